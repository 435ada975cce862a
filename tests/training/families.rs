//! Every model family through the CLI: `init` models of each family through
//! SFT (checkpointed), DPO in both schemes, merge, evaluation with greedy
//! generation and export; transformers' own checkpoints of each family
//! (tests/fixtures/families) evaluated dense and on a q8_0 base; and `plan`
//! refusing a family or setting it cannot compute, at the stage's line.

use crate::support::Workspace;
use lora_runner::cli::exit;
use lora_runner::model::config::ModelConfig;
use lora_runner::model::decoder::{Decoder, LoadOptions};
use lora_runner::model::formats::peft::load_adapter;
use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    crate::support::recipe_data(name)
}

const INIT_FAMILIES: [&str; 8] = [
    "llama", "mistral", "qwen3", "gemma2", "gemma3", "olmo2", "smollm3", "phi3",
];

fn sweep_recipe() -> String {
    let archs: Vec<String> = INIT_FAMILIES.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[recipe]
name = "families"
seed = 5

[defaults.sft]
train = {{ steps = 3, batch = 4, lr = 5e-3, seq_len = 32, checkpointing = true }}

[defaults.dpo]
train = {{ steps = 2, batch = 4, lr = 5e-3, seq_len = 32 }}

[stages.base]
kind = "base"
init = {{ arch = "qwen2", hidden = 32, layers = 4, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}
matrix = {{ "init.arch" = [{archs}] }}

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft_train}", eval = "{sft_eval}" }}
lora = {{ r = 4, alpha = 8, targets = "all-linear" }}

[stages.dpo_continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.dpo_fresh]
kind = "dpo"
model = "merged"
lora = {{ r = 4, alpha = 8, targets = ["o_proj", "down_proj"] }}
data = {{ train = "{dpo_train}", eval = "{dpo_eval}" }}

[stages.eval]
kind = "eval"
model = "merged"
adapter = "dpo_fresh"
data = {{ sft = "{sft_eval}", dpo = "{dpo_eval}" }}
prompts = ["sort cba:"]
max_new_tokens = 4
seq_len = 32
"#,
        archs = archs.join(", "),
        sft_train = data("sft_train.jsonl").display(),
        sft_eval = data("sft_eval.jsonl").display(),
        dpo_train = data("dpo_train.jsonl").display(),
        dpo_eval = data("dpo_eval.jsonl").display(),
    )
}

fn load(dir: &Path) -> Decoder {
    Decoder::load(dir, &LoadOptions::default()).unwrap()
}

#[test]
fn every_family_trains_in_both_schemes_merges_and_exports_through_the_cli() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &sweep_recipe());
    let run = ws.runner(&["run", "recipe.toml"]).ok();
    assert!(
        run.stderr.contains("48 stage(s) ran") || run.stdout.contains("48 stage(s) ran"),
        "{}",
        run.stderr
    );
    for arch in INIT_FAMILIES {
        // Scheme one's adapter in PEFT layout, on its base.
        let adapter = format!("out/{arch}/adapter");
        ws.runner(&[
            "export",
            "recipe.toml",
            &format!("dpo_continued@arch={arch}"),
            &adapter,
        ])
        .ok();
        let base = format!("out/{arch}/base");
        ws.runner(&["export", "recipe.toml", &format!("base@arch={arch}"), &base])
            .ok();
        let mut model = load(&ws.path(&base));
        let family = model.config.architecture;
        assert!(family.model_type().starts_with(arch), "{arch}: {family:?}");
        load_adapter(&mut model, &ws.path(&adapter)).unwrap();
        let projections = model.config.projections().len();
        assert_eq!(model.lora_parameters().len(), 4 * projections * 2, "{arch}");
        // Scheme two's merged model as an HF folder that reads back as
        // the same family, with every norm the family has.
        let merged = format!("out/{arch}/merged");
        ws.runner(&[
            "export",
            "recipe.toml",
            &format!("merged@arch={arch}"),
            &merged,
        ])
        .ok();
        let config = ModelConfig::from_dir(&ws.path(&merged)).unwrap();
        assert_eq!(config.architecture, family, "{arch}");
        let reloaded = load(&ws.path(&merged));
        let norms = reloaded.layers[0].norms(0).len();
        let expected = match arch {
            "gemma2" => 4,
            "gemma3" => 6,
            "qwen3" | "olmo2" => 4,
            _ => 2,
        };
        assert_eq!(norms, expected, "{arch}: norms of a layer");
    }
    // A llama.cpp adapter where llama.cpp has the family; refused by name
    // elsewhere.
    ws.runner(&[
        "export",
        "recipe.toml",
        "dpo_continued@arch=llama",
        "out/gguf",
        "--gguf",
    ])
    .ok();
    assert!(ws.path("out/gguf/adapter.gguf").is_file());
    ws.runner(&[
        "export",
        "recipe.toml",
        "sft@arch=gemma2",
        "out/g2",
        "--gguf",
    ])
    .ok();
    assert!(ws.path("out/g2/adapter.gguf").is_file());
    let refused = ws.runner(&[
        "export",
        "recipe.toml",
        "sft@arch=smollm3",
        "out/s3",
        "--gguf",
    ]);
    assert_eq!(refused.code, exit::USAGE, "{}", refused.stderr);
    assert!(refused.stderr.contains("smollm3") && refused.stderr.contains("not supported yet"));
    // A model stage (scheme two's merge) as a model GGUF, in q8_0 here;
    // `base` formats need a GGUF ancestor; an evaluation has no GGUF form.
    ws.runner(&[
        "export",
        "recipe.toml",
        "merged@arch=llama",
        "out/m",
        "--gguf",
        "--gguf-type",
        "q8_0",
    ])
    .ok();
    let written =
        lora_runner::model::formats::gguf::GgufModel::open(&ws.path("out/m/model.gguf")).unwrap();
    let config = written.config().unwrap();
    assert_eq!((config.hidden_size, config.num_hidden_layers), (32, 4));
    let formats = lora_runner::model::formats::gguf::tensor_formats(&written);
    assert_eq!(format!("{:?}", formats["blk.3.ffn_up.weight"]), "Q8_0");
    assert!(std::fs::read_to_string(ws.path("out/m/Modelfile"))
        .unwrap()
        .contains("FROM ./model.gguf"));
    for (stage, ty, says) in [
        ("merged@arch=llama", "base", "does not descend from one"),
        ("eval@arch=llama", "f16", "neither a model nor an adapter"),
        ("merged@arch=smollm3", "f16", "not supported yet"),
    ] {
        let run = ws.runner(&[
            "export",
            "recipe.toml",
            stage,
            "out/x",
            "--gguf",
            "--gguf-type",
            ty,
        ]);
        assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
        assert!(run.stderr.contains(says), "{stage}: {}", run.stderr);
    }
    // The runs differ by family where the families differ; greedy
    // generation ran for each.
    let eval_loss = |arch: &str| {
        let out = ws
            .runner(&[
                "show",
                "recipe.toml",
                &format!("eval@arch={arch}"),
                "--json",
            ])
            .ok()
            .stdout;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let metrics = &v["manifest"]["metrics"];
        assert_eq!(metrics["samples"][0]["mode"], "greedy", "{arch}");
        metrics["sft/loss"].as_f64().unwrap()
    };
    assert_ne!(eval_loss("gemma2"), eval_loss("gemma3"));
    assert_ne!(eval_loss("llama"), eval_loss("qwen3"));
}

