//! Activation checkpointing: gradients of LoRA Vars with checkpointed layers
//! equal the plain ones (padded and packed batches, dropout on), and no Var
//! loses its gradient (the first layer's input is the embeddings, not a Var).

use crate::support::model::*;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};

/// A model with random LoRA B (so every A has a gradient), checkpointed or not.
fn model(checkpointing: bool) -> Decoder {
    // Qwen2: biases on q/k/v, so the bias path is recomputed too.
    let mut s = spec(Architecture::Qwen2, false, 41);
    s.num_hidden_layers = 3;
    let dir = init_dir_amplified("checkpointing", &s);
    let opts = LoadOptions {
        dtype: Some(DType::F64),
        device: Device::Cpu,
    };
    let mut model = Decoder::load(&dir, &opts).unwrap();
    let mut lora = LoraConfig::new(2, 4.0, TargetModules::AllLinear);
    lora.dropout = 0.25;
    model.apply_lora(&lora, 5).unwrap();
    for (name, var) in model.lora_parameters() {
        if name.contains("lora_B") {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    if checkpointing {
        model.enable_checkpointing();
    }
    model
}

/// Σ log p of every next token, padded (left) and packed, and the gradients.
fn loss_and_grads(model: &Decoder, seqs: &[Vec<u32>], mode: Mode) -> (f64, GradStore) {
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let ids: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [vec![0; t - s.len()], s.clone()].concat())
        .collect();
    let mask: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| [vec![0; t - s.len()], vec![1; s.len()]].concat())
        .collect();
    let targets: Vec<(usize, usize, u32)> = ids
        .iter()
        .enumerate()
        .flat_map(|(row, s)| (t - seqs[row].len()..t - 1).map(move |i| (row, i, s[i + 1])))
        .collect();
    let hidden = model
        .forward(
            Input::padded(&ids_tensor(&ids), Some(&ids_tensor(&mask))),
            Rows::All,
            mode,
        )
        .unwrap();
    let padded = model
        .token_logprobs(&hidden, &targets)
        .unwrap()
        .sum_all()
        .unwrap();

    let slices: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (hidden, starts) = forward_packed(model, &slices, mode);
    let at: Vec<(usize, usize, u32)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(row, s)| {
            let start = starts[row];
            (0..s.len() - 1).map(move |i| (0, start + i, s[i + 1]))
        })
        .collect();
    let packed = model
        .token_logprobs(&hidden, &at)
        .unwrap()
        .sum_all()
        .unwrap();

    let loss = (padded + packed).unwrap();
    let grads = model.backward(&loss).unwrap();
    (loss.to_scalar::<f64>().unwrap(), grads)
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    with_big_stack(|| {
        let seqs: Vec<Vec<u32>> = [11usize, 4, 70]
            .iter()
            .zip(7u64..)
            .map(|(&len, seed)| random_ids(1, len, 128, seed).remove(0))
            .collect();
        // The same Vars (B is drawn unseeded), one copy checkpointed.
        let plain = model(false);
        let mut checkpointed = plain.clone();
        checkpointed.enable_checkpointing();
        for mode in [Mode::Eval, Mode::Train { dropout_seed: 99 }] {
            let (loss_p, grads_p) = loss_and_grads(&plain, &seqs, mode);
            let (loss_c, grads_c) = loss_and_grads(&checkpointed, &seqs, mode);
            // Same kernels in the same order: the forward pass is bitwise equal.
            assert_eq!(loss_p.to_bits(), loss_c.to_bits(), "{mode:?}");
            let params = plain.lora_parameters().into_iter();
            for ((name, p), (_, c)) in params.zip(checkpointed.lora_parameters()) {
                let gp = grads_p.get(p.as_tensor()).unwrap();
                let gc = grads_c
                    .get(c.as_tensor())
                    .unwrap_or_else(|| panic!("{mode:?}: no gradient for {name}"));
                let scale = gp.abs().unwrap().max_all().unwrap();
                let scale = scale
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(scale > 1e-6, "{mode:?}: {name} has a zero gradient");
                let d = max_abs_diff(gp, gc) as f64;
                assert!(
                    d <= 1e-9 * scale,
                    "{mode:?}: {name} differs by {d} (of {scale})"
                );
            }
        }
        // Dropout is on in training mode: its gradients differ from eval's,
        // so the equality above also covers the recomputed masks.
        let (_, eval) = loss_and_grads(&checkpointed, &seqs, Mode::Eval);
        let (_, train) = loss_and_grads(&checkpointed, &seqs, Mode::Train { dropout_seed: 99 });
        let (_, var) = &checkpointed.lora_parameters()[0];
        let d = max_abs_diff(
            eval.get(var.as_tensor()).unwrap(),
            train.get(var.as_tensor()).unwrap(),
        );
        assert!(d > 1e-6, "dropout changed nothing ({d})");
    });
}

