//! Malformed rows: file:line errors, skip mode, truncation modes and counts.

use crate::support::fixtures::*;
use lora_runner::data::{load_dpo, load_sft, BadRows, DataError, Overlong, TokenizeSettings};

fn sft_error(lines: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(dir.path(), "sft.jsonl", lines);
    let err = load_sft(&path, &tok, &settings(64)).unwrap_err();
    // Strip the temp dir so messages can be compared exactly.
    err.to_string()
        .replace(&format!("{}/", dir.path().display()), "")
}

const GOOD: &str = r#"{"prompt": "hello", "completion": " world"}"#;

#[test]
fn each_row_error_names_file_line_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"prompt": "hello"}"#,
            r#"sft.jsonl:2: missing field "completion""#,
        ),
        (
            r#"{"completion": "x"}"#,
            r#"sft.jsonl:2: missing field "prompt""#,
        ),
        (
            r#"{"prompt": "hello", "completion": 3}"#,
            r#"sft.jsonl:2: field "completion": expected a string or a list of messages"#,
        ),
        (
            r#"{"prompt": "hello", "completion": ""}"#,
            r#"sft.jsonl:2: field "completion" is empty"#,
        ),
        (
            r#"{"prompt": "hello", "completion": " world""#,
            "sft.jsonl:2: invalid JSON: EOF while parsing an object at line 1 column 42",
        ),
        (r#"["prompt"]"#, "sft.jsonl:2: expected a JSON object"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}"#,
            r#"sft.jsonl:2: missing field "messages[1].content""#,
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}]}"#,
            r#"sft.jsonl:2: field "messages[0].role": the last message must have role "assistant""#,
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}"#,
            r#"sft.jsonl:2: field "completion": expected a list of messages, like "prompt""#,
        ),
    ];
    for (bad, expected) in cases {
        assert_eq!(sft_error(&[GOOD, bad, GOOD]), *expected, "row {bad}");
    }
}

#[test]
fn non_utf8_and_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = dir.path().join("bytes.jsonl");
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.extend(b"\n\n{\"prompt\": \"\xff\xfe\", \"completion\": \"x\"}\n");
    std::fs::write(&path, bytes).unwrap();
    let err = load_sft(&path, &tok, &settings(64)).unwrap_err();
    // Blank line 2 is ignored but still counted in numbering.
    assert_eq!(
        err.to_string(),
        format!("{}:3: line is not valid UTF-8", path.display())
    );

    let empty = write_jsonl(dir.path(), "empty.jsonl", &["", "  "]);
    let err = load_sft(&empty, &tok, &settings(64)).unwrap_err();
    assert!(matches!(err, DataError::EmptyFile { .. }));
    assert_eq!(
        err.to_string(),
        format!("{}: file has no rows", empty.display())
    );
}

#[test]
fn dpo_chosen_equal_to_rejected_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[
            r#"{"prompt": "hello", "chosen": " good", "rejected": " bad"}"#,
            r#"{"prompt": "hello", "chosen": " good", "rejected": " good"}"#,
            // Different text, same tokens once whitespace-split.
            r#"{"prompt": "hello", "chosen": " good", "rejected": "  good"}"#,
            r#"{"prompt": "hello", "chosen": " good"}"#,
        ],
    );
    let err = load_dpo(&path, &tok, &settings(64)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: \"chosen\" and \"rejected\" are identical",
            path.display()
        )
    );
    let skip = TokenizeSettings {
        bad_rows: BadRows::Skip,
        ..settings(64)
    };
    let data = load_dpo(&path, &tok, &skip).unwrap();
    assert_eq!(
        (data.report.read, data.report.kept, data.report.skipped),
        (4, 1, 3)
    );
    assert_eq!(
        data.report.skipped_examples[2],
        format!("{}:4: missing field \"rejected\"", path.display())
    );
}

