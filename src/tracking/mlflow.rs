//! One stage's MLflow run, through MLflow's REST API (`experiments/…`,
//! `runs/create`, `runs/log-batch`, `runs/update`) from a thread of its
//! own: the training loop only queues lines, so a slow or absent server
//! never slows a step. Requests are retried; a server that keeps failing
//! is dropped with one warning. The run's id lives in the stage's work
//! folder and the count of lines the server holds in a tag of the run,
//! written in the same request as the lines, so a resumed stage continues
//! the same run and sends every line exactly once (the lines it recomputes
//! past its checkpoint were sent already; resumed runs are bit-identical
//! but for their timings).

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::tfrecord::HParam;
use crate::sink::Tracker;

/// Lines queued before the loop would have to wait: then they are dropped.
const QUEUE: usize = 100_000;
/// MLflow's limits for one `runs/log-batch`.
const BATCH_METRICS: usize = 1000;
const BATCH_PARAMS: usize = 100;
/// Longest parameter value MLflow stores everywhere (6000 since 2.x; 500 before).
const PARAM_CHARS: usize = 500;
/// Tries of one request, and the wait for the thread at the end.
const TRIES: u32 = 3;
const END_WAIT: Duration = Duration::from_secs(10);
/// How often queued lines are sent.
const SEND_EVERY: Duration = Duration::from_secs(1);
/// The run's id, in the stage's work folder.
pub const STATE_FILE: &str = "mlflow.json";
/// The run's tag counting the metrics lines the server holds.
const SENT_TAG: &str = "runner.sent_lines";

enum Msg {
    Restart(Vec<Value>),
    Line(Value),
    End(bool),
}

/// Where and as what a stage's run is logged.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// The tracking server, `http(s)://host:port`.
    pub uri: String,
    /// The experiment: `MLFLOW_EXPERIMENT_NAME`, else the recipe's name.
    pub experiment: String,
    /// `recipe/stage`.
    pub run_name: String,
    pub params: Vec<(String, HParam)>,
    /// The stage's work folder (survives crashes; gone when it completes).
    pub work_dir: PathBuf,
}

pub struct MlflowRun {
    tx: SyncSender<Msg>,
    worker: Mutex<Option<JoinHandle<()>>>,
    done: Mutex<Receiver<Result<(), String>>>,
    /// A line was dropped because the queue was full (warned once).
    dropped: std::sync::atomic::AtomicBool,
}

impl MlflowRun {
    pub fn new(spec: RunSpec) -> Self {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (done_tx, done_rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            let result = Worker::new(spec).run(rx);
            let _ = done_tx.send(result);
        });
        MlflowRun {
            tx,
            worker: Mutex::new(Some(worker)),
            done: Mutex::new(done_rx),
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn send(&self, msg: Msg) -> Result<(), String> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                let first = !self.dropped.swap(true, std::sync::atomic::Ordering::SeqCst);
                match first {
                    true => {
                        Err("MLflow: the server is behind by 100000 lines; dropping lines".into())
                    }
                    false => Ok(()),
                }
            }
            // The worker ended: it said why at `end`.
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }
}

impl Tracker for MlflowRun {
    fn restart(&self, lines: &[Value]) -> Result<(), String> {
        self.send(Msg::Restart(lines.to_vec()))
    }

    fn line(&self, line: &Value) -> Result<(), String> {
        self.send(Msg::Line(line.clone()))
    }

    /// Waits (at most `END_WAIT`) for what is queued to be sent and the
    /// run's status to be set.
    fn end(&self, finished: bool) -> Result<(), String> {
        let _ = self.tx.send(Msg::End(finished));
        let result = self
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .recv_timeout(END_WAIT);
        if let Some(w) = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if result.is_ok() {
                let _ = w.join();
            }
        }
        match result {
            Ok(r) => r,
            Err(_) => Err(format!(
                "MLflow: not done after {}s; the rest of this run is not logged",
                END_WAIT.as_secs()
            )),
        }
    }
}

