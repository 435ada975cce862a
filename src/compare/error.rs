//! Why a comparison could not be made: a stage named wrong or not run yet
//! (the user's to fix), or the report could not be written.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{} has no training stages to compare", .recipe.display())]
    NoTrainingStages { recipe: PathBuf },
    #[error("no stage `{stage}` in {}", .recipe.display())]
    NoStage { stage: String, recipe: PathBuf },
    #[error("stage `{stage}` is a `{kind}` stage; compare takes sft and dpo stages")]
    NotTraining { stage: String, kind: String },
    #[error("stage `{stage}` has not run ({reason}); run `runner run {}` first", .recipe.display())]
    NotRun {
        stage: String,
        reason: String,
        recipe: PathBuf,
    },
    #[error("artifact of `{stage}` has no manifest")]
    NoManifest { stage: String },
    #[error("cannot rank by `{metric}`: expected one of {}", .known.join(", "))]
    UnknownMetric { metric: String, known: Vec<String> },
    #[error("`{selector}` matches no training stage of {}", .searched.join(", "))]
    NoMatch {
        selector: String,
        searched: Vec<String>,
    },
    #[error("no stages to compare")]
    Nothing,
    /// Writing a file of the report failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Drawing a chart failed.
    #[error("writing the report: {0:#}")]
    Chart(anyhow::Error),
}

impl CompareError {
    /// The report could not be written: not the recipe's or the command line's fault.
    pub fn is_environment(&self) -> bool {
        matches!(self, CompareError::Io { .. } | CompareError::Chart(_))
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
        let context = context.into();
        move |source| CompareError::Io { context, source }
    }
}
