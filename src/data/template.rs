//! Chat templates: Hugging Face Jinja templates rendered with minijinja,
//! configured the way transformers configures Jinja2.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

use crate::data::error::{DataError, RowError};
use crate::data::rows::Message;
use crate::data::tokenizer::ModelTokenizer;

/// Names accepted for `TokenizeSettings::chat_format`.
pub const BUILTIN_FORMATS: &[&str] = &["chatml"];

/// `<|im_start|>role\ncontent<|im_end|>\n` per message, plus
/// `<|im_start|>assistant\n` as the generation prompt.
const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// Which template source applies, before compiling it. Compiling is left
/// until a row needs it, so a template minijinja cannot parse only matters
/// for data that uses messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateChoice {
    /// "model" or "builtin:<name>".
    pub origin: String,
    pub source: String,
}

impl TemplateChoice {
    /// The named built-in if the recipe gives one (an explicit choice wins
    /// over the model's), else the model's own template, else `None`.
    pub fn resolve(
        chat_format: Option<&str>,
        tokenizer: &ModelTokenizer,
    ) -> Result<Option<Self>, DataError> {
        match (chat_format, tokenizer.chat_template()) {
            (Some(name), _) => Self::builtin(name).map(Some),
            (None, Some(source)) => Ok(Some(TemplateChoice {
                origin: "model".into(),
                source: source.to_string(),
            })),
            (None, None) => Ok(None),
        }
    }

    /// A built-in format by name, or an error listing the known names.
    pub fn builtin(name: &str) -> Result<Self, DataError> {
        let source = match name {
            "chatml" => CHATML_TEMPLATE,
            _ => {
                return Err(DataError::UnknownChatFormat {
                    name: name.to_string(),
                    builtins: BUILTIN_FORMATS.join(", "),
                })
            }
        };
        Ok(TemplateChoice {
            origin: format!("builtin:{name}"),
            source: source.to_string(),
        })
    }

    /// Compiles the template with the tokenizer's BOS/EOS text.
    pub fn compile(&self, tokenizer: &ModelTokenizer) -> Result<ChatTemplate, DataError> {
        ChatTemplate::new(
            &self.source,
            &self.origin,
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `origin` says where it came from, for errors and
    /// the cache identity ("model", "builtin:chatml").
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, DataError> {
        let invalid = |e: Error| DataError::InvalidTemplate {
            origin: origin.to_string(),
            message: describe(&e),
        };
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(invalid)?;
        env.set_syntax(syntax);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(invalid)?;
        Ok(ChatTemplate {
            env,
            origin: origin.to_string(),
            source: source.to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        })
    }

    /// The template to use: the named built-in if the recipe gives one,
    /// else the model's own, else `None` (plain-text rows still work).
    pub fn resolve(
        chat_format: Option<&str>,
        tokenizer: &ModelTokenizer,
    ) -> Result<Option<Self>, DataError> {
        match TemplateChoice::resolve(chat_format, tokenizer)? {
            Some(choice) => choice.compile(tokenizer).map(Some),
            None => Ok(None),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant
    /// header so the result is a prompt awaiting a reply.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, RowError> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let context = Value::from_pairs([
            ("messages", Value::from(messages.as_slice())),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", Value::from(self.bos_token.clone())),
            ("eos_token", Value::from(self.eos_token.clone())),
        ]);
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| RowError::TemplateRender(describe(&e)))?;
        template
            .render(context)
            .map_err(|e| RowError::TemplateRender(describe(&e)))
    }
}

/// minijinja errors put the useful text in `detail`; fall back to Display.
fn describe(error: &Error) -> String {
    error
        .detail()
        .map_or_else(|| error.to_string(), str::to_string)
}

/// HF templates call `raise_exception('...')` to reject conversations.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers replaces Jinja2's HTML-escaping `tojson` with
/// `json.dumps(value, ensure_ascii=False, indent=indent)`; minijinja's
/// built-in escapes `<`, `>`, `&`, `'`, which would change tool schemas.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    // json.dumps puts items on their own lines when indenting, else ", ".
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => out.push_str(&json_string(value.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, depth + 1);
                out.push_str(&json_string(&key.to_string()));
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot serialize {} to JSON", value.kind()),
            ))
        }
    }
    Ok(())
}

