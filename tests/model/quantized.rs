//! A quantized frozen base: the quantized product and its input gradient
//! against the dequantised f32 computation, a quantized model with LoRA
//! against a dense model holding the dequantised weights, and merging into
//! a quantized base against W + s·B·A computed here.

use crate::support::model::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::kernels::quantized::{quantized_matmul, FrozenWeight, Quantization};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::model::merge::merge_lora;
use std::sync::Arc;

/// Values in [-0.3, 0.3) from a seeded generator (candle's randn is not seeded).
fn seeded_values(shape: &candle_core::Shape, seed: u64) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn l2(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn quantized_product_and_its_input_gradient_match_the_dequantised_weight() {
    with_big_stack(|| {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 256), &dev).unwrap();
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5_0] {
            let q = Arc::new(QTensor::quantize(&w, format).unwrap());
            let wd = q.dequantize(&dev).unwrap();
            // One row and a batch of rows (the matrix-vector and matrix paths).
            for shape in [(1, 1, 256), (3, 5, 256)] {
                let x = Var::randn(0f32, 1.0, shape, &dev).unwrap();
                let y = quantized_matmul(x.as_tensor(), &q).unwrap();
                let exact = x.as_tensor().broadcast_matmul(&wd.t().unwrap()).unwrap();
                // The dequantised weight times x, in f32.
                let rel = max_abs_diff(&y, &exact) / max_abs(&exact);
                assert!(rel < 1e-5, "{format:?} {shape:?}: forward off by {rel}");
                // bf16 inputs take candle's quantized product, which rounds
                // the input to 8-bit blocks: a small relative error.
                let x16 = x.as_tensor().to_dtype(DType::BF16).unwrap();
                let y16 = quantized_matmul(&x16, &q).unwrap();
                assert_eq!(y16.dtype(), DType::BF16);
                let rel = max_abs_diff(&y16, &exact) / max_abs(&exact);
                assert!(
                    rel < 0.03,
                    "{format:?} {shape:?}: bf16 forward off by {rel}"
                );
                // The product really uses the quantized weight, not W.
                if format == GgmlDType::Q4K {
                    let unquantized = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
                    assert!(
                        max_abs_diff(&y, &unquantized) > 2.0 * max_abs_diff(&y, &exact),
                        "{format:?}: the output is closer to the unquantized weight"
                    );
                }
                let g = Tensor::randn(0f32, 1.0, y.shape(), &dev).unwrap();
                let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).expect("the input gets a gradient");
                let expected = g.broadcast_matmul(&wd).unwrap();
                let d = max_abs_diff(dx, &expected) / max_abs(&expected);
                assert!(d < 1e-5, "{format:?} {shape:?}: input gradient off by {d}");
            }
        }
    });
}

#[test]
fn q4_k_falls_back_to_q5_0_for_rows_that_are_not_whole_super_blocks() {
    let q = Quantization::Q4K;
    assert_eq!(q.format_for(4864), Some(GgmlDType::Q4K));
    assert_eq!(q.format_for(896), Some(GgmlDType::Q5_0));
    assert_eq!(q.format_for(48), None);
    assert_eq!(Quantization::Q8_0.format_for(896), Some(GgmlDType::Q8_0));
    assert_eq!(Quantization::Q8_0.format_for(100), None);
    assert_eq!(Quantization::bits_per_weight(GgmlDType::Q4K), 4.5);
    assert_eq!(Quantization::bits_per_weight(GgmlDType::Q8_0), 8.5);
}

/// A tiny model whose projection rows are whole q4_k super-blocks in the MLP
/// (down_proj: 256 inputs) and q5_0 blocks elsewhere (64 inputs).
fn quantizable_dir() -> std::path::PathBuf {
    let mut s = spec(Architecture::Qwen2, true, 12);
    s.hidden_size = 64;
    s.intermediate_size = 256;
    let dir = init_dir("quantized", &s);
    amplify_weights(&dir, 3.0);
    dir
}

