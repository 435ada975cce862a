//! SFT datasets: rows `{"prompt", "completion"}` or `{"messages"}` →
//! token ids with the position where the loss starts.

use std::path::Path;

use crate::data::error::DataError;
use crate::data::load::{process_rows, PairEncoder, RowOutcome};
use crate::data::report::DataReport;
use crate::data::rows::parse_sft_row;
use crate::data::settings::TokenizeSettings;
use crate::data::tokenizer::ModelTokenizer;
use crate::data::truncate::{fit_sft, Fitted};

/// One SFT sequence. Loss is taken on `input_ids[completion_start..]` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    pub input_ids: Vec<u32>,
    /// Index of the first completion token; always `< input_ids.len()`.
    pub completion_start: usize,
}

impl SftExample {
    pub fn prompt_ids(&self) -> &[u32] {
        &self.input_ids[..self.completion_start]
    }

    pub fn completion_ids(&self) -> &[u32] {
        &self.input_ids[self.completion_start..]
    }

    /// 1 for completion tokens, 0 for prompt tokens, aligned with `input_ids`.
    pub fn completion_mask(&self) -> Vec<u8> {
        (0..self.input_ids.len())
            .map(|i| u8::from(i >= self.completion_start))
            .collect()
    }
}

/// A tokenized SFT file with what happened to its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftDataset {
    /// The 1-based line of the data file each example came from (what
    /// per-example evaluation results are paired by).
    pub lines: Vec<usize>,
    pub examples: Vec<SftExample>,
    pub report: DataReport,
}

/// Reads and tokenizes an SFT JSONL file.
pub fn load_sft(
    path: &Path,
    tokenizer: &ModelTokenizer,
    settings: &TokenizeSettings,
) -> Result<SftDataset, DataError> {
    let encoder = PairEncoder::new(tokenizer, settings)?;
    let (examples, lines, report) = process_rows(path, settings, |map| {
        let row = parse_sft_row(map)?;
        let pair = encoder.encode(&row.prompt, &row.completion, "completion")?;
        // As TRL: the model sees the full prompt+completion tokenization and
        // the loss starts where it diverges from the prompt's tokens.
        let (prompt, completion) = pair.full_ids.split_at(pair.completion_start());
        let boundary_mismatch = !pair.prompt_is_prefix();
        let (fitted, truncated) =
            match fit_sft(prompt, completion, settings.seq_len, settings.overlong) {
                Fitted::Unchanged(kept) => (kept, false),
                Fitted::Truncated(kept) => (kept, true),
                Fitted::Dropped => return Ok(RowOutcome::Dropped),
            };
        let (prompt, completion) = fitted;
        let completion_start = prompt.len();
        let mut input_ids = prompt;
        input_ids.extend_from_slice(&completion);
        Ok(RowOutcome::Kept {
            example: SftExample {
                input_ids,
                completion_start,
            },
            truncated,
            boundary_mismatch,
        })
    })?;
    Ok(SftDataset {
        examples,
        lines,
        report,
    })
}
