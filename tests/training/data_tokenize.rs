//! Tokenization and chat-template rendering against hand-computed ids and
//! strings.

use crate::support::fixtures::*;
use lora_runner::data::{
    load_dpo, load_sft, ChatTemplate, DataError, EosPolicy, Message, RowError, TemplateChoice,
    TokenizeSettings,
};

/// Qwen2-style ChatML template (default system prompt, `loop.first`,
/// attribute and subscript access, an unused `tools | tojson` branch, and the
/// `{%-`/`-}}` whitespace control real templates use).
const QWEN2_TEMPLATE: &str = r#"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Mistral/Llama-2-style template: namespace, slicing with a filter,
/// `raise_exception`, `.strip()`, bos/eos tokens and plain (non `-`) tags
/// relying on trim_blocks/lstrip_blocks.
const INST_TEMPLATE: &str = r#"{% set ns = namespace(system_later=false) %}
{% for message in messages[1:] if message['role'] == 'system' %}
    {% set ns.system_later = true %}
{% endfor %}
{% if ns.system_later %}
    {{ raise_exception('System message must come first') }}
{% endif %}
{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}
"#;

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn qwen2_template_renders_like_transformers() {
    let template = ChatTemplate::new(QWEN2_TEMPLATE, "model", None, Some("<|im_end|>")).unwrap();
    let conversation = [msg("user", "hello"), msg("assistant", "fine")];
    assert_eq!(
        template.render(&conversation, false).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nhello<|im_end|>\n\
         <|im_start|>assistant\nfine<|im_end|>\n"
    );
    let prompt = [msg("system", "be brief"), msg("user", "hello")];
    assert_eq!(
        template.render(&prompt, true).unwrap(),
        "<|im_start|>system\nbe brief<|im_end|>\n\
         <|im_start|>user\nhello<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn inst_template_uses_namespace_strip_and_special_tokens() {
    let template = ChatTemplate::new(INST_TEMPLATE, "model", Some("<s>"), Some("</s>")).unwrap();
    let conversation = [
        msg("user", "  hello "),
        msg("assistant", "fine\n"),
        msg("user", "how"),
    ];
    assert_eq!(
        template.render(&conversation, false).unwrap(),
        "<s>[INST] hello [/INST] fine</s>[INST] how [/INST]"
    );
    let bad = [msg("user", "hello"), msg("system", "late")];
    assert_eq!(
        template.render(&bad, false).unwrap_err(),
        RowError::TemplateRender("System message must come first".into())
    );
}

#[test]
fn builtin_chatml_and_unknown_format() {
    let choice = TemplateChoice::builtin("chatml").unwrap();
    assert_eq!(choice.origin, "builtin:chatml");
    let template = ChatTemplate::new(&choice.source, &choice.origin, None, None).unwrap();
    let rendered = template.render(&[msg("user", "hello")], true).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    let err = TemplateChoice::builtin("llama9").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown chat format \"llama9\" (built-in formats: chatml)"
    );
}

#[test]
fn sft_plain_text_gets_bos_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": "hello world", "completion": " how are you"}"#,
            // Already ends with EOS: not doubled.
            r#"{"prompt": "hello", "completion": " fine</s>"}"#,
        ],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    // <s> hello world | how are you </s>
    assert_eq!(data.examples[0].input_ids, vec![BOS, 5, 6, 7, 8, 9, EOS]);
    assert_eq!(data.examples[0].completion_start, 3);
    assert_eq!(
        data.examples[0].completion_mask(),
        vec![0, 0, 0, 1, 1, 1, 1]
    );
    assert_eq!(data.examples[1].input_ids, vec![BOS, 5, 10, EOS]);
    assert_eq!(data.examples[1].completion_start, 2);
    assert_eq!((data.report.read, data.report.kept), (2, 2));

    let never = TokenizeSettings {
        eos: EosPolicy::Never,
        ..settings(64)
    };
    let data = load_sft(&path, &tok, &never).unwrap();
    assert_eq!(data.examples[0].input_ids, vec![BOS, 5, 6, 7, 8, 9]);
}

#[test]
fn sft_messages_use_template_and_train_on_final_reply() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), Some(QWEN2_TEMPLATE));
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}"#,
            r#"{"prompt": [{"role": "user", "content": "how"}], "completion": [{"role": "assistant", "content": "good"}]}"#,
        ],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    // "<|im_start|>system\na<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    // then "fine<|im_end|>\n"; template output gets no BOS and (PlainTextOnly) no EOS.
    let prompt = vec![
        IM_START, 13, 16, IM_END, IM_START, 11, 5, IM_END, IM_START, 12,
    ];
    let mut expected = prompt.clone();
    expected.extend([10, IM_END]);
    assert_eq!(data.examples[0].input_ids, expected);
    assert_eq!(data.examples[0].completion_start, prompt.len());
    // Default system prompt "You are a helpful assistant." → You=<unk> are a
    // helpful=<unk> assistant.=<unk>.
    let ex = &data.examples[1];
    assert_eq!(
        ex.prompt_ids(),
        &[IM_START, 13, 0, 8, 16, 0, 0, IM_END, IM_START, 11, 7, IM_END, IM_START, 12]
    );
    assert_eq!(ex.completion_ids(), &[15, IM_END]);
}

#[test]
fn chatml_format_from_recipe_and_eos_always() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "hello"}], "completion": [{"role": "assistant", "content": "fine"}]}"#,
        ],
    );
    let err = load_sft(&path, &tok, &settings(64)).unwrap_err();
    assert!(
        matches!(err, DataError::NoChatTemplate { line: 1, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("sft.jsonl:1: row uses chat messages but the model has no chat template"));

    let chatml = TokenizeSettings {
        chat_format: Some("chatml".into()),
        eos: EosPolicy::Always,
        ..settings(64)
    };
    let data = load_sft(&path, &tok, &chatml).unwrap();
    assert_eq!(
        data.examples[0].input_ids,
        vec![IM_START, 11, 5, IM_END, IM_START, 12, 10, IM_END, EOS]
    );
    assert_eq!(data.examples[0].completion_start, 6);
}

#[test]
fn dpo_prompt_chosen_rejected_ids() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[r#"{"prompt": "how are", "chosen": " you", "rejected": " bad world"}"#],
    );
    let data = load_dpo(&path, &tok, &settings(64)).unwrap();
    let ex = &data.examples[0];
    assert_eq!(ex.prompt_ids, vec![BOS, 7, 8]);
    assert_eq!(ex.chosen_ids, vec![9, EOS]);
    assert_eq!(ex.rejected_ids, vec![14, 6, EOS]);
}

#[test]
fn dpo_messages_with_chatml() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "hello"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}"#,
        ],
    );
    let chatml = TokenizeSettings {
        chat_format: Some("chatml".into()),
        ..settings(64)
    };
    let data = load_dpo(&path, &tok, &chatml).unwrap();
    let ex = &data.examples[0];
    assert_eq!(ex.prompt_ids, vec![IM_START, 11, 5, IM_END, IM_START, 12]);
    assert_eq!(ex.chosen_ids, vec![15, IM_END]);
    assert_eq!(ex.rejected_ids, vec![14, IM_END]);
}
