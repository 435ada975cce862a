//! Greedy exact match of SFT rows against one-row-at-a-time generation.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use lora_runner::data::SftExample;
use lora_runner::model::decoder::{Decoder, LoadOptions};
use lora_runner::model::generate::{generate, GenerateOptions};
use lora_runner::model::init::{init_model, InitSpec};
use lora_runner::sink::Progress;
use lora_runner::train::task::greedy_exact_match;

struct Quiet;
impl Progress for Quiet {
    fn set_total(&self, _: u64) {}
    fn set_position(&self, _: u64, _: &str) {}
    fn log(&self, _: &str) {}
}

#[test]
fn exact_match_is_greedy_completion_equal_to_the_row_token_for_token() {
    let tmp = tempfile::tempdir().unwrap();
    init_model(&InitSpec::tiny(5), tmp.path()).unwrap();
    let model = Decoder::load(
        tmp.path(),
        &LoadOptions {
            dtype: Some(DType::F32),
            device: Device::Cpu,
        },
    )
    .unwrap();
    // Prompts of 2 to 5 tokens, so batches are left-padded.
    let prompts: Vec<Vec<u32>> = (0..40u32)
        .map(|i| (0..2 + i % 4).map(|k| 1 + (i * 3 + k * 5) % 17).collect())
        .collect();
    // What greedy decoding gives each prompt on its own, 4 tokens, no stop token.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(
                &model,
                std::slice::from_ref(p),
                &GenerateOptions::greedy(4, vec![]),
            )
            .unwrap()[0]
                .clone()
        })
        .collect();
    let rows: Vec<SftExample> = prompts
        .iter()
        .zip(&alone)
        .enumerate()
        .map(|(i, (p, g))| {
            let mut completion = g.clone();
            match i % 3 {
                // The greedy continuation itself.
                0 => {}
                // One token off.
                1 => completion[1] += 1,
                // Longer than what is generated in 4 tokens.
                _ => completion.push(g[0]),
            }
            SftExample {
                input_ids: [p.clone(), completion].concat(),
                completion_start: p.len(),
            }
        })
        .collect();
    let quiet = AtomicBool::new(false);
    let matched = greedy_exact_match(&model, &rows, &[], 4, &Quiet, &quiet).unwrap();
    let want: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
    assert_eq!(matched, want);

    // A stop token ends both sides: a completion ending in it matches the
    // greedy continuation that never produces it.
    let stop = (0..64u32).find(|t| !alone[0].contains(t)).unwrap();
    let row = |completion: Vec<u32>| SftExample {
        input_ids: [prompts[0].clone(), completion].concat(),
        completion_start: prompts[0].len(),
    };
    let ends_in_stop = row([alone[0].clone(), vec![stop]].concat());
    let stops_early = row([alone[0][..2].to_vec(), vec![stop], alone[0][2..].to_vec()].concat());
    let matched = greedy_exact_match(
        &model,
        &[ends_in_stop, stops_early],
        &[stop],
        4,
        &Quiet,
        &quiet,
    )
    .unwrap();
    assert_eq!(matched, vec![true, false]);

    // Ctrl-C stops before the next batch.
    let stopped = greedy_exact_match(&model, &rows, &[], 4, &Quiet, &AtomicBool::new(true));
    assert!(stopped.is_err());
}