/// A folder of one of transformers' own checkpoints, with the built-in
/// tokenizer beside it.
fn fixture_model(ws: &Workspace, family: &str) -> PathBuf {
    let src = crate::support::model::fixture_family(family);
    let dst = ws.path(&format!("models/{family}"));
    std::fs::create_dir_all(&dst).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(file), dst.join(file)).unwrap();
    }
    lora_runner::model::formats::tokenizer::write_builtin_tokenizer(&dst, 64).unwrap();
    dst
}

#[test]
fn transformers_checkpoints_of_every_family_evaluate_dense_and_q8_0_through_the_cli() {
    let ws = Workspace::new();
    let families = crate::support::model::FIXTURE_FAMILIES;
    let mut recipe = String::from("[recipe]\nname = \"checkpoints\"\nseed = 1\n");
    for family in families {
        fixture_model(&ws, family);
        let stage = family.replace('-', "_");
        recipe.push_str(&format!(
            "[stages.{stage}]\nkind = \"base\"\npath = \"models/{family}\"\n\
             [stages.{stage}_q8]\nkind = \"base\"\npath = \"models/{family}\"\nquantize = \"q8_0\"\n\
             [stages.eval_{stage}]\nkind = \"eval\"\nmodel = \"{stage}\"\ndata = {{ sft = \"{sft}\" }}\nseq_len = 32\n\
             prompts = [\"sort ba:\"]\nmax_new_tokens = 3\n\
             [stages.eval_{stage}_q8]\nkind = \"eval\"\nmodel = \"{stage}_q8\"\ndata = {{ sft = \"{sft}\" }}\nseq_len = 32\n",
            sft = data("sft_eval.jsonl").display()
        ));
    }
    ws.write("recipe.toml", &recipe);
    ws.runner(&["run", "recipe.toml"]).ok();
    for family in families {
        let stage = family.replace('-', "_");
        let loss = |name: &str| -> f64 {
            let out = ws
                .runner(&["show", "recipe.toml", name, "--json"])
                .ok()
                .stdout;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["manifest"]["metrics"]["sft/loss"]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: {v}"))
        };
        let (dense, q8) = (
            loss(&format!("eval_{stage}")),
            loss(&format!("eval_{stage}_q8")),
        );
        assert!(dense.is_finite() && dense > 0.0, "{family}: {dense}");
        // q8_0 moves the loss a little, not a lot.
        let rel = (q8 - dense).abs() / dense;
        assert!(
            rel > 0.0 && rel < 0.02,
            "{family}: dense {dense}, q8_0 {q8}"
        );
    }
}

#[test]
fn plan_refuses_an_unsupported_family_or_setting_at_the_base_stage() {
    for (config, expect) in [
        (
            serde_json::json!({"model_type": "gemma4_text", "hidden_size": 32}),
            "Gemma 4",
        ),
        (
            serde_json::json!({"model_type": "qwen3_moe", "hidden_size": 32}),
            "mixture-of-experts",
        ),
        (
            serde_json::json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
                "rope_scaling": {"rope_type": "mrope", "factor": 2.0}}),
            "mrope",
        ),
        (
            serde_json::json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
                "attn_logit_softcapping": 30.0}),
            "attn_logit_softcapping",
        ),
    ] {
        let ws = Workspace::new();
        ws.write("models/m/config.json", &config.to_string());
        ws.write(
            "recipe.toml",
            "[recipe]\nname = \"r\"\n\n[stages.base]\nkind = \"base\"\npath = \"models/m\"\n",
        );
        let run = ws.runner(&["plan", "recipe.toml"]);
        assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
        assert!(
            run.stderr.contains(expect)
                && run.stderr.contains("recipe.toml:6")
                && run.stderr.contains("stage `base`"),
            "{expect}: {}",
            run.stderr
        );
    }
}
