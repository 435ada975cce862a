//! Tokenized datasets stored in a compact binary form, for the engine's
//! cache.
//!
//! A dataset directory holds three files:
//! - `tokens.bin`: every token id, little-endian u32, examples back to back;
//! - `lengths.bin`: little-endian u32 per example — SFT: `len,
//!   completion_start, line`; DPO: `prompt_len, chosen_len, rejected_len,
//!   line` (`line`: the example's 1-based line in the data file);
//! - `header.json`: format version, kind, counts and the [`DataReport`].
//!
//! Each file is written to a temp file, fsynced and renamed; the header goes
//! last, so a directory with a header is complete.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::dpo::{DpoDataset, DpoExample};
use crate::data::error::DataError;
use crate::data::report::DataReport;
use crate::data::settings::DatasetKind;
use crate::data::sft::{SftDataset, SftExample};

/// Bumped whenever the file layout changes.
pub const FORMAT_VERSION: u32 = 2;

const HEADER_FILE: &str = "header.json";
const TOKENS_FILE: &str = "tokens.bin";
const LENGTHS_FILE: &str = "lengths.bin";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format_version: u32,
    kind: DatasetKind,
    examples: usize,
    tokens: usize,
    report: DataReport,
}

impl SftDataset {
    /// Writes the dataset into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let mut tokens = Vec::new();
        let mut lengths = Vec::with_capacity(self.examples.len() * 3);
        for (example, line) in self.examples.iter().zip(&self.lines) {
            tokens.extend_from_slice(&example.input_ids);
            lengths.push(example.input_ids.len());
            lengths.push(example.completion_start);
            lengths.push(*line);
        }
        write_dataset(
            dir,
            DatasetKind::Sft,
            self.examples.len(),
            &tokens,
            &lengths,
            &self.report,
        )
    }

    /// Reads a dataset written by [`SftDataset::write`], checking its layout.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let (header, tokens, lengths) = read_dataset(dir, DatasetKind::Sft, 3)?;
        let mut pieces = Pieces::new(dir, &tokens);
        let mut examples = Vec::with_capacity(header.examples);
        let mut lines = Vec::with_capacity(header.examples);
        for record in lengths.chunks_exact(3) {
            let (len, completion_start) = (record[0], record[1]);
            lines.push(record[2]);
            if completion_start >= len {
                return Err(corrupt(dir, "completion_start past the end of an example"));
            }
            examples.push(SftExample {
                input_ids: pieces.take(len)?,
                completion_start,
            });
        }
        pieces.finish()?;
        Ok(SftDataset {
            examples,
            lines,
            report: header.report,
        })
    }
}

impl DpoDataset {
    /// Writes the dataset into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let mut tokens = Vec::new();
        let mut lengths = Vec::with_capacity(self.examples.len() * 4);
        for (example, line) in self.examples.iter().zip(&self.lines) {
            for ids in [
                &example.prompt_ids,
                &example.chosen_ids,
                &example.rejected_ids,
            ] {
                tokens.extend_from_slice(ids);
                lengths.push(ids.len());
            }
            lengths.push(*line);
        }
        write_dataset(
            dir,
            DatasetKind::Dpo,
            self.examples.len(),
            &tokens,
            &lengths,
            &self.report,
        )
    }

    /// Reads a dataset written by [`DpoDataset::write`], checking its layout.
    pub fn read(dir: &Path) -> Result<Self, DataError> {
        let (header, tokens, lengths) = read_dataset(dir, DatasetKind::Dpo, 4)?;
        let mut pieces = Pieces::new(dir, &tokens);
        let mut examples = Vec::with_capacity(header.examples);
        let mut lines = Vec::with_capacity(header.examples);
        for record in lengths.chunks_exact(4) {
            lines.push(record[3]);
            examples.push(DpoExample {
                prompt_ids: pieces.take(record[0])?,
                chosen_ids: pieces.take(record[1])?,
                rejected_ids: pieces.take(record[2])?,
            });
        }
        pieces.finish()?;
        Ok(DpoDataset {
            examples,
            lines,
            report: header.report,
        })
    }
}