/// The thread's side: the HTTP client and the run's state.
struct Worker {
    spec: RunSpec,
    agent: ureq::Agent,
    run_id: Option<String>,
    /// Lines of the run sent so far (by this process or one before it).
    sent: usize,
    /// Lines of the run this process has seen: the kept ones, then new ones.
    seen: usize,
    /// The first error; after it nothing more is sent.
    failed: Option<String>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A metrics line as MLflow metrics: its values under TRL's names at its step.
fn metrics(line: &Value, timestamp: i64) -> Vec<Value> {
    let Some((step, values)) = super::line_values(line) else {
        return Vec::new();
    };
    values
        .into_iter()
        .map(|(key, value)| json!({"key": key, "value": value, "timestamp": timestamp, "step": step}))
        .collect()
}

impl Worker {
    fn new(spec: RunSpec) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Worker {
            spec,
            agent,
            run_id: None,
            sent: 0,
            seen: 0,
            failed: None,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) -> Result<(), String> {
        while let Ok(first) = rx.recv() {
            // What arrives within `SEND_EVERY` goes in the same requests:
            // a request a second, not one a step, keeps the server's share
            // of the machine small.
            // The run is made (or reopened) at once, so it shows while the
            // first lines gather.
            if matches!(first, Msg::Restart(_)) {
                self.start();
            }
            let mut batch = vec![first];
            let until = Instant::now() + SEND_EVERY;
            while !matches!(batch.last(), Some(Msg::End(_))) {
                match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            let mut lines = Vec::new();
            let mut end = None;
            for msg in batch {
                match msg {
                    // Made already when this message came first (`start` then does nothing).
                    Msg::Restart(kept) => {
                        self.start();
                        self.seen = 0;
                        lines.extend(kept);
                    }
                    Msg::Line(l) => lines.push(l),
                    Msg::End(finished) => end = Some(finished),
                }
            }
            self.log(&lines);
            if let Some(finished) = end {
                self.finish(finished);
                return self.failed.map_or(Ok(()), Err);
            }
        }
        Ok(())
    }

    fn state_path(&self) -> PathBuf {
        self.spec.work_dir.join(STATE_FILE)
    }

    /// The run this stage logs to: the one a previous process of the same
    /// stage made (its id in the work folder), or a new one with the
    /// stage's parameters.
    fn start(&mut self) {
        if self.failed.is_some() || self.run_id.is_some() {
            return;
        }
        let saved: Option<Value> = std::fs::read(self.state_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(state) = saved.filter(|s| s["uri"] == self.spec.uri) {
            self.run_id = state["run_id"].as_str().map(String::from);
            let id = self.run_id.clone().unwrap_or_default();
            self.sent = self.sent_lines(&id);
            self.call("runs/update", json!({"run_id": id, "status": "RUNNING"}));
            return;
        }
        let Some(experiment) = self.experiment() else {
            return;
        };
        let tags = vec![
            json!({"key": "mlflow.runName", "value": self.spec.run_name}),
            json!({"key": "mlflow.source.name", "value": "lora-runner"}),
        ];
        let created = self.call(
            "runs/create",
            json!({"experiment_id": experiment, "run_name": self.spec.run_name, "start_time": now_ms(), "tags": tags}),
        );
        self.run_id = created
            .as_ref()
            .and_then(|r| r["run"]["info"]["run_id"].as_str())
            .map(String::from);
        let Some(id) = self.run_id.clone() else {
            self.fail("runs/create gave no run id".into());
            return;
        };
        self.save_state();
        let params: Vec<Value> = self
            .spec
            .params
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    HParam::Number(x) => x.to_string(),
                    HParam::Text(s) => s.chars().take(PARAM_CHARS).collect(),
                    HParam::Bool(b) => b.to_string(),
                };
                json!({"key": k, "value": text})
            })
            .collect();
        for chunk in params.chunks(BATCH_PARAMS) {
            self.call("runs/log-batch", json!({"run_id": id, "params": chunk}));
        }
    }

