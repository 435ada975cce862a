//! Content hashes of inputs and artifacts, with a memo so that big inputs
//! are not re-read on every plan: (device, inode, size, mtime, ctime) of a
//! file -> its blake3, as DVC's state database does.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Hex blake3 digest.
pub type Digest = String;

/// What identifies a file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct MemoEntry {
    path: PathBuf,
    stamp: Stamp,
    hash: Digest,
}

/// Hash of a folder: every file's relative path and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeDigest {
    pub hash: Digest,
    /// Relative path -> file hash.
    pub files: BTreeMap<String, Digest>,
}

/// Hashes files, remembering results in `memo_dir`.
#[derive(Clone, Debug)]
pub struct Hasher {
    memo_dir: PathBuf,
}

impl Hasher {
    pub fn new(memo_dir: PathBuf) -> Self {
        Hasher { memo_dir }
    }

    fn memo_path(&self, path: &Path) -> PathBuf {
        let id = blake3::hash(path.as_os_str().as_encoded_bytes());
        self.memo_dir.join(&id.to_hex()[..32])
    }

    /// blake3 of one file's bytes; from the memo when the file's stamp is unchanged.
    pub fn file(&self, path: &Path) -> std::io::Result<Digest> {
        let path = std::path::absolute(path)?;
        let meta = std::fs::metadata(&path)?;
        let stamp = Stamp::of(&meta);
        let memo = self.memo_path(&path);
        if let Ok(bytes) = std::fs::read(&memo) {
            if let Ok(entry) = serde_json::from_slice::<MemoEntry>(&bytes) {
                if entry.path == path && entry.stamp == stamp {
                    return Ok(entry.hash);
                }
            }
        }
        let hash = hash_file(&path, meta.len())?;
        self.remember(&path, stamp, &hash);
        Ok(hash)
    }

    /// Record a hash known to be right (e.g. of a file just written) so it is not re-read.
    pub fn seed(&self, path: &Path, hash: &Digest) -> std::io::Result<()> {
        let path = std::path::absolute(path)?;
        let meta = std::fs::metadata(&path)?;
        self.remember(&path, Stamp::of(&meta), hash);
        Ok(())
    }

    fn remember(&self, path: &Path, stamp: Stamp, hash: &Digest) {
        let entry = MemoEntry {
            path: path.to_path_buf(),
            stamp,
            hash: hash.clone(),
        };
        // The memo is only a shortcut: failing to write it costs a re-hash later, nothing more.
        if let Ok(bytes) = serde_json::to_vec(&entry) {
            let _ = fsutil::write_atomic(&self.memo_path(path), &bytes);
        }
    }

    /// Hash of a folder's files (hidden entries and `exclude`d top-level names left out).
    pub fn tree(&self, dir: &Path, exclude: &[&str]) -> std::io::Result<TreeDigest> {
        let files = payload_files(dir, exclude)?;
        let hashed: Vec<(String, Digest)> = files
            .par_iter()
            .map(|f| {
                let rel = f
                    .strip_prefix(dir)
                    .expect("files are below their folder")
                    .to_string_lossy()
                    .into_owned();
                self.file(f).map(|h| (rel, h))
            })
            .collect::<Result<_, _>>()?;
        let files: BTreeMap<String, Digest> = hashed.into_iter().collect();
        Ok(TreeDigest {
            hash: tree_hash(&files),
            files,
        })
    }

    /// A file's hash, or a folder's tree hash.
    pub fn path(&self, path: &Path) -> std::io::Result<TreeDigest> {
        if path.is_dir() {
            self.tree(path, &[])
        } else {
            let hash = self.file(path)?;
            let name = crate::fsutil::file_name(path);
            Ok(TreeDigest {
                hash: hash.clone(),
                files: BTreeMap::from([(name, hash)]),
            })
        }
    }
}

/// The canonical hash of a set of (relative path, file hash).
pub fn tree_hash(files: &BTreeMap<String, Digest>) -> Digest {
    let mut h = blake3::Hasher::new();
    for (rel, hash) in files {
        h.update(rel.as_bytes());
        h.update(b"\0");
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

fn hash_file(path: &Path, len: u64) -> std::io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    // mmap + rayon pays off on big files; small ones are cheaper to read.
    if len > 1 << 20 {
        h.update_mmap_rayon(path)?;
    } else {
        h.update(&std::fs::read(path)?);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Every regular file below `dir` (following links, as model folders from a
/// hub cache are links), skipping hidden entries and top-level `exclude` names.
pub fn payload_files(dir: &Path, exclude: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, dir, exclude, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(root: &Path, dir: &Path, exclude: &[&str], out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || (dir == root && exclude.contains(&name.as_ref())) {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            walk(root, &path, exclude, out)?;
        } else if meta.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// JSON with object keys sorted at every level and no whitespace, so the
/// encoding depends only on the values (not on key order or formatting).
pub fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let body: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical_json(v)))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(items) => {
            let body: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", body.join(","))
        }
        other => other.to_string(),
    }
}

/// The key of a derived artifact (tokenized data, reference log-probs): the
/// blake3 of the canonical JSON of everything it depends on, 32 hex digits.
pub fn derived_key(inputs: &serde_json::Value) -> String {
    blake3::hash(canonical_json(inputs).as_bytes()).to_hex()[..32].to_string()
}
