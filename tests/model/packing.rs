//! Padding-free packing: sequences packed into one row give the log-probs
//! and LoRA gradients of the same sequences right-padded into a batch, with
//! and without a sliding window, on the fused path and on the GPU's.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};

/// Next-token targets at every position but the last of each sequence.
fn targets(seqs: &[Vec<u32>]) -> Vec<(usize, usize, u32)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(row, s)| (0..s.len() - 1).map(move |t| (row, t, s[t + 1])))
        .collect()
}

fn padded(model: &Decoder, seqs: &[Vec<u32>]) -> Tensor {
    model
        .token_logprobs(&padded_hidden(model, seqs), &targets(seqs))
        .unwrap()
}

/// Final hidden states of `seqs` right-padded into one batch.
fn padded_hidden(model: &Decoder, seqs: &[Vec<u32>]) -> Tensor {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [s.clone(), vec![0; t - s.len()]].concat())
        .collect();
    let mask: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [vec![1; s.len()], vec![0; t - s.len()]].concat())
        .collect();
    model
        .forward(
            Input::padded(&ids_tensor(&ids), Some(&ids_tensor(&mask))),
            Rows::All,
            Mode::Eval,
        )
        .unwrap()
}

fn packed(model: &Decoder, seqs: &[Vec<u32>]) -> Tensor {
    let slices: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (hidden, starts) = forward_packed(model, &slices, Mode::Eval);
    let at: Vec<(usize, usize, u32)> = targets(seqs)
        .into_iter()
        .map(|(row, t, tok)| (0, starts[row] + t, tok))
        .collect();
    model.token_logprobs(&hidden, &at).unwrap()
}

fn model(window: Option<usize>) -> Decoder {
    let mut s = spec(Architecture::Mistral, false, 33);
    s.num_hidden_layers = 2;
    let dir = init_dir_amplified("packing", &s);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(window);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let opts = LoadOptions {
        dtype: Some(DType::F64),
        device: Device::Cpu,
    };
    let mut model = Decoder::load(&dir, &opts).unwrap();
    model
        .apply_lora(&LoraConfig::new(2, 4.0, TargetModules::AllLinear), 5)
        .unwrap();
    for (name, var) in model.lora_parameters() {
        if name.contains("lora_B") {
            var.set(&(Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap()))
                .unwrap();
        }
    }
    model
}

#[test]
fn packed_sequences_give_the_padded_log_probs_and_gradients() {
    with_big_stack(|| {
        // Lengths 9, 3 and 70: the long one crosses a 64-query block and
        // starts well after the others in the packed row.
        let seqs: Vec<Vec<u32>> = [9usize, 3, 70]
            .iter()
            .zip(1u64..)
            .map(|(&len, seed)| random_ids(1, len, 128, seed).remove(0))
            .collect();
        for window in [None, Some(4)] {
            let model = model(window);
            let (p, q) = (padded(&model, &seqs), packed(&model, &seqs));
            assert!(
                max_abs_diff(&p, &q) < 1e-10,
                "{window:?}: log-probs differ by {}",
                max_abs_diff(&p, &q)
            );
            let gp = p.sum_all().unwrap().backward().unwrap();
            let gq = q.sum_all().unwrap().backward().unwrap();
            for (name, var) in model.lora_parameters() {
                let d = max_abs_diff(
                    gp.get(var.as_tensor()).unwrap(),
                    gq.get(var.as_tensor()).unwrap(),
                );
                assert!(d < 1e-9, "{window:?}: gradient of {name} differs by {d}");
            }
        }
        // Packing without per-sequence masking would differ: the tokens of
        // the third sequence would see the first two.
        let model = model(None);
        let joined = vec![seqs.concat()];
        let alone = padded(&model, &seqs[2..]);
        let in_one = padded(&model, &joined).narrow(0, 9 + 3, 69).unwrap();
        assert!(max_abs_diff(&alone, &in_one) > 1e-3);
    });
}

/// The same on the GPU's path: tiled attention (16-token tiles, which the
/// 70-token sequence crosses and which straddle the packed sequences) and
/// the head's log-probs without their logits.
#[test]
fn packed_sequences_give_the_padded_log_probs_and_gradients_on_the_generic_path() {
    passes_on_the_generic_path("packing::packed_sequences_give_the_padded_log_probs_and_gradients");
}

#[test]
fn selected_positions_give_the_full_pass_log_probs_and_gradients_on_the_generic_path() {
    passes_on_the_generic_path(
        "packing::selected_positions_give_the_full_pass_log_probs_and_gradients",
    );
}

