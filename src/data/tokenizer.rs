//! The model's tokenizer: `tokenizer.json` plus the special tokens and chat
//! template that Hugging Face keeps in `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::data::error::{DataError, RowError};

/// A special token's text and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

pub use crate::model::formats::tokenizer::TokenizerConfig;

// The parser itself is the model's; this adds reading the file with data errors.
impl TokenizerConfig {
    /// Reads and parses `tokenizer_config.json` (see `TokenizerConfig::from_json`).
    pub fn from_json_file(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let invalid = |message: String| DataError::TokenizerConfig {
            path: path.to_path_buf(),
            message,
        };
        let json: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        TokenizerConfig::from_json(&json).map_err(invalid)
    }
}

/// A loaded tokenizer with its special tokens resolved to ids.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl ModelTokenizer {
    /// Loads `tokenizer.json` and, from the same folder, `tokenizer_config.json`
    /// and `chat_template.jinja` when present (newer transformers saves the
    /// template in the latter; it is used only if the config has none).
    pub fn load(tokenizer_json: &Path) -> Result<Self, DataError> {
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() {
            TokenizerConfig::from_json_file(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        let jinja_path = dir.join("chat_template.jinja");
        if config.chat_template.is_none() && jinja_path.is_file() {
            let source =
                std::fs::read_to_string(&jinja_path).map_err(|e| DataError::io(&jinja_path, e))?;
            config.chat_template = Some(source);
        }
        Self::from_files(tokenizer_json, config)
    }

    /// Loads `tokenizer.json` with an already parsed config.
    pub fn from_files(tokenizer_json: &Path, config: TokenizerConfig) -> Result<Self, DataError> {
        let tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| DataError::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, config, tokenizer_json.to_path_buf())
    }

    fn new(
        tokenizer: Tokenizer,
        config: TokenizerConfig,
        origin: PathBuf,
    ) -> Result<Self, DataError> {
        let resolve =
            |text: Option<String>, key: &str| -> Result<Option<SpecialToken>, DataError> {
                let Some(text) = text else { return Ok(None) };
                match tokenizer.token_to_id(&text) {
                    Some(id) => Ok(Some(SpecialToken { text, id })),
                    None => Err(DataError::Tokenizer {
                        path: origin.clone(),
                        message: format!("{key} {text:?} is not in the vocabulary"),
                    }),
                }
            };
        let bos = resolve(config.bos_token, "bos_token")?;
        let eos = resolve(config.eos_token, "eos_token")?;
        let pad = resolve(config.pad_token, "pad_token")?;
        Ok(ModelTokenizer {
            tokenizer,
            bos,
            eos,
            pad,
            chat_template: config.chat_template,
        })
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// Id used for padding: the pad token, else EOS (as TRL does), else 0.
    /// Padded positions are masked out, so the value only has to be valid.
    pub fn pad_id(&self) -> u32 {
        self.pad.as_ref().or(self.eos.as_ref()).map_or(0, |t| t.id)
    }

    /// The model's own chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's
    /// post-processor (e.g. adds BOS), which is right for plain text and wrong
    /// for chat-template output that already contains its special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, RowError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| RowError::Encode(e.to_string()))
    }

    /// The text of a completion: `ids` without the `stop` tokens, decoded
    /// with special tokens left out.
    pub fn decode_completion(&self, ids: &[u32], stop: &[u32]) -> Result<String, RowError> {
        let ids: Vec<u32> = ids.iter().copied().filter(|t| !stop.contains(t)).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| RowError::Encode(format!("decoding a completion: {e}")))
    }
}

/// Text of a growing completion, a piece per token, decoding only a short
/// window (as text-generation-inference does): the tokens since the
/// previous piece and the few before them, whose text is subtracted, so a
/// tokenizer that decodes a token differently after another (a leading
/// space) still gives the right piece. A piece ending in an unfinished
/// character (a byte-level token can split one) waits for the next token.
pub struct StreamDecoder<'a> {
    tokenizer: &'a ModelTokenizer,
    stop: &'a [u32],
    tokens: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Tokens before this one have been printed.
    read: usize,
    printed: String,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a ModelTokenizer, stop: &'a [u32]) -> Self {
        StreamDecoder {
            tokenizer,
            stop,
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            printed: String::new(),
        }
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.tokenizer
            .decode_completion(tokens, self.stop)
            .unwrap_or_default()
    }

    /// The new text once `token` is added, if any is ready.
    pub fn push(&mut self, token: u32) -> Option<String> {
        self.tokens.push(token);
        let before = self.decode(&self.tokens[self.prefix..self.read]);
        let now = self.decode(&self.tokens[self.prefix..]);
        if now.ends_with('\u{FFFD}') {
            return None;
        }
        let piece = now.strip_prefix(before.as_str())?.to_string();
        if piece.is_empty() {
            return None;
        }
        self.prefix = self.read;
        self.read = self.tokens.len();
        self.printed.push_str(&piece);
        Some(piece)
    }

    /// What the whole completion adds to what was printed (what the
    /// window held back); the whole completion's text is decoded once.
    pub fn rest(&self, completion: &str) -> String {
        completion
            .strip_prefix(self.printed.as_str())
            .unwrap_or("")
            .to_string()
    }
}
