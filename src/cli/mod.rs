//! The `runner` command line: a thin layer over the engine. It parses the
//! arguments, calls one engine entry point per command, and renders typed
//! errors with their exit codes (`error`).

mod error;

pub use error::{exit, Error};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::cache::Cache;
use crate::diag::Problem;
use crate::exec::{self, Outcome, Selection};
use crate::graph::{self, Dag};
use crate::plan::{self, Overrides, Plan};
use crate::recipe::{self, LoadError, Recipe};
use crate::stage::{DeviceSpec, Registry};
use crate::{gc, report, schema};

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "Declarative, cached, resumable two-stage LoRA fine-tuning (SFT, then DPO)",
    long_about = "Declarative, cached, resumable two-stage LoRA fine-tuning (SFT, then DPO).\n\n\
        A TOML recipe declares stages (see the stage kinds below) that refer to \
        each other by name. `runner plan` shows what would run and why; `runner run` runs it, \
        skipping every stage whose inputs have not changed since it last ran."
)]
pub struct Cli {
    /// Cache folder (artifacts, keys, checkpoints).
    #[arg(long, global = true, env = "RUNNER_CACHE", default_value = "cache")]
    pub cache: PathBuf,
    /// Compute threads (default: RAYON_NUM_THREADS, else every core). Results are
    /// bit-identical for the same seed, device and thread count.
    #[arg(long, global = true, env = "RUNNER_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Compute device: auto (a GPU when this binary has CUDA and one is present), cpu or
    /// cuda:N. Overrides the recipe's `device`; the device kind enters the keys of stages
    /// that compute.
    #[arg(long, global = true, env = "RUNNER_DEVICE", value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    #[command(subcommand)]
    pub command: Command,
}

