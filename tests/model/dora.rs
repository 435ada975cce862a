//! DoRA against PEFT 0.21 (scripts/dora_reference.py → tests/fixtures/dora/):
//! the loss and the gradients of A, B and the magnitude on three families'
//! checkpoints (plain, biased q/k/v, fused projections), with and without
//! checkpointing, on the fused CPU path and on the GPU's compositions
//! (`LORA_RUNNER_GENERIC_OPS=1`, in a child process); PEFT's merged
//! weights; the adapter read and written in PEFT's layout; and dropout
//! against PEFT's formula written out by hand.

use crate::support::model::{
    assert_gradients_match, max_abs_diff_f64 as max_abs_diff, passes_on_the_generic_path,
    row_logits, row_logprob_sum, with_big_stack,
};
use candle_core::{DType, Device, Tensor};
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::formats::peft::{load_adapter, save_adapter};
use lora_runner::model::kernels::quantized::Quantization;
use lora_runner::model::merge::merge_lora;
use std::collections::HashMap;
use std::path::PathBuf;

const FAMILIES: [&str; 3] = ["llama3", "qwen2", "phi3"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    rows: Vec<Vec<u32>>,
    loss: f64,
    summary: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn reference(family: &str) -> Reference {
    let dir = fixtures().join("dora").join(family);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    Reference {
        rows: serde_json::from_value(summary["rows"].clone()).unwrap(),
        loss: summary["loss"].as_f64().unwrap(),
        tensors: candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap(),
        summary,
    }
}

/// The family's checkpoint in `dtype` with the PEFT DoRA adapter on it.
fn load(family: &str, dtype: DType) -> Decoder {
    let opts = LoadOptions {
        dtype: Some(dtype),
        device: Device::Cpu,
    };
    let mut model = Decoder::load(&fixtures().join("families").join(family), &opts).unwrap();
    load_adapter(&mut model, &fixtures().join("dora").join(family)).unwrap();
    model
}

/// Mean next-token NLL over the rows, each row its own forward pass.
fn mean_loss(model: &Decoder, rows: &[Vec<u32>], mode: Mode) -> Tensor {
    let count: usize = rows.iter().map(|r| r.len() - 1).sum();
    let sums: Vec<Tensor> = rows
        .iter()
        .map(|row| row_logprob_sum(model, row, mode))
        .collect();
    (Tensor::stack(&sums, 0)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
        / count as f64)
        .unwrap()
}

/// Every family: PEFT's loss (1e-6 relative) and the gradient of every A,
/// B and magnitude (1e-4 relative to the tensor's largest entry).
fn check_loss_and_gradients() {
    for family in FAMILIES {
        let r = reference(family);
        for checkpointing in [false, true] {
            let mut model = load(family, DType::F64);
            if checkpointing {
                model.enable_checkpointing();
            }
            let loss = mean_loss(&model, &r.rows, Mode::Eval);
            let value = loss.to_scalar::<f64>().unwrap();
            let rel = (value - r.loss).abs() / r.loss.abs();
            assert!(
                rel < 1e-6,
                "{family}: loss {value} vs PEFT {} ({rel})",
                r.loss
            );
            let grads = model.backward(&loss).unwrap();
            let params = model.lora_parameters();
            let magnitudes = params
                .iter()
                .filter(|(n, _)| n.ends_with("lora_magnitude_vector"))
                .count();
            assert_eq!(
                magnitudes,
                2 * model.config.projections().len(),
                "{family}: a magnitude on every module"
            );
            assert_eq!(params.len(), 3 * magnitudes);
            // PEFT's parameter is `<module>.lora_magnitude_vector.weight`;
            // its saved tensor drops the `.weight`.
            let key = |name: &str| match name.ends_with("lora_magnitude_vector") {
                true => format!("grad.{name}.weight"),
                false => format!("grad.{name}"),
            };
            let context = format!("{family} (checkpointing {checkpointing})");
            assert_gradients_match(&grads, params, &r.tensors, key, 1e-4, &context);
        }
    }
}

#[test]
fn dora_gives_peft_loss_and_gradients_also_checkpointed() {
    with_big_stack(check_loss_and_gradients);
}

/// The same check on the compositions a GPU runs.
#[test]
fn dora_gives_peft_gradients_on_the_gpu_code_path() {
    passes_on_the_generic_path("dora::dora_gives_peft_loss_and_gradients_also_checkpointed");
}

/// PEFT's merge_and_unload: W' = m / ‖W + sBA‖ ∘ (W + sBA). The merge runs
/// in f32, so the f64 logits agree to f32 rounding.
#[test]
fn dora_merge_gives_peft_merged_logits() {
    with_big_stack(|| {
        for family in FAMILIES {
            let r = reference(family);
            let model = load(family, DType::F64);
            let merged = merge_lora(&model).unwrap();
            assert!(merged.lora_parameters().is_empty());
            for (i, row) in r.rows.iter().enumerate() {
                let logits = row_logits(&merged, row);
                let expected = &r.tensors[&format!("merged_logits.{i}")];
                let diff = max_abs_diff(&logits, expected);
                let spread = max_abs_diff(expected, &expected.zeros_like().unwrap());
                assert!(
                    diff < 1e-4 * spread,
                    "{family} row {i}: merged logits off by {diff} (largest {spread})"
                );
                // The unmerged adapter gives the same logits.
                let unmerged = row_logits(&model, row);
                assert!(max_abs_diff(&unmerged, expected) < 1e-4 * spread);
            }
        }
    });
}

/// Read in PEFT's layout and written back: the same tensor names, shapes
/// and values, `use_dora = true`, and reading that gives the same loss.
#[test]
fn dora_adapter_round_trips_through_the_peft_layout() {
    with_big_stack(|| {
        let family = "qwen2";
        let r = reference(family);
        let model = load(family, DType::F64);
        let out = tempfile::tempdir().unwrap();
        save_adapter(&model, out.path(), family).unwrap();
        let read = |dir: &std::path::Path| {
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
        };
        let peft = read(&fixtures().join("dora").join(family));
        let ours = read(out.path());
        let mut names: Vec<_> = ours.keys().collect();
        names.sort();
        let mut expected: Vec<_> = peft.keys().collect();
        expected.sort();
        assert_eq!(names, expected);
        for (name, t) in &ours {
            assert_eq!(t.dims(), peft[name].dims(), "{name}");
            assert_eq!(max_abs_diff(t, &peft[name]), 0.0, "{name}");
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["use_dora"], true);
        let mut again = load(family, DType::F64);
        load_adapter(&mut again, out.path()).unwrap();
        let loss = |m: &Decoder| {
            mean_loss(m, &r.rows, Mode::Inference)
                .to_scalar::<f64>()
                .unwrap()
        };
        assert_eq!(loss(&again), loss(&model));
        assert!((loss(&again) - r.loss).abs() < 1e-6 * r.loss);
    });
}

/// PEFT's DoRA written out by hand for one layer, with W dense (dequantised
/// for a quantized base) and the norm formed from the dense sum
/// W + s·B·A: y = x·Wᵀ + b + (c − 1)∘(x_d·Wᵀ) + c∘s·(x_d·Aᵀ)·Bᵀ, with
/// x_d = x∘mask (the layer's own mask; x itself without dropout) and
/// c = m / ‖W + s·B·A‖, in f64. Returns the largest difference from the
/// layer (run in the model's dtype) relative to the largest output.
fn formula_gap(model: &mut Decoder, dropout: f64) -> f64 {
    let name = "model.layers.1.self_attn.k_proj";
    if let Some(lora) = &mut model.linear_mut(name).unwrap().lora {
        lora.dropout = dropout;
    }
    let linear = model.linear(name).unwrap().clone();
    let lora = linear.lora.as_ref().unwrap();
    let dora = lora.dora.as_ref().unwrap();
    let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let x = Tensor::randn(0.0, 1.0, (2, 5, linear.in_features()), &Device::Cpu)
        .unwrap()
        .to_dtype(model.dtype)
        .unwrap();
    let seed = 77;
    let y = linear
        .forward(&x, Mode::Train { dropout_seed: seed })
        .unwrap();
    let dropped = match linear.dropout_mask(&x, seed).unwrap() {
        Some(mask) => f64_(&(&x * &mask).unwrap()),
        None => f64_(&x),
    };
    let x = f64_(&x);
    let w = linear.weight.to_dense(DType::F64).unwrap();
    let (a, b) = (f64_(lora.a.as_tensor()), f64_(lora.b.as_tensor()));
    let delta = (b.matmul(&a).unwrap() * lora.scale).unwrap();
    let norm = (&w + &delta)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap();
    let c = (f64_(dora.magnitude.as_tensor()) / norm).unwrap();
    let project = |input: &Tensor, m: &Tensor| input.broadcast_matmul(&m.t().unwrap()).unwrap();
    let bias = f64_(linear.bias.as_ref().unwrap());
    let expected = project(&x, &w)
        .broadcast_add(&bias)
        .unwrap()
        .add(
            &project(&dropped, &w)
                .broadcast_mul(&(&c - 1.0).unwrap())
                .unwrap(),
        )
        .unwrap()
        .add(
            &project(&project(&dropped, &a), &b)
                .affine(lora.scale, 0.0)
                .unwrap()
                .broadcast_mul(&c)
                .unwrap(),
        )
        .unwrap();
    if dropout > 0.0 {
        // The mask drops something: without it the output differs.
        let plain = linear.forward(&x, Mode::Eval).unwrap();
        assert!(max_abs_diff(&plain, &y) > 1e-2);
    }
    max_abs_diff(&y, &expected) / max_abs_diff(&expected, &expected.zeros_like().unwrap())
}

#[test]
fn dora_with_dropout_and_on_a_quantized_base_follows_peft_formula() {
    with_big_stack(|| {
        for dropout in [0.0, 0.3] {
            let gap = formula_gap(&mut load("qwen2", DType::F64), dropout);
            assert!(gap < 1e-12, "dense, dropout {dropout}: off by {gap}");
            // On q8_0 blocks (f32): W is the dequantised blocks, in the norm too.
            let opts = LoadOptions {
                dtype: Some(DType::F32),
                device: Device::Cpu,
            };
            let dir = fixtures().join("families/qwen2");
            let mut q8 = Decoder::load_quantized(&dir, &opts, Some(Quantization::Q8_0)).unwrap();
            load_adapter(&mut q8, &fixtures().join("dora/qwen2")).unwrap();
            assert!(q8
                .linear("model.layers.1.self_attn.k_proj")
                .unwrap()
                .weight
                .as_dense()
                .is_none());
            let gap = formula_gap(&mut q8, dropout);
            assert!(gap < 1e-5, "q8_0, dropout {dropout}: off by {gap}");
        }
    });
}

/// A DoRA adapter lora-runner trained on the llama3 checkpoint and exported
/// (`runner export` of an `sft` stage with `dora = true`, committed under
/// dora/llama3/trained/) gives, loaded in PEFT on transformers' model, the
/// loss this program computes with it; exporting it again writes the same
/// bytes, so the check covers today's writer.
#[test]
fn dora_adapter_trained_here_gives_peft_the_same_loss() {
    with_big_stack(|| {
        let r = reference("llama3");
        let trained = fixtures().join("dora/llama3/trained");
        let opts = LoadOptions {
            dtype: Some(DType::F64),
            device: Device::Cpu,
        };
        let mut model = Decoder::load(&fixtures().join("families/llama3"), &opts).unwrap();
        let pooled = |model: &Decoder| {
            mean_loss(model, &r.rows, Mode::Inference)
                .to_scalar::<f64>()
                .unwrap()
        };
        let want = |key: &str| r.summary[key].as_f64().unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        let base = pooled(&model);
        assert!(rel(base, want("trained_base_loss")) < 1e-6, "base {base}");
        load_adapter(&mut model, &trained).unwrap();
        let adapted = pooled(&model);
        let peft = want("trained_loss");
        assert!(rel(adapted, peft) < 1e-6, "ours {adapted}, PEFT {peft}");
        assert!(rel(adapted, base) > 1e-3, "the adapter changes the loss");
        let out = tempfile::tempdir().unwrap();
        save_adapter(&model, out.path(), "llama3").unwrap();
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            assert_eq!(
                std::fs::read(out.path().join(file)).unwrap(),
                std::fs::read(trained.join(file)).unwrap(),
                "{file}: export writes what PEFT read"
            );
        }
    });
}

