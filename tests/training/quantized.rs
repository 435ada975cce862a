//! A quantized base end to end on the demo task: SFT with checkpointing on
//! a q4_k base still learns, both DPO schemes still learn, the merge and the
//! evaluation measure what the quantization costs, the adapter stays
//! portable, and a killed run resumes to the same bytes.

use std::path::PathBuf;

use crate::support::{plan_entry, Workspace};

fn data(name: &str) -> PathBuf {
    crate::support::recipe_data(name)
}

/// hidden 64 (rows of 64: q5_0 blocks) and ffn 256 (down_proj's rows of 256:
/// q4_k super-blocks), so both formats of `q4_k` are used.
fn recipe(quantize: &str, sft_steps: u32) -> String {
    format!(
        r#"[recipe]
name = "quantized"
seed = 5

[stages.base]
kind = "base"
init = {{ hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 256, vocab = 100 }}
quantize = "{quantize}"

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft_train}", eval = "{sft_eval}" }}
lora = {{ r = 8, alpha = 16, targets = "all-linear" }}
train = {{ steps = {sft_steps}, batch = 8, lr = 5e-3, seq_len = 32, checkpoint_every = 5, checkpointing = true }}

[stages.dpo_continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}
train = {{ steps = 30, batch = 8, lr = 5e-3, seq_len = 32 }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"
eval = "{sft_eval}"

[stages.dpo_fresh]
kind = "dpo"
model = "merged"
lora = {{ r = 4, alpha = 8, targets = "all-linear" }}
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}
train = {{ steps = 30, batch = 8, lr = 5e-3, seq_len = 32 }}

[stages.eval_sft]
kind = "eval"
model = "base"
adapter = "sft"
data = {{ sft = "{sft_eval}" }}
max_new_tokens = 8
seq_len = 32
"#,
        sft_train = data("sft_train.jsonl").display(),
        sft_eval = data("sft_eval.jsonl").display(),
        dpo_train = data("dpo_train.jsonl").display(),
        dpo_eval = data("dpo_eval.jsonl").display(),
    )
}

fn shown(ws: &Workspace, stage: &str) -> serde_json::Value {
    let out = ws
        .runner(&["show", "recipe.toml", stage, "--json"])
        .ok()
        .stdout;
    serde_json::from_str(&out).unwrap()
}

fn metric(ws: &Workspace, stage: &str, name: &str) -> f64 {
    shown(ws, stage)["manifest"]["metrics"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{stage} has no metric {name}"))
}

/// The merge's saved-weights error recomputed from the files: the largest
/// |W_merged − (W_base + s·B·A)| with the base dense in f32 and s·B·A from
/// the `sft` adapter's tensors and config.
fn saved_error_from_files(ws: &Workspace) -> f64 {
    let f32_cpu = lora_runner::model::decoder::LoadOptions {
        dtype: Some(candle_core::DType::F32),
        device: candle_core::Device::Cpu,
    };
    let base = lora_runner::model::Decoder::load(&artifact(ws, "base"), &f32_cpu).unwrap();
    let merged = lora_runner::model::Decoder::load(&artifact(ws, "merged"), &f32_cpu).unwrap();
    let sft = artifact(ws, "sft");
    let tensors = candle_core::safetensors::load(
        sft.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("adapter_config.json")).unwrap()).unwrap();
    let scale = config["lora_alpha"].as_f64().unwrap() / config["r"].as_f64().unwrap();
    let mut largest = 0f64;
    for (b, m) in base.linears().zip(merged.linears()) {
        let lora = |which: &str| {
            tensors[&format!("base_model.model.{}.lora_{which}.weight", b.name)]
                .to_dtype(candle_core::DType::F64)
                .unwrap()
        };
        let delta = (lora("B").matmul(&lora("A")).unwrap() * scale).unwrap();
        let f64_of = |l: &lora_runner::model::decoder::Linear| {
            l.weight.to_dense(candle_core::DType::F64).unwrap()
        };
        let diff = (f64_of(m) - (f64_of(b) + delta).unwrap()).unwrap();
        let d = diff
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        largest = largest.max(d);
    }
    largest
}