/// Where `runner run` runs stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    Local,
    Slurm,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Dry run: every stage in execution order, cached or to run, and why,
    /// with each training stage's estimated peak memory.
    Plan {
        /// The recipe (a TOML file).
        recipe: PathBuf,
        /// Machine-readable output (schemas/plan.schema.json).
        #[arg(long)]
        json: bool,
    },
    /// Run the recipe: stages whose inputs are unchanged are skipped.
    Run {
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
    },
    /// Cancel the recipe's queued and running Slurm jobs (a cancelled training
    /// stage resumes from its last checkpoint when submitted again).
    Cancel {
        /// The recipe (a TOML file).
        recipe: PathBuf,
    },
    /// Each stage's state: cached artifact, when it finished, its headline metrics.
    Status {
        /// The recipe (a TOML file).
        recipe: PathBuf,
    },
    /// A stage's manifest, metrics, lineage and artifact path.
    Show {
        /// The recipe (a TOML file).
        recipe: PathBuf,
        /// A stage of the recipe.
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Compare finished training stages side by side (default: the leaf ones,
    /// i.e. scheme one and scheme two), with curves as SVG and a Markdown report.
    Compare {
        /// One or more recipes (files ending in .toml), then the stages to
        /// compare: names or globs (`dpo_*`), `recipe:stage` to pick from one
        /// recipe (its [recipe] name). Default: each recipe's leaf training
        /// stages. With several recipes, stages are shown as `recipe:stage`.
        #[arg(required = true, value_name = "RECIPE.toml... [STAGE-OR-GLOB]")]
        targets: Vec<String>,
        /// Rank the stages by this per-example metric of their eval stages
        /// (e.g. sft/exact_match, preference/accuracy, sft/loss).
        #[arg(long, value_name = "METRIC")]
        sort: Option<String>,
        /// Machine-readable output instead of the table.
        #[arg(long)]
        json: bool,
        /// Bootstrap resamples for the paired 95% intervals (seeded by the recipe's seed).
        #[arg(long, default_value_t = crate::compare::bootstrap::DEFAULT_RESAMPLES)]
        resamples: usize,
    },
    /// Copy a stage's cached artifact to DIR (PEFT or Hugging Face layout).
    Export {
        /// The recipe (a TOML file).
        recipe: PathBuf,
        stage: String,
        dir: PathBuf,
    },
    /// Print the JSON schema of recipes.
    Schema {
        /// Print the schema of `runner plan --json` output instead.
        #[arg(long, conflicts_with = "compare")]
        plan: bool,
        /// Print the schema of `runner compare --json` output instead.
        #[arg(long)]
        compare: bool,
    },
    /// Keep a stage's current artifact through `gc`, whatever recipes are given.
    Pin { recipe: PathBuf, stage: String },
    /// Remove a pin (`runner unpin NAME`; `runner unpin` lists them).
    Unpin { name: Option<String> },
    /// Check the compute device: logits of a small seeded model on the chosen device
    /// against the CPU (f32, tolerance 1e-3). Used by scripts/gpu-check.sh.
    #[command(hide = true)]
    Selftest,
    /// Remove artifacts no given recipe or pin reaches (dry run unless --delete).
    Gc {
        /// Recipes whose stages (and their lineage) are kept.
        recipes: Vec<PathBuf>,
        /// Actually delete.
        #[arg(long)]
        delete: bool,
    },
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The command line, with the stage kinds of `registry` and the exit codes in `--help`.
fn command(registry: &Registry) -> clap::Command {
    let width = registry.names().map(str::len).max().unwrap_or(0);
    let mut help = String::from("Stage kinds:\n");
    for kind in registry.kinds() {
        help.push_str(&format!("  {:width$}  {}\n", kind.name(), kind.summary()));
    }
    help.push_str(
        "\nExit codes:\n  0    done\n  1    a stage failed (finished stages stay cached)\n  \
         2    bad recipe or usage; nothing ran\n  3    the cache, a file or the device failed\n  \
         130  interrupted (Ctrl-C); running stages checkpointed",
    );
    Cli::command().after_long_help(help)
}

/// The program's entry point with the built-in stage kinds.
pub fn main() -> i32 {
    run_with(std::env::args_os(), &crate::kinds::builtin())
}

/// Parse `args` and run, with the given stage kinds. Returns the exit code.
pub fn run_with<I, T>(args: I, registry: &Registry) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = command(registry)
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    set_threads(cli.threads);
    keep_freed_memory();
    match dispatch(cli, registry) {
        Ok(()) => exit::OK,
        Err(e) => {
            if let Some(text) = e.render(color()) {
                eprint!("{text}");
            }
            e.exit_code()
        }
    }
}

/// A recipe loaded and type-checked.
pub struct Checked {
    pub recipe: Recipe,
    pub dag: Dag,
}

pub fn check(path: &Path, registry: &Registry) -> Result<Checked, Error> {
    let recipe = recipe::load(path, registry).map_err(|e| match e {
        LoadError::Io { path, source } => Error::RecipeUnreadable { path, source },
        LoadError::Invalid(e) => Error::Recipe(e),
    })?;
    let dag = graph::build(&recipe)?;
    Ok(Checked { recipe, dag })
}

/// The device the recipe's stages compute on: `--device`, else the recipe's
/// `device`, with `auto` decided and a GPU checked to be there.
fn resolve_device(checked: &Checked, asked: &Option<DeviceSpec>) -> Result<DeviceSpec, Error> {
    let header = &checked.recipe.header.device;
    let (wanted, span) = match asked {
        Some(d) => (d, 0..0),
        None => (&header.value, header.span.clone()),
    };
    crate::device::resolve(wanted).map_err(|e| {
        Error::Recipe(
            checked
                .recipe
                .error(vec![Problem::new(e.to_string()).at(span, "device")]),
        )
    })
}

fn make_plan(
    checked: &Checked,
    cache: &Cache,
    force: &[String],
    device: &Option<DeviceSpec>,
) -> Result<Plan, Error> {
    let overrides = Overrides {
        force: force.to_vec(),
        device: resolve_device(checked, device)?,
    };
    plan::plan(&checked.recipe, &checked.dag, cache, &overrides).map_err(|e| match e {
        plan::PlanError::Recipe(e) => Error::Recipe(e),
        plan::PlanError::Io(e) => Error::io(format!("cache {}", cache.root.display()))(e),
    })
}

fn dispatch(cli: Cli, registry: &Registry) -> Result<(), Error> {
    let device = &cli.device;
    let open_cache =
        || Cache::open(&cli.cache).map_err(Error::io(format!("cache {}", cli.cache.display())));
    match &cli.command {
        Command::Schema { plan, compare } => {
            let schema = if *plan {
                schema::plan_schema()
            } else if *compare {
                crate::compare::compare_schema()
            } else {
                schema::recipe_schema(registry)
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&schema).expect("schema serializes")
            );
            Ok(())
        }
        Command::Plan { recipe, json } => {
            let (checked, cache, plan) = check_and_plan(recipe, registry, &open_cache, device)?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report::plan_json(&checked.recipe, &plan))
                        .expect("plan serializes")
                );
            } else {
                print!("{}", report::plan_text(&checked.recipe, &plan, &cache));
            }
            Ok(())
        }
        Command::Run {
            recipe,
            force,
            only,
            until,
            jobs,
            devices,
            executor,
            wait,
        } => {
            let checked = check(recipe, registry)?;
            let no_stage =
                |name: &str| Error::Usage(format!("no stage `{name}` in {}", recipe.display()));
            // --force on a swept stage's own name forces all its variants.
            let mut forced = Vec::new();
            for name in force {
                let named = checked.recipe.stages_named(name);
                if named.is_empty() {
                    return Err(no_stage(name));
                }
                forced.extend(named.into_iter().map(str::to_string));
            }
            let force = &forced;
            // --only and --until take one stage: a swept one by its variant.
            for name in only.iter().chain(until) {
                if checked.recipe.stage(name).is_none() {
                    let variants = checked.recipe.stages_named(name);
                    if variants.is_empty() {
                        return Err(no_stage(name));
                    }
                    return Err(Error::Usage(format!(
                        "`{name}` is swept in {}: name one variant ({})",
                        recipe.display(),
                        variants.join(", ")
                    )));
                }
            }
            let cache = open_cache()?;
            let plan = make_plan(&checked, &cache, force, device)?;
            let selection = Selection {
                only: only.clone(),
                until: until.clone(),
            };
            let wanted = cli
                .device
                .clone()
                .unwrap_or_else(|| checked.recipe.header.device.value.clone());
            eprintln!(
                "[runner] device: {} (asked: {})",
                String::from(plan.device.clone()),
                String::from(wanted)
            );
            let selected = exec::select(&checked.recipe, &checked.dag, &plan, &selection)
                .map_err(exec_error)?;
            let interrupt = install_interrupt();
            let reporter = crate::progress::reporter();
            let program = std::env::current_exe()
                .map_err(Error::io("finding the runner binary for stage processes"))?;
            let passed_device = cli.device.clone().map(String::from);
            let outcome = if *executor == ExecutorKind::Slurm {
                let submission = crate::executor::slurm::Submission {
                    program,
                    threads: cli.threads,
                    device: passed_device,
                    force,
                };
                let slurm = crate::executor::slurm::Slurm;
                let submitted = crate::executor::slurm::submit(
                    &slurm,
                    &checked.recipe,
                    &cache,
                    &plan,
                    &selected,
                    &submission,
                )
                .map_err(Error::environment("submitting to Slurm"))?;
                let cached = plan
                    .stages
                    .iter()
                    .filter(|p| selected.contains(&p.index) && !p.status.will_run())
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
                if !*wait {
                    return Ok(());
                }
                crate::executor::slurm::wait(
                    &slurm,
                    &cache,
                    &submitted,
                    reporter.as_ref(),
                    &interrupt,
                    std::time::Duration::from_secs(1),
                )
                .map_err(Error::environment("following the Slurm jobs"))?
            } else if *jobs > 1 || !devices.is_empty() {
                let jobs = *jobs as usize;
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let threads = cli
                    .threads
                    .filter(|t| *t > 0)
                    .unwrap_or((cores / jobs).max(1));
                let note = if jobs * threads > cores {
                    " (more threads than cores: stages will slow each other down)"
                } else {
                    ""
                };
                eprintln!("[runner] {jobs} jobs × {threads} thread(s) on {cores} core(s){note}");
                let settings = crate::executor::local::Parallel {
                    jobs,
                    threads,
                    devices: devices.iter().cloned().map(String::from).collect(),
                    device: passed_device,
                    program,
                    force: force.clone(),
                };
                crate::executor::local::run_parallel(
                    &checked.recipe,
                    &cache,
                    &plan,
                    &selected,
                    &settings,
                    reporter.as_ref(),
                    &interrupt,
                )
                .map_err(exec_error)?
            } else {
                exec::execute(
                    &checked.recipe,
                    &cache,
                    &plan,
                    &selected,
                    reporter.as_ref(),
                    &interrupt,
                )
                .map_err(exec_error)?
            };
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
            if outcome.failed() {
                return Err(Error::StageFailed);
            }
            // A whole recipe with two schemes: show them side by side, as `runner compare` does.
            let leaves = crate::compare::leaf_training_stages(&checked.recipe, &checked.dag);
            if selection.only.is_none() && selection.until.is_none() && leaves.len() >= 2 {
                let plan = make_plan(&checked, &cache, &[], device)?;
                let bootstrap = bootstrap_of(&checked.recipe, None);
                if let Ok(summaries) = crate::compare::collect(
                    &checked.recipe,
                    &checked.dag,
                    &plan,
                    &cache,
                    &[],
                    bootstrap,
                ) {
                    let (report, verdict) =
                        write_report(&checked.recipe, &cache, &summaries, bootstrap)?;
                    let mut summaries = summaries;
                    if summaries.len() > 2 {
                        // A sweep: a ranking says more than every pair's verdict (those are in the report).
                        let metric = crate::compare::evaluation::METRICS.iter().find(|(m, _)| {
                            summaries.iter().all(|s| {
                                s.evaluated
                                    .evaluation
                                    .as_ref()
                                    .is_some_and(|e| e.metrics.contains_key(*m))
                            })
                        });
                        print!("{}", crate::compare::text_table(&summaries));
                        if let Some((metric, _)) = metric {
                            if let Ok(ranking) =
                                crate::compare::select::rank(&mut summaries, metric, bootstrap)
                            {
                                print!("{ranking}");
                            }
                        }
                        println!("every pair's verdict, and the ranking by other metrics (`runner compare --sort`): {}", report.display());
                    } else {
                        print!("{}", crate::compare::text_table(&summaries));
                        print!("{verdict}");
                        println!("report: {}", report.display());
                    }
                }
            }
            Ok(())
        }
        Command::Status { recipe } => {
            let (checked, cache, plan) = check_and_plan(recipe, registry, &open_cache, device)?;
            let jobs = job_lines(&cache, &plan);
            print!(
                "{}",
                report::status_text(&checked.recipe, &plan, &cache, &jobs)
            );
            Ok(())
        }
        Command::Cancel { recipe } => {
            let (_, cache, plan) = check_and_plan(recipe, registry, &open_cache, device)?;
            let slurm = crate::executor::slurm::Slurm;
            let jobs = crate::executor::slurm::jobs_of(&slurm, &cache, &plan)
                .map_err(Error::environment("reading the Slurm queue"))?;
            let active: Vec<(&String, &String)> = jobs
                .iter()
                .filter(|(_, (_, state))| state.active())
                .map(|(stage, (record, _))| (stage, &record.id))
                .collect();
            let ids: Vec<String> = active.iter().map(|(_, id)| id.to_string()).collect();
            crate::executor::Executor::cancel(&slurm, &ids)
                .map_err(Error::environment("cancelling Slurm jobs"))?;
            for (stage, id) in &active {
                println!("cancelled job {id} ({stage})");
            }
            if active.is_empty() {
                println!("no queued or running job of {}", recipe.display());
            }
            Ok(())
        }
        Command::Show {
            recipe,
            stage,
            json,
        } => {
            let (_, cache, plan) = check_and_plan(recipe, registry, &open_cache, device)?;
            let planned = plan.by_name(stage).ok_or_else(|| {
                Error::Usage(format!("no stage `{stage}` in {}", recipe.display()))
            })?;
            let job = job_lines(&cache, &plan).remove(stage);
            // A stage that has not finished but was submitted: where its job is.
            if let (Some(job), false) =
                (&job, matches!(planned.status, plan::Status::Cached { .. }))
            {
                println!(
                    "stage     {stage} ({})\nstatus    {}\njob       {job}",
                    planned.kind,
                    planned.reason()
                );
                return Ok(());
            }
            let out = report::show(&cache, planned, *json).map_err(|e| match e {
                report::ShowError::NotCached { .. } => Error::Usage(e.to_string()),
                report::ShowError::NoManifest(_) => {
                    Error::environment(format!("cache {}", cache.root.display()))(e.into())
                }
            })?;
            println!("{out}");
            if let (Some(job), false) = (job, *json) {
                println!("job       {job}");
            }
            Ok(())
        }
        Command::Export { recipe, stage, dir } => {
            let (_, cache, artifact) =
                cached_artifact(recipe, stage, registry, &open_cache, device)?;
            let from = crate::cache::payload_dir(&cache.artifact_dir(&artifact))
                .map_err(Error::io(format!("artifact of `{stage}`")))?;
            let files = crate::kinds::export::export_folder(&from, dir).map_err(
                Error::environment(format!("exporting `{stage}` to {}", dir.display())),
            )?;
            eprintln!(
                "exported `{stage}` ({} files) to {}",
                files.len(),
                dir.display()
            );
            Ok(())
        }
        Command::Compare {
            targets,
            sort,
            json,
            resamples,
        } => {
            let (recipes, selectors): (Vec<&String>, Vec<String>) = {
                let (r, s): (Vec<&String>, Vec<&String>) =
                    targets.iter().partition(|t| t.ends_with(".toml"));
                (r, s.into_iter().cloned().collect())
            };
            if recipes.is_empty() {
                return Err(Error::Usage(
                    "name at least one recipe (a file ending in .toml) before the stages".into(),
                ));
            }
            let cache = open_cache()?;
            let mut summaries = Vec::new();
            let mut names = Vec::new();
            let mut searched = Vec::new();
            let mut matched = vec![false; selectors.len()];
            let mut bootstrap = None;
            let mut first = None;
            for path in &recipes {
                let checked = check(Path::new(path), registry)?;
                let plan = make_plan(&checked, &cache, &[], device)?;
                let name = checked.recipe.header.name.value.clone();
                searched.push(name.clone());
                // No selector: `collect` takes the leaf training stages.
                let chosen = if selectors.is_empty() {
                    Vec::new()
                } else {
                    let selection = crate::compare::select::select(
                        &name,
                        &crate::compare::training_stages(&checked.recipe, &checked.dag),
                        &|stage| checked.recipe.stage(stage).is_some(),
                        &selectors,
                        recipes.len() > 1,
                    );
                    for (m, here) in matched.iter_mut().zip(&selection.matched) {
                        *m |= here;
                    }
                    if selection.stages.is_empty() {
                        continue;
                    }
                    selection.stages
                };
                let b = *bootstrap.get_or_insert(bootstrap_of(&checked.recipe, Some(*resamples)));
                let mut found = crate::compare::collect(
                    &checked.recipe,
                    &checked.dag,
                    &plan,
                    &cache,
                    &chosen,
                    b,
                )
                .map_err(Error::Usage)?;
                if recipes.len() > 1 {
                    for s in &mut found {
                        s.name = format!("{name}:{}", s.name);
                    }
                }
                names.push(name);
                summaries.extend(found);
                first.get_or_insert(checked);
            }
            if let Some((s, _)) = selectors.iter().zip(&matched).find(|(_, m)| !**m) {
                return Err(Error::Usage(format!(
                    "`{s}` matches no training stage of {}",
                    searched.join(", ")
                )));
            }
            let (Some(checked), Some(bootstrap)) = (first, bootstrap) else {
                return Err(Error::Usage("no stages to compare".into()));
            };
            let ranking = match sort {
                Some(metric) => Some(
                    crate::compare::select::rank(&mut summaries, metric, bootstrap)
                        .map_err(Error::Usage)?,
                ),
                None => None,
            };
            let report_name = names.join("+");
            let (report, verdict) =
                write_report_named(&checked.recipe, &report_name, &cache, &summaries, bootstrap)?;
            if *json {
                let mut value = crate::compare::compare_json(&summaries, bootstrap);
                value.report = Some(report.display().to_string());
                value.report_html = Some(report.with_extension("html").display().to_string());
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).expect("serializes")
                );
            } else {
                print!("{}", crate::compare::text_table(&summaries));
                print!("{}", ranking.unwrap_or_default());
                print!("{verdict}");
                println!("report: {}", report.display());
            }
            Ok(())
        }
        Command::Selftest => {
            let wanted = cli.device.clone().unwrap_or_default();
            let device =
                crate::device::resolve(&wanted).map_err(|e| Error::Usage(e.to_string()))?;
            let diff = crate::train::with_big_stack(|| crate::device::logits_check(&device))
                .map_err(Error::environment("selftest"))?;
            let ok = diff <= 1e-3;
            println!(
                "logits on {} vs cpu (f32): max abs diff {diff:.3e} ({})",
                String::from(device),
                if ok {
                    "ok, within 1e-3"
                } else {
                    "FAILED, above 1e-3"
                }
            );
            if ok {
                Ok(())
            } else {
                Err(Error::StageFailed)
            }
        }
        Command::Pin { recipe, stage } => {
            let (checked, cache, artifact) =
                cached_artifact(recipe, stage, registry, &open_cache, device)?;
            let name = format!("{}.{stage}", checked.recipe.header.name.value);
            gc::pin(&cache, &name, &artifact).map_err(Error::io("writing the pin"))?;
            println!("pinned {name} = {}", crate::cache::short(&artifact));
            Ok(())
        }
        Command::Unpin { name } => {
            let cache = open_cache()?;
            match name {
                Some(name) => {
                    if !gc::unpin(&cache, name).map_err(Error::io("removing the pin"))? {
                        return Err(Error::Usage(format!("no pin `{name}`")));
                    }
                    println!("unpinned {name}");
                }
                None => {
                    for (name, artifact) in gc::pins(&cache).map_err(Error::io("reading pins"))? {
                        println!("{name} = {artifact}");
                    }
                }
            }
            Ok(())
        }
        Command::Gc { recipes, delete } => {
            let cache = open_cache()?;
            let mut keep = Vec::new();
            for r in recipes {
                let checked = check(r, registry)?;
                let plan = make_plan(&checked, &cache, &[], device)?;
                keep.extend(plan.stages.iter().map(|s| s.key.clone()));
            }
            let summary = gc::collect(&cache, &keep, *delete)
                .map_err(Error::io(format!("gc in {}", cache.root.display())))?;
            print!("{summary}");
            Ok(())
        }
    }
}

