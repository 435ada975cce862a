//! Error type for the model side. Every variant that concerns a file or a
//! tensor names it, so a user can act on the message without a debugger.

use crate::model::family::Architecture;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: unknown architecture: model_type {model_type:?} (architectures {architectures:?}); supported: {}", Architecture::supported())]
    UnknownArchitecture {
        file: PathBuf,
        model_type: String,
        architectures: Vec<String>,
    },
    #[error("{file}: {message}")]
    Config { file: PathBuf, message: String },
    #[error("tensor {tensor:?} is missing from {file}")]
    MissingTensor { tensor: String, file: PathBuf },
    #[error("tensor {tensor:?} in {file} has shape {actual:?}, expected {expected:?}")]
    MisshapenTensor {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{file}: unsupported adapter setting: {message}")]
    UnsupportedAdapter { file: PathBuf, message: String },
    #[error("invalid LoRA configuration: {0}")]
    LoraConfig(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{}", io_message(path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tokenizer error: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn config(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Config {
            file: file.into(),
            message: message.into(),
        }
    }
}

/// "<file>: <why>", unless the I/O error already names the file (the
/// cache's atomic writes do).
fn io_message(path: &std::path::Path, source: &std::io::Error) -> String {
    let why = source.to_string();
    let file = path.display().to_string();
    match why.contains(&file) {
        true => why,
        false => format!("{file}: {why}"),
    }
}
