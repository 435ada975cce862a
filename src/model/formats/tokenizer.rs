//! Tokenizers: a small character-level tokenizer the program builds itself
//! for `init` models (a real tokenizers::Tokenizer, serialized as
//! tokenizer.json + tokenizer_config.json), and the one parser of
//! tokenizer_config.json (`data::ModelTokenizer` loads a tokenizer folder).

use crate::model::error::{ModelError, Result};
use crate::model::formats::io::{write_file_atomic, write_json_atomic};
use serde_json::{json, Map, Value};
use std::path::Path;

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const UNK: &str = "<unk>";

/// Special tokens first (ids 0..4), then "\n" and printable ASCII.
pub const SPECIAL_TOKENS: [&str; 4] = [ENDOFTEXT, IM_START, IM_END, UNK];

/// ChatML, the format Qwen uses; simple enough for any Jinja engine.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The characters of the built-in tokenizer, in id order after the specials.
fn builtin_chars() -> Vec<char> {
    std::iter::once('\n')
        .chain((0x20u8..=0x7e).map(char::from))
        .collect()
}

/// Vocabulary size of the built-in tokenizer (the model vocab must be at least this).
pub fn builtin_vocab_size() -> usize {
    SPECIAL_TOKENS.len() + builtin_chars().len()
}

/// Id of a special token in the built-in tokenizer.
pub fn builtin_special_id(token: &str) -> Option<u32> {
    SPECIAL_TOKENS
        .iter()
        .position(|t| *t == token)
        .map(|i| i as u32)
}

/// tokenizer.json of the built-in tokenizer: WordLevel over single
/// characters (a Split pre-tokenizer isolates every character), Fuse decoder.
/// `[\s\S]` rather than `(?s).` because Oniguruma (Python tokenizers) and
/// fancy-regex disagree on the dot-all flag.
pub fn builtin_tokenizer_json() -> Value {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, tok) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(tok.to_string(), json!(id));
        added.push(json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for (i, c) in builtin_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIAL_TOKENS.len() + i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": Value::Object(vocab), "unk_token": UNK}
    })
}

/// tokenizer_config.json for the built-in tokenizer.
pub fn builtin_tokenizer_config_json(model_max_length: usize) -> Value {
    let mut decoder = Map::new();
    for (id, tok) in SPECIAL_TOKENS.iter().enumerate() {
        decoder.insert(
            id.to_string(),
            json!({"content": tok, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
        );
    }
    json!({
        "added_tokens_decoder": Value::Object(decoder),
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": UNK,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

/// Writes tokenizer.json and tokenizer_config.json of the built-in tokenizer into `dir`.
pub fn write_builtin_tokenizer(dir: &Path, model_max_length: usize) -> Result<()> {
    let tok_json = builtin_tokenizer_json();
    let text = serde_json::to_string_pretty(&tok_json).map_err(|e| ModelError::Json {
        path: dir.join("tokenizer.json"),
        source: e,
    })?;
    // Check that the tokenizers crate accepts what we are about to write.
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| ModelError::Tokenizer {
            path: dir.join("tokenizer.json"),
            message: e.to_string(),
        })?;
    write_file_atomic(&dir.join("tokenizer.json"), format!("{text}\n").as_bytes())?;
    write_json_atomic(
        &dir.join("tokenizer_config.json"),
        &builtin_tokenizer_config_json(model_max_length),
    )
}

/// Special tokens and chat template as read from tokenizer_config.json.
/// The one parser of that file (`data` uses it too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Parses a tokenizer_config.json value. Tokens may be strings or
    /// `{"content": ...}` objects; see `chat_template_from_config` for the
    /// template. The error message does not name the file.
    pub fn from_json(cfg: &Value) -> std::result::Result<Self, String> {
        let token = |key: &str| -> std::result::Result<Option<String>, String> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(format!("\"{key}\" has no string \"content\"")),
                },
                Some(_) => Err(format!("\"{key}\" must be a string or an object")),
            }
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            chat_template: chat_template_from_config(cfg)?,
        })
    }
}

/// The chat template of a tokenizer_config.json value: a string, or a list
/// of `{name, template}` of which the one named "default" is used. A list
/// without "default" is an error, as in transformers' `get_chat_template`
/// when no template name is asked for.
pub fn chat_template_from_config(cfg: &Value) -> std::result::Result<Option<String>, String> {
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| "\"chat_template\" list has no \"default\" entry".to_string()),
        Some(_) => Err("\"chat_template\" must be a string or a list".into()),
    }
}