/// Paired-bootstrap settings: `resamples` (or the default), seeded by the recipe's seed.
fn bootstrap_of(
    recipe: &Recipe,
    resamples: Option<usize>,
) -> crate::compare::evaluation::Bootstrap {
    crate::compare::evaluation::Bootstrap {
        resamples: resamples.unwrap_or(crate::compare::bootstrap::DEFAULT_RESAMPLES),
        seed: recipe.header.seed.value,
    }
}

/// Write the charts, report.md and report.html of a comparison next to the
/// artifacts; returns report.md's path and the verdict text.
fn write_report(
    recipe: &Recipe,
    cache: &Cache,
    summaries: &[crate::compare::StageSummary],
    bootstrap: crate::compare::evaluation::Bootstrap,
) -> Result<(PathBuf, String), Error> {
    write_report_named(
        recipe,
        &recipe.header.name.value,
        cache,
        summaries,
        bootstrap,
    )
}

/// As `write_report`, into `cache/reports/<name>/` (several recipes: their names joined by "+").
fn write_report_named(
    recipe: &Recipe,
    name: &str,
    cache: &Cache,
    summaries: &[crate::compare::StageSummary],
    bootstrap: crate::compare::evaluation::Bootstrap,
) -> Result<(PathBuf, String), Error> {
    let dir = crate::compare::report_dir(cache, recipe).with_file_name(name);
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let internal = |e: anyhow::Error| Error::environment("writing the report")(e);
    crate::compare::loss_chart(summaries, dir.join("loss.svg")).map_err(internal)?;
    let mut charts = vec![(
        crate::compare::LOSS_CHART_TITLE.to_string(),
        "loss.svg".to_string(),
    )];
    if summaries
        .iter()
        .any(|s| s.objective == crate::stage::Objective::Dpo)
    {
        crate::compare::dpo_chart(summaries, dir.join("dpo.svg")).map_err(internal)?;
        charts.push((
            crate::compare::DPO_CHART_TITLE.to_string(),
            "dpo.svg".to_string(),
        ));
    }
    let verdicts = crate::compare::evaluation::verdicts_of(summaries, bootstrap);
    let verdict = crate::compare::evaluation::verdict_text(summaries, &verdicts, bootstrap);
    let markdown = format!(
        "# {} — comparison\n\nRecipe: `{}`\n\n{}",
        name,
        recipe.path.display(),
        crate::compare::markdown_report(summaries, &charts, &verdict)
    );
    let path = dir.join("report.md");
    crate::fsutil::write_atomic(&path, markdown.as_bytes())
        .map_err(Error::io(format!("writing {}", path.display())))?;
    let svgs: Vec<(String, String)> = charts
        .iter()
        .filter_map(|(title, file)| {
            Some((title.clone(), std::fs::read_to_string(dir.join(file)).ok()?))
        })
        .collect();
    let html = crate::compare::html_report(
        &format!("{name} — comparison"),
        summaries,
        &verdicts,
        bootstrap,
        &svgs,
    );
    let html_path = dir.join("report.html");
    crate::fsutil::write_atomic(&html_path, html.as_bytes())
        .map_err(Error::io(format!("writing {}", html_path.display())))?;
    Ok((path, verdict))
}

