//! Every way a `runner` command can end other than "done", with its exit
//! code. The engine's typed errors arrive here whole and are rendered once.

use std::path::PathBuf;

use crate::compare::CompareError;
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
    /// The command line names a stage the recipe does not have.
    #[error("no stage `{stage}` in {}", .recipe.display())]
    NoStage { stage: String, recipe: PathBuf },
    /// The command line names a swept stage where one variant is wanted.
    #[error("`{stage}` is swept in {}: name one variant ({})", .recipe.display(), .variants.join(", "))]
    Swept {
        stage: String,
        recipe: PathBuf,
        variants: Vec<String>,
    },
    /// The command needs a stage's artifact, which is not in the cache.
    #[error("stage `{stage}` has no cached artifact ({reason}); run `runner run {} --until {stage}` first", .recipe.display())]
    NotCached {
        stage: String,
        reason: String,
        recipe: PathBuf,
    },
    /// `--only`/`--until` name a stage wrong, or `--only` a stage whose inputs are not cached.
    #[error("{0}")]
    Select(crate::executor::ExecError),
    /// `show` of a stage that has no artifact yet.
    #[error("{0}")]
    NotShown(crate::plan::render::ShowError),
    /// The stages to compare are named wrong, not run yet, or the report could not be written.
    #[error("{0}")]
    Compare(#[from] CompareError),
    /// The command line names something else that is not there, or asks for what cannot be done yet.
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
    /// The remote cache: its settings are wrong (usage) or it failed.
    #[error("{context}: {source}{}", if matches!(source, crate::remote::RemoteError::Request { .. }) { " (--no-remote: use the local cache only)" } else { "" })]
    Remote {
        context: String,
        source: crate::remote::RemoteError,
    },
    /// One or more stages failed; each was reported as it failed.
    #[error("a stage failed")]
    StageFailed,
    /// A stage failed because a write did (no space, a quota, a read-only
    /// disk): the machine's failure, reported with the file as it failed.
    #[error("a stage could not write its results (the disk or the cache failed, not the stage)")]
    StageUnwritable,
    /// Stages finished here but could not be uploaded to the remote cache
    /// (each reported as it failed): the cache failed, not the stages.
    #[error(
        "{0} stage(s) finished here but their upload to the remote failed; `runner push` retries"
    )]
    Unpushed(usize),
    /// Ctrl-C; running stages checkpointed.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Compare(e) if e.is_environment() => exit::ENVIRONMENT,
            Error::Remote {
                source: crate::remote::RemoteError::Config(_),
                ..
            } => exit::USAGE,
            Error::Remote { .. } => exit::ENVIRONMENT,
            Error::Recipe(_)
            | Error::RecipeUnreadable { .. }
            | Error::NoStage { .. }
            | Error::Swept { .. }
            | Error::NotCached { .. }
            | Error::Compare(_)
            | Error::Select(_)
            | Error::NotShown(_)
            | Error::Usage(_) => exit::USAGE,
            Error::Io { .. } | Error::Environment { .. } => exit::ENVIRONMENT,
            Error::StageFailed => exit::STAGE_FAILED,
            Error::StageUnwritable | Error::Unpushed(_) => exit::ENVIRONMENT,
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

    pub fn no_stage(stage: &str, recipe: &std::path::Path) -> Error {
        Error::NoStage {
            stage: stage.to_string(),
            recipe: recipe.to_path_buf(),
        }
    }

    /// An I/O error, saying what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// A remote cache's failure, saying what was being done.
    pub fn remote(context: impl Into<String>) -> impl FnOnce(crate::remote::RemoteError) -> Error {
        let context = context.into();
        move |source| Error::Remote { context, source }
    }

    /// Any other failure outside the recipe, saying what was being done.
    pub fn environment(context: impl Into<String>) -> impl FnOnce(anyhow::Error) -> Error {
        let context = context.into();
        move |source| Error::Environment { context, source }
    }
}
