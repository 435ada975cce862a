//! Artifacts are the same bytes on every machine: the same recipe run into
//! two caches in two different folders makes the same artifact ids, stage
//! by stage. Adapters name their base symbolically (no cache path), and
//! wall-clock figures live in an unhashed timings file beside metrics.jsonl.

use crate::support::Workspace;
use std::path::Path;

fn data(name: &str) -> String {
    crate::support::recipe_data(name).display().to_string()
}

/// Both schemes in five stages on a tiny model (`sft_lr` varies the SFT);
/// also the remote-cache tests' recipe.
pub fn recipe(sft_lr: &str) -> String {
    let (sft, dpo) = (data("sft_train.jsonl"), data("dpo_train.jsonl"));
    format!(
        r#"[recipe]
name = "port"
seed = 3

[defaults.sft]
train = {{ steps = 2, batch = 2, lr = {sft_lr}, seq_len = 32 }}
[defaults.dpo]
train = {{ steps = 2, batch = 2, lr = 1e-3, seq_len = 32 }}

[stages.base]
kind = "base"
init = {{ arch = "qwen2", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft}" }}
lora = {{ r = 2, alpha = 4 }}

[stages.continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo}" }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.fresh]
kind = "dpo"
model = "merged"
lora = {{ r = 2, alpha = 4 }}
data = {{ train = "{dpo}" }}
"#
    )
}

#[test]
fn the_same_recipe_makes_the_same_artifacts_in_two_caches() {
    let ws = Workspace::new();
    let elsewhere = tempfile::tempdir().unwrap();
    ws.write("recipe.toml", &recipe("1e-3"));
    assert!(lora_runner::cache::UNHASHED.contains(&lora_runner::train::trainer::TIMINGS_FILE));
    let caches = [ws.path("one"), elsewhere.path().join("two")];
    let mut ids = Vec::new();
    for cache in &caches {
        let cache = cache.display().to_string();
        ws.runner(&["--cache", &cache, "run", "recipe.toml"]).ok();
        let mut found: Vec<String> = std::fs::read_dir(Path::new(&cache).join("artifacts"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        ids.push(found);
    }
    assert_eq!(ids[0].len(), 5, "{:?}", ids[0]);
    assert_eq!(ids[0], ids[1], "artifact ids differ between the two caches");

    let show = |stage: &str| -> serde_json::Value {
        let cache = caches[0].display().to_string();
        ws.runner(&["--cache", &cache, "show", "recipe.toml", stage, "--json"])
            .ok()
            .json()
    };
    for (stage, base) in [
        ("sft", "port/base"),
        ("continued", "port/base"),
        ("fresh", "port/merged"),
    ] {
        let artifact = Path::new(show(stage)["path"].as_str().unwrap()).to_path_buf();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(artifact.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["base_model_name_or_path"], base, "{stage}");
        let metrics = std::fs::read_to_string(artifact.join("metrics.jsonl")).unwrap();
        assert!(!metrics.contains("tokens_per_s") && !metrics.contains("elapsed_s"));
        let timings = std::fs::read_to_string(artifact.join("timings.jsonl")).unwrap();
        assert_eq!(timings.lines().count(), 2, "{stage}: one line a step");
        assert!(timings.contains("\"tokens_per_s\"") && timings.contains("\"elapsed_s\""));
    }
}

/// A write the machine refuses (here a file-size limit, `ulimit -f`, as a
/// full disk would) fails the stage as the machine's failure: exit 3, the
/// file and the stage named, and no artifact, half-written or whole.
#[test]
fn a_write_the_disk_refuses_is_exit_3_naming_the_file_and_leaves_no_artifact() {
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        "[recipe]\nname = \"full\"\n\n[stages.base]\nkind = \"base\"\n\
         init = { arch = \"llama\", hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 100 }\n",
    );
    // 64 blocks of 512 bytes: the model's 150 KB safetensors file cannot be
    // written; SIGXFSZ ignored, so the write fails with EFBIG instead.
    let run = ws.runner_limited("ulimit -f 64; trap '' XFSZ", &["run", "recipe.toml"], &[]);
    let stderr = &run.stderr;
    assert_eq!(run.code, lora_runner::cli::exit::ENVIRONMENT, "{stderr}");
    assert!(stderr.contains("base: FAILED writing"), "{stderr}");
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    let artifacts = ws.cache().join("artifacts");
    assert!(
        !artifacts.exists() || std::fs::read_dir(&artifacts).unwrap().next().is_none(),
        "an artifact was left"
    );
    // With room again, the same command runs.
    ws.runner(&["run", "recipe.toml"]).ok();
}