/// `recipe` checked, the cache opened, and the plan made with no stage forced.
fn check_and_plan(
    recipe: &Path,
    registry: &Registry,
    open_cache: &dyn Fn() -> Result<Cache, Error>,
    device: &Option<DeviceSpec>,
) -> Result<(Checked, Cache, Plan), Error> {
    let checked = check(recipe, registry)?;
    let cache = open_cache()?;
    let plan = make_plan(&checked, &cache, &[], device)?;
    Ok((checked, cache, plan))
}

/// The cached artifact of `stage` in `recipe`, or a usage error saying how to make it.
fn cached_artifact(
    recipe: &Path,
    stage: &str,
    registry: &Registry,
    open_cache: &dyn Fn() -> Result<Cache, Error>,
    device: &Option<DeviceSpec>,
) -> Result<(Checked, Cache, String), Error> {
    let (checked, cache, plan) = check_and_plan(recipe, registry, open_cache, device)?;
    let planned = plan
        .by_name(stage)
        .ok_or_else(|| Error::Usage(format!("no stage `{stage}` in {}", recipe.display())))?;
    let plan::Status::Cached { artifact } = &planned.status else {
        return Err(Error::Usage(format!(
            "stage `{stage}` has no cached artifact ({}); run `runner run {} --until {stage}` first",
            planned.reason(),
            recipe.display()
        )));
    };
    let artifact = artifact.clone();
    Ok((checked, cache, artifact))
}

