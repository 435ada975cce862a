//! Padding-free packing: sequences packed into one row give the log-probs
//! and LoRA gradients of the same sequences right-padded into a batch, with
//! and without a sliding window.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::lora::{LoraConfig, TargetModules};

/// Next-token targets at every position but the last of each sequence.
fn targets(seqs: &[Vec<u32>]) -> Vec<(usize, usize, u32)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(row, s)| (0..s.len() - 1).map(move |t| (row, t, s[t + 1])))
        .collect()
}

fn padded(model: &Decoder, seqs: &[Vec<u32>]) -> Tensor {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [s.clone(), vec![0; t - s.len()]].concat())
        .collect();
    let mask: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [vec![1; s.len()], vec![0; t - s.len()]].concat())
        .collect();
    let hidden = model
        .forward_hidden(&ids_tensor(&ids), Some(&ids_tensor(&mask)), Mode::Eval)
        .unwrap();
    model.token_logprobs(&hidden, &targets(seqs)).unwrap()
}

fn packed(model: &Decoder, seqs: &[Vec<u32>]) -> Tensor {
    let slices: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (hidden, starts) = model.forward_hidden_packed(&slices, Mode::Eval).unwrap();
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
