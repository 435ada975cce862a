//! Progress display: indicatif bars on a terminal (the pipeline and the
//! current stage), plain log lines elsewhere.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::stage::Progress;

/// How the run is shown.
pub trait Reporter: Send + Sync {
    fn start_pipeline(&self, stages: usize);
    /// A stage begins running; returns where it reports its steps.
    fn start_stage(&self, name: &str, kind: &str, why: &str) -> Box<dyn Progress + '_>;
    /// A stage was skipped, found cached, finished or failed: one line for the record.
    fn stage_done(&self, line: &str);
    /// Any other line (a stage waiting for a lock, ...).
    fn stage_line(&self, line: &str);
    fn finish(&self);
}

/// Bars when stderr is a terminal, lines otherwise; events for a parent
/// runner (`RUNNER_PROGRESS=events`, set by `--jobs`).
pub fn reporter() -> Box<dyn Reporter> {
    if std::env::var("RUNNER_PROGRESS").as_deref() == Ok("events") {
        return Box::new(Events);
    }
    if std::io::stderr().is_terminal() && std::env::var_os("RUNNER_PLAIN").is_none() {
        Box::new(Bars::new())
    } else {
        Box::new(Lines)
    }
}

/// Plain lines on stderr: for logs, CI and pipes.
pub struct Lines;

struct LineStage {
    name: String,
    /// Total steps, when the last line was printed, and its step.
    total: Mutex<(u64, Instant, Option<u64>)>,
}

impl Progress for LineStage {
    fn set_total(&self, total: u64) {
        let mut state = self.total.lock().expect("progress lock");
        // A new count (the reference pass, then training) may repeat steps.
        if state.0 != total {
            *state = (total, state.1, None);
        }
    }
    fn set_position(&self, done: u64, message: &str) {
        let mut state = self.total.lock().expect("progress lock");
        let (total, last, printed) = *state;
        // At most one line every few seconds, and always the last step; never
        // the same step twice (`--executor slurm --wait` polls a job's step).
        let due = done == total || last.elapsed() >= Duration::from_secs(5);
        if due && printed != Some(done) {
            *state = (total, Instant::now(), Some(done));
            eprintln!("[runner] {}: step {done}/{total} {message}", self.name);
        }
    }
    fn log(&self, line: &str) {
        eprintln!("[runner] {}: {line}", self.name);
    }
}

impl Reporter for Lines {
    fn start_pipeline(&self, stages: usize) {
        eprintln!("[runner] {stages} stage(s) to consider");
    }
    fn start_stage(&self, name: &str, kind: &str, why: &str) -> Box<dyn Progress + '_> {
        eprintln!("[runner] {name} ({kind}): running ({why})");
        Box::new(LineStage {
            name: name.to_string(),
            total: Mutex::new((0, Instant::now() - Duration::from_secs(60), None)),
        })
    }
    fn stage_done(&self, line: &str) {
        eprintln!("[runner] {line}");
    }
    fn stage_line(&self, line: &str) {
        eprintln!("[runner] {line}");
    }
    fn finish(&self) {}
}

/// indicatif bars: one for the pipeline, one for the running stage.
pub struct Bars {
    multi: MultiProgress,
    pipeline: ProgressBar,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let pipeline = multi.add(ProgressBar::new(0));
        pipeline.set_style(
            ProgressStyle::with_template("pipeline [{bar:30}] {pos}/{len} stages {msg}")
                .expect("template")
                .progress_chars("=> "),
        );
        Bars { multi, pipeline }
    }
}

struct BarStage {
    bar: ProgressBar,
    multi: MultiProgress,
}

impl Progress for BarStage {
    fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }
    fn set_position(&self, done: u64, message: &str) {
        self.bar.set_position(done);
        self.bar.set_message(message.to_string());
    }
    fn log(&self, line: &str) {
        let _ = self.multi.println(line);
    }
}

impl Drop for BarStage {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        self.multi.remove(&self.bar);
    }
}

impl Reporter for Bars {
    fn start_pipeline(&self, stages: usize) {
        self.pipeline.set_length(stages as u64);
    }
    fn start_stage(&self, name: &str, kind: &str, why: &str) -> Box<dyn Progress + '_> {
        let _ = self
            .multi
            .println(format!("{name} ({kind}): running ({why})"));
        let bar = self.multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{name:>12} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
            ))
            .expect("template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(BarStage {
            bar,
            multi: self.multi.clone(),
        })
    }
    fn stage_done(&self, line: &str) {
        self.pipeline.inc(1);
        let _ = self.multi.println(line);
    }
    fn stage_line(&self, line: &str) {
        let _ = self.multi.println(line);
    }
    fn finish(&self) {
        self.pipeline.finish_and_clear();
    }
}

/// A sink that shows nothing (for library callers and tests).
pub struct Silent;

impl Progress for Silent {
    fn set_total(&self, _: u64) {}
    fn set_position(&self, _: u64, _: &str) {}
    fn log(&self, _: &str) {}
}

impl Reporter for Silent {
    fn start_pipeline(&self, _: usize) {}
    fn start_stage(&self, _: &str, _: &str, _: &str) -> Box<dyn Progress + '_> {
        Box::new(Silent)
    }
    fn stage_done(&self, _: &str) {}
    fn stage_line(&self, _: &str) {}
    fn finish(&self) {}
}

/// What a stage running in a child process tells the runner that started it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        name: String,
        kind: String,
        why: String,
    },
    Total {
        total: u64,
    },
    Position {
        done: u64,
        message: String,
    },
    Log {
        line: String,
    },
    Done {
        line: String,
    },
    Line {
        line: String,
    },
}

/// Marks an event line on a child's stderr; other lines are its own output.
pub const EVENT_PREFIX: &str = "@runner ";

impl Event {
    pub fn parse(line: &str) -> Option<Event> {
        serde_json::from_str(line.strip_prefix(EVENT_PREFIX)?).ok()
    }

    fn emit(&self) {
        let json = serde_json::to_string(self).expect("events serialize");
        eprintln!("{EVENT_PREFIX}{json}");
    }
}

/// Progress as event lines on stderr, for a parent runner to show.
pub struct Events;

/// (total, when the last position was sent): positions at most five a second.
struct EventStage(Mutex<(u64, Instant)>);

impl Progress for EventStage {
    fn set_total(&self, total: u64) {
        self.0.lock().expect("progress lock").0 = total;
        Event::Total { total }.emit();
    }
    fn set_position(&self, done: u64, message: &str) {
        let mut state = self.0.lock().expect("progress lock");
        if done != state.0 && state.1.elapsed() < Duration::from_millis(200) {
            return;
        }
        state.1 = Instant::now();
        Event::Position {
            done,
            message: message.to_string(),
        }
        .emit();
    }
    fn log(&self, line: &str) {
        Event::Log {
            line: line.to_string(),
        }
        .emit();
    }
}

impl Reporter for Events {
    fn start_pipeline(&self, _: usize) {}
    fn start_stage(&self, name: &str, kind: &str, why: &str) -> Box<dyn Progress + '_> {
        Event::Start {
            name: name.to_string(),
            kind: kind.to_string(),
            why: why.to_string(),
        }
        .emit();
        Box::new(EventStage(Mutex::new((
            0,
            Instant::now() - Duration::from_secs(1),
        ))))
    }
    fn stage_done(&self, line: &str) {
        Event::Done {
            line: line.to_string(),
        }
        .emit();
    }
    fn stage_line(&self, line: &str) {
        Event::Line {
            line: line.to_string(),
        }
        .emit();
    }
    fn finish(&self) {}
}
