//! The real pretrained model through the CLI: a `base` stage on SmolLM2's
//! GGUF (fetched by scripts/fetch-smollm2.sh; see tests/model/gguf.rs for
//! what its numbers are checked against), an evaluation of a few rows, two
//! SFT steps on its Q4_1 blocks, the merge, and both out as GGUF.

use crate::support::model::smollm2;
use crate::support::Workspace;
use std::path::PathBuf;

#[test]
fn smollm2_from_its_gguf_evaluates_and_fine_tunes_through_the_cli() {
    let Some(gguf) = smollm2() else { return };
    let ws = Workspace::new();
    let rows = [
        (
            "What is the capital of France?",
            " The capital of France is Paris.",
        ),
        ("What is 2 + 3?", " 2 + 3 = 5."),
        ("Name a primary color.", " Red is a primary color."),
        ("What do bees make?", " Bees make honey."),
    ];
    let jsonl: String = rows
        .iter()
        .map(|(p, c)| format!("{}\n", serde_json::json!({"prompt": p, "completion": c})))
        .collect();
    ws.write("data/train.jsonl", &jsonl);
    ws.write(
        "recipe.toml",
        &format!(
            r#"[recipe]
name = "smollm2"
seed = 2

[stages.base]
kind = "base"
path = "{gguf}"

[stages.before]
kind = "eval"
model = "base"
data = {{ sft = "data/train.jsonl" }}
seq_len = 48

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "data/train.jsonl" }}
lora = {{ r = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}
train = {{ steps = 2, batch = 2, lr = 1e-3, seq_len = 48 }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"
dtype = "bf16"
"#,
            gguf = gguf.display()
        ),
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let show = |stage: &str| -> serde_json::Value {
        let out = ws
            .runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .stdout;
        serde_json::from_str(&out).unwrap()
    };
    let base = show("base");
    let artifact = PathBuf::from(base["path"].as_str().unwrap());
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.gguf",
    ] {
        assert!(artifact.join(file).is_file(), "{file} in the base artifact");
    }
    // A pretrained model already knows these answers: a low loss.
    let loss = show("before")["manifest"]["metrics"]["sft/loss"]
        .as_f64()
        .unwrap();
    assert!(
        loss > 0.0 && loss < 3.0,
        "SmolLM2's loss on its own answers: {loss}"
    );
    let metrics = show("sft")["manifest"]["metrics"].clone();
    assert!(metrics.to_string().contains("loss"), "{metrics}");
    // For llama.cpp and ollama: the adapter and a Modelfile on the base GGUF.
    ws.runner(&["export", "recipe.toml", "sft", "out", "--gguf"])
        .ok();
    assert!(ws.path("out/adapter.gguf").is_file());
    let modelfile = std::fs::read_to_string(ws.path("out/Modelfile")).unwrap();
    let from = format!("FROM {}", artifact.join("model.gguf").display());
    for line in [
        from.as_str(),
        "ADAPTER ./adapter.gguf",
        "PARAMETER stop \"<|im_end|>\"",
    ] {
        assert!(modelfile.contains(line), "{line} in\n{modelfile}");
    }
    assert!(modelfile.contains("<|im_start|>assistant"));
    assert!(modelfile.contains("SYSTEM \"\"\"You are a helpful AI assistant named SmolLM"));

    // Scheme two's merge onto the Q4_1 blocks: measured against an f32
    // merge into the dequantised blocks (here the bf16 cast's error)...
    let merge = show("merged")["manifest"]["metrics"].clone();
    let err = merge["merge/weight_max_abs_err"].as_f64().unwrap();
    assert!(err > 0.0 && err < 0.05, "{merge}");
    // ...and out as GGUF for llama.cpp: f16 by default, keeping all of the
    // fine-tune; in the base's own Q4_1 blocks on request, which round two
    // steps' change back onto the base's grid, and the export says so.
    let f16 = ws
        .runner(&["export", "recipe.toml", "merged", "out/merged", "--gguf"])
        .ok();
    assert!(
        f16.stderr.contains("f16 model") && !f16.stderr.contains("warning"),
        "{}",
        f16.stderr
    );
    let same = ws
        .runner(&[
            "export",
            "recipe.toml",
            "merged",
            "out/q",
            "--gguf",
            "--gguf-type",
            "base",
        ])
        .ok();
    assert!(
        same.stderr.contains("warning: base keeps"),
        "{}",
        same.stderr
    );
    use lora_runner::model::formats::gguf::{tensor_formats, GgufModel};
    let exported = GgufModel::open(&ws.path("out/q/model.gguf")).unwrap();
    let original = GgufModel::open(&gguf).unwrap();
    assert_eq!(tensor_formats(&exported), tensor_formats(&original));
    assert_eq!(
        exported.tokenizer_json().unwrap(),
        original.tokenizer_json().unwrap()
    );
    let modelfile = std::fs::read_to_string(ws.path("out/merged/Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf\n"), "{modelfile}");
    // An adapter is not given a number format.
    let run = ws.runner(&[
        "export",
        "recipe.toml",
        "sft",
        "out/x",
        "--gguf",
        "--gguf-type",
        "q8_0",
    ]);
    assert_eq!(run.code, lora_runner::cli::exit::USAGE, "{}", run.stderr);
}

#[test]
fn plan_refuses_a_gguf_that_is_not_one() {
    let ws = Workspace::new();
    ws.write("model.gguf", "not a gguf");
    ws.write(
        "recipe.toml",
        "[recipe]\nname = \"r\"\n\n[stages.base]\nkind = \"base\"\npath = \"model.gguf\"\n",
    );
    let run = ws.runner(&["plan", "recipe.toml"]);
    assert_eq!(run.code, lora_runner::cli::exit::USAGE, "{}", run.stderr);
    assert!(
        run.stderr.contains("not a GGUF file") && run.stderr.contains("recipe.toml:6"),
        "{}",
        run.stderr
    );
}
