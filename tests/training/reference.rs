//! The DPO reference is the SFT model in both schemes: base + the SFT adapter
//! (frozen) in scheme one, the merged model in scheme two. Their reference
//! log-probs must agree to float tolerance.

use std::path::Path;

use candle_core::{DType, Device};
use lora_runner::data::{load_dpo, ModelTokenizer, TokenizeSettings};
use lora_runner::model::decoder::{Decoder, LoadOptions};
use lora_runner::model::formats::peft::{load_adapter, save_adapter};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::model::merge::{merge_lora, save_model_folder};
use lora_runner::train::dpo::score_pairs;

use crate::support::model::set_lora_b;

fn load(dir: &Path) -> Decoder {
    Decoder::load(
        dir,
        &LoadOptions {
            dtype: Some(DType::F32),
            device: Device::Cpu,
        },
    )
    .unwrap()
}

#[test]
fn scheme_one_and_scheme_two_reference_logprobs_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir, merged_dir) = (
        tmp.path().join("base"),
        tmp.path().join("sft"),
        tmp.path().join("merged"),
    );
    init_model(&RandomModel::tiny(11), &base_dir).unwrap();

    // An "SFT adapter" with non-zero B, so that it matters.
    let mut sft = load(&base_dir);
    sft.apply_lora(&LoraConfig::new(4, 8.0, TargetModules::AllLinear), 5)
        .unwrap();
    set_lora_b(&sft, 0.4);
    save_adapter(&sft, &adapter_dir, "base").unwrap();
    save_model_folder(
        &merge_lora(&sft).unwrap(),
        &merged_dir,
        Some(&base_dir),
        u64::MAX,
    )
    .unwrap();

    let tokenizer = ModelTokenizer::load(&base_dir.join("tokenizer.json")).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/data/dpo_eval.jsonl");
    let pairs = load_dpo(&data, &tokenizer, &TokenizeSettings::new(32)).unwrap();
    let pad = tokenizer.pad_id();

    let mut scheme_one = load(&base_dir);
    load_adapter(&mut scheme_one, &adapter_dir).unwrap();
    let one = score_pairs(&scheme_one, &pairs, pad, &Device::Cpu, None).unwrap();
    let two = score_pairs(&load(&merged_dir), &pairs, pad, &Device::Cpu, None).unwrap();
    let bare = score_pairs(&load(&base_dir), &pairs, pad, &Device::Cpu, None).unwrap();

    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert_eq!(one.chosen.len(), 200);
    assert!(
        max_diff(&one.chosen, &two.chosen) < 1e-3,
        "chosen: {}",
        max_diff(&one.chosen, &two.chosen)
    );
    assert!(
        max_diff(&one.rejected, &two.rejected) < 1e-3,
        "rejected: {}",
        max_diff(&one.rejected, &two.rejected)
    );
    assert_eq!(one.chosen_tokens, two.chosen_tokens);
    // The bare base is a different model: using it as the reference would be the classic bug.
    assert!(
        max_diff(&one.chosen, &bare.chosen) > 0.1,
        "the adapter changes the log-probs"
    );
}

#[test]
fn reference_pairs_are_computed_once_each_and_only_when_wanted() {
    use lora_runner::train::dpo::{score_pairs_into, ScoringCount};
    use std::sync::atomic::AtomicBool;
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tmp.path().join("base");
    init_model(&RandomModel::tiny(4), &base_dir).unwrap();
    let tokenizer = ModelTokenizer::load(&base_dir.join("tokenizer.json")).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/data/dpo_eval.jsonl");
    let pairs = load_dpo(&data, &tokenizer, &TokenizeSettings::new(32)).unwrap();
    let pad = tokenizer.pad_id();
    let full = score_pairs(&load(&base_dir), &pairs, pad, &Device::Cpu, None).unwrap();
    let dir = tmp.path().join("reference");
    std::fs::create_dir(&dir).unwrap();
    let run = |wanted: &[usize], stop: bool| {
        score_pairs_into(
            || Ok(load(&base_dir)),
            &pairs,
            wanted,
            &dir,
            pad,
            None,
            &Device::Cpu,
            &lora_runner::progress::Silent,
            &AtomicBool::new(stop),
        )
    };
    // Ctrl-C before the first batch: nothing computed, nothing saved.
    assert!(run(&[1, 2], true).is_err());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    let first: Vec<usize> = (0..150).step_by(2).collect();
    let (scores, count) = run(&first, false).unwrap();
    assert_eq!(
        count,
        ScoringCount {
            reused: 0,
            computed: 75
        }
    );
    for i in 0..pairs.examples.len() {
        if first.contains(&i) {
            // The same numbers as scoring the whole file at once.
            assert!((scores.chosen[i] - full.chosen[i]).abs() < 1e-4, "pair {i}");
            assert!(
                (scores.rejected[i] - full.rejected[i]).abs() < 1e-4,
                "pair {i}"
            );
            assert_eq!(scores.chosen_tokens[i], full.chosen_tokens[i]);
        } else {
            assert!(scores.chosen[i].is_nan(), "pair {i} was not wanted");
        }
    }
    // A longer run: only the new pairs are computed, and the model is not
    // even loaded when nothing is missing.
    let more: Vec<usize> = (0..200).collect();
    // Ctrl-C after the first forward pass (the progress sink presses it):
    // that batch is saved, and the run stops before the next.
    struct PressCtrlC<'a>(&'a AtomicBool);
    impl lora_runner::sink::Progress for PressCtrlC<'_> {
        fn set_total(&self, _: u64) {}
        fn set_position(&self, _: u64, _: &str) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        fn log(&self, _: &str) {}
    }
    let flag = AtomicBool::new(false);
    let stopped = score_pairs_into(
        || Ok(load(&base_dir)),
        &pairs,
        &more,
        &dir,
        pad,
        None,
        &Device::Cpu,
        &PressCtrlC(&flag),
        &flag,
    );
    assert!(stopped.unwrap_err().is::<lora_runner::sink::Interrupted>());
    let (_, count) = run(&more, false).unwrap();
    assert_eq!(
        count,
        ScoringCount {
            reused: 75 + 16,
            computed: 125 - 16
        }
    );
    let (again, count) = score_pairs_into(
        || anyhow::bail!("no model needed"),
        &pairs,
        &more,
        &dir,
        pad,
        None,
        &Device::Cpu,
        &lora_runner::progress::Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(
        count,
        ScoringCount {
            reused: 200,
            computed: 0
        }
    );
    for i in 0..200 {
        assert!((again.chosen[i] - full.chosen[i]).abs() < 1e-4, "pair {i}");
    }
}
