//! Stage keys: stable under everything that does not change the result,
//! different under anything that does.

use crate::support;
use crate::support::Workspace;
use lora_runner::cache::Cache;
use lora_runner::cli::exit;
use lora_runner::plan::{self, Overrides};

/// Keys of every stage of `text`, by stage name.
fn keys(ws: &Workspace, text: &str) -> std::collections::BTreeMap<String, String> {
    let path = ws.write("recipe.toml", text);
    let registry = support::kinds::registry();
    let recipe = lora_runner::recipe::load(&path, &registry).unwrap_or_else(|e| panic!("{e}"));
    let dag = lora_runner::graph::build(&recipe).unwrap_or_else(|e| panic!("{e}"));
    let cache = Cache::open(&ws.cache()).unwrap();
    let plan =
        plan::plan(&recipe, &dag, &cache, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
    plan.stages.into_iter().map(|s| (s.name, s.key)).collect()
}

const RECIPE: &str = r#"[recipe]
name = "keys"
seed = 5

[defaults.sft]
train = { lr = 0.001 }

[stages.base]
kind = "base"
path = "models/m"

[stages.sft]
kind = "sft"
model = "base"
data = { train = "data/sft.jsonl" }
lora = { r = 8, targets = ["q_proj", "v_proj"] }
train = { steps = 20 }

[stages.dpo]
kind = "dpo"
model = "base"
adapter = "sft"
data = { train = "data/dpo.jsonl" }
"#;

fn setup() -> Workspace {
    let ws = Workspace::new();
    ws.model_folder("models/m", 2);
    ws.write(
        "data/sft.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    );
    ws.write(
        "data/dpo.jsonl",
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
    );
    ws
}

#[test]
fn keys_ignore_order_comments_whitespace_and_spelled_out_defaults() {
    let ws = setup();
    let original = keys(&ws, RECIPE);
    let rewritten = r#"# the same recipe, written differently
[stages.dpo]
data = {train="data/dpo.jsonl"}   # preference pairs
adapter = "sft"
model = "base"
kind = "dpo"
dpo = { beta = 0.1, loss = "sigmoid", label_smoothing = 0.0 }   # the defaults, spelled out

[stages.sft]
train = { steps = 20, lr = 1e-3, batch = 8, schedule = "linear", grad_accum = 1 }
lora.targets = ["q_proj", "v_proj"]
lora.r = 8
lora.alpha = 16.0
data.train = "data/sft.jsonl"
model = "base"
kind = "sft"

[stages.base]
path = "models/../models/m"
kind = "base"

[recipe]
seed = 5
name = "another name"
"#;
    assert_eq!(keys(&ws, rewritten), original);
}

#[test]
fn any_parameter_or_byte_changes_the_key() {
    let ws = setup();
    let original = keys(&ws, RECIPE);

    let changed = keys(
        &ws,
        &RECIPE.replace("train = { steps = 20 }", "train = { steps = 21 }"),
    );
    assert_ne!(changed["sft"], original["sft"]);
    assert_ne!(
        changed["dpo"], original["dpo"],
        "dependents get new keys too"
    );
    assert_eq!(changed["base"], original["base"]);

    let changed = keys(&ws, &RECIPE.replace("lr = 0.001", "lr = 0.002"));
    assert_ne!(
        changed["sft"], original["sft"],
        "a default changes the key of stages it applies to"
    );

    let changed = keys(&ws, &RECIPE.replace("seed = 5", "seed = 6"));
    assert!(
        changed.iter().all(|(k, v)| v != &original[k]),
        "the seed enters every key"
    );

    ws.write(
        "data/dpo.jsonl",
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"d\"}\n",
    );
    let changed = keys(&ws, RECIPE);
    assert_eq!(changed["sft"], original["sft"]);
    assert_ne!(changed["dpo"], original["dpo"], "one data byte");

    let mut weights = std::fs::read(ws.path("models/m/model.safetensors")).unwrap();
    weights[100] ^= 1;
    ws.write_bytes("models/m/model.safetensors", &weights);
    let changed = keys(&ws, RECIPE);
    assert!(
        changed.iter().all(|(k, v)| v != &original[k]),
        "one model bit changes everything downstream"
    );
}

#[test]
fn a_changed_model_file_is_named_in_the_reason() {
    let ws = setup();
    ws.write(
        "recipe.toml",
        "[recipe]\nname = \"m\"\n[stages.base]\nkind = \"base\"\npath = \"models/m\"\n",
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let mut weights = std::fs::read(ws.path("models/m/model.safetensors")).unwrap();
    weights[0] ^= 1;
    ws.write_bytes("models/m/model.safetensors", &weights);
    let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
    assert_eq!(
        support::plan_entry(&plan, "base").1,
        "model file changed: models/m/model.safetensors"
    );
}

#[test]
fn canonical_json_sorts_keys_at_every_level() {
    let a: serde_json::Value =
        serde_json::from_str(r#"{"b": {"y": 1, "x": [2, {"q": 1, "p": 2}]}, "a": 1.5}"#).unwrap();
    assert_eq!(
        lora_runner::hashing::canonical_json(&a),
        r#"{"a":1.5,"b":{"x":[2,{"p":2,"q":1}],"y":1}}"#
    );
}

#[test]
fn the_hash_memo_is_used_while_the_file_is_untouched_and_dropped_when_touched() {
    let ws = Workspace::new();
    let file = ws.write("big.bin", "hello");
    let hasher = lora_runner::hashing::Hasher::new(ws.path("memo"));
    let real = hasher.file(&file).unwrap();
    assert_eq!(
        real,
        blake3::hash(b"hello").to_hex().to_string(),
        "an independent blake3"
    );
    // Plant a different hash for the same stamp: the memo must answer without reading.
    hasher.seed(&file, &"f".repeat(64)).unwrap();
    assert_eq!(hasher.file(&file).unwrap(), "f".repeat(64));
    // Touching the file (new mtime/ctime) makes the memo miss.
    std::thread::sleep(std::time::Duration::from_millis(10));
    ws.write("big.bin", "hello");
    assert_eq!(hasher.file(&file).unwrap(), real);
}

#[test]
fn the_device_kind_enters_the_keys_of_computing_stages_only() {
    let ws = setup();
    let path = ws.write("recipe.toml", RECIPE);
    let registry = support::kinds::registry();
    let recipe = lora_runner::recipe::load(&path, &registry).unwrap();
    let dag = lora_runner::graph::build(&recipe).unwrap();
    let cache = Cache::open(&ws.cache()).unwrap();
    let plan = plan::plan(&recipe, &dag, &cache, &Overrides::default()).unwrap();
    let device = |name: &str| {
        plan.stages
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .key_inputs
            .device
            .clone()
    };
    assert_eq!(
        device("sft").as_deref(),
        Some("cpu"),
        "auto resolves to the CPU without CUDA"
    );
    assert_eq!(device("dpo").as_deref(), Some("cpu"));
    assert_eq!(
        device("base"),
        None,
        "a model folder does not depend on the device"
    );
}

#[test]
fn asking_for_a_gpu_without_cuda_is_a_recipe_error_at_the_device_line() {
    if cfg!(feature = "cuda") {
        return;
    }
    let ws = setup();
    ws.write(
        "recipe.toml",
        &RECIPE.replace("seed = 5", "seed = 5\ndevice = \"cuda:0\""),
    );
    let run = ws.runner(&["plan", "recipe.toml"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(run.stderr.contains("[recipe.toml:4:10]"), "{}", run.stderr);
    assert!(run.stderr.contains("built without CUDA"), "{}", run.stderr);
    // --device overrides the recipe.
    ws.runner(&["plan", "recipe.toml", "--device", "cpu"]).ok();
    let bad = ws.runner(&["plan", "recipe.toml", "--device", "tpu"]);
    assert_eq!(bad.code, exit::USAGE);
    assert!(
        bad.stderr.contains("unknown device `tpu`"),
        "{}",
        bad.stderr
    );
}

/// TRL's DPO options enter the key only when they change the loss.
#[test]
fn dpo_options_enter_the_key_only_when_they_change_the_loss() {
    let ws = setup();
    let original = keys(&ws, RECIPE);
    let with = |table: &str| {
        keys(
            &ws,
            &RECIPE.replace(
                "data = { train = \"data/dpo.jsonl\" }\n",
                &format!("data = {{ train = \"data/dpo.jsonl\" }}\ndpo = {table}\n"),
            ),
        )["dpo"]
            .clone()
    };
    // Spelled-out defaults, LD-DPO's α = 1 (no weighting) and the
    // α-divergence's α = 1 (its reverse-KL limit) are the same loss.
    assert_eq!(
        with(r#"{ f_divergence_type = "reverse_kl" }"#),
        original["dpo"]
    );
    assert_eq!(with("{ ld_alpha = 1.0 }"), original["dpo"]);
    assert_eq!(
        with(r#"{ f_divergence_type = "alpha_divergence", f_alpha_divergence_coef = 1.0 }"#),
        original["dpo"]
    );
    let js = with(r#"{ f_divergence_type = "js_divergence" }"#);
    let alpha = with(r#"{ f_divergence_type = "alpha_divergence" }"#);
    let alpha_3 =
        with(r#"{ f_divergence_type = "alpha_divergence", f_alpha_divergence_coef = 0.3 }"#);
    let ld = with("{ ld_alpha = 0.5 }");
    let ld_0 = with("{ ld_alpha = 0.0 }");
    let wpo = with("{ use_weighting = true }");
    assert_eq!(with("{ use_weighting = false }"), original["dpo"]);
    let all = [&original["dpo"], &js, &alpha, &alpha_3, &ld, &ld_0, &wpo];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }
}