/// JSON string literal; non-ASCII stays as is (`ensure_ascii=False`).
fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The Python `str`/`dict` methods HF templates call (`.strip()`,
/// `.startswith()`, `.items()`, ...), which Jinja2 gets from Python and
/// minijinja does not have.
fn python_methods(
    _state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return map_method(value, method, args);
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let strip_set = |args: &[Value]| -> Result<Option<Vec<char>>, Error> {
        let (chars,): (Option<&str>,) = from_args(args)?;
        Ok(chars.map(|c| c.chars().collect()))
    };
    let result = match method {
        "strip" => match strip_set(args)? {
            Some(set) => Value::from(s.trim_matches(set.as_slice())),
            None => Value::from(s.trim()),
        },
        "lstrip" => match strip_set(args)? {
            Some(set) => Value::from(s.trim_start_matches(set.as_slice())),
            None => Value::from(s.trim_start()),
        },
        "rstrip" => match strip_set(args)? {
            Some(set) => Value::from(s.trim_end_matches(set.as_slice())),
            None => Value::from(s.trim_end()),
        },
        "startswith" | "endswith" => {
            let (affix,): (&str,) = from_args(args)?;
            Value::from(if method == "startswith" {
                s.starts_with(affix)
            } else {
                s.ends_with(affix)
            })
        }
        "split" => {
            let (sep,): (Option<&str>,) = from_args(args)?;
            match sep {
                Some(sep) if !sep.is_empty() => s.split(sep).map(Value::from).collect(),
                Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "empty separator")),
                None => s.split_whitespace().map(Value::from).collect(),
            }
        }
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "replace" => {
            let (from, to): (&str, &str) = from_args(args)?;
            Value::from(s.replace(from, to))
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(result)
}

fn map_method(map: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match method {
        "items" | "keys" | "values" => {
            let () = from_args(args)?;
            let keys = map.try_iter()?;
            Ok(keys
                .map(|key| {
                    let value = map.get_item(&key).unwrap_or_default();
                    match method {
                        "items" => Value::from(vec![key, value].as_slice()),
                        "keys" => key,
                        _ => value,
                    }
                })
                .collect())
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            let value = map.get_item(&key)?;
            Ok(if value.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                value
            })
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message]) -> Result<String, RowError> {
        ChatTemplate::new(source, "test", Some("<s>"), Some("</s>"))
            .unwrap()
            .render(messages, false)
    }

    fn user(content: &str) -> Message {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }

    #[test]
    fn python_string_methods() {
        let source = "{% set c = messages[0].content %}\
            {{ c.lstrip('x') }}|{{ c.rstrip() }}|{{ c.startswith('xx') }}|{{ c.endswith('b ') }}|\
            {{ c.split('a') }}|{{ c.split() }}|{{ c.upper() }}|{{ c.replace('a', '-') }}";
        assert_eq!(
            render(source, &[user("xxa b ")]).unwrap(),
            "a b |xxa b|True|True|['xx', ' b ']|['xxa', 'b']|XXA B |xx- b "
        );
    }

    #[test]
    fn python_dict_methods() {
        let source = "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}\
            {{ messages[0].get('role') }}|{{ messages[0].get('name', 'anon') }}|{{ messages[0].keys() | list | length }}";
        assert_eq!(
            render(source, &[user("hi")]).unwrap(),
            "role=user;content=hi;user|anon|2"
        );
    }

    #[test]
    fn tojson_and_loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}";
        assert_eq!(
            render(source, &[user("a \"q\""), user("b")]).unwrap(),
            r#""a \"q\"""#
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let source = "{{ messages[0] | tojson }}|{{ messages[0].content | tojson }}|{{ [1, 2.5, none, true] | tojson(indent=2) }}";
        // json.dumps(..., ensure_ascii=False): no HTML escaping, é kept.
        assert_eq!(
            render(source, &[user("<b>é & 'q'")]).unwrap(),
            "{\"role\": \"user\", \"content\": \"<b>é & 'q'\"}|\"<b>é & 'q'\"|[\n  1,\n  2.5,\n  null,\n  true\n]"
        );
    }

    #[test]
    fn unknown_method_and_bad_syntax_are_errors() {
        assert!(render("{{ messages[0].content.nope() }}", &[user("a")]).is_err());
        let err = ChatTemplate::new("{% generation %}x{% endgeneration %}", "model", None, None)
            .unwrap_err();
        assert!(matches!(err, DataError::InvalidTemplate { .. }), "{err}");
    }
}
