//! A GGUF base either way through the CLI: kept in its own blocks
//! (dequantised per product) or, with `quantize = "none"`, dequantised once
//! to f32 by the base stage; and a SentencePiece-vocabulary GGUF trained. The GGUF is one this program wrote (`runner
//! export --gguf --gguf-type q8_0` of an `init` model), so the test needs
//! no download.

use crate::support::{plan_entry, Workspace};
use std::path::Path;

fn data(name: &str) -> String {
    crate::support::recipe_data(name).display().to_string()
}

#[test]
fn a_gguf_base_is_kept_in_its_blocks_or_dequantised_once_as_the_recipe_says() {
    let ws = Workspace::new();
    ws.write(
        "make.toml",
        "[recipe]\nname = \"make\"\nseed = 3\n\n[stages.base]\nkind = \"base\"\n\
         init = { arch = \"llama\", hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 100 }\n",
    );
    ws.runner(&["run", "make.toml"]).ok();
    ws.runner(&[
        "export",
        "make.toml",
        "base",
        "gguf",
        "--gguf",
        "--gguf-type",
        "q8_0",
    ])
    .ok();
    let sft = data("sft_eval.jsonl");
    ws.write(
        "recipe.toml",
        &format!(
            r#"[recipe]
name = "gguf"
seed = 3

[defaults.sft]
train = {{ steps = 2, batch = 2, lr = 1e-3, seq_len = 32 }}
lora = {{ r = 2, alpha = 4 }}
data = {{ train = "{sft}" }}

[defaults.eval]
data = {{ sft = "{sft}" }}
seq_len = 32
prompts = []

[stages.blocks]
kind = "base"
path = "gguf/model.gguf"

[stages.dense]
kind = "base"
path = "gguf/model.gguf"
quantize = "none"

[stages.eval_blocks]
kind = "eval"
model = "blocks"

[stages.eval_dense]
kind = "eval"
model = "dense"

[stages.sft_blocks]
kind = "sft"
model = "blocks"

[stages.sft_dense]
kind = "sft"
model = "dense"

# A SentencePiece vocabulary (tests/fixtures/spm): byte fallback, BOS first.
[stages.spm]
kind = "base"
path = "{spm}"

[stages.sft_spm]
kind = "sft"
model = "spm"

# Declared GGUF exports: scheme one's adapter for llama.cpp, a model in q8_0.
[stages.out_lora]
kind = "export"
from = "sft_blocks"
path = "out/lora"
gguf = "lora"

[stages.out_model]
kind = "export"
from = "dense"
path = "out/model"
gguf = "q8_0"
"#,
            spm = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/spm/model.gguf")
                .display()
        ),
    );
    // Two keys, and `plan` says which is which.
    let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
    assert_ne!(plan_entry(&plan, "blocks").2, plan_entry(&plan, "dense").2);
    // The estimate counts the blocks as stored: q8_0's 8.5 bits a weight.
    let planned = |stage: &str, field: &str| {
        plan["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == stage)
            .unwrap()["memory"][field]
            .as_u64()
            .unwrap()
    };
    let weights = |stage: &str| planned(stage, "weights_bytes");
    let (blocks, dense) = (weights("sft_blocks"), weights("sft_dense"));
    // Embeddings and norms (6.4k + 0.3k values) are dense either way; the
    // projections' 2·(2·64² + 2·32·64 + 3·64·128) = 73728 weights (4
    // query heads, 2 kv heads of 16) are not.
    assert_eq!(dense - blocks, (73728.0 * (32.0 - 8.5) / 8.0) as u64);
    let text = ws.runner(&["plan", "recipe.toml"]).ok().stdout;
    assert!(text.contains("kept in the GGUF's own blocks"), "{text}");
    assert!(text.contains("dequantised once, to f32"), "{text}");

    ws.runner(&["run", "recipe.toml"]).ok();
    let show = |stage: &str| -> serde_json::Value {
        ws.runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .json()
    };
    let dense = show("dense");
    let artifact = Path::new(dense["path"].as_str().unwrap());
    assert!(artifact.join("model.safetensors").is_file());
    let blocks = show("blocks");
    assert!(!Path::new(blocks["path"].as_str().unwrap())
        .join("model.safetensors")
        .exists());
    // The same arithmetic either way: q8_0 values are exact in f32.
    let loss = |stage: &str| {
        show(stage)["manifest"]["metrics"]["sft/loss"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (loss("eval_blocks"), loss("eval_dense"));
    assert!((a - b).abs() / a < 1e-5, "{a} vs {b}");
    // Training sees 8.5 bits a weight on the blocks, 32 dense.
    let bits = |stage: &str| {
        show(stage)["manifest"]["metrics"]["base/bits_per_weight"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(bits("sft_blocks"), 8.5);
    assert_eq!(bits("sft_dense"), 32.0);
    // The declared exports wrote their GGUFs and Modelfiles.
    for file in [
        "out/lora/adapter.gguf",
        "out/lora/Modelfile",
        "out/model/model.gguf",
        "out/model/Modelfile",
    ] {
        assert!(ws.path(file).is_file(), "{file}");
    }
    let exported =
        lora_runner::model::formats::gguf::GgufModel::open(&ws.path("out/model/model.gguf"))
            .unwrap();
    let formats = lora_runner::model::formats::gguf::tensor_formats(&exported);
    assert_eq!(format!("{:?}", formats["blk.0.ffn_up.weight"]), "Q8_0");
    // A format that does not fit the stage is refused at plan time, at its line.
    let text = std::fs::read_to_string(ws.path("recipe.toml")).unwrap();
    ws.write(
        "bad.toml",
        &text.replace("gguf = \"q8_0\"", "gguf = \"lora\""),
    );
    let run = ws.runner(&["plan", "bad.toml"]);
    assert_eq!(run.code, lora_runner::cli::exit::USAGE, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("does not fit stage `dense`, which makes a model"),
        "{}",
        run.stderr
    );
    // The SentencePiece base trained: two steps, a finite loss, near
    // ln(600) for a random model of 600 tokens.
    let spm = show("sft_spm")["manifest"]["metrics"].clone();
    let loss = spm["loss"].as_f64().unwrap();
    assert!(
        spm["steps"].as_f64() == Some(2.0) && (loss - 600f64.ln()).abs() < 1.0,
        "{spm}"
    );
    // The run's estimate is plan's.
    let gib = |stage: &str| {
        show(stage)["manifest"]["metrics"]["memory/estimate_gib"]
            .as_f64()
            .unwrap()
    };
    let planned_gib = |stage: &str| {
        let bytes = planned(stage, "estimate_bytes");
        (bytes as f64 / (1u64 << 30) as f64 * 1000.0).round() / 1000.0
    };
    assert_eq!(gib("sft_blocks"), planned_gib("sft_blocks"));
}