/// Fix the thread count of candle and rayon before any pool starts. Left to
/// itself candle counts physical cores and rayon logical ones, which on small
/// machines makes the two disagree and training slower.
fn set_threads(threads: Option<usize>) {
    let n = threads
        .filter(|n| *n > 0)
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Safe in the 2021 edition; done before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // candle runs elementwise ops over a pool of its own whose workers spin
    // between ops, on the cores gemm's threads and ours need: 12% of a
    // training step's samples on 2 cores for 1% of useful work. On the
    // calling thread alone the peer benchmark's SFT stage ran 1.1× the
    // tokens/s on 12% less CPU time (interleaved, `perf stat`).
    // CANDLE_NUM_THREADS set by the user still wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Training allocates and frees the same few-MiB activations every step.
/// glibc's defaults hand such blocks back to the kernel (mmap, heap trim)
/// and fault them in again next time: 5% of an SFT step in kernel page
/// handling. Blocks under 32 MiB now come from the heap and up to 256 MiB
/// of freed heap is kept. On the peer benchmark's SFT stage (`perf stat`):
/// 905k page faults → 118k, 6% less CPU time, the same peak RSS.
/// GLIBC_TUNABLES naming malloc settings is left to rule.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
        if !user_set {
            // SAFETY: mallopt only sets allocator parameters; it is called
            // before the threads that allocate most.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            }
        }
    }
}

