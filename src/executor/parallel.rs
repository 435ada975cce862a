//! `runner run --jobs N`: ready stages run at the same time, each as a
//! child `runner run --only STAGE` with its share of the threads (and its
//! own device when several are given). A child process per stage keeps each
//! stage's threads, device and peak memory its own, and a crash its own.
//! Children report progress as event lines, shown here as one bar each.
//! Ctrl-C is passed on to every running child once (each checkpoints and
//! exits 130); no new stage starts after it.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::StageCommand;
use crate::cache::{self, Cache};
use crate::executor::{ExecError, Outcome, Report};
use crate::plan::{Plan, PlannedStage, Status};
use crate::progress::{Event, Reporter};
use crate::recipe::Recipe;

/// How to run stages side by side.
#[derive(Clone, Debug)]
pub struct Parallel {
    /// Stages at once.
    pub jobs: usize,
    /// Threads of each stage.
    pub threads: usize,
    /// One device per job slot (`--devices`); empty: the plan's device for all.
    pub devices: Vec<String>,
    /// `--device` to pass on when no `devices` are given.
    pub device: Option<String>,
    /// The `runner` binary the children run.
    pub program: std::path::PathBuf,
    /// Stages forced with `--force`.
    pub force: Vec<String>,
    /// The machine's memory (None: not checked, `--ignore-memory-check`):
    /// a stage starts only when its estimate and those of the stages
    /// running fit in it together (one stage alone always may: it passed
    /// its own check).
    pub memory_budget: Option<u64>,
    /// `--ignore-memory-check`, passed on to the children.
    pub ignore_memory_check: bool,
}

/// What a child's end says.
struct Finished {
    position: usize,
    slot: usize,
    exit: Option<i32>,
    /// The child's own `FAILED` line, if it reported one.
    failure: Option<String>,
    /// Its last lines that were not events (a panic, an error it printed).
    tail: Vec<String>,
    seconds: f64,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting,
    Running { pid: u32 },
    Done,
}

/// Where the stages of a parallel run are, and what is known of them.
struct Schedule<'a> {
    recipe: &'a Recipe,
    cache: &'a Cache,
    settings: &'a Parallel,
    reporter: &'a dyn Reporter,
    /// The selected stages, in plan order; the vectors below follow it.
    stages: Vec<&'a PlannedStage>,
    outcomes: Vec<Option<Outcome>>,
    states: Vec<State>,
    /// The artifact of each stage available so far (cached or just made), by index.
    artifacts: BTreeMap<usize, String>,
    /// Why a stage's artifact will not come (it failed, or an input of it did).
    missing: BTreeMap<usize, String>,
    /// Job slots not in use (a slot picks the device of `--devices`).
    free: Vec<usize>,
    /// Each stage's memory estimate (0 when it has none), by position.
    estimates: Vec<u64>,
    /// Stages that finished but whose upload to the remote failed.
    unpushed: Vec<String>,
}

