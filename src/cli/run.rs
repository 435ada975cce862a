//! `runner run`: the plan carried out here (one stage at a time, or child
//! processes with `--jobs`) or by Slurm, then the schemes compared.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::context::{exec_error, Checked};
use super::{process, Context, Error};
use crate::cache::Cache;
use crate::executor::{self, in_process, parallel, slurm, Outcome, Report, Selection};
use crate::plan::Plan;
use crate::progress::Reporter;
use crate::recipe::Recipe;
use crate::stage::DeviceSpec;

/// Where `runner run` runs stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    /// Rerun this stage even if cached (repeatable); a swept stage's own
    /// name forces every variant of it.
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Run only this stage; its inputs must be cached.
    #[arg(long, value_name = "STAGE", conflicts_with = "until")]
    only: Option<String>,
    /// Run this stage and its inputs, nothing after it.
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    /// Run up to N ready stages at once, each in its own process with its
    /// share of the threads (--threads each; default: cores / N). Results
    /// are byte-identical to --jobs 1 at the same --threads.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    jobs: u32,
    /// With --jobs: one device per job slot, e.g. cuda:0,cuda:1.
    #[arg(long, value_name = "DEVICES", value_delimiter = ',')]
    devices: Vec<DeviceSpec>,
    /// Where stages run: `local` (here), or `slurm`: one sbatch job per stage
    /// not cached, after its parents' jobs, on the same cache (which must be on
    /// storage every node sees). Settings: [executor.slurm] in the recipe.
    #[arg(long, value_enum, default_value_t = ExecutorKind::Local)]
    executor: ExecutorKind,
    /// With --executor slurm: follow the jobs to the end, with the exit codes
    /// of a local run (Ctrl-C stops waiting; the jobs go on).
    #[arg(long)]
    wait: bool,
    /// Run a stage even when its memory estimate exceeds this machine's
    /// memory (the smaller of physical memory and the cgroup limit, or
    /// RUNNER_MACHINE_MEMORY), or, for a stage on a GPU, the GPU's
    /// (nvidia-smi's, or RUNNER_DEVICE_MEMORY); it is refused otherwise.
    #[arg(long)]
    ignore_memory_check: bool,
    /// Log every training stage's metrics live to TensorBoard event files
    /// under DIR (`DIR/<recipe>/<stage>/`), with the stage's parameters as
    /// hyperparameters: `tensorboard --logdir DIR`. Overrides the recipe's
    /// `[tracking] tensorboard`; changes no stage key.
    #[arg(long, value_name = "DIR", env = "RUNNER_TENSORBOARD")]
    tensorboard: Option<PathBuf>,
    /// Log every training stage to an MLflow tracking server: one run per
    /// stage (`recipe/stage`) in the experiment MLFLOW_EXPERIMENT_NAME (else
    /// the recipe's name), its parameters as params, each step's metrics,
    /// FINISHED or FAILED at the end; credentials from MLFLOW_TRACKING_TOKEN
    /// or MLFLOW_TRACKING_USERNAME/PASSWORD. A server that is down is
    /// warned of and dropped; it never fails or slows a stage.
    #[arg(long, value_name = "URI", env = "MLFLOW_TRACKING_URI")]
    mlflow: Option<String>,
}

/// Everything an executor is handed.
struct Work<'a> {
    recipe: &'a Recipe,
    cache: &'a Cache,
    plan: &'a Plan,
    selected: &'a [usize],
    force: &'a [String],
    reporter: &'a dyn Reporter,
    interrupt: &'a AtomicBool,
    /// This binary, for stage processes.
    program: PathBuf,
    /// `--threads` and `--device` as given, passed on to stage processes.
    threads: Option<usize>,
    device: Option<String>,
}