#[test]
fn skip_mode_counts_bad_rows_and_template_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(
        dir.path(),
        Some("{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}{% for m in messages %}{{ m.content }} {% endfor %}"),
    );
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            GOOD,
            "not json",
            r#"{"prompt": "hello", "completion": ""}"#,
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        ],
    );
    let err = load_sft(&path, &tok, &settings(64)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: invalid JSON: expected ident at line 1 column 2",
            path.display()
        )
    );
    let skip = TokenizeSettings {
        bad_rows: BadRows::Skip,
        ..settings(64)
    };
    let data = load_sft(&path, &tok, &skip).unwrap();
    let r = &data.report;
    assert_eq!(
        (r.read, r.kept, r.skipped, r.dropped, r.truncated),
        (5, 2, 3, 0, 0)
    );
    // Each kept example knows its line (what evaluations are paired by),
    // and the tokenized cache keeps it.
    assert_eq!(data.lines, vec![1, 5]);
    let cached = dir.path().join("tokens");
    data.write(&cached).unwrap();
    assert_eq!(
        lora_runner::data::SftDataset::read(&cached).unwrap().lines,
        vec![1, 5]
    );
    assert_eq!(
        r.skipped_examples[2],
        format!(
            "{}:4: field \"prompt\": ends with an assistant message; continuing a final message is not supported",
            path.display()
        )
    );

    let all_bad = write_jsonl(dir.path(), "bad.jsonl", &["x", "y"]);
    let err = load_sft(&all_bad, &tok, &skip).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::NoExamples {
                read: 2,
                skipped: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn template_raise_exception_is_a_row_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(
        dir.path(),
        Some("{{ raise_exception('roles must alternate') }}"),
    );
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        ],
    );
    let err = load_sft(&path, &tok, &settings(64)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}:1: chat template: roles must alternate", path.display())
    );
}

/// Rows: <s> a b c | d e </s> (7 tokens, completion 3), and
/// <s> a | b </s> (4 tokens), and <s> a b c d e | f </s> (8 tokens, completion 2).
fn overlong_file(dir: &std::path::Path) -> std::path::PathBuf {
    write_jsonl(
        dir,
        "sft.jsonl",
        &[
            r#"{"prompt": "a b c", "completion": " d e"}"#,
            r#"{"prompt": "a", "completion": " b"}"#,
            r#"{"prompt": "a b c d e", "completion": " f"}"#,
        ],
    )
}

fn with(overlong: Overlong, seq_len: usize) -> TokenizeSettings {
    TokenizeSettings {
        overlong,
        ..settings(seq_len)
    }
}

#[test]
fn sft_truncation_modes_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = overlong_file(dir.path());

    let left = load_sft(&path, &tok, &with(Overlong::TruncateLeft, 5)).unwrap();
    let ids: Vec<_> = left
        .examples
        .iter()
        .map(|e| (e.input_ids.clone(), e.completion_start))
        .collect();
    assert_eq!(
        ids,
        vec![
            (vec![17, 18, 19, 20, EOS], 2),
            (vec![BOS, 16, 17, EOS], 2),
            (vec![18, 19, 20, 21, EOS], 3),
        ]
    );
    assert_eq!(
        (left.report.kept, left.report.truncated, left.report.dropped),
        (3, 2, 0)
    );

    // Completion alone (3 tokens) longer than seq_len 2: prompt gone, end cut.
    let tiny = load_sft(&path, &tok, &with(Overlong::TruncateLeft, 2)).unwrap();
    assert_eq!(tiny.examples[0].input_ids, vec![19, 20]);
    assert_eq!(tiny.examples[0].completion_start, 0);
    assert_eq!(tiny.report.truncated, 3);

    let right = load_sft(&path, &tok, &with(Overlong::TruncateRight, 5)).unwrap();
    assert_eq!(right.examples[0].input_ids, vec![BOS, 16, 17, 18, 19]);
    assert_eq!(right.examples[0].completion_start, 4);
    // Row 3's prompt (6 tokens) fills the window: nothing to learn, dropped.
    assert_eq!(
        (
            right.report.kept,
            right.report.truncated,
            right.report.dropped
        ),
        (2, 1, 1)
    );

    let drop = load_sft(&path, &tok, &with(Overlong::Drop, 5)).unwrap();
    assert_eq!(drop.examples.len(), 1);
    assert_eq!(
        (
            drop.report.read,
            drop.report.kept,
            drop.report.truncated,
            drop.report.dropped
        ),
        (3, 1, 0, 2)
    );
}

