//! Tokenization settings chosen by the recipe, and the identity the engine
//! hashes to decide whether a cached tokenized dataset is still valid.

use serde::{Deserialize, Serialize};

use crate::data::error::DataError;
use crate::data::template::TemplateChoice;
use crate::data::tokenizer::ModelTokenizer;

/// Bumped whenever tokenization logic changes in a way that alters output
/// for the same inputs, so stale caches are never reused.
pub const TOKENIZATION_VERSION: u32 = 2;

/// What to do with a row longer than `seq_len` tokens.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Cut the prompt from the left, keeping the completion whole; if the
    /// completion alone exceeds `seq_len`, drop the prompt and cut the
    /// completion's end.
    #[default]
    TruncateLeft,
    /// Cut the end of the row (TRL's `keep_start`).
    TruncateRight,
    /// Leave the row out.
    Drop,
}

/// What to do with a malformed row.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BadRows {
    /// Stop at the first malformed row with a file:line error.
    #[default]
    Error,
    /// Leave malformed rows out and count them in the report.
    Skip,
}

/// When to append the tokenizer's EOS token to completions (SFT) and to
/// chosen/rejected (DPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EosPolicy {
    /// TRL's behaviour: plain-text completions get EOS unless they already end
    /// with it; chat-templated completions rely on the template's own
    /// end-of-turn marker.
    PlainTextOnly,
    /// Also append EOS after chat-templated completions.
    Always,
    /// Never append EOS.
    Never,
}

/// Everything the recipe decides about turning JSONL into token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeSettings {
    /// Maximum tokens per sequence (SFT: prompt+completion; DPO: prompt+chosen
    /// and prompt+rejected, each).
    pub seq_len: usize,
    pub overlong: Overlong,
    pub bad_rows: BadRows,
    pub eos: EosPolicy,
    /// Name of a built-in chat format (e.g. "chatml"). `None` uses the
    /// model's own `chat_template`. An explicit name wins over the model's.
    pub chat_format: Option<String>,
}

impl TokenizeSettings {
    /// TRL-like defaults for a given sequence length.
    pub fn new(seq_len: usize) -> Self {
        TokenizeSettings {
            seq_len,
            overlong: Overlong::TruncateLeft,
            bad_rows: BadRows::Error,
            eos: EosPolicy::PlainTextOnly,
            chat_format: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), DataError> {
        if self.seq_len == 0 {
            return Err(DataError::Settings("seq_len must be at least 1".into()));
        }
        Ok(())
    }
}

/// Which kind of dataset a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    Sft,
    Dpo,
}

/// Stable description of how a dataset was tokenized. The engine serializes
/// and hashes it together with the hashes of the data file and
/// tokenizer.json. `bad_rows` is left out on purpose: a run that succeeds
/// under `Error` yields exactly what `Skip` would, so it must not miss the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizationIdentity {
    pub version: u32,
    pub kind: DatasetKind,
    pub seq_len: usize,
    pub overlong: Overlong,
    pub eos: EosPolicy,
    /// Where the template came from: "model", "builtin:chatml" or "none".
    pub template_origin: String,
    /// Full template source, so an edited tokenizer_config.json invalidates.
    pub template_source: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// Computes the identity for `settings` applied with `tokenizer`.
pub fn tokenization_identity(
    kind: DatasetKind,
    settings: &TokenizeSettings,
    tokenizer: &ModelTokenizer,
) -> Result<TokenizationIdentity, DataError> {
    settings.validate()?;
    let template = TemplateChoice::resolve(settings.chat_format.as_deref(), tokenizer)?;
    Ok(TokenizationIdentity {
        version: TOKENIZATION_VERSION,
        kind,
        seq_len: settings.seq_len,
        overlong: settings.overlong,
        eos: settings.eos,
        template_origin: template
            .as_ref()
            .map_or_else(|| "none".to_string(), |t| t.origin.clone()),
        template_source: template.map(|t| t.source),
        bos_token: tokenizer.bos_token().map(str::to_string),
        eos_token: tokenizer.eos_token().map(str::to_string),
    })
}