fn f32_options() -> LoadOptions {
    LoadOptions {
        dtype: Some(DType::F32),
        device: Device::Cpu,
    }
}

/// Log-probs of every next token of `ids` and the gradients of the LoRA Vars.
fn logprobs_and_grads(model: &Decoder, ids: &[Vec<u32>]) -> (Tensor, Vec<Tensor>) {
    let targets: Vec<(usize, usize, u32)> = ids
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..s.len() - 1).map(move |t| (b, t, s[t + 1])))
        .collect();
    let hidden = model
        .forward(Input::padded(&ids_tensor(ids), None), Rows::All, Mode::Eval)
        .unwrap();
    let lp = model.token_logprobs(&hidden, &targets).unwrap();
    let grads = lp.sum_all().unwrap().backward().unwrap();
    let g = model
        .lora_parameters()
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .clone()
        })
        .collect();
    (lp, g)
}

#[test]
fn lora_on_a_quantized_base_trains_like_on_its_dequantised_weights() {
    with_big_stack(|| {
        let dir = quantizable_dir();
        let lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        let mut quantized =
            Decoder::load_quantized(&dir, &f32_options(), Some(Quantization::Q4K)).unwrap();
        let layer = &quantized.layers[0];
        assert_eq!(layer.linears()[0].weight.format(), Some(GgmlDType::Q5_0));
        assert_eq!(layer.mlp.down_proj.weight.format(), Some(GgmlDType::Q4K));
        // The reference: the same weights, dequantised and held dense.
        let mut dense = Decoder::load(&dir, &f32_options()).unwrap();
        let unquantized = dense.clone();
        for (d, q) in dense
            .layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .zip(quantized.linears())
        {
            d.weight = FrozenWeight::Dense(q.weight.to_dense(DType::F32).unwrap());
        }
        quantized.apply_lora(&lora, 3).unwrap();
        dense.apply_lora(&lora, 3).unwrap();
        for (i, ((_, q), (_, d))) in quantized
            .lora_parameters()
            .iter()
            .zip(dense.lora_parameters())
            .enumerate()
        {
            let values = seeded_values(q.shape(), i as u64);
            q.set(&values).unwrap();
            d.set(&values).unwrap();
        }
        let ids = random_ids(2, 12, 128, 8);
        let (lp_q, g_q) = logprobs_and_grads(&quantized, &ids);
        let (lp_d, g_d) = logprobs_and_grads(&dense, &ids);
        // Products use the dequantised weight in f32, as the dense model does.
        let d = max_abs_diff(&lp_q, &lp_d) / max_abs(&lp_d);
        assert!(d < 1e-5, "log-probs differ by {d} (relative)");
        for (i, (gq, gd)) in g_q.iter().zip(&g_d).enumerate() {
            let d = l2(&(gq - gd).unwrap()) / l2(gd);
            assert!(d < 1e-5, "gradient {i} differs by {d} (relative, L2)");
        }
        // The quantized model is closer to its dequantised weights than to
        // the unquantized model: the weights really are quantized.
        let (_, lp_u) = {
            let mut u = unquantized;
            u.apply_lora(&lora, 3).unwrap();
            for ((_, q), (_, v)) in quantized.lora_parameters().iter().zip(u.lora_parameters()) {
                v.set(q.as_tensor()).unwrap();
            }
            let (lp, _) = logprobs_and_grads(&u, &ids);
            ((), lp)
        };
        assert!(
            max_abs_diff(&lp_q, &lp_u) > 2.0 * max_abs_diff(&lp_q, &lp_d),
            "{} vs {}",
            max_abs_diff(&lp_q, &lp_u),
            max_abs_diff(&lp_q, &lp_d)
        );
    });
}