/// Run the selected stages of a plan, `settings.jobs` at a time.
pub fn run_parallel(
    recipe: &Recipe,
    cache: &Cache,
    plan: &Plan,
    selected: &[usize],
    settings: &Parallel,
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<Report, ExecError> {
    let _shared = cache.lock_shared()?;
    let mut schedule = Schedule::new(recipe, cache, plan, selected, settings, reporter);
    reporter.start_pipeline(schedule.stages.len());
    let mut forwarded = false;
    std::thread::scope(|scope| -> Result<(), ExecError> {
        let (tx, rx) = mpsc::channel::<Finished>();
        loop {
            let stopping = interrupt.load(Ordering::SeqCst);
            if !stopping {
                schedule.start_ready(scope, &tx)?;
            }
            let running = schedule.running();
            if running.is_empty() {
                break;
            }
            if stopping && !forwarded {
                forwarded = true;
                for pid in &running {
                    // SAFETY: kill(2) on a child we started and have not reaped.
                    unsafe {
                        libc::kill(*pid as i32, libc::SIGINT);
                    }
                }
            }
            if let Ok(done) = rx.recv_timeout(Duration::from_millis(100)) {
                schedule.finished(done);
            }
        }
        Ok(())
    })?;
    reporter.finish();
    Ok(Report {
        stages: schedule
            .stages
            .iter()
            .zip(schedule.outcomes)
            .filter_map(|(p, o)| o.map(|o| (p.name.clone(), o)))
            .collect(),
        unpushed: schedule.unpushed,
    })
}

impl<'a> Schedule<'a> {
    fn new(
        recipe: &'a Recipe,
        cache: &'a Cache,
        plan: &'a Plan,
        selected: &[usize],
        settings: &'a Parallel,
        reporter: &'a dyn Reporter,
    ) -> Self {
        let stages: Vec<&PlannedStage> = plan
            .stages
            .iter()
            .filter(|p| selected.contains(&p.index))
            .collect();
        let artifacts = plan
            .stages
            .iter()
            .filter_map(|p| match &p.status {
                Status::Cached { artifact } => Some((p.index, artifact.clone())),
                _ => None,
            })
            .collect();
        let slots = if settings.devices.is_empty() {
            settings.jobs
        } else {
            settings.jobs.min(settings.devices.len())
        };
        let estimates = stages
            .iter()
            .map(|p| crate::plan::render::memory(recipe, p).map_or(0, |m| m.estimate_bytes))
            .collect();
        Schedule {
            recipe,
            cache,
            settings,
            reporter,
            estimates,
            unpushed: Vec::new(),
            outcomes: vec![None; stages.len()],
            states: vec![State::Waiting; stages.len()],
            stages,
            artifacts,
            missing: BTreeMap::new(),
            free: (0..slots).rev().collect(),
        }
    }

    /// Settle every waiting stage that can be settled without running
    /// (blocked by a failed input, or cached), and start those whose inputs
    /// are all there while a slot is free.
    fn start_ready<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        tx: &mpsc::Sender<Finished>,
    ) -> Result<(), ExecError>
    where
        'a: 'scope,
    {
        for position in 0..self.stages.len() {
            let p = self.stages[position];
            if self.states[position] != State::Waiting {
                continue;
            }
            if let Some((_, d)) = p.deps.iter().find(|(_, d)| self.missing.contains_key(d)) {
                let why = self.missing[d].clone();
                self.reporter
                    .stage_done(&format!("{}: skipped ({why})", p.name));
                self.missing
                    .insert(p.index, format!("input `{}` failed", p.name));
                self.settle(position, Outcome::Blocked(why));
                continue;
            }
            if !p.deps.iter().all(|(_, d)| self.artifacts.contains_key(d)) {
                continue;
            }
            if let Status::Cached { artifact } = &p.status {
                self.cache
                    .write_stage_record(&self.recipe.canonical, &p.name, &p.record())?;
                self.reporter.stage_done(&format!(
                    "{}: cached ({})",
                    p.name,
                    cache::short(artifact)
                ));
                self.settle(position, Outcome::Cached);
                continue;
            }
            if let Some(budget) = self.settings.memory_budget {
                let running: u64 = (0..self.stages.len())
                    .filter(|&i| matches!(self.states[i], State::Running { .. }))
                    .map(|i| self.estimates[i])
                    .sum();
                if running > 0 && running + self.estimates[position] > budget {
                    continue;
                }
            }
            let Some(slot) = self.free.pop() else {
                continue;
            };
            let mut child = self.spawn(p, slot)?;
            self.states[position] = State::Running { pid: child.id() };
            let (tx, reporter) = (tx.clone(), self.reporter);
            let stderr = child.stderr.take().expect("piped");
            scope.spawn(move || {
                let finished = follow(child, stderr, reporter, position, slot);
                let _ = tx.send(finished);
            });
        }
        Ok(())
    }

    fn settle(&mut self, position: usize, outcome: Outcome) {
        self.outcomes[position] = Some(outcome);
        self.states[position] = State::Done;
    }

    /// The stage as a child `runner run --only STAGE` on slot `slot`'s device.
    fn spawn(&self, p: &PlannedStage, slot: usize) -> std::io::Result<Child> {
        let settings = self.settings;
        let command = StageCommand {
            program: settings.program.clone(),
            cache: self.cache.root.clone(),
            recipe: self.recipe.canonical.clone(),
            stage: p.name.clone(),
            threads: settings.threads,
            device: settings
                .devices
                .get(slot)
                .cloned()
                .or_else(|| settings.device.clone()),
            force: settings.force.contains(&p.name),
            ignore_memory_check: settings.ignore_memory_check,
            tensorboard: self.recipe.tensorboard.clone(),
            mlflow: self.recipe.mlflow.clone(),
            remote: self.cache.remote.as_ref().map(|r| r.url().to_string()),
        };
        Command::new(&command.program)
            .args(command.args())
            .env("RUNNER_PROGRESS", "events")
            .env("RAYON_NUM_THREADS", settings.threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only
            // this process, which passes it on exactly once.
            .process_group(0)
            .spawn()
    }

    /// The process ids of the running children.
    fn running(&self) -> Vec<u32> {
        self.states
            .iter()
            .filter_map(|s| match s {
                State::Running { pid } => Some(*pid),
                _ => None,
            })
            .collect()
    }

    /// The artifact of `key` when the cache holds it whole.
    fn finished_whole(&self, key: &str) -> Option<String> {
        let record = self.cache.key_record(key)?;
        (self.cache.verify(&record.artifact) == crate::cache::Integrity::Whole)
            .then_some(record.artifact)
    }

    /// A child ended: its stage's outcome, its slot free again.
    fn finished(&mut self, done: Finished) {
        self.free.push(done.slot);
        let p = self.stages[done.position];
        // Exit 3 with the artifact whole in the cache: the stage finished
        // and only its upload to the remote failed (the child said so).
        // Checked once: verifying reads the artifact's files.
        let unpushed = match done.exit {
            Some(3) => self.finished_whole(&p.key),
            _ => None,
        };
        let outcome = match (done.exit, unpushed) {
            (Some(0), _) => match self.cache.key_record(&p.key) {
                Some(record) => {
                    self.artifacts.insert(p.index, record.artifact.clone());
                    Outcome::Ran {
                        artifact: record.artifact,
                        seconds: done.seconds,
                    }
                }
                None => Outcome::Failed("its process ended without an artifact".into()),
            },
            // The child's exit code for an interruption (cli's exit::INTERRUPTED).
            (Some(130), _) => Outcome::Interrupted,
            (Some(3), Some(artifact)) => {
                self.artifacts.insert(p.index, artifact.clone());
                self.unpushed.push(format!(
                    "{}: finished, but its upload to the remote failed",
                    p.name
                ));
                Outcome::Ran {
                    artifact,
                    seconds: done.seconds,
                }
            }
            (Some(code), _) => {
                let why = done.failure.clone().unwrap_or_else(|| {
                    let what = if code < 0 {
                        format!("killed by signal {}", -code)
                    } else {
                        format!("exit code {code}")
                    };
                    format!("{}: FAILED: {what}: {}", p.name, done.tail.join("\n"))
                });
                if done.failure.is_none() {
                    self.reporter.stage_done(&why);
                }
                // The child's exit code for a failed write (cli's exit::ENVIRONMENT).
                match code {
                    3 => Outcome::Unwritable(why),
                    _ => Outcome::Failed(why),
                }
            }
            (None, _) => Outcome::Failed("its process could not be waited for".into()),
        };
        if !matches!(outcome, Outcome::Ran { .. }) {
            self.missing
                .insert(p.index, format!("input `{}` failed", p.name));
        }
        self.settle(done.position, outcome);
    }
}

/// Follow a child to its end: its event lines shown as progress, its other
/// lines kept (the last 20) in case it fails without saying why.
fn follow(
    mut child: Child,
    stderr: ChildStderr,
    reporter: &dyn Reporter,
    position: usize,
    slot: usize,
) -> Finished {
    let clock = Instant::now();
    let mut progress = None;
    let mut failure = None;
    let mut tail = VecDeque::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        match Event::parse(&line) {
            Some(Event::Start { name, kind, why }) => {
                progress = Some(reporter.start_stage(&name, &kind, &why));
            }
            Some(Event::Total { total }) => {
                if let Some(p) = &progress {
                    p.set_total(total)
                }
            }
            Some(Event::Position { done, message }) => {
                if let Some(p) = &progress {
                    p.set_position(done, &message)
                }
            }
            Some(Event::Log { line }) => match &progress {
                Some(p) => p.log(&line),
                None => reporter.stage_line(&line),
            },
            Some(Event::Done { line }) => {
                progress = None;
                if line.contains(": FAILED: ") {
                    failure = Some(line.clone());
                }
                reporter.stage_done(&line);
            }
            Some(Event::Line { line }) => reporter.stage_line(&line),
            None => {
                tail.push_back(line);
                if tail.len() > 20 {
                    tail.pop_front();
                }
            }
        }
    }
    drop(progress);
    let exit = child.wait().ok().and_then(|s| {
        use std::os::unix::process::ExitStatusExt;
        s.code().or_else(|| s.signal().map(|sig| -sig))
    });
    Finished {
        position,
        slot,
        exit,
        failure,
        tail: tail.into(),
        seconds: clock.elapsed().as_secs_f64(),
    }
}