pub fn run(ctx: &Context, args: &RunArgs) -> Result<(), Error> {
    let mut checked = ctx.check(&args.recipe)?;
    if let Some(dir) = &args.tensorboard {
        let dir = std::path::absolute(dir).map_err(Error::io(format!(
            "resolving --tensorboard {}",
            dir.display()
        )))?;
        checked.recipe.tensorboard = Some(dir);
    }
    if let Some(uri) = &args.mlflow {
        checked.recipe.mlflow = Some(uri.clone());
    }
    let force = super::context::named_stages(&checked, &args.recipe, &args.force)?;
    for name in args.only.iter().chain(&args.until) {
        one_stage(&checked, &args.recipe, name)?;
    }
    let cache = ctx.open_cache_for(Some(&checked.recipe))?;
    let mut plan = ctx.plan(&checked, &cache, &force)?;
    let selection = Selection {
        only: args.only.clone(),
        until: args.until.clone(),
    };
    let wanted = ctx
        .device
        .clone()
        .unwrap_or_else(|| checked.recipe.header.device.value.clone());
    eprintln!(
        "[runner] device: {} (asked: {})",
        String::from(plan.device.clone()),
        String::from(wanted)
    );
    let selected =
        executor::select(&checked.recipe, &checked.dag, &plan, &selection).map_err(exec_error)?;
    // A Slurm job's node is not this machine: its `--mem` is the limit there.
    if args.executor != ExecutorKind::Slurm {
        ctx.check_memory(&checked, &plan, Some(&selected), args.ignore_memory_check)?;
    }
    let interrupt = process::install_interrupt();
    let reporter = crate::progress::reporter();
    // Slurm jobs pull their own inputs where they run.
    if args.executor != ExecutorKind::Slurm {
        executor::share::pull_needed(
            &checked.recipe,
            &cache,
            &mut plan,
            &selected,
            reporter.as_ref(),
            &interrupt,
        )
        .map_err(exec_error)?;
    }
    let work = Work {
        recipe: &checked.recipe,
        cache: &cache,
        plan: &plan,
        selected: &selected,
        force: &force,
        reporter: reporter.as_ref(),
        interrupt: &interrupt,
        program: std::env::current_exe()
            .map_err(Error::io("finding the runner binary for stage processes"))?,
        threads: ctx.threads,
        device: ctx.device.clone().map(String::from),
    };
    let outcome = match args.executor {
        ExecutorKind::Slurm => match on_slurm(&work, args)? {
            Some(outcome) => outcome,
            None => return Ok(()),
        },
        ExecutorKind::Local if args.jobs > 1 || !args.devices.is_empty() => {
            in_parallel(&work, args)?
        }
        ExecutorKind::Local => in_process::execute(
            work.recipe,
            work.cache,
            work.plan,
            work.selected,
            work.reporter,
            work.interrupt,
        )
        .map_err(exec_error)?,
    };
    finish(&outcome, &interrupt)?;
    if selection.only.is_none() && selection.until.is_none() {
        compare_schemes(ctx, &checked, &cache);
    }
    Ok(())
}

/// `--only` and `--until` take one stage: a swept one by its variant.
fn one_stage(checked: &Checked, recipe: &Path, name: &str) -> Result<(), Error> {
    if checked.recipe.stage(name).is_some() {
        return Ok(());
    }
    let variants = checked.recipe.stages_named(name);
    if variants.is_empty() {
        return Err(Error::no_stage(name, recipe));
    }
    Err(Error::Swept {
        stage: name.to_string(),
        recipe: recipe.to_path_buf(),
        variants: variants.into_iter().map(str::to_string).collect(),
    })
}

