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
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::StageCommand;
use crate::cache::{self, Cache};
use crate::exec::{ExecError, Outcome, Report};
use crate::plan::{Plan, Status};
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
    let stages: Vec<&crate::plan::PlannedStage> = plan
        .stages
        .iter()
        .filter(|p| selected.contains(&p.index))
        .collect();
    let mut artifacts: BTreeMap<usize, String> = plan
        .stages
        .iter()
        .filter_map(|p| match &p.status {
            Status::Cached { artifact } => Some((p.index, artifact.clone())),
            _ => None,
        })
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; stages.len()];
    let mut states = vec![State::Waiting; stages.len()];
    // Why a stage's artifact will not come (it failed, or an input of it did).
    let mut missing: BTreeMap<usize, String> = BTreeMap::new();
    let slots = if settings.devices.is_empty() {
        settings.jobs
    } else {
        settings.jobs.min(settings.devices.len())
    };
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut forwarded = false;
    reporter.start_pipeline(stages.len());

    std::thread::scope(|scope| -> Result<(), ExecError> {
        let (tx, rx) = mpsc::channel::<Finished>();
        loop {
            let stopping = interrupt.load(Ordering::SeqCst);
            for (position, p) in stages.iter().enumerate() {
                if states[position] != State::Waiting || stopping {
                    continue;
                }
                if let Some((_, d)) = p.deps.iter().find(|(_, d)| missing.contains_key(d)) {
                    let why = missing[d].clone();
                    reporter.stage_done(&format!("{}: skipped ({why})", p.name));
                    missing.insert(p.index, format!("input `{}` failed", p.name));
                    outcomes[position] = Some(Outcome::Blocked(why));
                    states[position] = State::Done;
                    continue;
                }
                if !p.deps.iter().all(|(_, d)| artifacts.contains_key(d)) {
                    continue;
                }
                if let Status::Cached { artifact } = &p.status {
                    cache.write_stage_record(&recipe.canonical, &p.name, &p.record())?;
                    reporter.stage_done(&format!(
                        "{}: cached ({})",
                        p.name,
                        cache::short(artifact)
                    ));
                    outcomes[position] = Some(Outcome::Cached);
                    states[position] = State::Done;
                    continue;
                }
                let Some(slot) = free.pop() else { continue };
                let command = StageCommand {
                    program: settings.program.clone(),
                    cache: cache.root.clone(),
                    recipe: recipe.canonical.clone(),
                    stage: p.name.clone(),
                    threads: settings.threads,
                    device: settings
                        .devices
                        .get(slot)
                        .cloned()
                        .or_else(|| settings.device.clone()),
                    force: settings.force.contains(&p.name),
                };
                let mut child = Command::new(&command.program)
                    .args(command.args())
                    .env("RUNNER_PROGRESS", "events")
                    .env("RAYON_NUM_THREADS", settings.threads.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    // Its own process group: a terminal's Ctrl-C reaches only
                    // this process, which passes it on exactly once.
                    .process_group(0)
                    .spawn()?;
                states[position] = State::Running { pid: child.id() };
                let tx = tx.clone();
                let stderr = child.stderr.take().expect("piped");
                scope.spawn(move || {
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
                    let _ = tx.send(Finished {
                        position,
                        slot,
                        exit,
                        failure,
                        tail: tail.into(),
                        seconds: clock.elapsed().as_secs_f64(),
                    });
                });
            }
            let running: Vec<u32> = states
                .iter()
                .filter_map(|s| match s {
                    State::Running { pid } => Some(*pid),
                    _ => None,
                })
                .collect();
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
            let Ok(done) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            free.push(done.slot);
            states[done.position] = State::Done;
            let p = stages[done.position];
            let outcome = match done.exit {
                Some(0) => match cache.key_record(&p.key) {
                    Some(record) => {
                        artifacts.insert(p.index, record.artifact.clone());
                        Outcome::Ran {
                            artifact: record.artifact,
                            seconds: done.seconds,
                        }
                    }
                    None => Outcome::Failed("its process ended without an artifact".into()),
                },
                Some(130) => Outcome::Interrupted,
                Some(code) => {
                    let why = done.failure.clone().unwrap_or_else(|| {
                        let what = if code < 0 {
                            format!("killed by signal {}", -code)
                        } else {
                            format!("exit code {code}")
                        };
                        format!("{}: FAILED: {what}: {}", p.name, done.tail.join("\n"))
                    });
                    if done.failure.is_none() {
                        reporter.stage_done(&why);
                    }
                    Outcome::Failed(why)
                }
                None => Outcome::Failed("its process could not be waited for".into()),
            };
            if !matches!(outcome, Outcome::Ran { .. }) {
                missing.insert(p.index, format!("input `{}` failed", p.name));
            }
            outcomes[done.position] = Some(outcome);
        }
        Ok(())
    })?;
    reporter.finish();
    Ok(Report {
        stages: stages
            .iter()
            .zip(outcomes)
            .filter_map(|(p, o)| o.map(|o| (p.name.clone(), o)))
            .collect(),
    })
}