#[test]
fn merging_into_a_quantized_base_adds_the_delta_to_the_dequantised_weight() {
    with_big_stack(|| {
        let dir = quantizable_dir();
        let mut model =
            Decoder::load_quantized(&dir, &f32_options(), Some(Quantization::Q8_0)).unwrap();
        model
            .apply_lora(&LoraConfig::new(2, 6.0, TargetModules::AllLinear), 4)
            .unwrap();
        for (_, v) in model.lora_parameters() {
            v.set(&Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let merged = merge_lora(&model).unwrap();
        for (before, after) in model.linears().zip(merged.linears()) {
            let lora = before.lora.as_ref().unwrap();
            let delta =
                (lora.b.as_tensor().matmul(lora.a.as_tensor()).unwrap() * lora.scale).unwrap();
            let expected = (before.weight.to_dense(DType::F32).unwrap() + delta).unwrap();
            let got = after.weight.as_dense().expect("merged weights are dense");
            assert_eq!(max_abs_diff(got, &expected), 0.0, "{}", before.name);
            assert!(after.lora.is_none());
        }
    });
}

/// Mean KL(p ‖ q) and the largest logit gap over every position of `rows`,
/// from the models' full logits with a log-softmax written out here in f64.
fn kl_by_hand(p: &Decoder, q: &Decoder, rows: &[Vec<u32>]) -> (f64, f64, usize) {
    let logits = |m: &Decoder, ids: &[u32]| -> Vec<Vec<f64>> {
        let hidden = m
            .forward(
                Input::padded(&ids_tensor(&[ids.to_vec()]), None),
                Rows::All,
                Mode::Inference,
            )
            .unwrap();
        let l = m.logits(&hidden).unwrap().to_dtype(DType::F64).unwrap();
        l.squeeze(0).unwrap().to_vec2::<f64>().unwrap()
    };
    let log_softmax = |row: &[f64]| -> Vec<f64> {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        row.iter().map(|v| v - lse).collect()
    };
    let (mut kl, mut gap, mut n) = (0.0, 0.0f64, 0);
    for ids in rows {
        let (lp, lq) = (logits(p, ids), logits(q, ids));
        // Every position but the last predicts a next token.
        for t in 0..ids.len() - 1 {
            let (a, b) = (log_softmax(&lp[t]), log_softmax(&lq[t]));
            kl += a
                .iter()
                .zip(&b)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>();
            for (x, y) in lp[t].iter().zip(&lq[t]) {
                gap = gap.max((x - y).abs());
            }
            n += 1;
        }
    }
    (kl / n as f64, gap, n)
}

#[test]
fn divergence_equals_the_kl_computed_by_hand_and_is_zero_between_equal_models() {
    use lora_runner::data::SftExample;
    use lora_runner::metrics::divergence::divergence;
    with_big_stack(|| {
        let dir = quantizable_dir();
        let dense = Decoder::load(&dir, &f32_options()).unwrap();
        let quantized =
            Decoder::load_quantized(&dir, &f32_options(), Some(Quantization::Q4K)).unwrap();
        // A one-token row predicts nothing and is left out.
        let rows = [
            random_ids(1, 9, 128, 1).remove(0),
            random_ids(1, 5, 128, 2).remove(0),
            vec![3],
        ];
        let examples: Vec<SftExample> = rows
            .iter()
            .map(|ids| SftExample {
                input_ids: ids.clone(),
                completion_start: ids.len() - 1,
            })
            .collect();
        let d = divergence(&dense, &quantized, &examples).unwrap();
        let (kl, gap, n) = kl_by_hand(&dense, &quantized, &rows[..2]);
        assert_eq!(d.positions, n);
        assert!(
            kl > 0.0 && (d.mean_kl - kl).abs() <= 1e-6 * kl,
            "{} vs {kl}",
            d.mean_kl
        );
        assert!(
            (d.max_logit_error - gap).abs() <= 1e-6 * gap,
            "{} vs {gap}",
            d.max_logit_error
        );
        let same = divergence(&dense, &dense, &examples).unwrap();
        assert_eq!((same.mean_kl, same.max_logit_error), (0.0, 0.0));
    });
}
