//! Executors: where a planned stage runs. `in_process` runs the selected
//! stages here, one after another. The others run each stage the same way,
//! as `runner run RECIPE --only STAGE` on the same cache (`StageCommand`), so
//! a stage behaves identically wherever it runs: its own lock, checkpoints,
//! resume and atomic promotion. `parallel` runs ready stages as child
//! processes, N at a time (`--jobs`); `slurm` submits each as a batch job
//! with dependencies on its parents'.

pub mod in_process;
pub mod parallel;
pub mod share;
pub mod slurm;

use std::path::PathBuf;

use crate::graph::Dag;
use crate::plan::Plan;
use crate::recipe::Recipe;

/// Which stages to run.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Run only this stage (its inputs must be cached).
    pub only: Option<String>,
    /// Run this stage and what it depends on, nothing after.
    pub until: Option<String>,
}

/// How each stage ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Cached,
    Ran {
        artifact: String,
        seconds: f64,
    },
    Failed(String),
    /// Failed because the disk, the cache or the device did: a write found
    /// no space or was refused (README's exit code 3), not the stage's
    /// computation.
    Unwritable(String),
    /// Not run because an input failed or was not run.
    Blocked(String),
    Interrupted,
}

#[derive(Debug, Default)]
pub struct Report {
    /// (stage, outcome) in execution order.
    pub stages: Vec<(String, Outcome)>,
    /// Stages that finished here but whose upload to the remote failed (why).
    pub unpushed: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.stages.iter().any(|(_, o)| {
            matches!(
                o,
                Outcome::Failed(_) | Outcome::Unwritable(_) | Outcome::Blocked(_)
            )
        })
    }
    /// Whether a stage failed because a write did (the disk, the cache).
    pub fn unwritable(&self) -> bool {
        self.stages
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Unwritable(_)))
    }
    pub fn interrupted(&self) -> bool {
        self.stages.iter().any(|(_, o)| *o == Outcome::Interrupted)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("unknown stage `{0}`")]
    UnknownStage(String),
    #[error("--only {stage}: its input `{input}` is not cached; run `runner run --until {stage}` instead")]
    InputNotCached { stage: String, input: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The remote cache failed (reading or writing).
    #[error("{0}")]
    Remote(String),
}

/// Stage indices selected to run, in plan order.
pub fn select(
    recipe: &Recipe,
    dag: &Dag,
    plan: &Plan,
    selection: &Selection,
) -> Result<Vec<usize>, ExecError> {
    let index_of = |name: &str| {
        recipe
            .stages
            .iter()
            .position(|s| s.name.value == name)
            .ok_or_else(|| ExecError::UnknownStage(name.to_string()))
    };
    let mut chosen: Vec<usize> = plan.stages.iter().map(|s| s.index).collect();
    if let Some(until) = &selection.until {
        let keep = dag.ancestors_and_self(index_of(until)?);
        chosen.retain(|i| keep.contains(i));
    }
    if let Some(only) = &selection.only {
        let i = index_of(only)?;
        let mut local = Vec::new();
        for (_, d) in dag.deps(i) {
            if !plan.by_index(d).status.will_run() {
                continue;
            }
            // An input no cache shares (a base read from a file here) is
            // made here first: a job with a cache of its own cannot get it
            // from anywhere else, and it costs a copy or a reference.
            let input = &recipe.stages[d];
            let from_inputs_at_hand = dag
                .deps(d)
                .iter()
                .all(|(_, dd)| !plan.by_index(*dd).status.will_run());
            if !input.kind.shared(input.params.as_ref()) && from_inputs_at_hand {
                local.push(d);
                continue;
            }
            return Err(ExecError::InputNotCached {
                stage: only.clone(),
                input: input.name.value.clone(),
            });
        }
        chosen.retain(|&c| c == i || local.contains(&c));
    }
    Ok(chosen)
}