/// A DoRA config without its magnitudes names the missing tensor; a plain
/// LoRA config with magnitudes beside it names them as unaccounted for.
#[test]
fn dora_tensors_and_config_must_agree() {
    let src = fixtures().join("dora/qwen2");
    let tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let attempt = |config: &str, keep_magnitudes: bool| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
        let kept: HashMap<String, Tensor> = tensors
            .iter()
            .filter(|(n, _)| keep_magnitudes || !n.ends_with("lora_magnitude_vector"))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        candle_core::safetensors::save(&kept, dir.path().join("adapter_model.safetensors"))
            .unwrap();
        let mut model = Decoder::load(
            &fixtures().join("families/qwen2"),
            &LoadOptions {
                dtype: Some(DType::F32),
                device: Device::Cpu,
            },
        )
        .unwrap();
        load_adapter(&mut model, dir.path())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let missing = attempt(&config, false);
    assert!(
        missing.contains("lora_magnitude_vector") && missing.contains("adapter_model.safetensors"),
        "{missing}"
    );
    let plain = config.replace(r#""use_dora": true"#, r#""use_dora": false"#);
    assert_ne!(plain, config);
    let extra = attempt(&plain, true);
    assert!(
        extra.contains("does not account for") && extra.contains("lora_magnitude_vector"),
        "{extra}"
    );
}