/// `forward` at `Rows::At`: the last layer computes only the selected
/// rows; log-probs and LoRA gradients equal the full pass's at those rows.
/// Selections: the short completions a loss reads (in order), and rows out
/// of order with a repeat, the first and the last token included.
#[test]
fn selected_positions_give_the_full_pass_log_probs_and_gradients() {
    with_big_stack(|| {
        let seqs: Vec<Vec<u32>> = [9usize, 3, 70]
            .iter()
            .zip(7u64..)
            .map(|(&len, seed)| random_ids(1, len, 128, seed).remove(0))
            .collect();
        let slices: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let all = targets(&seqs);
        let completions: Vec<usize> = vec![6, 7, 10, 77, 78, 79, 80];
        let scrambled: Vec<usize> = vec![81, 0, 40, 12, 40, 9];
        for (window, checkpointing) in [(None, false), (Some(4), false), (None, true)] {
            let mut model = model(window);
            if checkpointing {
                model.enable_checkpointing();
            }
            for at in [&completions, &scrambled] {
                // The packed row's next-token targets, by packed position.
                let (_, starts) = forward_packed(&model, &slices, Mode::Inference);
                let target_at = |p: usize| {
                    all.iter()
                        .find(|&&(row, t, _)| starts[row] + t == p)
                        .map_or(0, |&(_, _, tok)| tok)
                };
                let full_rows: Vec<(usize, usize, u32)> =
                    at.iter().map(|&p| (0, p, target_at(p))).collect();
                let sel_rows: Vec<(usize, usize, u32)> = at
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| (0, i, target_at(p)))
                    .collect();
                let (hidden, _) = forward_packed(&model, &slices, Mode::Eval);
                let full = model.token_logprobs(&hidden, &full_rows).unwrap();
                let hidden_at = model
                    .forward(Input::Packed(&slices), Rows::At(at), Mode::Eval)
                    .unwrap();
                assert_eq!(hidden_at.dims(), [1, at.len(), hidden.dim(2).unwrap()]);
                let sel = model.token_logprobs(&hidden_at, &sel_rows).unwrap();
                let d = max_abs_diff_f64(&full, &sel);
                assert!(
                    d < 1e-10,
                    "{window:?} {checkpointing}: log-probs differ by {d}"
                );
                // Weighted, so that each row's gradient counts differently.
                let weights: Vec<f64> = (0..at.len()).map(|i| 1.0 + i as f64).collect();
                let w = Tensor::from_vec(weights, at.len(), &Device::Cpu).unwrap();
                // Checkpointed layers' gradients are merged by the model's backward.
                let gf = model
                    .backward(&(&full * &w).unwrap().sum_all().unwrap())
                    .unwrap();
                let gs = model
                    .backward(&(&sel * &w).unwrap().sum_all().unwrap())
                    .unwrap();
                for (name, var) in model.lora_parameters() {
                    let (a, b) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
                    let (a, b) = (
                        a.expect("full gradient"),
                        b.unwrap_or_else(|| {
                            panic!("{window:?} {checkpointing} {at:?}: no gradient for {name}")
                        }),
                    );
                    let d = max_abs_diff_f64(a, b);
                    assert!(
                        d < 1e-10,
                        "{window:?} {checkpointing}: {name} differs by {d}"
                    );
                    assert!(
                        a.abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                            > 0.0
                    );
                }
            }
        }
        let model = model(None);
        let err = model
            .forward(Input::Packed(&slices), Rows::At(&[82]), Mode::Eval)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("position 82 is outside the 82 packed tokens"),
            "{err}"
        );
    });
}

fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    let flat = |t: &Tensor| {
        let t = t.to_dtype(DType::F64).unwrap();
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// WPO's log Σ p² of each target position, against the full logits'
/// softmax summed in f64 here; and the same from a packed row as from the
/// padded batch (the trainer takes either path).
#[test]
fn log_sum_of_squared_probabilities_is_the_softmax_s() {
    let model = model(None);
    let seqs = random_ids(3, 7, model.config.vocab_size, 5);
    let seqs: Vec<Vec<u32>> = seqs
        .into_iter()
        .enumerate()
        .map(|(i, s)| s[..7 - 2 * i].to_vec())
        .collect();
    let hidden = padded_hidden(&model, &seqs);
    let targets = targets(&seqs);
    let got = model.token_log_sum_sq_probs(&hidden, &targets).unwrap();
    let logits: Vec<Vec<Vec<f64>>> = model
        .logits(&hidden)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec3()
        .unwrap();
    for (i, &(row, pos, _)) in targets.iter().enumerate() {
        let z = &logits[row][pos];
        let max = z.iter().cloned().fold(f64::MIN, f64::max);
        let p: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
        let total: f64 = p.iter().sum();
        let want = p.iter().map(|q| (q / total).powi(2)).sum::<f64>().ln();
        assert!(
            (f64::from(got[i]) - want).abs() < 1e-5 * (1.0 + want.abs()),
            "target {i}: {} vs {want}",
            got[i]
        );
        assert!(want < 0.0);
    }
    let slices: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (hidden, starts) = forward_packed(&model, &slices, Mode::Eval);
    let at: Vec<(usize, usize, u32)> = targets
        .iter()
        .map(|&(row, t, tok)| (0, starts[row] + t, tok))
        .collect();
    let packed = model.token_log_sum_sq_probs(&hidden, &at).unwrap();
    for (a, b) in got.iter().zip(&packed) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}