/// One sbatch job per stage to run; with `wait`, followed to the end
/// (None: submitted, not followed).
fn on_slurm(work: &Work, args: &RunArgs) -> Result<Option<Report>, Error> {
    let wait = args.wait;
    let (reach, own_caches) = slurm::cache_reach(work.cache)
        .map_err(Error::environment("checking the cache for Slurm jobs"))?;
    eprintln!("[runner] slurm: {reach}");
    let submission = slurm::Submission {
        program: work.program.clone(),
        threads: work.threads,
        device: work.device.clone(),
        force: work.force,
        ignore_memory_check: args.ignore_memory_check,
        own_caches,
    };
    let submitted = slurm::submit(
        &slurm::Slurm,
        work.recipe,
        work.cache,
        work.plan,
        work.selected,
        &submission,
    )
    .map_err(Error::environment("submitting to Slurm"))?;
    let cached = work
        .plan
        .stages
        .iter()
        .filter(|p| work.selected.contains(&p.index) && !p.status.will_run())
        .count();
    for s in &submitted {
        let how = if s.fresh {
            "submitted"
        } else {
            "already queued"
        };
        eprintln!(
            "[runner] {}: job {} {how}; output {}",
            s.stage,
            s.id,
            s.output.display()
        );
    }
    let fresh = submitted.iter().filter(|s| s.fresh).count();
    eprintln!(
        "{fresh} job(s) submitted, {} already queued or running, {cached} stage(s) cached",
        submitted.len() - fresh
    );
    if !wait {
        return Ok(None);
    }
    slurm::wait(
        &slurm::Slurm,
        work.cache,
        &submitted,
        work.reporter,
        work.interrupt,
        std::time::Duration::from_secs(1),
    )
    .map(Some)
    .map_err(Error::environment("following the Slurm jobs"))
}

/// `--jobs N`: ready stages as child processes, each with its share of the threads.
fn in_parallel(work: &Work, args: &RunArgs) -> Result<Report, Error> {
    let jobs = args.jobs as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = work
        .threads
        .filter(|t| *t > 0)
        .unwrap_or((cores / jobs).max(1));
    let note = if jobs * threads > cores {
        " (more threads than cores: stages will slow each other down)"
    } else {
        ""
    };
    eprintln!("[runner] {jobs} jobs × {threads} thread(s) on {cores} core(s){note}");
    let settings = parallel::Parallel {
        jobs,
        threads,
        devices: args.devices.iter().cloned().map(String::from).collect(),
        device: work.device.clone(),
        program: work.program.clone(),
        force: work.force.to_vec(),
        // Stages on GPUs hold their estimate in the devices' memory.
        memory_budget: match args.ignore_memory_check || !args.devices.is_empty() {
            true => None,
            false => crate::machine::memory().ok().flatten().map(|m| m.bytes),
        },
        ignore_memory_check: args.ignore_memory_check,
    };
    parallel::run_parallel(
        work.recipe,
        work.cache,
        work.plan,
        work.selected,
        &settings,
        work.reporter,
        work.interrupt,
    )
    .map_err(exec_error)
}

/// The run's last line, and its exit: interrupted, a stage failed, or done.
fn finish(outcome: &Report, interrupt: &AtomicBool) -> Result<(), Error> {
    let ran = outcome
        .stages
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Ran { .. }))
        .count();
    let cached = outcome
        .stages
        .iter()
        .filter(|(_, o)| *o == Outcome::Cached)
        .count();
    eprintln!(
        "{ran} stage(s) ran, {cached} cached, {} not done",
        outcome.stages.len() - ran - cached
    );
    if outcome.interrupted() || interrupt.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    if outcome.unwritable() {
        return Err(Error::StageUnwritable);
    }
    if outcome.failed() {
        return Err(Error::StageFailed);
    }
    if !outcome.unpushed.is_empty() {
        return Err(Error::Unpushed(outcome.unpushed.len()));
    }
    Ok(())
}

/// A whole recipe with two schemes (or a sweep): shown side by side, as
/// `runner compare` does. The stages are done, so a failure here is a warning.
fn compare_schemes(ctx: &Context, checked: &Checked, cache: &Cache) {
    let shown = ctx.plan(checked, cache, &[]).and_then(|plan| {
        crate::compare::report::after_run(&checked.recipe, &checked.dag, &plan, cache)
            .map_err(Error::from)
    });
    match shown {
        Ok(Some(text)) => print!("{text}"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: the stages ran, but comparing them failed: {e}"),
    }
}
