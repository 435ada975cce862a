//! Reading JSONL files and checking rows against the shapes TRL accepts.
//!
//! Parsing is done by hand on `serde_json::Value` rather than with derive so
//! every error can name the exact field (`prompt[1].content`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::data::error::{DataError, RowError};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt or completion: plain text, or messages for the chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    Text(String),
    Messages(Vec<Message>),
}

impl Turn {
    pub fn is_messages(&self) -> bool {
        matches!(self, Turn::Messages(_))
    }
}

/// An SFT row after shape checks. `{"messages"}` rows are already split into
/// prompt and completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftRow {
    pub prompt: Turn,
    pub completion: Turn,
}

/// A DPO row after shape checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoRow {
    pub prompt: Turn,
    pub chosen: Turn,
    pub rejected: Turn,
}

/// A non-blank line of a JSONL file with its 1-based line number.
pub(crate) struct Line {
    pub number: usize,
    pub parsed: Result<Map<String, Value>, RowError>,
}

/// Reads every non-blank line of `path`. A non-UTF-8 or invalid-JSON line
/// becomes a per-line error, never a failure of the whole read.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<Line>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut lines = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match std::str::from_utf8(raw) {
            Err(_) => Err(RowError::InvalidUtf8),
            Ok(text) => match serde_json::from_str::<Value>(text) {
                Err(e) => Err(RowError::InvalidJson(e.to_string())),
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err(RowError::NotAnObject),
            },
        };
        lines.push(Line {
            number: index + 1,
            parsed,
        });
    }
    if lines.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(lines)
}

/// Checks an SFT row: `{"prompt", "completion"}` or `{"messages"}`.
pub fn parse_sft_row(row: &Map<String, Value>) -> Result<SftRow, RowError> {
    if let Some(messages) = row.get("messages") {
        if row.contains_key("prompt") {
            return Err(RowError::InvalidField {
                field: "messages".into(),
                reason: "cannot be combined with \"prompt\"".into(),
            });
        }
        return split_conversation(messages);
    }
    let prompt = parse_turn(required(row, "prompt")?, "prompt", true)?;
    let completion = parse_turn(required(row, "completion")?, "completion", false)?;
    check_same_kind(&prompt, &completion, "completion")?;
    Ok(SftRow { prompt, completion })
}

/// Checks a DPO row: `{"prompt", "chosen", "rejected"}`.
pub fn parse_dpo_row(row: &Map<String, Value>) -> Result<DpoRow, RowError> {
    let prompt = parse_turn(required(row, "prompt")?, "prompt", true)?;
    let chosen = parse_turn(required(row, "chosen")?, "chosen", false)?;
    let rejected = parse_turn(required(row, "rejected")?, "rejected", false)?;
    check_same_kind(&prompt, &chosen, "chosen")?;
    check_same_kind(&prompt, &rejected, "rejected")?;
    if chosen == rejected {
        return Err(RowError::ChosenEqualsRejected);
    }
    Ok(DpoRow {
        prompt,
        chosen,
        rejected,
    })
}

/// Splits `{"messages": [...]}` into prompt = everything before the final
/// assistant message, completion = that message.
///
/// TRL treats such rows as language modelling and trains on every token
/// (or, with `assistant_only_loss`, on all assistant turns via the
/// template's `{% generation %}` markers, which few templates have). We train
/// on the final assistant reply only: it works with any template, matches
/// what the prompt/completion shape does, and keeps loss off user text.
fn split_conversation(value: &Value) -> Result<SftRow, RowError> {
    let mut messages = parse_messages(value, "messages")?;
    let last = messages.len() - 1;
    if messages[last].role != "assistant" {
        return Err(RowError::InvalidField {
            field: format!("messages[{last}].role"),
            reason: "the last message must have role \"assistant\"".into(),
        });
    }
    if messages[last].content.is_empty() {
        return Err(RowError::EmptyField(format!("messages[{last}].content")));
    }
    if last == 0 {
        return Err(RowError::InvalidField {
            field: "messages".into(),
            reason: "needs at least one message before the final assistant message".into(),
        });
    }
    let completion = messages.split_off(last);
    Ok(SftRow {
        prompt: Turn::Messages(messages),
        completion: Turn::Messages(completion),
    })
}

fn required<'a>(row: &'a Map<String, Value>, field: &str) -> Result<&'a Value, RowError> {
    row.get(field)
        .ok_or_else(|| RowError::MissingField(field.to_string()))
}

/// A prompt may be an empty string (pure continuation); completions may not.
fn parse_turn(value: &Value, field: &str, may_be_empty: bool) -> Result<Turn, RowError> {
    match value {
        Value::String(text) => {
            if text.is_empty() && !may_be_empty {
                return Err(RowError::EmptyField(field.to_string()));
            }
            Ok(Turn::Text(text.clone()))
        }
        Value::Array(_) => {
            let messages = parse_messages(value, field)?;
            if !may_be_empty && messages.iter().all(|m| m.content.is_empty()) {
                return Err(RowError::EmptyField(field.to_string()));
            }
            Ok(Turn::Messages(messages))
        }
        _ => Err(RowError::WrongType {
            field: field.to_string(),
            expected: "a string or a list of messages",
        }),
    }
}

fn parse_messages(value: &Value, field: &str) -> Result<Vec<Message>, RowError> {
    let Value::Array(items) = value else {
        return Err(RowError::WrongType {
            field: field.to_string(),
            expected: "a list of messages",
        });
    };
    if items.is_empty() {
        return Err(RowError::EmptyField(field.to_string()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let here = format!("{field}[{i}]");
            let Value::Object(map) = item else {
                return Err(RowError::WrongType {
                    field: here,
                    expected: "an object with \"role\" and \"content\"",
                });
            };
            Ok(Message {
                role: string_field(map, &here, "role")?,
                content: string_field(map, &here, "content")?,
            })
        })
        .collect()
}

fn string_field(map: &Map<String, Value>, parent: &str, key: &str) -> Result<String, RowError> {
    match map.get(key) {
        None => Err(RowError::MissingField(format!("{parent}.{key}"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(RowError::WrongType {
            field: format!("{parent}.{key}"),
            expected: "a string",
        }),
    }
}

/// Mixing plain text and messages in one row has no sensible rendering.
fn check_same_kind(prompt: &Turn, other: &Turn, field: &str) -> Result<(), RowError> {
    if prompt.is_messages() != other.is_messages() {
        let expected = if prompt.is_messages() {
            "a list of messages, like \"prompt\""
        } else {
            "a string, like \"prompt\""
        };
        return Err(RowError::WrongType {
            field: field.to_string(),
            expected,
        });
    }
    Ok(())
}
