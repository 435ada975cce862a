//! The model's file helpers with `ModelError`s naming the file: writes go
//! through `crate::fsutil` (temp file, fsync, rename, fsync of the folder),
//! so a crash never leaves a half-written file behind.

use crate::fsutil;
use crate::model::error::{ModelError, Result};
use std::path::Path;

/// Writes `bytes` to `path` atomically.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fsutil::write_atomic(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// Writes `value` as pretty JSON (trailing newline) atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    fsutil::write_json_atomic(path, value).map_err(|e| ModelError::io(path, e))
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