/// Ctrl-C sets a flag that stages check between steps; a second Ctrl-C exits at once.
fn install_interrupt() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                std::process::exit(exit::INTERRUPTED);
            }
            eprintln!("\ninterrupted: finishing the current step (Ctrl-C again to quit now)");
        });
        flag
    })
    .clone()
}

/// `job 12 RUNNING, output PATH` for each stage of the plan submitted to
/// Slurm; a stage that will never start says which input's job failed.
fn job_lines(cache: &Cache, plan: &Plan) -> std::collections::BTreeMap<String, String> {
    use crate::executor::JobState;
    let slurm = crate::executor::slurm::Slurm;
    let jobs = match crate::executor::slurm::jobs_of(&slurm, cache, plan) {
        Ok(jobs) => jobs,
        Err(e) => {
            return plan
                .stages
                .iter()
                .filter_map(|p| {
                    let r = crate::executor::slurm::job_record(cache, &p.key)?;
                    Some((
                        p.name.clone(),
                        format!("job {} (state unknown: {e:#})", r.id),
                    ))
                })
                .collect()
        }
    };
    let mut lines = std::collections::BTreeMap::new();
    for p in &plan.stages {
        let Some((record, state)) = jobs.get(&p.name) else {
            continue;
        };
        let mut line = format!("job {} {}", record.id, state.label());
        if let JobState::Never(_) = state {
            for (_, d) in &p.deps {
                let up = plan.by_index(*d);
                if let Some((r, s)) = jobs.get(&up.name) {
                    if matches!(s, JobState::Failed(_) | JobState::Never(_)) {
                        line = format!(
                            "job {} never started: input `{}` failed (job {} {})",
                            record.id,
                            up.name,
                            r.id,
                            s.label()
                        );
                    }
                }
            }
        }
        lines.insert(
            p.name.clone(),
            format!("{line}, output {}", record.output.display()),
        );
    }
    lines
}

/// Errors of selecting and running stages: a name or an order the user got wrong, or I/O.
fn exec_error(e: exec::ExecError) -> Error {
    match e {
        exec::ExecError::Io(e) => Error::io("running stages")(e),
        other => Error::Usage(other.to_string()),
    }
}
