//! Training stages end to end on a tiny model: learning in both schemes,
//! exact resume after SIGKILL, determinism, failures that name their cause.

use crate::support;
use lora_runner::cli::exit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{plan_entry, Workspace};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recipes/data")
        .join(name)
}

/// A tiny two-scheme recipe over the demo task.
pub(crate) fn recipe(sft_steps: u32, dpo_steps: u32, extra_sft: &str) -> String {
    format!(
        r#"[recipe]
name = "tiny"
seed = 3

[stages.base]
kind = "base"
init = {{ hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft_train}", eval = "{sft_eval}" }}
lora = {{ r = 8, alpha = 16, targets = "all-linear" }}
train = {{ steps = {sft_steps}, batch = 8, lr = 5e-3, seq_len = 32, checkpoint_every = 5 {extra_sft} }}

[stages.dpo_continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}
train = {{ steps = {dpo_steps}, batch = 8, lr = 5e-3, seq_len = 32 }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.dpo_fresh]
kind = "dpo"
model = "merged"
lora = {{ r = 4, alpha = 8, targets = ["q_proj", "v_proj", "down_proj"] }}
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}
train = {{ steps = {dpo_steps}, batch = 8, lr = 5e-3, seq_len = 32 }}

[stages.eval_sft]
kind = "eval"
model = "base"
adapter = "sft"
data = {{ sft = "{sft_eval}", dpo = "{dpo_eval}" }}
prompts = ["sort cba:", "sort hge:"]
max_new_tokens = 8
temperature = 0.7
seq_len = 32

[stages.eval_fresh]
kind = "eval"
model = "merged"
adapter = "dpo_fresh"
data = {{ dpo = "{dpo_eval}" }}
seq_len = 32
"#,
        sft_train = data("sft_train.jsonl").display(),
        sft_eval = data("sft_eval.jsonl").display(),
        dpo_train = data("dpo_train.jsonl").display(),
        dpo_eval = data("dpo_eval.jsonl").display(),
    )
}

