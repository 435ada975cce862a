//! Training stages streamed to TensorBoard: every metrics line's values at
//! their step, a resumed run without a step logged twice, the stage's
//! parameters as hyperparameters, and TensorBoard's own reader agreeing
//! (scripts/tensorboard_check.py, where CI installs TensorBoard).

use crate::support::Workspace;
use std::path::Path;

/// The (step, tag, value) of every scalar in the event files of `dir`,
/// each record's framing and masked CRC-32C checked on the way.
fn scalars(dir: &Path) -> Vec<(i64, String, f32)> {
    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*i];
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    /// (field, wire type, payload) of a message's fields.
    fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let (mut i, mut out) = (0, Vec::new());
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                0 => varint(b, &mut i).to_le_bytes().to_vec(),
                1 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                5 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }
    let masked = |d: &[u8]| crc32c::crc32c(d).rotate_right(15).wrapping_add(0xa282_ead8);
    let mut out = Vec::new();
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one event file a run: {files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            masked(&bytes[at..at + 8]).to_le_bytes(),
            bytes[at + 8..at + 12]
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            masked(data).to_le_bytes(),
            bytes[at + 12 + len..at + 16 + len]
        );
        at += 16 + len;
        let event = fields(data);
        let step = event
            .iter()
            .find(|f| f.0 == 2)
            .map_or(0, |f| i64::from_le_bytes(f.2.clone().try_into().unwrap()));
        for (_, _, summary) in event.iter().filter(|f| f.0 == 5) {
            for (_, _, value) in fields(summary) {
                let v = fields(&value);
                let tag =
                    String::from_utf8(v.iter().find(|f| f.0 == 1).unwrap().2.clone()).unwrap();
                if let Some((_, _, x)) = v.iter().find(|f| f.0 == 2) {
                    out.push((step, tag, f32::from_le_bytes(x.clone().try_into().unwrap())));
                }
            }
        }
    }
    out
}