/// SFT at least halves the held-out loss; both DPO schemes reach 0.9
/// held-out preference accuracy.
fn learns_in_both_schemes(ws: &Workspace) {
    let (before, after) = (
        metric(ws, "sft", "before/eval/loss"),
        metric(ws, "sft", "eval/loss"),
    );
    assert!(after <= before / 2.0, "SFT eval loss {before} -> {after}");
    for stage in ["dpo_continued", "dpo_fresh"] {
        let acc = metric(ws, stage, "eval/rewards/accuracies");
        assert!(acc >= 0.9, "{stage}: held-out preference accuracy {acc}");
    }
}

/// What the `sft` adapter says it was trained against.
fn base_note(ws: &Workspace) -> serde_json::Value {
    let file = artifact(ws, "sft").join("base_quantization.json");
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

fn artifact(ws: &Workspace, stage: &str) -> PathBuf {
    PathBuf::from(shown(ws, stage)["path"].as_str().unwrap())
}

#[test]
fn a_q4_k_base_with_checkpointing_still_learns_in_both_schemes_and_measures_its_error() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe("q4_k", 40));
    let plan = ws.runner(&["plan", "recipe.toml"]).ok();
    assert!(
        plan.stdout.contains("q4_k"),
        "plan shows the quantization:\n{}",
        plan.stdout
    );
    ws.runner(&["run", "recipe.toml"]).ok();

    learns_in_both_schemes(&ws);

    // The merge dequantises: the saved weights carry the q4_k rounding of
    // the base, and the re-quantized model (as dpo_fresh loads it) more.
    let saved = metric(&ws, "merged", "merge/weight_max_abs_err");
    let loaded = metric(&ws, "merged", "merge/loaded/weight_max_abs_err");
    assert!(
        saved > 1e-4 && loaded >= saved,
        "saved {saved}, loaded {loaded}"
    );
    let largest = saved_error_from_files(&ws);
    assert!(
        (largest - saved).abs() <= 1e-6 * saved,
        "recorded {saved}, recomputed {largest}"
    );
    let kl = metric(&ws, "merged", "merge/kl");
    assert!(kl > 0.0 && kl < 1.0, "merge KL {kl}");
    let q_kl = metric(&ws, "eval_sft", "quantization/kl");
    assert!(q_kl > 0.0 && q_kl < 1.0, "quantization KL {q_kl}");

    // Scheme one's adapter is an ordinary PEFT adapter that says what it
    // was trained against, and loads onto the full-precision base.
    let sft = artifact(&ws, "sft");
    let note: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sft.join("base_quantization.json")).unwrap())
            .unwrap();
    assert_eq!(note["quantize"], "q4_k");
    assert_eq!(note["formats"]["q4_k"], 2, "{note}");
    assert_eq!(note["formats"]["q5_0"], 12, "{note}");
    let base = artifact(&ws, "base");
    let mut dense = lora_runner::model::Decoder::load(&base, &Default::default()).unwrap();
    lora_runner::model::formats::peft::load_adapter(&mut dense, &sft).unwrap();
    assert!(dense.quantization.is_none() && !dense.lora_parameters().is_empty());
}

#[test]
fn quantize_is_in_the_base_key_and_a_killed_quantized_run_resumes_to_the_same_bytes() {
    let keys = |text: String| {
        let ws = Workspace::new();
        ws.write("recipe.toml", &text);
        let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
        (plan_entry(&plan, "base").2, plan_entry(&plan, "sft").2)
    };
    let (q8, q4) = (keys(recipe("q8_0", 20)), keys(recipe("q4_k", 20)));
    let none = keys(recipe("none", 20));
    let omitted = keys(recipe("none", 20).replace("quantize = \"none\"\n", ""));
    assert!(
        q8.0 != q4.0 && q4.0 != none.0 && q8.1 != q4.1,
        "{q8:?} {q4:?} {none:?}"
    );
    assert_eq!(
        none, omitted,
        "\"none\" is the default and keeps older keys"
    );

    let text = recipe("q8_0", 20);
    let (straight, resumed) = crate::stages::straight_and_resumed_sft(&text);
    assert!(
        straight == resumed,
        "the resumed run ends with the same adapter bytes"
    );
}

