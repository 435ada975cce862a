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
    // Sampling: seeded, so the same twice; a nucleus that small keeps only
    // the most likely token, so it is the greedy answer.
    let answer = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "generate",
            "recipe.toml",
            "--stages",
            "sft",
            "--raw",
            "--json",
        ];
        args.extend_from_slice(extra);
        args.push("sort cba:");
        serde_json::from_str(ws.runner(&args).ok().stdout.trim()).unwrap()
    };
    let greedy = answer(&[]);
    let hot = ["--temperature", "3", "--seed", "4"];
    let sampled = answer(&hot);
    assert_eq!(sampled["mode"], "sampled (temperature 3)");
    assert_eq!(sampled, answer(&hot));
    assert_ne!(sampled["completion"], greedy["completion"]);
    let narrow = answer(&["--temperature", "3", "--top-p", "1e-9"]);
    assert_eq!(narrow["mode"], "sampled (temperature 3, top_p 0.000000001)");
    assert_eq!(narrow["completion"], greedy["completion"]);
    let run = ws.runner(&[
        "generate",
        "recipe.toml",
        "--stages",
        "sft",
        "--temperature",
        "1",
        "--top-p",
        "0",
        "hi",
    ]);
    assert_eq!(run.code, exit::USAGE);
    assert!(run.stderr.contains("--top-p"), "{}", run.stderr);
}

/// Tokens reach standard output while generation goes on (read here from a
/// run asked for a million tokens, still running), and Ctrl-C stops it
/// cleanly: the line is ended, nothing more comes, exit 130.
#[test]
fn generate_streams_tokens_and_ctrl_c_stops_it() {
    use std::io::Read;
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        "[recipe]\nname = \"stream\"\nseed = 9\n\n[stages.base]\nkind = \"base\"\n\
         init = { arch = \"qwen2\", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }\n",
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "generate",
            "recipe.toml",
            "--stages",
            "base",
            "--raw",
            "--max-new-tokens",
            "1000000",
            "sort cba:",
        ])
        .current_dir(ws.path("."))
        .env("RUNNER_CACHE", ws.cache())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let header = "── sort cba:\nbase (greedy): ";
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.len() < header.len() + 40 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "output ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the text came while generating"
    );
    assert!(String::from_utf8_lossy(&seen).starts_with(header));
    let send = std::thread::spawn(move || crate::support::interrupt_and_wait(child));
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    send.join().unwrap();
    seen.extend(rest);
    let text = String::from_utf8(seen).unwrap();
    assert!(
        text.ends_with('\n') && text.lines().count() == 2,
        "{text:?}"
    );
}
