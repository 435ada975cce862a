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

/// GPT-2's byte → printable character map that byte-level BPE uses
/// (space is 'Ġ', newline 'Ċ').
pub fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(byte) {
        char::from(byte)
    } else {
        let shift = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + shift).unwrap()
    }
}

/// Id of a single-byte token in [`write_byte_level_bpe`]'s vocabulary.
pub fn byte_id(byte: u8) -> u32 {
    1 + u32::from(byte)
}

/// Ids of the merged tokens of [`write_byte_level_bpe`], in merge order.
pub const BL: u32 = 257;
pub const BLU: u32 = 258;
pub const BLUE: u32 = 259;
pub const SPACE_BLUE: u32 = 260;
/// `<|endoftext|>`: EOS and padding.
pub const ENDOFTEXT: u32 = 0;

/// A byte-level BPE tokenizer folder (GPT-2 / Qwen2 style: no BOS,
/// `<|endoftext|>` = 0 = EOS): every byte is a token (id 1 + byte) and the
/// only merges spell " blue", so a prompt ending in a space merges with a
/// completion starting "blue" into one token `Ġblue`. The chat template
/// renders "User: …\n" and "Assistant: …\n"; its generation prompt ends in
/// a space.
pub fn write_byte_level_bpe(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), ENDOFTEXT.into());
    for byte in 0..=255u8 {
        vocab.insert(byte_level_char(byte).to_string(), byte_id(byte).into());
    }
    for (token, id) in [
        ("bl", BL),
        ("blu", BLU),
        ("blue", BLUE),
        ("Ġblue", SPACE_BLUE),
    ] {
        vocab.insert(token.into(), id.into());
    }
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": ENDOFTEXT, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab,
            "merges": ["b l", "bl u", "blu e", "Ġ blue"]
        }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n\
                    {% else %}Assistant: {{ m.content }}\n{% endif %}{% endfor %}\
                    {% if add_generation_prompt %}Assistant: {% endif %}";
    let config = serde_json::json!({
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// Ids of `text` in [`write_byte_level_bpe`]'s vocabulary when no merge applies.
pub fn bytes_ids(text: &str) -> Vec<u32> {
    text.bytes().map(byte_id).collect()
}
