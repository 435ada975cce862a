//! `eval`'s `chat_prompts`: prompts sent as a user message through the chat
//! template, as an instruct model is asked, or refused by name when the
//! model has no template.

use crate::support::Workspace;
use lora_runner::cli::exit;

#[test]
fn chat_prompts_go_through_the_chat_template() {
    let ws = Workspace::new();
    let question = "sort cba:";
    // The built-in tokenizer's ChatML, rendered by hand.
    let rendered = format!("<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n");
    ws.write(
        "recipe.toml",
        &format!(
            r#"[recipe]
name = "chat"
seed = 4

[stages.base]
kind = "base"
init = {{ arch = "llama", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}

[stages.chat]
kind = "eval"
model = "base"
prompts = ["{question}"]
chat_prompts = true
max_new_tokens = 6

[stages.by_hand]
kind = "eval"
model = "base"
prompts = ["{rendered}"]
max_new_tokens = 6

[stages.spm]
kind = "base"
path = "{spm}"

[stages.no_template]
kind = "eval"
model = "spm"
prompts = ["hello"]
chat_prompts = true
"#,
            spm = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/spm/model.gguf")
                .display()
        ),
    );
    let run = ws.runner(&["run", "recipe.toml"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr.contains("`chat_prompts` needs a chat template"),
        "{}",
        run.stderr
    );
    let completion = |stage: &str| {
        let shown = ws
            .runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .json();
        shown["manifest"]["metrics"]["samples"][0]["completion"].clone()
    };
    assert!(completion("chat").is_string());
    assert_eq!(completion("chat"), completion("by_hand"));
}
