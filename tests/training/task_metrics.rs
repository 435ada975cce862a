//! Greedy exact match of SFT rows against one-row-at-a-time generation.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use lora_runner::data::SftExample;
use lora_runner::metrics::task::{greedy_match, teacher_forced};
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Rows};
use lora_runner::model::generate::{generate, GenerateOptions};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::progress::Silent;

/// Exact match of every row (what `sft/exact_match` averages).
fn exact(
    model: &Decoder,
    rows: &[SftExample],
    stop: &[u32],
    interrupt: &AtomicBool,
) -> anyhow::Result<Vec<bool>> {
    Ok(greedy_match(model, rows, stop, 4, &Silent, interrupt)?
        .into_iter()
        .map(|g| g.exact)
        .collect())
}

/// A tiny random model.
fn tiny_model(dir: &std::path::Path, seed: u64) -> Decoder {
    init_model(&RandomModel::tiny(seed), dir).unwrap();
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
fn exact_match_is_greedy_completion_equal_to_the_row_token_for_token() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 5);
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
    let matched = exact(&model, &rows, &[], &quiet).unwrap();
    let want: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
    assert_eq!(matched, want);
    // Prefix match: all 4, the first of 4 (one off at index 1), 4 of 5.
    let prefix: Vec<f64> = greedy_match(&model, &rows, &[], 4, &Silent, &quiet)
        .unwrap()
        .iter()
        .map(|g| g.prefix)
        .collect();
    let want: Vec<f64> = (0..40).map(|i| [1.0, 0.25, 0.8][i % 3]).collect();
    assert_eq!(prefix, want);

    // A stop token ends both sides: a completion ending in it matches the
    // greedy continuation that never produces it.
    let stop = (0..64u32).find(|t| !alone[0].contains(t)).unwrap();
    let row = |completion: Vec<u32>| SftExample {
        input_ids: [prompts[0].clone(), completion].concat(),
        completion_start: prompts[0].len(),
    };
    let ends_in_stop = row([alone[0].clone(), vec![stop]].concat());
    let stops_early = row([alone[0][..2].to_vec(), vec![stop], alone[0][2..].to_vec()].concat());
    let matched = exact(&model, &[ends_in_stop, stops_early], &[stop], &quiet).unwrap();
    assert_eq!(matched, vec![true, false]);

    // Ctrl-C stops before the next batch.
    let stopped = exact(&model, &rows, &[], &AtomicBool::new(true));
    assert!(stopped.is_err());
}

#[test]
fn teacher_forced_scores_match_the_full_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 8);
    // Odd rows: arbitrary tokens; even rows: the prompt's greedy
    // continuation, so every completion token is the argmax.
    let rows: Vec<SftExample> = (0..20u32)
        .map(|i| {
            let ids: Vec<u32> = (0..4 + i % 5).map(|k| 1 + (i * 7 + k * 3) % 50).collect();
            let start = 1 + (i % 3) as usize;
            if i % 2 == 1 {
                return SftExample {
                    input_ids: ids,
                    completion_start: start,
                };
            }
            let prompt = ids[..start].to_vec();
            let greedy = generate(
                &model,
                std::slice::from_ref(&prompt),
                &GenerateOptions::greedy(3, vec![]),
            )
            .unwrap()
            .remove(0);
            SftExample {
                input_ids: [prompt, greedy].concat(),
                completion_start: start,
            }
        })
        .collect();
    let scores = teacher_forced(&model, &rows, 0, &Device::Cpu).unwrap();
    // Each row alone, unpadded, from the full logits: log-softmax by hand, argmax by hand.
    for (row, score) in rows.iter().zip(&scores) {
        let ids = candle_core::Tensor::new(row.input_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = model
            .forward(
                Input::padded(&ids, None),
                Rows::All,
                lora_runner::model::decoder::Mode::Inference,
            )
            .unwrap();
        let logits: Vec<Vec<f32>> = model
            .logits(&hidden)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let (mut nll, mut correct) = (0.0f64, 0usize);
        for t in row.completion_start..row.input_ids.len() {
            let l = &logits[t - 1];
            let max = l.iter().cloned().fold(f32::MIN, f32::max);
            let lse = f64::from(max) + l.iter().map(|x| f64::from(x - max).exp()).sum::<f64>().ln();
            let target = row.input_ids[t] as usize;
            nll += lse - f64::from(l[target]);
            let best = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            correct += usize::from(best == target);
        }
        assert_eq!(score.tokens, row.input_ids.len() - row.completion_start);
        assert!(
            (score.nll - nll).abs() < 1e-4 * (1.0 + nll),
            "{} vs {nll}",
            score.nll
        );
        assert_eq!(score.correct, correct);
    }
    for (i, score) in scores.iter().enumerate().step_by(2) {
        assert_eq!((score.correct, score.tokens), (3, 3), "row {i}");
    }
}

#[test]
fn whitespace_normalisation_collapses_runs_and_trims() {
    use lora_runner::metrics::task::normalize_whitespace;
    assert_eq!(normalize_whitespace("  abc.\n"), "abc.");
    assert_eq!(normalize_whitespace(" a \t b  c "), "a b c");
    assert_eq!(
        normalize_whitespace(" abc."),
        normalize_whitespace("abc.  ")
    );
    assert_ne!(normalize_whitespace("a b"), normalize_whitespace("ab"));
    assert_eq!(normalize_whitespace(""), "");
}
