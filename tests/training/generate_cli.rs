//! `runner generate`: finished stages answer prompts side by side, each
//! model as its stage saw it, greedy output equal to the `eval` stage's
//! samples for the same prompts; nothing is cached.

use crate::support::Workspace;
use lora_runner::cli::exit;

#[test]
fn generate_answers_side_by_side_as_the_eval_stage_does() {
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        &format!(
            r#"[recipe]
name = "gen"
seed = 9

[stages.base]
kind = "base"
init = {{ arch = "qwen2", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{train}" }}
lora = {{ r = 4, alpha = 8 }}
train = {{ steps = 60, batch = 8, lr = 3e-2, seq_len = 32 }}

[stages.ev]
kind = "eval"
model = "base"
adapter = "sft"
prompts = ["sort cba:", "sort zyx:"]
max_new_tokens = 6
seq_len = 32
"#,
            train = crate::support::recipe_data("sft_train.jsonl").display()
        ),
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let before = ws.artifacts();
    let run = ws
        .runner(&[
            "generate",
            "recipe.toml",
            "--stages",
            "base,sft",
            "--raw",
            "--max-new-tokens",
            "6",
            "--json",
            "sort cba:",
            "sort zyx:",
        ])
        .ok();
    let rows: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4, "{}", run.stdout);
    let eval = ws
        .runner(&["show", "recipe.toml", "ev", "--json"])
        .ok()
        .json();
    for sample in eval["manifest"]["metrics"]["samples"].as_array().unwrap() {
        let ours = rows
            .iter()
            .find(|r| r["stage"] == "sft" && r["prompt"] == sample["prompt"])
            .unwrap();
        assert_eq!(
            ours["completion"], sample["completion"],
            "{}",
            sample["prompt"]
        );
    }
    // The trained adapter changed what the model says.
    let said = |stage: &str| -> Vec<&serde_json::Value> {
        rows.iter()
            .filter(|r| r["stage"] == stage)
            .map(|r| &r["completion"])
            .collect()
    };
    assert_ne!(said("base"), said("sft"));
    assert_eq!(ws.artifacts(), before, "generate wrote to the cache");
    // Side by side as text; the chat template by default.
    let text = ws
        .runner(&[
            "generate",
            "recipe.toml",
            "--stages",
            "sft,base",
            "sort cba:",
        ])
        .ok()
        .stdout;
    assert!(text.starts_with("── sort cba:\nsft (greedy): "), "{text}");
    assert!(text.contains("\nbase (greedy): "), "{text}");
    // An evaluation makes no model; a stage not run is named.
    let run = ws.runner(&["generate", "recipe.toml", "--stages", "ev", "hi"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(
        run.stderr
            .contains("`ev` makes neither a model nor an adapter"),
        "{}",
        run.stderr
    );
    let run = ws.runner(&["generate", "recipe.toml", "--stages", "nope", "hi"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(run.stderr.contains("nope"), "{}", run.stderr);
    // A glob picks the stages that make a model or an adapter (not `ev`),
    // in recipe order, each once.
    let stages_of = |selector: &str| -> Vec<String> {
        ws.runner(&[
            "generate",
            "recipe.toml",
            "--stages",
            selector,
            "--json",
            "hi",
        ])
        .ok()
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
    };
    assert_eq!(stages_of("*"), ["base", "sft"]);
    assert_eq!(stages_of("s*,base,sf?"), ["sft", "base"]);
    let run = ws.runner(&["generate", "recipe.toml", "--stages", "dpo_*", "hi"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(
        run.stderr.contains("`dpo_*` matches no stage"),
        "{}",
        run.stderr
    );
}