/// `quantize = "fp8"`: 128 × 128 blocks, partial on this small model (one
/// block a matrix); both schemes learn, the merge measures what the FP8
/// codes cost, and the base's bits a weight are FP8's.
#[test]
fn an_fp8_base_learns_in_both_schemes_and_measures_its_error() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &recipe("fp8", 40));
    let plan = ws.runner(&["plan", "recipe.toml"]).ok();
    assert!(plan.stdout.contains("float8_e4m3fn"), "{}", plan.stdout);
    ws.runner(&["run", "recipe.toml"]).ok();
    learns_in_both_schemes(&ws);
    // One byte a weight plus one f32 per block: 64×64 and 64×256 matrices
    // hold one or two partial 128×128 blocks, so more than 8 bits.
    let bits = metric(&ws, "sft", "base/bits_per_weight");
    assert!(bits > 8.0 && bits < 8.1, "{bits}");
    let note = base_note(&ws);
    assert_eq!(
        (&note["quantize"], &note["formats"]["fp8"]),
        (&"fp8".into(), &14.into()),
        "{note}"
    );
    // The merge of an FP8 base is written as an FP8 checkpoint, which
    // loading stages read as it is: what is saved is what they hold.
    let saved = metric(&ws, "merged", "merge/weight_max_abs_err");
    let loaded = metric(&ws, "merged", "merge/loaded/weight_max_abs_err");
    assert!(
        saved > 1e-5 && loaded == saved,
        "saved {saved}, loaded {loaded}"
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(artifact(&ws, "merged").join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["quantization_config"]["weight_block_size"],
        serde_json::json!([128, 128])
    );
    let (straight, resumed) = crate::stages::straight_and_resumed_sft(&recipe("fp8", 20));
    assert!(
        straight == resumed,
        "a killed FP8 run resumes to the same bytes"
    );
}

/// transformers' FP8 checkpoint as a base: its projections stay FP8 codes
/// (the plan says so), SFT trains on them, the merge is measured.
#[test]
fn an_fp8_checkpoint_trains_as_it_is_stored() {
    a_checkpoint_trains_as_it_is_stored(
        "llama3",
        "FP8 codes (float8_e4m3fn, an f32 scale per 16 × 16 block)",
        "fp8",
    );
}

/// The same with float8_e5m2 codes and 24 × 16 blocks.
#[test]
fn an_e5m2_checkpoint_trains_as_it_is_stored() {
    a_checkpoint_trains_as_it_is_stored(
        "llama3-e5m2",
        "FP8 codes (float8_e5m2, an f32 scale per 24 × 16 block)",
        "fp8_e5m2",
    );
}

fn a_checkpoint_trains_as_it_is_stored(fixture: &str, planned: &str, label: &str) {
    let ws = Workspace::new();
    let dst = ws.path("models/fp8");
    std::fs::create_dir_all(&dst).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fp8")
        .join(fixture);
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(file), dst.join(file)).unwrap();
    }
    lora_runner::model::formats::tokenizer::write_builtin_tokenizer(&dst, 64).unwrap();
    let text = recipe("none", 20)
        .replace(
            "init = { hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 256, vocab = 100 }\nquantize = \"none\"",
            "path = \"models/fp8\"",
        );
    assert!(text.contains("path = \"models/fp8\""));
    ws.write("recipe.toml", &text);
    let plan = ws.runner(&["plan", "recipe.toml"]).ok();
    assert!(plan.stdout.contains(planned), "{}", plan.stdout);
    ws.runner(&["run", "recipe.toml", "--until", "merged"]).ok();
    let note = base_note(&ws);
    assert!(
        note["quantize"].is_null() && note["formats"][label] == 14,
        "{note}"
    );
    let (before, after) = (
        metric(&ws, "sft", "before/eval/loss"),
        metric(&ws, "sft", "eval/loss"),
    );
    assert!(after < before, "SFT eval loss {before} -> {after}");
    // Measured against an f32 merge into the dequantised codes; the merge
    // is written in the checkpoint's f32, so it is that merge exactly.
    assert_eq!(metric(&ws, "merged", "merge/weight_max_abs_err"), 0.0);
}