/// SIGKILLed after a checkpoint and resumed, the SFT stage's run holds
/// each step once, with metrics.jsonl's values; the parameters are there.
#[test]
fn a_resumed_run_logs_every_step_once_with_the_artifacts_values() {
    let text = crate::stages::recipe(40, 3, "");
    let ws = Workspace::new();
    ws.write("recipe.toml", &text);
    let args = [
        "run",
        "recipe.toml",
        "--until",
        "sft",
        "--tensorboard",
        "tb",
    ];
    killed_and_resumed(&ws, &args, || true);
    let logged = scalars(&ws.path("tb/tiny/sft"));
    let expected = artifact_values(&ws);
    for (k, step, v) in &expected {
        let tag = match k.as_str() {
            "lr" => "train/learning_rate".to_string(),
            k if k.starts_with("eval/") => k.to_string(),
            k => format!("train/{k}"),
        };
        let at: Vec<f32> = logged
            .iter()
            .filter(|(s, t, _)| s == step && *t == tag)
            .map(|(_, _, x)| *x)
            .collect();
        assert_eq!(at, [*v as f32], "{tag} at step {step}");
    }
    let train_loss = logged.iter().filter(|(_, t, _)| t == "train/loss").count();
    assert_eq!(train_loss, 40, "each step once");
    // The values of metrics.jsonl, plus the timings beside them.
    assert!(
        logged.len() > expected.len(),
        "{} vs {}",
        logged.len(),
        expected.len()
    );
    // The hyperparameters: the event file names the stage's learning rate and key.
    let file = std::fs::read_dir(ws.path("tb/tiny/sft"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(file).unwrap();
    let has = |s: &str| bytes.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has("_hparams_/session_start_info") && has("train.lr") && has("tiny/sft"));
}

/// TensorBoard's own reader (EventAccumulator and the hparams plugin's
/// protobuf) on a whole run of two schemes: every scalar at every step
/// equals metrics.jsonl / timings.jsonl. Needs RUNNER_TEST_TENSORBOARD_PY, a
/// Python with `tensorboard` (`.ci/run` makes one); SKIPPED without it, and
/// a failure under CI=true.
#[test]
fn tensorboards_own_reader_sees_what_metrics_jsonl_holds() {
    let python = match std::env::var("RUNNER_TEST_TENSORBOARD_PY") {
        Ok(p) if !p.is_empty() => p,
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must set RUNNER_TEST_TENSORBOARD_PY (.ci/run installs TensorBoard)"
            );
            eprintln!(
                "SKIPPED: no RUNNER_TEST_TENSORBOARD_PY (a python with `pip install tensorboard`)"
            );
            return;
        }
    };
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        &(crate::stages::recipe(6, 4, "") + "\n[tracking]\ntensorboard = \"tb\"\n"),
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tensorboard_check.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args([ws.path("tb"), ws.cache()])
        .arg("tiny")
        .env("RUNNER", env!("CARGO_BIN_EXE_runner"))
        .env("RECIPE_FILE", ws.path("recipe.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // sft, dpo_continued, dpo_fresh.
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

/// Runs `args` in `ws`, SIGKILLs the run once it has checkpointed step 10
/// and `ready` says so, runs it again and returns that run, which resumed.
fn killed_and_resumed(
    ws: &Workspace,
    args: &[&str],
    ready: impl Fn() -> bool,
) -> crate::support::Run {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(ws.path("."))
        .env("RUNNER_CACHE", ws.cache())
        .env_remove("MLFLOW_EXPERIMENT_NAME")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::stages::wait_for_checkpoint(ws, 10, &mut child);
    let start = std::time::Instant::now();
    while !ready() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended first");
        assert!(start.elapsed().as_secs() < 120, "never ready");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = ws.runner(args).ok();
    assert!(
        resumed.stderr.contains("resuming from step"),
        "{}",
        resumed.stderr
    );
    resumed
}

/// (name, step, value) of every value in the SFT stage's metrics.jsonl.
fn artifact_values(ws: &Workspace) -> Vec<(String, i64, f64)> {
    let lines =
        String::from_utf8(crate::stages::artifact_file(ws, "sft", "metrics.jsonl")).unwrap();
    let mut out = Vec::new();
    for line in lines.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = row["step"].as_i64().unwrap();
        for (k, v) in row.as_object().unwrap() {
            if let Some(v) = v.as_f64().filter(|_| k != "step") {
                out.push((k.clone(), step, v));
            }
        }
    }
    out
}

/// What a stand-in MLflow server was sent: (endpoint, JSON body) in order.
type Requests = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// A stand-in for MLflow's tracking server on a free local port: answers
/// the REST calls runner makes as MLflow 3 does (an experiment that does
/// not exist is a 404) and records every request.
fn fake_mlflow() -> (String, Requests) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let seen: Requests = Default::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut runs = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let endpoint = path
                .trim_start_matches("/api/2.0/mlflow/")
                .split('?')
                .next()
                .unwrap()
                .to_string();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let created = log
                .lock()
                .unwrap()
                .iter()
                .any(|(e, _)| e == "experiments/create");
            // The count runner keeps in a tag, as the last log-batch set it.
            let sent = log
                .lock()
                .unwrap()
                .iter()
                .rev()
                .filter(|(e, _)| e == "runs/log-batch")
                .filter_map(|(_, b)| b["tags"].as_array().cloned())
                .flatten()
                .find(|t| t["key"] == "runner.sent_lines");
            let (status, answer) = match endpoint.as_str() {
                "runs/get" => (
                    200,
                    serde_json::json!({"run": {"data": {"tags": sent.into_iter().collect::<Vec<_>>()}}}),
                ),
                "experiments/get-by-name" if !created => (
                    404,
                    serde_json::json!({"error_code": "RESOURCE_DOES_NOT_EXIST"}),
                ),
                "experiments/get-by-name" => (
                    200,
                    serde_json::json!({"experiment": {"experiment_id": "1"}}),
                ),
                "experiments/create" => (200, serde_json::json!({"experiment_id": "1"})),
                "runs/create" => {
                    runs += 1;
                    (
                        200,
                        serde_json::json!({"run": {"info": {"run_id": format!("run{runs}")}}}),
                    )
                }
                _ => (200, serde_json::json!({})),
            };
            log.lock().unwrap().push((endpoint, body));
            let text = answer.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (uri, seen)
}