/// Hands out consecutive runs of the token array.
struct Pieces<'a> {
    dir: &'a Path,
    tokens: &'a [u32],
    at: usize,
}

impl<'a> Pieces<'a> {
    fn new(dir: &'a Path, tokens: &'a [u32]) -> Self {
        Pieces { dir, tokens, at: 0 }
    }

    fn take(&mut self, len: usize) -> Result<Vec<u32>, DataError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.tokens.len())
            .ok_or_else(|| corrupt(self.dir, "lengths exceed the token array"))?;
        let piece = self.tokens[self.at..end].to_vec();
        self.at = end;
        Ok(piece)
    }

    fn finish(self) -> Result<(), DataError> {
        if self.at != self.tokens.len() {
            return Err(corrupt(self.dir, "token array longer than the lengths say"));
        }
        Ok(())
    }
}

fn write_dataset(
    dir: &Path,
    kind: DatasetKind,
    examples: usize,
    tokens: &[u32],
    lengths: &[usize],
    report: &DataReport,
) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let lengths = lengths
        .iter()
        .map(|&n| {
            u32::try_from(n).map_err(|_| DataError::Settings("sequence longer than u32".into()))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    write_atomic(&dir.join(TOKENS_FILE), &u32s_to_le_bytes(tokens))?;
    write_atomic(&dir.join(LENGTHS_FILE), &u32s_to_le_bytes(&lengths))?;
    let header = Header {
        format_version: FORMAT_VERSION,
        kind,
        examples,
        tokens: tokens.len(),
        report: report.clone(),
    };
    let header = serde_json::to_vec_pretty(&header).expect("header serializes");
    write_atomic(&dir.join(HEADER_FILE), &header)?;
    sync_dir(dir)
}

/// Returns the header, the tokens and the lengths as usize.
fn read_dataset(
    dir: &Path,
    kind: DatasetKind,
    lengths_per_example: usize,
) -> Result<(Header, Vec<u32>, Vec<usize>), DataError> {
    let header_path = dir.join(HEADER_FILE);
    let header_bytes = std::fs::read(&header_path).map_err(|e| DataError::io(&header_path, e))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| corrupt(dir, &format!("{HEADER_FILE}: {e}")))?;
    if header.format_version != FORMAT_VERSION {
        return Err(corrupt(
            dir,
            &format!(
                "format version {} (expected {FORMAT_VERSION})",
                header.format_version
            ),
        ));
    }
    if header.kind != kind {
        return Err(corrupt(
            dir,
            &format!("holds a {:?} dataset, not {kind:?}", header.kind),
        ));
    }
    let tokens = read_u32s(dir, TOKENS_FILE)?;
    let lengths = read_u32s(dir, LENGTHS_FILE)?;
    if tokens.len() != header.tokens {
        return Err(corrupt(dir, "token count differs from the header"));
    }
    if Some(lengths.len()) != header.examples.checked_mul(lengths_per_example) {
        return Err(corrupt(dir, "example count differs from the header"));
    }
    let lengths = lengths.into_iter().map(|n| n as usize).collect();
    Ok((header, tokens, lengths))
}

fn read_u32s(dir: &Path, name: &str) -> Result<Vec<u32>, DataError> {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
    if bytes.len() % 4 != 0 {
        return Err(corrupt(
            dir,
            &format!("{name}: size is not a multiple of 4"),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn u32s_to_le_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Temp file in the same directory + fsync + rename, so readers never see
/// a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let mut temp = PathBuf::from(path);
    temp.set_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        DataError::io(path, e)
    })
}

/// Makes the renames durable. Opening a directory for fsync is not
/// possible everywhere (Windows), so failure to open is ignored.
fn sync_dir(dir: &Path) -> Result<(), DataError> {
    if let Ok(handle) = File::open(dir) {
        handle.sync_all().or_else(|e| {
            if cfg!(unix) {
                Err(DataError::io(dir, e))
            } else {
                Ok(())
            }
        })?;
    }
    Ok(())
}

fn corrupt(dir: &Path, reason: &str) -> DataError {
    DataError::CorruptCache {
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}
