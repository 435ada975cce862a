//! Every way a `runner` command can end other than "done", with its exit
//! code. The engine's typed errors arrive here whole and are rendered once.

use std::path::PathBuf;

use crate::diag::RecipeError;

/// Exit codes, stable for scripts (also in README and `--help`).
pub mod exit {
    /// Everything asked for is done.
    pub const OK: i32 = 0;
    /// A stage failed (others may have finished and stay cached).
    pub const STAGE_FAILED: i32 = 1;
    /// The recipe or the command line is wrong; nothing ran.
    pub const USAGE: i32 = 2;
    /// The cache, a file or the environment (the device) failed: not the recipe's fault.
    pub const ENVIRONMENT: i32 = 3;
    /// Interrupted with Ctrl-C; finished stages stay cached, a training stage checkpointed.
    pub const INTERRUPTED: i32 = 130;
}

/// Why a command did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe has problems; rendered with the lines they point at.
    #[error("{0}")]
    Recipe(#[from] RecipeError),
    /// The recipe file itself cannot be read.
    #[error("cannot read recipe {path}: {source}")]
    RecipeUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The command line names something that is not there, or asks for what cannot be done yet.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing the cache or another file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A failure outside the recipe: exporting, writing a report, the device.
    #[error("{context}: {source:#}")]
    Environment {
        context: String,
        source: anyhow::Error,
    },
    /// One or more stages failed; each was reported as it failed.
    #[error("a stage failed")]
    StageFailed,
    /// Ctrl-C; running stages checkpointed.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Recipe(_) | Error::RecipeUnreadable { .. } | Error::Usage(_) => exit::USAGE,
            Error::Io { .. } | Error::Environment { .. } => exit::ENVIRONMENT,
            Error::StageFailed => exit::STAGE_FAILED,
            Error::Interrupted => exit::INTERRUPTED,
        }
    }

    /// What to print on stderr; nothing for errors already reported as they happened.
    pub fn render(&self, color: bool) -> Option<String> {
        match self {
            Error::Recipe(e) => Some(e.render(color)),
            Error::StageFailed | Error::Interrupted => None,
            other => Some(format!("error: {other}\n")),
        }
    }

    /// An I/O error, saying what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Any other failure outside the recipe, saying what was being done.
    pub fn environment(context: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
        let context = context.into();
        move |source| Error::Environment { context, source }
    }
}