fn manifest(ws: &Workspace, stage: &str) -> serde_json::Value {
    let out = ws
        .runner(&["show", "recipe.toml", stage, "--json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["manifest"].clone()
}

pub(crate) fn artifact_file(ws: &Workspace, stage: &str, file: &str) -> Vec<u8> {
    let out = ws
        .runner(&["show", "recipe.toml", stage, "--json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    std::fs::read(Path::new(v["path"].as_str().unwrap()).join(file)).unwrap()
}

#[test]
fn sft_lowers_the_eval_loss_and_dpo_raises_preference_accuracy_in_both_schemes() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe(40, 30, ""));
    ws.runner(&["run", "recipe.toml"]).ok();

    let sft = manifest(&ws, "sft")["metrics"].clone();
    let (before, after) = (
        sft["before/eval/loss"].as_f64().unwrap(),
        sft["eval/loss"].as_f64().unwrap(),
    );
    assert!(after < before - 0.2, "SFT eval loss {before} -> {after}");

    for stage in ["dpo_continued", "dpo_fresh"] {
        let m = manifest(&ws, stage)["metrics"].clone();
        let acc = m["eval/rewards/accuracies"].as_f64().unwrap();
        let margin = m["eval/rewards/margins"].as_f64().unwrap();
        assert!(
            acc >= 0.9 && margin > 0.0,
            "{stage}: held-out accuracy {acc}, margin {margin}"
        );
        assert!(
            m["before/eval/rewards/margins"].as_f64().unwrap().abs() < 1e-6,
            "{stage} starts at its reference"
        );
    }
    assert_eq!(
        manifest(&ws, "dpo_continued")["metrics"]["reference"],
        "base + adapter `sft` (frozen)"
    );
    assert_eq!(manifest(&ws, "dpo_fresh")["metrics"]["reference"], "merged");

    // Metrics JSONL: one line per step plus the final eval, with TRL's names.
    let lines = String::from_utf8(artifact_file(&ws, "dpo_fresh", "metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 31);
    for key in [
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            rows[0].get(key).is_some(),
            "metric {key} missing from {}",
            rows[0]
        );
    }
    assert!(rows[30].get("eval/rewards/accuracies").is_some());

    // The adapter artifacts are PEFT folders.
    let config: serde_json::Value =
        serde_json::from_slice(&artifact_file(&ws, "dpo_fresh", "adapter_config.json")).unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["peft_type"], "LORA");

    // The eval stages: held-out loss, preference accuracy against the model without the adapter, samples.
    let e = manifest(&ws, "eval_sft")["metrics"].clone();
    assert!(
        (e["sft/loss"].as_f64().unwrap() - after).abs() < 1e-6,
        "the same held-out loss as the SFT stage measured"
    );
    assert_eq!(e["reference"], "base");
    let samples = e["samples"].as_array().unwrap();
    assert_eq!(
        samples.len(),
        4,
        "greedy and sampled, for two prompts: {samples:?}"
    );
    assert_eq!(samples[0]["prompt"], "sort cba:");
    assert_eq!(samples[0]["mode"], "greedy");
    let lines = String::from_utf8(artifact_file(&ws, "eval_sft", "eval.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        2 + 4,
        "sft metrics, dpo metrics, four samples"
    );
    let f = manifest(&ws, "eval_fresh")["metrics"].clone();
    assert!(f["rewards/accuracies"].as_f64().unwrap() >= 0.9, "{f}");
    assert_eq!(f["reference"], "merged");

    // `run` ended with the comparison of the two schemes; `compare` gives it again, and as JSON.
    let table = ws.runner(&["compare", "recipe.toml"]).ok().stdout;
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("dpo_continued")
            && header.contains("dpo_fresh")
            && !header.contains(" sft"),
        "{table}"
    );
    let scheme = table.lines().find(|l| l.starts_with("scheme")).unwrap();
    assert!(
        scheme.contains("scheme one: continue `sft`")
            && scheme.contains("scheme two: fresh adapter on `merged`"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ws.runner(&["compare", "recipe.toml", "--json"]).ok().stdout)
            .unwrap();
    let stages = json["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    let bytes = |i: usize| stages[i]["bytes_on_disk"].as_u64().unwrap();
    assert!(
        bytes(1) > 2 * bytes(0),
        "scheme two's bytes include its merged model: {} vs {}",
        bytes(1),
        bytes(0)
    );
    let report = std::path::PathBuf::from(json["report"].as_str().unwrap());
    let markdown = std::fs::read_to_string(&report).unwrap();
    assert!(
        markdown.contains("![") && markdown.contains("loss.svg") && markdown.contains("dpo.svg"),
        "{markdown}"
    );
    for svg in ["loss.svg", "dpo.svg"] {
        let text = std::fs::read_to_string(report.parent().unwrap().join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("dpo_fresh"),
            "{svg}"
        );
    }
    let run = ws.runner(&["compare", "recipe.toml", "base"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(
        run.stderr.contains("compare takes sft and dpo stages"),
        "{}",
        run.stderr
    );

    // Everything is cached now; editing one DPO parameter reruns only that branch.
    let again = ws.runner(&["run", "recipe.toml"]).ok();
    assert!(
        again.stderr.contains("0 stage(s) ran, 7 cached"),
        "{}",
        again.stderr
    );
    ws.write(
        "recipe.toml",
        &recipe(40, 30, "").replacen(
            "seq_len = 32 }\n\n[stages.merged]",
            "seq_len = 32 }\ndpo = { beta = 0.2 }\n\n[stages.merged]",
            1,
        ),
    );
    let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
    assert_eq!(
        plan_entry(&plan, "dpo_continued").1,
        "parameter changed: dpo.beta 0.1 → 0.2"
    );
    for stage in [
        "base",
        "sft",
        "merged",
        "dpo_fresh",
        "eval_sft",
        "eval_fresh",
    ] {
        assert_eq!(plan_entry(&plan, stage).0, "cached", "{stage}");
    }
}

/// Wait until the stage's work folder says it checkpointed at least `step`.
pub(crate) fn wait_for_checkpoint(ws: &Workspace, step: u64, child: &mut std::process::Child) {
    let start = Instant::now();
    loop {
        let work = ws.cache().join("work");
        let reached = support::list(&work).iter().any(|k| {
            std::fs::read(work.join(k).join("resume.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s >= step)
        });
        if reached {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before checkpointing step {step}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint at step {step}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts `runner ARGS` in `ws` and SIGKILLs it once a checkpoint at
/// `step` or later exists, at whatever point it reached.
pub(crate) fn kill_after_checkpoint(ws: &Workspace, args: &[&str], step: u64) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(ws.path("."))
        .env("RUNNER_CACHE", ws.cache())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(ws, step, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The `sft` adapter of recipe `text` run straight, and run again with a
/// SIGKILL after the step-10 checkpoint and a resume (which must say so).
pub(crate) fn straight_and_resumed_sft(text: &str) -> (Vec<u8>, Vec<u8>) {
    let only_sft = ["run", "recipe.toml", "--until", "sft"];
    let adapter = |ws: &Workspace| artifact_file(ws, "sft", "adapter_model.safetensors");
    let straight = Workspace::new();
    straight.write("recipe.toml", text);
    straight.runner(&only_sft).ok();
    let killed = Workspace::new();
    killed.write("recipe.toml", text);
    kill_after_checkpoint(&killed, &only_sft, 10);
    let resumed = killed.runner(&only_sft).ok();
    assert!(
        resumed.stderr.contains("resuming from step"),
        "{}",
        resumed.stderr
    );
    (adapter(&straight), adapter(&killed))
}

#[test]
fn a_run_killed_mid_training_resumes_to_the_same_bytes_and_runs_are_deterministic() {
    let text = recipe(60, 10, "");
    let only_sft = ["run", "recipe.toml", "--until", "sft"];

    let straight = Workspace::new();
    straight.write("recipe.toml", &text);
    straight.runner(&only_sft).ok();
    let want = artifact_file(&straight, "sft", "adapter_model.safetensors");

    let again = Workspace::new();
    again.write("recipe.toml", &text);
    again.runner(&only_sft).ok();
    assert!(
        artifact_file(&again, "sft", "adapter_model.safetensors") == want,
        "same recipe, seed, device, threads: same bytes"
    );

    let killed = Workspace::new();
    killed.write("recipe.toml", &text);
    kill_after_checkpoint(&killed, &only_sft, 10);
    let plan = killed
        .runner(&["plan", "recipe.toml", "--json"])
        .ok()
        .json();
    let (status, _, _) = plan_entry(&plan, "sft");
    assert_eq!(status, "resume");
    let resumed = killed.runner(&only_sft).ok();
    assert!(
        resumed.stderr.contains("resuming from step"),
        "{}",
        resumed.stderr
    );
    assert!(
        artifact_file(&killed, "sft", "adapter_model.safetensors") == want,
        "resumed run ends with the same adapter bytes"
    );
    let lines = String::from_utf8(artifact_file(&killed, "sft", "metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().count(),
        61,
        "one line per step and the final eval, none repeated"
    );
}

#[test]
fn ctrl_c_checkpoints_and_plan_says_where_it_resumes() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe(100_000, 10, ""));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["run", "recipe.toml"])
        .current_dir(ws.path("."))
        .env("RUNNER_CACHE", ws.cache())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&ws, 5, &mut child);
    support::interrupt_and_wait(child);
    let plan = ws.runner(&["plan", "recipe.toml"]).ok().stdout;
    let line = plan.lines().find(|l| l.starts_with("sft ")).unwrap();
    assert!(line.contains("resume from step"), "{plan}");
}

#[test]
fn a_bad_data_row_fails_the_stage_naming_file_and_line() {
    let ws = Workspace::new();
    ws.write(
        "sft.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n",
    );
    let text =
        recipe(5, 5, "").replace(&data("sft_train.jsonl").display().to_string(), "sft.jsonl");
    ws.write("recipe.toml", &text);
    let run = ws.runner(&["run", "recipe.toml"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("sft.jsonl:2: missing field \"completion\""),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("dpo_continued: skipped"),
        "{}",
        run.stderr
    );

    // With bad_rows = "skip" the row is counted and training goes on.
    ws.write(
        "recipe.toml",
        &recipe(5, 5, ", bad_rows = \"skip\"")
            .replace(&data("sft_train.jsonl").display().to_string(), "sft.jsonl"),
    );
    ws.runner(&["run", "recipe.toml", "--until", "sft"]).ok();
    let m = manifest(&ws, "sft")["metrics"].clone();
    assert_eq!(m["data/sft.jsonl"]["skipped"], 1);
}

#[test]
fn a_diverging_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let ws = Workspace::new();
    // An absurd learning rate blows the adapter up within a few steps.
    ws.write(
        "recipe.toml",
        &recipe(50, 5, ", max_grad_norm = 0.0").replace(
            "lr = 5e-3, seq_len = 32, checkpoint_every = 5",
            "lr = 1e30, seq_len = 32, checkpoint_every = 1",
        ),
    );
    let run = ws.runner(&["run", "recipe.toml", "--until", "sft"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    let re = regex::Regex::new(r"step (\d+): the (loss|gradient norm) is (NaN|inf|-inf)").unwrap();
    let caps = re
        .captures(&run.stderr)
        .unwrap_or_else(|| panic!("{}", run.stderr));
    let step: u64 = caps[1].parse().unwrap();
    assert!(step >= 2, "the first step is finite");
    let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
    let entry = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "sft")
        .unwrap()
        .clone();
    assert_eq!(entry["status"], "resume");
    assert_eq!(
        entry["resume_step"],
        step - 1,
        "the last good checkpoint is kept"
    );
}

#[test]
fn an_exported_adapter_is_imported_checked_against_its_model_and_continued() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe(5, 5, ""));
    ws.runner(&["run", "recipe.toml", "--until", "sft"]).ok();
    ws.runner(&["export", "recipe.toml", "sft", "exported/sft"])
        .ok();
    assert!(ws.path("exported/sft/adapter_model.safetensors").is_file());

    let import = |init: &str| {
        format!(
            "[recipe]\nname = \"import\"\nseed = 3\n[stages.base]\nkind = \"base\"\ninit = {{ {init} }}\n\
             [stages.sft]\nkind = \"adapter\"\nmodel = \"base\"\npath = \"exported/sft\"\n\
             [stages.dpo]\nkind = \"dpo\"\nmodel = \"base\"\nadapter = \"sft\"\n\
             data = {{ train = \"{}\" }}\ntrain = {{ steps = 3, batch = 4, seq_len = 32 }}\n",
            data("dpo_train.jsonl").display()
        )
    };
    ws.write(
        "import.toml",
        &import("hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100"),
    );
    let run = ws.runner(&["run", "import.toml"]).ok();
    assert!(
        run.stderr.contains("2 stage(s) ran, 1 cached"),
        "the same base is shared: {}",
        run.stderr
    );

    // On a model of another shape the import fails, naming the tensor.
    ws.write(
        "import.toml",
        &import("hidden = 48, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100"),
    );
    let run = ws.runner(&["run", "import.toml"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr.contains("tensor `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` has shape [8, 32], but the model"),
        "{}",
        run.stderr
    );
}

#[test]
fn reference_overrides_the_default_reference() {
    let ws = Workspace::new();
    let with_reference = |r: &str| {
        recipe(10, 2, "").replace(
            "lora = { r = 4, alpha = 8, targets = [\"q_proj\", \"v_proj\", \"down_proj\"] }",
            &format!("lora = {{ r = 4, alpha = 8, targets = [\"q_proj\", \"v_proj\", \"down_proj\"] }}\nreference = \"{r}\""),
        )
    };
    // base + the SFT adapter is the merged model: the fresh adapter starts at that reference.
    ws.write("recipe.toml", &with_reference("sft"));
    ws.runner(&["run", "recipe.toml", "--until", "dpo_fresh"])
        .ok();
    let m = manifest(&ws, "dpo_fresh")["metrics"].clone();
    assert_eq!(m["reference"], "base + adapter `sft` (frozen)");
    assert!(
        m["before/eval/rewards/margins"].as_f64().unwrap().abs() < 1e-3,
        "{m}"
    );

    // The bare base is a different policy: margins start away from zero.
    ws.write("recipe.toml", &with_reference("base"));
    ws.runner(&["run", "recipe.toml", "--until", "dpo_fresh"])
        .ok();
    let m = manifest(&ws, "dpo_fresh")["metrics"].clone();
    assert_eq!(m["reference"], "base");
    assert!(
        m["before/eval/rewards/margins"].as_f64().unwrap().abs() > 1e-3,
        "{m}"
    );
}

#[test]
fn half_precision_training_learns_with_f32_adapters() {
    for dtype in ["bf16", "f16"] {
        let ws = Workspace::new();
        let text =
            recipe(30, 2, "").replace("seed = 3\n", &format!("seed = 3\ndtype = \"{dtype}\"\n"));
        ws.write("recipe.toml", &text);
        ws.runner(&["run", "recipe.toml", "--until", "sft"]).ok();
        let m = manifest(&ws, "sft")["metrics"].clone();
        let (before, after) = (
            m["before/eval/loss"].as_f64().unwrap(),
            m["eval/loss"].as_f64().unwrap(),
        );
        assert!(
            after < before - 0.2,
            "{dtype}: eval loss {before} -> {after}"
        );
        assert_eq!(manifest(&ws, "sft")["params"]["dtype"], dtype);
        // LoRA master weights stay f32 whatever the compute dtype.
        let bytes = artifact_file(&ws, "sft", "adapter_model.safetensors");
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let dtypes: std::collections::BTreeSet<&str> = header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(_, v)| v["dtype"].as_str().unwrap())
            .collect();
        assert_eq!(dtypes, std::collections::BTreeSet::from(["F32"]), "{dtype}");
    }
}

#[test]
fn reference_free_losses_learn_the_preference_without_a_reference_pass() {
    let ws = Workspace::new();
    // Scheme one with SimPO, scheme two with ORPO: the two schemes still
    // differ only in the adapter they train.
    let text = recipe(30, 20, "")
        .replace(
            "adapter = \"sft\"\ndata = { train",
            "adapter = \"sft\"\ndpo = { loss = \"simpo\", beta = 2.0, simpo_gamma = 0.5 }\ndata = { train",
        )
        .replace(
            "model = \"merged\"\nlora",
            "model = \"merged\"\ndpo = { loss = \"orpo\", beta = 0.5 }\nlora",
        );
    ws.write("recipe.toml", &text);
    let plan = ws.runner(&["plan", "recipe.toml"]).ok().stdout;
    assert!(
        plan.contains("note: dpo_continued: loss simpo: no reference")
            && plan.contains("note: dpo_fresh: loss orpo: no reference"),
        "{plan}"
    );
    ws.runner(&["run", "recipe.toml", "--until", "dpo_fresh"])
        .ok();
    ws.runner(&["run", "recipe.toml", "--until", "dpo_continued"])
        .ok();
    for (stage, term) in [("dpo_continued", "simpo"), ("dpo_fresh", "orpo")] {
        let m = manifest(&ws, stage)["metrics"].clone();
        assert_eq!(m["reference"], "no reference", "{stage}");
        let (before, after) = (
            m["before/eval/rewards/accuracies"].as_f64().unwrap(),
            m["eval/rewards/accuracies"].as_f64().unwrap(),
        );
        assert!(
            after >= 0.9 && after > before,
            "{stage} ({term}): held-out preference accuracy {before} -> {after}"
        );
        let lines = String::from_utf8(artifact_file(&ws, stage, "metrics.jsonl")).unwrap();
        let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        assert!(first.get(format!("loss/{term}")).is_some(), "{first}");
    }
    // No reference log-probs were computed or cached.
    let derived = ws.cache().join("derived");
    let names = if derived.exists() {
        support::list(&derived)
    } else {
        Vec::new()
    };
    assert!(!names.iter().any(|n| n.contains("reference")), "{names:?}");
    let table = ws.runner(&["compare", "recipe.toml"]).ok().stdout;
    let reference = table.lines().find(|l| l.starts_with("reference")).unwrap();
    assert_eq!(reference.matches("no reference").count(), 2, "{table}");
}

#[test]
fn a_comparison_that_cannot_be_written_is_a_warning_after_a_run_and_exit_3_from_compare() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe(4, 2, ""));
    let first = ws.runner(&["run", "recipe.toml"]).ok();
    assert!(first.stdout.contains("report: "), "{}", first.stdout);
    // The report's folder is taken by a file: the stages are done, the report cannot be.
    let reports = ws.cache().join("reports").join("tiny");
    std::fs::remove_dir_all(&reports).unwrap();
    std::fs::write(&reports, "not a folder").unwrap();
    let again = ws.runner(&["run", "recipe.toml"]).ok();
    assert!(
        again
            .stderr
            .contains("warning: the stages ran, but comparing them failed: creating"),
        "{}",
        again.stderr
    );
    assert!(!again.stdout.contains("report: "), "{}", again.stdout);
    let compare = ws.runner(&["compare", "recipe.toml"]);
    assert_eq!(compare.code, exit::ENVIRONMENT, "{}", compare.stderr);
    assert!(compare.stderr.contains("creating"), "{}", compare.stderr);
    // A stage that is not there is the command line's fault, typed and named.
    let missing = ws.runner(&["compare", "recipe.toml", "nope"]);
    assert_eq!(missing.code, exit::USAGE, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("no stage `nope` in"),
        "{}",
        missing.stderr
    );
}

#[test]
fn compare_pairs_evaluations_by_example_and_writes_a_self_contained_html_report() {
    let ws = Workspace::new();
    let sft_eval = data("sft_eval.jsonl").display().to_string();
    let dpo_eval = data("dpo_eval.jsonl").display().to_string();
    let both = format!("data = {{ sft = \"{sft_eval}\", dpo = \"{dpo_eval}\" }}");
    let text = recipe(30, 10, "").replace(
        &format!("adapter = \"dpo_fresh\"\ndata = {{ dpo = \"{dpo_eval}\" }}"),
        &format!("adapter = \"dpo_fresh\"\n{both}\nprompts = [\"sort cba:\"]\nmax_new_tokens = 8"),
    );
    // Without an eval of scheme one, compare says which stage to add.
    ws.write("recipe.toml", &text);
    ws.runner(&["run", "recipe.toml"]).ok();
    let out = ws
        .runner(&["compare", "recipe.toml", "--resamples", "300"])
        .ok()
        .stdout;
    assert!(
        out.contains(
            "note: dpo_continued: add an eval stage with model = \"base\", adapter = \"dpo_continued\""
        ),
        "{out}"
    );
    let with_eval = format!(
        "{text}\n[stages.eval_continued]\nkind = \"eval\"\nmodel = \"base\"\nadapter = \"dpo_continued\"\n\
         reference = \"sft\"\n{both}\nprompts = [\"sort cba:\"]\nmax_new_tokens = 8\nseq_len = 32\n"
    );
    ws.write("recipe.toml", &with_eval);
    ws.runner(&["run", "recipe.toml"]).ok();
    let json = ws
        .runner(&["compare", "recipe.toml", "--json", "--resamples", "300"])
        .ok()
        .json();
    let stages = json["stages"].as_array().unwrap();
    for (stage, from) in [(&stages[0], "sft"), (&stages[1], "merged")] {
        let change = &stage["evaluated"]["change"];
        assert_eq!(change["from"], from, "{stage}");
        // Both evals read the same two files: 200 + 200 rows pair up.
        assert_eq!(change["paired"], 400);
        assert_eq!(change["evaluation"]["stage"], "eval_sft");
        for metric in ["sft/exact_match", "sft/loss", "preference/accuracy"] {
            let d = &change["deltas"][metric];
            let (mean, low, high) = (
                d["mean"].as_f64().unwrap(),
                d["low"].as_f64().unwrap(),
                d["high"].as_f64().unwrap(),
            );
            assert!(low <= mean && mean <= high, "{metric}: {d}");
        }
    }
    let verdicts = json["verdicts"].as_array().unwrap();
    assert_eq!(verdicts.len(), 7, "every per-example metric: {verdicts:?}");
    for v in verdicts {
        assert_eq!(
            (v["a"].as_str(), v["b"].as_str()),
            (Some("dpo_continued"), Some("dpo_fresh"))
        );
        assert_eq!(v["paired"], 200);
        let d = &v["difference"];
        let significant = d["low"].as_f64().unwrap() > 0.0 || d["high"].as_f64().unwrap() < 0.0;
        assert_eq!(significant, !v["better"].is_null(), "{v}");
    }
    assert_eq!(json["bootstrap"]["resamples"], 300);
    let metrics = &stages[0]["evaluated"]["evaluation"]["metrics"];
    assert!(
        metrics["generation/seconds"].as_f64().unwrap() > 0.0,
        "{metrics}"
    );
    assert!(
        metrics["sft/token_accuracy"].as_f64().is_some(),
        "{metrics}"
    );

    // The HTML: verdict first, every chart inline and drawn, nothing fetched.
    let html = std::fs::read_to_string(json["report_html"].as_str().unwrap()).unwrap();
    let verdict = html.find("<section id=\"verdict\">").unwrap();
    let table = html.find("<section id=\"table\">").unwrap();
    let curves = html.find("<section id=\"curves\">").unwrap();
    let samples = html.find("<section id=\"samples\">").unwrap();
    assert!(verdict < table && table < curves && curves < samples);
    assert!(html.contains("<p class=\"verdict"), "a verdict line");
    assert!(html.contains("What training changed:"));
    let charts: Vec<&str> = html.split("<figure class=\"chart\">").skip(1).collect();
    assert_eq!(
        charts.len(),
        4,
        "the verdict's forest plot, loss, DPO rewards, task metric before and after"
    );
    let svg =
        |chart: &str| chart[chart.find("<svg").unwrap()..chart.find("</svg>").unwrap()].to_string();
    // The forest plot, in the verdict section: a point per verdict line
    // (two stages: every pair is drawn).
    assert!(html.find(charts[0]).unwrap() < table);
    let lines = html[verdict..table].matches("<li>").count();
    assert!(lines > 0);
    assert_eq!(svg(charts[0]).matches("<circle").count(), lines);
    let charts = &charts[1..];
    // Curves are polylines (plotters); the before/after chart is bars: two per stage.
    for chart in &charts[..2] {
        assert!(
            svg(chart).matches("<polyline").count() >= 2,
            "a chart with no curves"
        );
    }
    assert_eq!(
        svg(charts[2]).matches("<rect").count(),
        4,
        "{}",
        svg(charts[2])
    );
    for external in ["<script", "<link", "src=", "href=", "url(", "@import"] {
        assert!(!html.contains(external), "{external} in the report");
    }
    assert!(
        html.contains("<code>sort cba:</code>"),
        "samples side by side"
    );
    // report.md keeps the verdict too.
    let md = std::fs::read_to_string(json["report"].as_str().unwrap()).unwrap();
    assert!(
        md.starts_with("# tiny") && md.contains("## Verdict"),
        "{md}"
    );
    // ... and its forest plot, the same SVG as the HTML's, beside it.
    assert!(md.contains("](verdict.svg)"), "{md}");
    let report_dir = std::path::Path::new(json["report"].as_str().unwrap())
        .parent()
        .unwrap();
    let forest = std::fs::read_to_string(report_dir.join("verdict.svg")).unwrap();
    assert!(html.contains(&forest));

    // Globs select, --sort ranks (best first, columns in that order).
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["compare", "--json", "--resamples", "100"];
        all.extend_from_slice(args);
        ws.runner(&all).ok().json()["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&["recipe.toml", "dpo_f*"]), ["dpo_fresh"]);
    assert_eq!(
        names(&["recipe.toml", "*"]),
        ["sft", "dpo_continued", "dpo_fresh"]
    );
    let ranked = ws
        .runner(&[
            "compare",
            "recipe.toml",
            "dpo_*",
            "--sort",
            "sft/loss",
            "--resamples",
            "100",
        ])
        .ok()
        .stdout;
    let ranking: Vec<&str> = ranked
        .lines()
        .skip_while(|l| !l.starts_with("ranking by sft/loss (lower is better):"))
        .skip(1)
        .take(2)
        .collect();
    let loss = |line: &str| {
        line.split_whitespace()
            .nth(2)
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert!(loss(ranking[0]) <= loss(ranking[1]), "{ranked}");
    let (best, other) = match ranking[0].split_whitespace().nth(1).unwrap() {
        "dpo_fresh" => ("dpo_fresh", "dpo_continued"),
        _ => ("dpo_continued", "dpo_fresh"),
    };
    let header = ranked.lines().next().unwrap();
    assert!(
        header.find(best) < header.find(other),
        "the best column first: {ranked}"
    );
    let bad = ws.runner(&["compare", "recipe.toml", "--sort", "bleu"]);
    assert_eq!(bad.code, exit::USAGE);
    assert!(
        bad.stderr.contains("cannot rank by `bleu`"),
        "{}",
        bad.stderr
    );
    let none = ws.runner(&["compare", "recipe.toml", "nope*"]);
    assert_eq!(none.code, exit::USAGE);
    assert!(
        none.stderr
            .contains("`nope*` matches no training stage of tiny"),
        "{}",
        none.stderr
    );

    // Two recipes (the second shares every artifact through the cache): stages as recipe:stage.
    ws.write(
        "other.toml",
        &with_eval.replace("name = \"tiny\"", "name = \"other\""),
    );
    let two = ws
        .runner(&[
            "compare",
            "recipe.toml",
            "other.toml",
            "tiny:dpo_continued",
            "other:dpo_fresh",
            "--json",
            "--resamples",
            "100",
        ])
        .ok()
        .json();
    let stage_names: Vec<&str> = two["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stage_names, ["tiny:dpo_continued", "other:dpo_fresh"]);
    let v = &two["verdicts"][0];
    assert_eq!(
        (v["a"].as_str(), v["b"].as_str(), v["paired"].as_u64()),
        (
            Some("tiny:dpo_continued"),
            Some("other:dpo_fresh"),
            Some(200)
        )
    );
    assert!(two["report_html"].as_str().unwrap().contains("tiny+other"));
}

#[test]
fn the_reference_pass_scores_only_the_pairs_training_visits_and_a_longer_run_reuses_them() {
    let ws = Workspace::new();
    // 2 steps of 8 pairs visit 16 of the 1000 training pairs; the 200 eval pairs are all scored.
    ws.write("recipe.toml", &recipe(10, 2, ""));
    ws.runner(&["run", "recipe.toml", "--until", "dpo_continued"])
        .ok();
    let m = manifest(&ws, "dpo_continued")["metrics"].clone();
    assert_eq!(
        (
            m["reference/pairs_computed"].as_u64(),
            m["reference/pairs_reused"].as_u64()
        ),
        (Some(16 + 200), Some(0)),
        "{m}"
    );
    // 4 steps: the same seeded order, so the first 16 pairs are reused.
    ws.write("recipe.toml", &recipe(10, 4, ""));
    ws.runner(&["run", "recipe.toml", "--until", "dpo_continued"])
        .ok();
    let m = manifest(&ws, "dpo_continued")["metrics"].clone();
    assert_eq!(
        (
            m["reference/pairs_computed"].as_u64(),
            m["reference/pairs_reused"].as_u64()
        ),
        (Some(16), Some(16 + 200)),
        "{m}"
    );
}

/// TRL's LD-DPO, f-DPO and WPO options train through the CLI (WPO: its
/// weights are below 1, so the loss is below the unweighted one's log 2
/// at the start), and LD-DPO weighs
/// the reference's tokens as the policy's: the stage starts at a zero
/// margin against its own reference log-probs, kept apart from plain
/// DPO's.
#[test]
fn ld_dpo_f_dpo_and_wpo_train_from_their_own_reference() {
    let ws = Workspace::new();
    let text = recipe(4, 3, "")
        + r#"
[stages.dpo_ld]
kind = "dpo"
model = "merged"
lora = { r = 4, alpha = 8, targets = ["q_proj", "v_proj"] }
data = { train = "DPO_TRAIN", eval = "DPO_EVAL" }
train = { steps = 3, batch = 8, lr = 5e-3, seq_len = 32 }
dpo = { ld_alpha = 0.3, f_divergence_type = "js_divergence", use_weighting = true }
"#;
    let text = text
        .replace("DPO_TRAIN", &data("dpo_train.jsonl").display().to_string())
        .replace("DPO_EVAL", &data("dpo_eval.jsonl").display().to_string());
    let reference_folders = || {
        std::fs::read_dir(ws.cache().join("derived"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("reference-logps-")
            })
            .count()
    };
    // α = 1 weighs nothing: the stage shares plain DPO's reference folders.
    ws.write(
        "recipe.toml",
        &text.replace("ld_alpha = 0.3", "ld_alpha = 1.0"),
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let plain = reference_folders();
    ws.write("recipe.toml", &text);
    ws.runner(&["run", "recipe.toml"]).ok();
    let m = manifest(&ws, "dpo_ld")["metrics"].clone();
    let start = m["before/eval/rewards/margins"].as_f64().unwrap();
    assert!(
        start.abs() < 1e-6,
        "starts at its reference: margin {start}"
    );
    assert!(m["eval/loss"].as_f64().unwrap().is_finite(), "{m}");
    // At policy = reference every pair's sigmoid loss is log 2; WPO's
    // weights (probabilities against Σ p², each below 1) scale it down.
    let start_loss = m["before/eval/loss"].as_f64().unwrap();
    assert!(
        start_loss > 0.0 && start_loss < std::f64::consts::LN_2 - 1e-3,
        "{m}"
    );
    assert!(m["reference/pairs_computed"].as_u64().unwrap() > 0, "{m}");
    // Its own train and eval reference folders beside plain DPO's.
    assert_eq!(reference_folders(), plain + 2);
}