/// The command line that runs one stage of a recipe in another process.
#[derive(Clone, Debug)]
pub struct StageCommand {
    /// The `runner` binary.
    pub program: PathBuf,
    pub cache: PathBuf,
    pub recipe: PathBuf,
    pub stage: String,
    /// Compute threads of the stage (part of what makes results bit-identical).
    pub threads: usize,
    /// `--device`, when one is to be passed on.
    pub device: Option<String>,
    /// The stage was forced with `--force`.
    pub force: bool,
    /// `--ignore-memory-check` was given: the child runs the stage too.
    pub ignore_memory_check: bool,
    /// TensorBoard's log folder (the recipe's `[tracking]` or `--tensorboard`).
    pub tensorboard: Option<PathBuf>,
    /// The MLflow server (the recipe's `[tracking]` or `--mlflow`).
    pub mlflow: Option<String>,
    /// The remote cache the parent uses, passed on as `--remote URL`, or
    /// `--no-remote` when it uses none: the stage's process decides as
    /// the parent did, whatever its environment says.
    pub remote: Option<String>,
}

impl StageCommand {
    /// Arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--cache".to_string(),
            self.cache.display().to_string(),
            "--threads".to_string(),
            self.threads.to_string(),
        ];
        if let Some(d) = &self.device {
            args.extend(["--device".to_string(), d.clone()]);
        }
        match &self.remote {
            Some(url) => args.extend(["--remote".to_string(), url.clone()]),
            None => args.push("--no-remote".to_string()),
        }
        args.extend([
            "run".to_string(),
            self.recipe.display().to_string(),
            "--only".to_string(),
            self.stage.clone(),
        ]);
        if self.force {
            args.extend(["--force".to_string(), self.stage.clone()]);
        }
        if self.ignore_memory_check {
            args.push("--ignore-memory-check".to_string());
        }
        if let Some(dir) = &self.tensorboard {
            args.extend(["--tensorboard".to_string(), dir.display().to_string()]);
        }
        if let Some(uri) = &self.mlflow {
            args.extend(["--mlflow".to_string(), uri.clone()]);
        }
        args
    }
}

/// Where a submitted stage is, as its scheduler reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting (the scheduler's reason: `Dependency`, `Resources`, ...).
    Pending(String),
    Running,
    Completed,
    /// Ended without success (`FAILED`, `CANCELLED`, `TIMEOUT`, ...): the
    /// state and reason as the scheduler gives them.
    Failed(String),
    /// Waiting for an input that failed: it will never start.
    Never(String),
    /// The scheduler no longer knows the job.
    Unknown,
}

impl JobState {
    /// Queued or running: submitting the stage again would run it twice.
    pub fn active(&self) -> bool {
        matches!(self, JobState::Pending(_) | JobState::Running)
    }

    pub fn label(&self) -> String {
        match self {
            JobState::Pending(why) if why.is_empty() || why == "None" => "PENDING".into(),
            JobState::Pending(why) => format!("PENDING ({why})"),
            JobState::Running => "RUNNING".into(),
            JobState::Completed => "COMPLETED".into(),
            JobState::Failed(what) => what.clone(),
            JobState::Never(why) => format!("NEVER STARTS ({why})"),
            JobState::Unknown => "gone from the queue".into(),
        }
    }
}

/// A scheduler that runs stage commands as jobs: the whole interface a
/// cluster executor implements (Slurm now; a Kubernetes Job one could follow).
pub trait Executor {
    /// Submit `command` to start after the jobs `after` succeed; its output goes to `output`.
    fn submit(
        &self,
        name: &str,
        command: &StageCommand,
        after: &[String],
        settings: &crate::recipe::executor::SlurmSettings,
        output: &std::path::Path,
    ) -> anyhow::Result<String>;
    /// The state of each job id (ids the scheduler forgot are `Unknown`).
    fn state(&self, ids: &[String])
        -> anyhow::Result<std::collections::BTreeMap<String, JobState>>;
    fn cancel(&self, ids: &[String]) -> anyhow::Result<()>;
}

/// An error and its causes on one line, each cause once: a cause whose
/// text the line already holds (as wrappers that quote their source do)
/// is not repeated.
pub fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Whether a stage's error is the machine's rather than the stage's: a
/// write that found no space, hit a quota or a file-size limit, or a
/// read-only file system, anywhere in the error's chain.
pub fn is_unwritable(error: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    error.chain().any(|cause| {
        // Wrapping errors (the model's, candle's) expose theirs as sources.
        let io = cause.downcast_ref::<std::io::Error>();
        io.is_some_and(|e| {
            matches!(
                e.kind(),
                ErrorKind::StorageFull
                    | ErrorKind::QuotaExceeded
                    | ErrorKind::FileTooLarge
                    | ErrorKind::ReadOnlyFilesystem
            )
        })
    })
}