/// SIGKILLed after a checkpoint and resumed, the SFT stage's MLflow run is
/// one run (reopened, not created again) holding each line's metrics once
/// with the artifact's values, its parameters, and FINISHED at the end.
#[test]
fn a_resumed_stage_continues_its_mlflow_run_without_sending_a_line_twice() {
    let (uri, requests) = fake_mlflow();
    let ws = Workspace::new();
    ws.write("recipe.toml", &crate::stages::recipe(1500, 3, ""));
    let args = ["run", "recipe.toml", "--until", "sft", "--mlflow", &uri];
    // Killed once lines past the checkpoint reached the server (they are
    // sent each second).
    let sent_lines = || {
        requests.lock().unwrap().iter().any(|(e, b)| {
            e == "runs/log-batch" && b["metrics"].as_array().is_some_and(|m| !m.is_empty())
        })
    };
    let resumed = killed_and_resumed(&ws, &args, sent_lines);
    assert!(!resumed.stderr.contains("warning"), "{}", resumed.stderr);
    let requests = requests.lock().unwrap().clone();
    let count = |e: &str| requests.iter().filter(|(x, _)| x == e).count();
    assert_eq!(count("runs/create"), 1, "one run across both processes");
    let create = &requests.iter().find(|(e, _)| e == "runs/create").unwrap().1;
    assert_eq!(create["run_name"], "tiny/sft");
    let updates: Vec<&serde_json::Value> = requests
        .iter()
        .filter(|(e, _)| e == "runs/update")
        .map(|(_, b)| &b["status"])
        .collect();
    assert_eq!(updates, ["RUNNING", "FINISHED"], "reopened, then finished");
    let mut logged: std::collections::BTreeMap<(String, i64), f64> = Default::default();
    let mut params = Vec::new();
    for (_, body) in requests.iter().filter(|(e, _)| e == "runs/log-batch") {
        assert_eq!(body["run_id"], "run1");
        for m in body["metrics"].as_array().into_iter().flatten() {
            let key = (
                m["key"].as_str().unwrap().to_string(),
                m["step"].as_i64().unwrap(),
            );
            let before = logged.insert(key.clone(), m["value"].as_f64().unwrap());
            assert!(before.is_none(), "{key:?} sent twice");
        }
        params.extend(body["params"].as_array().into_iter().flatten().cloned());
    }
    assert!(
        params
            .iter()
            .any(|p| p["key"] == "train.lr" && p["value"] == "0.005"),
        "{params:?}"
    );
    assert!(params.iter().any(|p| p["key"] == "key"));
    let expected = artifact_values(&ws);
    for (k, step, v) in &expected {
        let k = if k == "lr" { "learning_rate" } else { k };
        assert_eq!(
            logged.get(&(k.to_string(), *step)),
            Some(v),
            "{k} at {step}"
        );
    }
    // metrics.jsonl's values, and the timings beside them.
    assert!(
        logged.len() > expected.len() && expected.len() > 1500,
        "{} values logged, {} in metrics.jsonl",
        logged.len(),
        expected.len()
    );
}

/// A tracking server that is not there: one warning, the stage done, its
/// artifact the same as without tracking.
#[test]
fn an_absent_mlflow_server_is_warned_of_and_never_fails_the_stage() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ws = Workspace::new();
    ws.write("recipe.toml", &crate::stages::recipe(3, 2, ""));
    let uri = format!("http://127.0.0.1:{port}");
    let run = ws
        .runner(&["run", "recipe.toml", "--until", "sft", "--mlflow", &uri])
        .ok();
    assert_eq!(
        run.stderr.matches("warning: MLflow at").count(),
        1,
        "{}",
        run.stderr
    );
    let plain = Workspace::new();
    plain.write("recipe.toml", &crate::stages::recipe(3, 2, ""));
    plain.runner(&["run", "recipe.toml", "--until", "sft"]).ok();
    assert!(
        crate::stages::artifact_file(&ws, "sft", "adapter_model.safetensors")
            == crate::stages::artifact_file(&plain, "sft", "adapter_model.safetensors")
    );
}
