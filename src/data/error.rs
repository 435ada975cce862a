//! Error types of the data layer.
//!
//! Row-level problems carry the file and 1-based line so a user can jump
//! straight to the offending row; `Display` reads like a compiler message:
//! `data/sft.jsonl:12: missing field "completion"`.

use std::path::PathBuf;

/// What is wrong with one JSONL row. Wrapped in [`DataError::Row`] with the
/// file and line; under `BadRows::Skip` it is only counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("line is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("expected a JSON object")]
    NotAnObject,
    #[error("missing field \"{0}\"")]
    MissingField(String),
    #[error("field \"{field}\": expected {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("field \"{0}\" is empty")]
    EmptyField(String),
    #[error("field \"{field}\": {reason}")]
    InvalidField { field: String, reason: String },
    #[error("\"chosen\" and \"rejected\" are identical")]
    ChosenEqualsRejected,
    #[error("chat template: {0}")]
    TemplateRender(String),
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Every error the data layer returns.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The cause is in the message, so it is not also a `source` (which
    // `{:#}` would print a second time).
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}:{line}: {kind}", path.display())]
    Row {
        path: PathBuf,
        line: usize,
        kind: RowError,
    },
    #[error("{}: file has no rows", path.display())]
    EmptyFile { path: PathBuf },
    #[error("{}: no usable rows ({read} read, {dropped} dropped as over-long, {skipped} skipped as malformed)", path.display())]
    NoExamples {
        path: PathBuf,
        read: usize,
        dropped: usize,
        skipped: usize,
    },
    #[error(
        "{}:{line}: row uses chat messages but the model has no chat template; \
         set an explicit chat format in the recipe (built-in: {builtins})",
        path.display()
    )]
    NoChatTemplate {
        path: PathBuf,
        line: usize,
        builtins: String,
    },
    #[error("unknown chat format \"{name}\" (built-in formats: {builtins})")]
    UnknownChatFormat { name: String, builtins: String },
    #[error("invalid chat template ({origin}): {message}")]
    InvalidTemplate { origin: String, message: String },
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{}: invalid tokenizer config: {message}", path.display())]
    TokenizerConfig { path: PathBuf, message: String },
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("{}: corrupt tokenized dataset: {reason}", dir.display())]
    CorruptCache { dir: PathBuf, reason: String },
    #[error("batching: {0}")]
    Batch(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            error: source,
        }
    }
}