    /// The experiment's id, created when it does not exist.
    fn experiment(&mut self) -> Option<String> {
        let name = self.spec.experiment.clone();
        let url = format!(
            "{}/api/2.0/mlflow/experiments/get-by-name",
            self.spec.uri.trim_end_matches('/')
        );
        let found = self.request(|agent| {
            with_auth(agent.get(&url))
                .query("experiment_name", &name)
                .call()
        });
        match found {
            Ok(Some(v)) => v["experiment"]["experiment_id"].as_str().map(String::from),
            Ok(None) => self
                .call("experiments/create", json!({"name": name}))
                .and_then(|v| v["experiment_id"].as_str().map(String::from)),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// Sends the metrics of those of `lines` (the next lines of the run)
    /// not sent before.
    fn log(&mut self, lines: &[Value]) {
        let first = self.seen;
        self.seen += lines.len();
        let Some(id) = self.run_id.clone().filter(|_| self.failed.is_none()) else {
            return;
        };
        let skip = self.sent.saturating_sub(first).min(lines.len());
        let timestamp = now_ms();
        // Requests of whole lines, each with the count of lines sent once
        // it is stored, as a tag in the same request: the server holds the
        // lines and the count together or neither.
        let mut at = skip;
        while at < lines.len() {
            let mut batch = Vec::new();
            let mut end = at;
            while end < lines.len() {
                let m = metrics(&lines[end], timestamp);
                if !batch.is_empty() && batch.len() + m.len() >= BATCH_METRICS {
                    break;
                }
                batch.extend(m);
                end += 1;
            }
            let count = json!([{"key": SENT_TAG, "value": (first + end).to_string()}]);
            let body = json!({"run_id": id, "metrics": batch, "tags": count});
            if self.call("runs/log-batch", body).is_none() {
                return;
            }
            self.sent = first + end;
            at = end;
        }
    }

    /// How many of the run's lines the server holds: its `SENT_TAG`.
    fn sent_lines(&mut self, id: &str) -> usize {
        let url = format!(
            "{}/api/2.0/mlflow/runs/get",
            self.spec.uri.trim_end_matches('/')
        );
        let run = self.request(|agent| with_auth(agent.get(&url)).query("run_id", id).call());
        let tags = match run {
            Ok(Some(v)) => v["run"]["data"]["tags"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            Ok(None) => {
                self.fail(format!("run {id} no longer exists"));
                return 0;
            }
            Err(e) => {
                self.fail(format!("runs/get: {e}"));
                return 0;
            }
        };
        tags.iter()
            .find(|t| t["key"] == SENT_TAG)
            .and_then(|t| t["value"].as_str()?.parse().ok())
            .unwrap_or(0)
    }

    fn finish(&mut self, finished: bool) {
        let Some(id) = self.run_id.clone().filter(|_| self.failed.is_none()) else {
            return;
        };
        let status = if finished { "FINISHED" } else { "FAILED" };
        self.call(
            "runs/update",
            json!({"run_id": id, "status": status, "end_time": now_ms()}),
        );
    }

    fn save_state(&self) {
        let state = json!({"uri": self.spec.uri, "run_id": self.run_id, "sent_lines": self.sent});
        let _ = crate::fsutil::write_atomic(&self.state_path(), state.to_string().as_bytes());
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            self.failed = Some(format!("MLflow at {}: {why}", self.spec.uri));
        }
    }

    /// POST `api/2.0/mlflow/<endpoint>`; None (and the tracker failed) on error.
    fn call(&mut self, endpoint: &str, body: Value) -> Option<Value> {
        if self.failed.is_some() {
            return None;
        }
        let url = format!(
            "{}/api/2.0/mlflow/{endpoint}",
            self.spec.uri.trim_end_matches('/')
        );
        match self.request(|agent| with_auth(agent.post(&url)).send_json(&body)) {
            Ok(Some(v)) => Some(v),
            Ok(None) => {
                self.fail(format!("{endpoint}: not found"));
                None
            }
            Err(e) => {
                self.fail(format!("{endpoint}: {e}"));
                None
            }
        }
    }

    /// A request, tried `TRIES` times on a network error or a 5xx answer,
    /// backing off; Ok(None) for 404 (MLflow's "does not exist").
    fn request(
        &self,
        send: impl Fn(&ureq::Agent) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Option<Value>, String> {
        let started = Instant::now();
        let mut last = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500 << attempt));
            }
            match send(&self.agent) {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let text = response.body_mut().read_to_string().unwrap_or_default();
                    match status {
                        200..=299 => {
                            return Ok(Some(serde_json::from_str(&text).unwrap_or(Value::Null)))
                        }
                        404 => return Ok(None),
                        500..=599 => last = format!("HTTP {status}: {text}"),
                        _ => return Err(format!("HTTP {status}: {text}")),
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "{last} ({TRIES} tries in {:.0}s)",
            started.elapsed().as_secs_f64()
        ))
    }
}

/// MLflow's own credentials: `MLFLOW_TRACKING_TOKEN` (bearer), or
/// `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD` (basic).
fn with_auth<B>(request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    if let Ok(token) = std::env::var("MLFLOW_TRACKING_TOKEN") {
        return request.header("Authorization", format!("Bearer {token}"));
    }
    match (
        std::env::var("MLFLOW_TRACKING_USERNAME"),
        std::env::var("MLFLOW_TRACKING_PASSWORD"),
    ) {
        (Ok(user), Ok(password)) => request.header(
            "Authorization",
            format!("Basic {}", base64(format!("{user}:{password}").as_bytes())),
        ),
        _ => request,
    }
}

/// Standard base64 with padding (for HTTP basic authentication).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_examples() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn lines_become_metrics_at_their_step() {
        let m = metrics(
            &json!({"step": 4, "loss": 0.5, "lr": 0.01, "note": "x", "eval/loss": f64::NAN}),
            7,
        );
        assert_eq!(m.len(), 2);
        assert!(
            m.contains(&json!({"key": "learning_rate", "value": 0.01, "timestamp": 7, "step": 4}))
        );
    }
}
