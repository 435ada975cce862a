//! Fixtures shared by the integration tests: a tiny hand-built tokenizer and
//! JSONL writers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lora_runner::data::{ModelTokenizer, TokenizeSettings};

/// Word-level vocabulary; ids are what the tests expect by hand.
pub const VOCAB: &[(&str, u32)] = &[
    ("<unk>", 0),
    ("<s>", 1),
    ("</s>", 2),
    ("<|im_start|>", 3),
    ("<|im_end|>", 4),
    ("hello", 5),
    ("world", 6),
    ("how", 7),
    ("are", 8),
    ("you", 9),
    ("fine", 10),
    ("user", 11),
    ("assistant", 12),
    ("system", 13),
    ("bad", 14),
    ("good", 15),
    ("a", 16),
    ("b", 17),
    ("c", 18),
    ("d", 19),
    ("e", 20),
    ("f", 21),
];

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const IM_START: u32 = 3;
pub const IM_END: u32 = 4;

/// Writes tokenizer.json: WordLevel over whitespace-split words, special
/// tokens as added tokens, and a post-processor that prepends `<s>` (like
/// Llama's). Returns its path.
pub fn write_tokenizer(dir: &Path) -> PathBuf {
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .map(|&(word, id)| (word.to_string(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = VOCAB[..5]
        .iter()
        .map(|&(word, id)| {
            serde_json::json!({
                "id": id, "content": word, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    let bos = |type_id: u32| serde_json::json!({"SpecialToken": {"id": "<s>", "type_id": type_id}});
    let seq =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos(0), seq("A", 0)],
            "pair": [bos(0), seq("A", 0), seq("B", 1)],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tokenizer).unwrap()).unwrap();
    path
}

/// Writes tokenizer_config.json with `<s>`/`</s>` and an optional template.
pub fn write_config(dir: &Path, chat_template: Option<&str>) {
    let mut config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": false},
        "pad_token": null,
    });
    if let Some(template) = chat_template {
        config["chat_template"] = template.into();
    }
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// A tokenizer folder with the given template, loaded.
pub fn tokenizer(dir: &Path, chat_template: Option<&str>) -> ModelTokenizer {
    let path = write_tokenizer(dir);
    write_config(dir, chat_template);
    ModelTokenizer::load(&path).unwrap()
}

/// Writes `lines` (joined by newlines) as a JSONL file named `name`.
pub fn write_jsonl(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

pub fn settings(seq_len: usize) -> TokenizeSettings {
    TokenizeSettings::new(seq_len)
}
