//! Shared row loop and prompt/completion encoding for SFT and DPO loading.
//!
//! Encoding follows TRL 1.16: the prompt and prompt+completion are
//! tokenized separately and the completion is the latter's suffix past the
//! prefix the two share (`common_prefix_length`). Tokenizing the whole text (not the pieces) keeps merges
//! across the boundary identical to what the model sees at inference.

use std::cell::OnceCell;
use std::path::Path;

use serde_json::{Map, Value};

use crate::data::error::{DataError, RowError};
use crate::data::report::{DataReport, SKIPPED_EXAMPLES_KEPT};
use crate::data::rows::{read_jsonl, Message, Turn};
use crate::data::settings::{BadRows, EosPolicy, TokenizeSettings};
use crate::data::template::{ChatTemplate, TemplateChoice, BUILTIN_FORMATS};
use crate::data::tokenizer::ModelTokenizer;

/// Why a row could not be used: a row problem (skippable), or a recipe or
/// model problem that no row can avoid (never skipped).
pub(crate) enum RowFailure {
    Row(RowError),
    NoChatTemplate,
    InvalidTemplate { origin: String, message: String },
}

impl From<RowError> for RowFailure {
    fn from(e: RowError) -> Self {
        RowFailure::Row(e)
    }
}

/// What became of one well-formed row.
pub(crate) enum RowOutcome<T> {
    Kept {
        example: T,
        truncated: bool,
        boundary_mismatch: bool,
    },
    Dropped,
}

/// Kept examples with the 1-based line each came from, and the report.
pub(crate) type Processed<T> = (Vec<T>, Vec<usize>, DataReport);

/// Runs `convert` over every row of `path`, applying `bad_rows` and
/// filling the report.
pub(crate) fn process_rows<T>(
    path: &Path,
    settings: &TokenizeSettings,
    mut convert: impl FnMut(&Map<String, Value>) -> Result<RowOutcome<T>, RowFailure>,
) -> Result<Processed<T>, DataError> {
    settings.validate()?;
    let lines = read_jsonl(path)?;
    let mut report = DataReport::default();
    let mut examples = Vec::new();
    let mut kept_lines = Vec::new();
    for line in lines {
        report.read += 1;
        let outcome = match &line.parsed {
            Ok(map) => convert(map),
            Err(e) => Err(RowFailure::Row(e.clone())),
        };
        match outcome {
            Ok(RowOutcome::Kept {
                example,
                truncated,
                boundary_mismatch,
            }) => {
                report.kept += 1;
                report.truncated += usize::from(truncated);
                report.prompt_boundary_mismatches += usize::from(boundary_mismatch);
                examples.push(example);
                kept_lines.push(line.number);
            }
            Ok(RowOutcome::Dropped) => report.dropped += 1,
            Err(RowFailure::NoChatTemplate) => {
                return Err(DataError::NoChatTemplate {
                    path: path.to_path_buf(),
                    line: line.number,
                    builtins: BUILTIN_FORMATS.join(", "),
                })
            }
            Err(RowFailure::InvalidTemplate { origin, message }) => {
                return Err(DataError::InvalidTemplate { origin, message })
            }
            Err(RowFailure::Row(kind)) => {
                let error = DataError::Row {
                    path: path.to_path_buf(),
                    line: line.number,
                    kind,
                };
                if settings.bad_rows == BadRows::Error {
                    return Err(error);
                }
                report.skipped += 1;
                if report.skipped_examples.len() < SKIPPED_EXAMPLES_KEPT {
                    report.skipped_examples.push(error.to_string());
                }
            }
        }
    }
    if examples.is_empty() {
        return Err(DataError::NoExamples {
            path: path.to_path_buf(),
            read: report.read,
            dropped: report.dropped,
            skipped: report.skipped,
        });
    }
    Ok((examples, kept_lines, report))
}

/// Prompt tokens and prompt+completion tokens of one pair.
pub(crate) struct EncodedPair {
    pub prompt_ids: Vec<u32>,
    pub full_ids: Vec<u32>,
}

impl EncodedPair {
    /// Whether the prompt's tokens are a prefix of the full tokens.
    pub fn prompt_is_prefix(&self) -> bool {
        self.full_ids.starts_with(&self.prompt_ids)
    }

    /// Where the completion starts in `full_ids`: the length of the prefix
    /// the full tokens share with the prompt's, as TRL 1.16 decides it
    /// (`common_prefix_length`). It is short of the prompt's length when the
    /// tokenizer merges the prompt's end with the completion's start (a
    /// prompt ending in a space before a byte-level BPE word) or the
    /// template renders the prompt differently when a reply follows.
    pub fn completion_start(&self) -> usize {
        common_prefix_length(&self.prompt_ids, &self.full_ids)
    }

    /// The tokens the loss is taken on.
    pub fn completion_ids(&self) -> &[u32] {
        &self.full_ids[self.completion_start()..]
    }
}