#[test]
fn dpo_truncation_modes_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[
            // prompt <s> a b c (4), chosen d </s> (2), rejected e f </s> (3)
            r#"{"prompt": "a b c", "chosen": " d", "rejected": " e f"}"#,
            // short: fits 5
            r#"{"prompt": "a", "chosen": " b", "rejected": " c"}"#,
            // chosen/rejected differ only at their 3rd token
            r#"{"prompt": "a b c", "chosen": " d e f", "rejected": " d e"}"#,
        ],
    );
    let left = load_dpo(&path, &tok, &with(Overlong::TruncateLeft, 5)).unwrap();
    let first = &left.examples[0];
    assert_eq!(first.prompt_ids, vec![17, 18]);
    assert_eq!(first.chosen_ids, vec![19, EOS]);
    assert_eq!(first.rejected_ids, vec![20, 21, EOS]);
    assert_eq!(
        (left.report.kept, left.report.truncated, left.report.dropped),
        (3, 2, 0)
    );

    let right = load_dpo(&path, &tok, &with(Overlong::TruncateRight, 5)).unwrap();
    assert_eq!(right.examples[0].prompt_ids, vec![BOS, 16, 17, 18]);
    assert_eq!(right.examples[0].chosen_ids, vec![19]);
    assert_eq!(right.examples[0].rejected_ids, vec![20]);
    // Row 3 cut to " d" / " d": identical, dropped.
    assert_eq!(
        (
            right.report.kept,
            right.report.truncated,
            right.report.dropped
        ),
        (2, 1, 1)
    );

    let drop = load_dpo(&path, &tok, &with(Overlong::Drop, 5)).unwrap();
    assert_eq!((drop.report.kept, drop.report.dropped), (1, 2));
}

#[test]
fn unparsable_model_template_only_fails_message_rows() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(
        dir.path(),
        Some("{% generation %}{{ x }}{% endgeneration %}"),
    );
    let plain = write_jsonl(dir.path(), "plain.jsonl", &[GOOD]);
    assert_eq!(
        load_sft(&plain, &tok, &settings(64))
            .unwrap()
            .examples
            .len(),
        1
    );
    let chat = write_jsonl(
        dir.path(),
        "chat.jsonl",
        &[
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        ],
    );
    let skip = TokenizeSettings {
        bad_rows: BadRows::Skip,
        ..settings(64)
    };
    // A broken template is never "skipped" row by row.
    let err = load_sft(&chat, &tok, &skip).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid chat template (model): "),
        "{err}"
    );
}

#[test]
fn template_that_rewrites_the_prompt_starts_the_completion_where_tokens_diverge() {
    let dir = tempfile::tempdir().unwrap();
    // The generation prompt changes the start of the text, so the rendered
    // prompt ("a b ") is not a prefix of the rendered conversation ("b c ").
    // TRL 1.16 accepts this and starts the completion at the common token
    // prefix (here: none), so do we, and the row is counted.
    let tok = tokenizer(
        dir.path(),
        Some("{% if add_generation_prompt %}a {% endif %}{% for m in messages %}{{ m.content }} {% endfor %}"),
    );
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "b"}], "completion": [{"role": "assistant", "content": "c"}]}"#,
        ],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    assert_eq!(data.report.prompt_boundary_mismatches, 1);
    assert_eq!(data.examples[0].input_ids, vec![17, 18]);
    assert_eq!(data.examples[0].completion_start, 0);
}

#[test]
fn prompt_boundary_mismatch_is_counted_and_follows_trl() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    // "hello wor" → <s> hello <unk>; "hello world" → <s> hello world.
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[r#"{"prompt": "hello wor", "completion": "ld"}"#],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    assert_eq!(data.report.prompt_boundary_mismatches, 1);
    // Full tokenization is trained on; the loss starts where it diverges
    // from the prompt's tokens (TRL 1.16's common prefix), so it covers "world".
    assert_eq!(data.examples[0].input_ids, vec![BOS, 5, 6, EOS]);
    assert_eq!(data.examples[0].completion_start, 2);
}

#[test]
fn tokenizer_config_variants() {
    use lora_runner::data::{ModelTokenizer, TokenizerConfig};
    let dir = tempfile::tempdir().unwrap();
    let tokenizer_json = write_tokenizer(dir.path());
    let config_path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config_path,
        r#"{"eos_token": "</s>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
    )
    .unwrap();
    let config = TokenizerConfig::from_json_file(&config_path).unwrap();
    assert_eq!(config.chat_template.as_deref(), Some("D"));
    assert_eq!(config.bos_token, None);

    // Template in chat_template.jinja is used when the config has none.
    std::fs::write(
        &config_path,
        r#"{"eos_token": "</s>", "pad_token": "<unk>"}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    let tok = ModelTokenizer::load(&tokenizer_json).unwrap();
    assert_eq!(tok.chat_template(), Some("J"));
    assert_eq!(tok.pad_id(), 0);
    assert_eq!(tok.eos().map(|t| t.id), Some(EOS));

    std::fs::write(&config_path, r#"{"eos_token": "<eos>"}"#).unwrap();
    let err = ModelTokenizer::load(&tokenizer_json).err().unwrap();
    assert!(
        err.to_string()
            .ends_with("eos_token \"<eos>\" is not in the vocabulary"),
        "{err}"
    );
}
