//! File writing helpers: every file is written to a temporary sibling,
//! fsynced and renamed, so a crash never leaves a half-written file behind.

use crate::model::error::{ModelError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ModelError::Input(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| ModelError::io(&tmp, e))?;
        f.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
        // Persist the rename itself; not every filesystem allows opening a
        // directory, so this part is best effort.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    text.push('\n');
    write_file_atomic(path, text.as_bytes())
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Serializes named tensors to safetensors bytes (sorted by name, so the same
/// tensors always give the same bytes) with the `{"format": "pt"}` metadata
/// that transformers and PEFT expect, and writes them atomically.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
) -> Result<()> {
    let mut sorted: Vec<(&String, &candle_core::Tensor)> =
        tensors.iter().map(|(n, t)| (n, t)).collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut contiguous = Vec::with_capacity(sorted.len());
    for (name, t) in sorted {
        contiguous.push((name.clone(), t.contiguous()?));
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let bytes =
        safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), metadata)
            .map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_file_atomic(path, &bytes)
}