/// Number of leading tokens `a` and `b` have in common.
pub(crate) fn common_prefix_length(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Turns prompt/completion turns into token ids.
pub(crate) struct PairEncoder<'a> {
    tokenizer: &'a ModelTokenizer,
    template_choice: Option<TemplateChoice>,
    /// Compiled on first use; a compile error is kept as (origin, message).
    template: OnceCell<Result<ChatTemplate, (String, String)>>,
    eos: EosPolicy,
}

impl<'a> PairEncoder<'a> {
    pub fn new(
        tokenizer: &'a ModelTokenizer,
        settings: &TokenizeSettings,
    ) -> Result<Self, DataError> {
        Ok(PairEncoder {
            tokenizer,
            template_choice: TemplateChoice::resolve(settings.chat_format.as_deref(), tokenizer)?,
            template: OnceCell::new(),
            eos: settings.eos,
        })
    }

    /// Encodes one prompt/completion pair; `field` names the completion for
    /// errors ("completion", "chosen", ...). Both turns have the same kind
    /// (checked when parsing the row).
    pub fn encode(
        &self,
        prompt: &Turn,
        completion: &Turn,
        field: &str,
    ) -> Result<EncodedPair, RowFailure> {
        let (mut pair, eos_wanted, text_has_eos) = match (prompt, completion) {
            (Turn::Text(prompt), Turn::Text(completion)) => {
                // Plain text gets the tokenizer's own special tokens (BOS),
                // as TRL's `processing_class(text=...)` does.
                let full_text = format!("{prompt}{completion}");
                let pair = EncodedPair {
                    prompt_ids: self.tokenizer.encode(prompt, true)?,
                    full_ids: self.tokenizer.encode(&full_text, true)?,
                };
                let has_eos = self
                    .tokenizer
                    .eos_token()
                    .is_some_and(|eos| completion.ends_with(eos));
                (pair, self.eos != EosPolicy::Never, has_eos)
            }
            (Turn::Messages(prompt), Turn::Messages(completion)) => {
                let pair = self.encode_messages(prompt, completion)?;
                (pair, self.eos == EosPolicy::Always, false)
            }
            _ => unreachable_kind(field)?,
        };
        if let Some(eos) = self.tokenizer.eos() {
            // Checked on tokens too: a post-processor may already add EOS.
            if eos_wanted && !text_has_eos && pair.full_ids.last() != Some(&eos.id) {
                pair.full_ids.push(eos.id);
            }
        }
        if pair.completion_ids().is_empty() {
            return Err(RowError::InvalidField {
                field: field.to_string(),
                reason: "produces no tokens after the prompt".into(),
            }
            .into());
        }
        Ok(pair)
    }

    /// Renders the prompt with the generation prompt and prompt+completion
    /// without it. When the latter does not start with the former, the
    /// completion still starts where their tokens diverge (TRL 1.16 accepts
    /// such templates too); the row counts as a boundary mismatch.
    /// Template output already holds its special tokens, so the
    /// post-processor is not run (no double BOS).
    fn encode_messages(
        &self,
        prompt: &[Message],
        completion: &[Message],
    ) -> Result<EncodedPair, RowFailure> {
        let template = self.template()?;
        if prompt.last().is_some_and(|m| m.role == "assistant") {
            // TRL would render with continue_final_message; not supported.
            return Err(RowError::InvalidField {
                field: "prompt".into(),
                reason:
                    "ends with an assistant message; continuing a final message is not supported"
                        .into(),
            }
            .into());
        }
        let prompt_text = template.render(prompt, true)?;
        let conversation: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
        let full_text = template.render(&conversation, false)?;
        Ok(EncodedPair {
            prompt_ids: self.tokenizer.encode(&prompt_text, false)?,
            full_ids: self.tokenizer.encode(&full_text, false)?,
        })
    }
}

impl PairEncoder<'_> {
    fn template(&self) -> Result<&ChatTemplate, RowFailure> {
        let choice = self
            .template_choice
            .as_ref()
            .ok_or(RowFailure::NoChatTemplate)?;
        let compiled = self.template.get_or_init(|| {
            choice.compile(self.tokenizer).map_err(|e| match e {
                DataError::InvalidTemplate { origin, message } => (origin, message),
                other => (choice.origin.clone(), other.to_string()),
            })
        });
        compiled
            .as_ref()
            .map_err(|(origin, message)| RowFailure::InvalidTemplate {
                origin: origin.clone(),
                message: message.clone(),
            })
    }
}

/// Row parsing guarantees prompt and completion have the same kind.
fn unreachable_kind<T>(field: &str) -> Result<T, RowFailure> {
    Err(RowError::WrongType {
        field: field.to_string(),
        expected: "the same kind (string or messages) as \"prompt\"",
    }
    .into())
}
