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
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(ws.path("."))
        .env("RUNNER_CACHE", ws.cache())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::stages::wait_for_checkpoint(&ws, 10, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = ws.runner(&args).ok();
    assert!(
        resumed.stderr.contains("resuming from step"),
        "{}",
        resumed.stderr
    );
    let logged = scalars(&ws.path("tb/tiny/sft"));
    let lines =
        String::from_utf8(crate::stages::artifact_file(&ws, "sft", "metrics.jsonl")).unwrap();
    let mut expected = 0;
    for line in lines.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = row["step"].as_i64().unwrap();
        for (k, v) in row.as_object().unwrap() {
            let Some(v) = v.as_f64().filter(|_| k != "step") else {
                continue;
            };
            let tag = match k.as_str() {
                "lr" => "train/learning_rate".to_string(),
                k if k.starts_with("eval/") => k.to_string(),
                k => format!("train/{k}"),
            };
            let at: Vec<f32> = logged
                .iter()
                .filter(|(s, t, _)| *s == step && *t == tag)
                .map(|(_, _, x)| *x)
                .collect();
            assert_eq!(at, [v as f32], "{tag} at step {step}");
            expected += 1;
        }
    }
    let train_loss = logged.iter().filter(|(_, t, _)| t == "train/loss").count();
    assert_eq!(train_loss, 40, "each step once");
    // The values of metrics.jsonl, plus the timings beside them.
    assert!(logged.len() > expected, "{} vs {expected}", logged.len());
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
