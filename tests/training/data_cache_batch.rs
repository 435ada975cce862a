//! On-disk round trip, settings identity and padded micro-batches.

use crate::support::fixtures::*;
use lora_runner::data::{
    dpo_micro_batches, load_dpo, load_sft, sft_micro_batches, tokenization_identity, DataError,
    DatasetKind, DpoDataset, DpoExample, Padding, SftDataset, SftExample, TokenizeSettings,
};

fn sft_example(input_ids: Vec<u32>, completion_start: usize) -> SftExample {
    SftExample {
        input_ids,
        completion_start,
    }
}

#[test]
fn sft_dataset_round_trips_through_disk() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": "hello world", "completion": " how are you"}"#,
            r#"{"prompt": "", "completion": "fine"}"#,
            "garbage",
        ],
    );
    let settings = TokenizeSettings {
        bad_rows: lora_runner::data::BadRows::Skip,
        ..settings(64)
    };
    let data = load_sft(&path, &tok, &settings).unwrap();
    assert_eq!(data.report.skipped, 1);
    let cache = dir.path().join("cache/sft");
    data.write(&cache).unwrap();
    assert_eq!(SftDataset::read(&cache).unwrap(), data);
    // tokens.bin holds every id as little-endian u32: 7 + 3 tokens.
    assert_eq!(
        std::fs::metadata(cache.join("tokens.bin")).unwrap().len(),
        40
    );
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 3);

    // Wrong kind and truncated files are detected, not misread.
    assert!(matches!(
        DpoDataset::read(&cache),
        Err(DataError::CorruptCache { .. })
    ));
    let tokens = std::fs::read(cache.join("tokens.bin")).unwrap();
    std::fs::write(cache.join("tokens.bin"), &tokens[..36]).unwrap();
    assert!(matches!(
        SftDataset::read(&cache),
        Err(DataError::CorruptCache { .. })
    ));
}

#[test]
fn dpo_dataset_round_trips_through_disk() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[
            r#"{"prompt": "hello", "chosen": " good", "rejected": " bad"}"#,
            r#"{"prompt": "how are", "chosen": " you", "rejected": " fine world"}"#,
        ],
    );
    let data = load_dpo(&path, &tok, &settings(64)).unwrap();
    let cache = dir.path().join("dpo-cache");
    data.write(&cache).unwrap();
    let back = DpoDataset::read(&cache).unwrap();
    assert_eq!(back, data);
    assert_eq!(back.examples[1].rejected_ids, vec![10, 6, EOS]);
    assert_eq!(back.lines, vec![1, 2]);
}

#[test]
fn identity_changes_with_settings_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), None);
    let base = tokenization_identity(DatasetKind::Sft, &settings(64), &tok).unwrap();
    assert_eq!(base.template_origin, "none");
    assert_eq!(base.eos_token.as_deref(), Some("</s>"));
    let json = serde_json::to_string(&base).unwrap();
    assert_eq!(
        serde_json::to_string(
            &tokenization_identity(DatasetKind::Sft, &settings(64), &tok).unwrap()
        )
        .unwrap(),
        json
    );
    assert_ne!(
        tokenization_identity(DatasetKind::Sft, &settings(32), &tok).unwrap(),
        base
    );
    assert_ne!(
        tokenization_identity(DatasetKind::Dpo, &settings(64), &tok).unwrap(),
        base
    );
    let chatml = TokenizeSettings {
        chat_format: Some("chatml".into()),
        ..settings(64)
    };
    let with_template = tokenization_identity(DatasetKind::Sft, &chatml, &tok).unwrap();
    assert_eq!(with_template.template_origin, "builtin:chatml");
    assert!(with_template
        .template_source
        .unwrap()
        .contains("<|im_start|>"));
    // bad_rows does not change what a successful load produces.
    let skip = TokenizeSettings {
        bad_rows: lora_runner::data::BadRows::Skip,
        ..settings(64)
    };
    assert_eq!(
        tokenization_identity(DatasetKind::Sft, &skip, &tok).unwrap(),
        base
    );
}

#[test]
fn sft_batches_pad_right_with_masks() {
    let examples = vec![
        sft_example(vec![1, 5, 6, 7, 2], 3),
        sft_example(vec![1, 8, 9], 2),
        sft_example(vec![1, 10], 1),
    ];
    // Order picks example 1 then 0; micro-batch of 2, pad id 99.
    let batches = sft_micro_batches(&examples, &[1, 0, 2], 2, 99, Padding::Longest).unwrap();
    assert_eq!(batches.len(), 2);
    let b = &batches[0];
    assert_eq!((b.batch_size, b.width), (2, 5));
    assert_eq!(b.input_ids, vec![1, 8, 9, 99, 99, /**/ 1, 5, 6, 7, 2]);
    assert_eq!(
        b.attention_mask,
        vec![1., 1., 1., 0., 0., /**/ 1., 1., 1., 1., 1.]
    );
    assert_eq!(
        b.label_mask,
        vec![0., 0., 1., 0., 0., /**/ 0., 0., 0., 1., 1.]
    );
    // Last micro-batch holds the remainder.
    assert_eq!(
        (batches[1].batch_size, batches[1].input_ids.clone()),
        (1, vec![1, 10])
    );

    let fixed = sft_micro_batches(&examples, &[2], 1, 0, Padding::Fixed(4)).unwrap();
    assert_eq!(fixed[0].input_ids, vec![1, 10, 0, 0]);
    assert!(sft_micro_batches(&examples, &[0], 1, 0, Padding::Fixed(4)).is_err());
    assert!(sft_micro_batches(&examples, &[3], 1, 0, Padding::Longest).is_err());
    assert!(sft_micro_batches(&examples, &[0], 0, 0, Padding::Longest).is_err());
}

#[test]
fn dpo_batches_stack_chosen_then_rejected() {
    let examples = vec![
        DpoExample {
            prompt_ids: vec![1, 5],
            chosen_ids: vec![15, 2],
            rejected_ids: vec![14, 6, 2],
        },
        DpoExample {
            prompt_ids: vec![1],
            chosen_ids: vec![9],
            rejected_ids: vec![10, 2],
        },
    ];
    let batches = dpo_micro_batches(&examples, &[0, 1], 2, 0, Padding::Longest).unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!((b.pairs, b.width), (2, 5));
    #[rustfmt::skip]
    let expected_ids = vec![
        1, 5, 15, 2, 0,  // pair 0 chosen
        1, 9, 0, 0, 0,   // pair 1 chosen
        1, 5, 14, 6, 2,  // pair 0 rejected
        1, 10, 2, 0, 0,  // pair 1 rejected
    ];
    assert_eq!(b.input_ids, expected_ids);
    #[rustfmt::skip]
    let attention = vec![
        1., 1., 1., 1., 0.,
        1., 1., 0., 0., 0.,
        1., 1., 1., 1., 1.,
        1., 1., 1., 0., 0.,
    ];
    assert_eq!(b.attention_mask, attention);
    #[rustfmt::skip]
    let prompt = vec![
        1., 1., 0., 0., 0.,
        1., 0., 0., 0., 0.,
        1., 1., 0., 0., 0.,
        1., 0., 0., 0., 0.,
    ];
    assert_eq!(b.prompt_mask, prompt);
    #[rustfmt::skip]
    let completion = vec![
        0., 0., 1., 1., 0.,
        0., 1., 0., 0., 0.,
        0., 0., 1., 1., 1.,
        0., 1., 1., 0., 0.,
    ];
    assert_eq!(b.completion_mask, completion);
}