/// A plain `Tensor::backward` through checkpointed layers would lose their
/// LoRA gradients: it fails instead of returning them silently incomplete.
#[test]
fn a_plain_backward_through_checkpointed_layers_is_refused() {
    with_big_stack(|| {
        let model = model(true);
        let ids = ids_tensor(&random_ids(1, 6, 128, 4));
        let hidden = model
            .forward(Input::padded(&ids, None), Rows::All, Mode::Eval)
            .unwrap();
        let loss = hidden.sum_all().unwrap();
        let Err(err) = loss.backward() else {
            panic!("a plain backward was let through")
        };
        assert!(err.to_string().contains("Decoder::backward"), "{err}");
        assert!(model.backward(&loss).is_ok());
    });
}

#[test]
fn a_second_backward_starts_from_an_empty_store() {
    with_big_stack(|| {
        let seqs = random_ids(2, 9, 128, 3);
        let model = model(true);
        let (_, once) = loss_and_grads(&model, &seqs, Mode::Eval);
        let (_, again) = loss_and_grads(&model, &seqs, Mode::Eval);
        for (name, var) in model.lora_parameters() {
            let (a, b) = (
                once.get(var.as_tensor()).unwrap(),
                again.get(var.as_tensor()).unwrap(),
            );
            assert_eq!(
                max_abs_diff(a, b),
                0.0,
                "{name} accumulated across backwards"
            );
        }
    });
}

#[test]
fn output_head_in_chunks_of_rows_equals_the_whole() {
    use lora_runner::model::kernels::ops::token_logprobs;
    use lora_runner::model::kernels::recompute::{recomputed_rows, RowFunction};
    use std::sync::Arc;
    with_big_stack(|| {
        let dev = Device::Cpu;
        let (n, hidden, vocab) = (7, 5, 11);
        let weight = Tensor::randn(0f64, 1.0, (vocab, hidden), &dev).unwrap();
        let tokens: Arc<Vec<u32>> =
            Arc::new((0..n as u32).map(|i| (i * 5) % vocab as u32).collect());
        let x = candle_core::Var::randn(0f64, 1.0, (n, hidden), &dev).unwrap();
        // Rows scaled per row so that each row's gradient differs.
        let row_scale = Tensor::arange(1f64, n as f64 + 1.0, &dev)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let whole = token_logprobs(
            &x.as_tensor().matmul(&weight.t().unwrap()).unwrap(),
            &tokens,
        )
        .unwrap();
        let g_whole = (whole.clone() * row_scale.squeeze(1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for chunk in [1, 3, 7, 100] {
            let (w, t) = (weight.clone(), tokens.clone());
            let f: RowFunction =
                Arc::new(move |rows, x| token_logprobs(&x.matmul(&w.t()?)?, &t[rows]));
            let chunked = recomputed_rows(x.as_tensor(), chunk, f).unwrap();
            assert!(
                max_abs_diff(&whole, &chunked) < 1e-12,
                "chunk {chunk}: forward"
            );
            let g = (chunked * row_scale.squeeze(1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_abs_diff(
                g_whole.get(x.as_tensor()).unwrap(),
                g.get(x.as_tensor()).unwrap(),
            );
            assert!(d < 1e-12, "chunk {chunk}: gradient differs by {d}");
        }
    });
}

/// The same on the GPU's path, where each recomputed layer's attention is
/// itself tiled and recomputes its tiles inside the layer's backward.
#[test]
fn checkpointed_gradients_equal_plain_ones_on_the_generic_path() {
    passes_on_the_generic_path("checkpointing::checkpointed_gradients_equal_plain_ones");
}
