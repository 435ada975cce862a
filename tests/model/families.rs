//! Every supported family against transformers 5.24 and PEFT 0.21 on tiny
//! random checkpoints that transformers itself wrote
//! (scripts/family_reference.py → tests/fixtures/families/, each configured
//! so that its family's features change the numbers): logits alone, padded
//! and packed, in f64 and f32 and on a q8_0 base; the loss and the LoRA
//! gradients of a PEFT adapter, with and without checkpointing; and every
//! rope type's frequencies against transformers' rope-init functions
//! (tests/fixtures/rope-init.json).

use crate::support::model::{
    assert_gradients_match, max_abs_diff_f64 as max_abs_diff, mean_nll, with_big_stack,
    FIXTURE_FAMILIES,
};
use candle_core::{DType, Device, Tensor, D};
use lora_runner::model::config::ModelConfig;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::formats::peft::load_adapter;
use lora_runner::model::kernels::quantized::Quantization;
use lora_runner::model::rope::Rope;
use std::collections::HashMap;
use std::path::PathBuf;

const FAMILIES: [&str; 10] = FIXTURE_FAMILIES;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    rows: Vec<Vec<u32>>,
    lora_loss: f64,
    tensors: HashMap<String, Tensor>,
}

fn reference(family: &str) -> Reference {
    let dir = fixtures().join("families").join(family);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let rows = serde_json::from_value(summary["rows"].clone()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    Reference {
        rows,
        lora_loss: summary["lora_loss"].as_f64().unwrap(),
        tensors,
    }
}

fn load(family: &str, dtype: DType, quantize: Option<Quantization>) -> Decoder {
    let opts = LoadOptions {
        dtype: Some(dtype),
        device: Device::Cpu,
    };
    let dir = fixtures().join("families").join(family);
    Decoder::load_quantized(&dir, &opts, quantize).unwrap()
}

/// Logits [t, vocab] of each row computed alone, padded together (right
/// padding, then left padding) and packed into one row.
fn logits_every_way(model: &Decoder, rows: &[Vec<u32>]) -> Vec<(String, usize, Tensor)> {
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let ids = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = model
            .forward(Input::padded(&ids, None), Rows::All, Mode::Inference)
            .unwrap();
        let logits = model.logits(&hidden).unwrap().squeeze(0).unwrap();
        // Only some positions (the last layer computes those rows alone).
        let at = [0, row.len() / 2, row.len() - 1];
        let selected = model
            .forward(Input::padded(&ids, None), Rows::At(&at), Mode::Inference)
            .unwrap();
        let selected = model.logits(&selected).unwrap().squeeze(0).unwrap();
        for (k, &p) in at.iter().enumerate() {
            let d = max_abs_diff(&selected.get(k).unwrap(), &logits.get(p).unwrap());
            let tol = if model.dtype == DType::F64 {
                1e-9
            } else {
                1e-4
            };
            assert!(
                d < tol,
                "row {i}: logits at position {p} alone differ by {d}"
            );
        }
        out.push(("alone".to_string(), i, logits));
    }
    let width = rows.iter().map(Vec::len).max().unwrap();
    for left in [false, true] {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for row in rows {
            let pad = width - row.len();
            let (ids_row, mask_row) = match left {
                false => (
                    [row.clone(), vec![0; pad]].concat(),
                    [vec![1u32; row.len()], vec![0; pad]].concat(),
                ),
                true => (
                    [vec![0; pad], row.clone()].concat(),
                    [vec![0; pad], vec![1u32; row.len()]].concat(),
                ),
            };
            ids.push(ids_row);
            mask.push(mask_row);
        }
        let ids = Tensor::new(ids, &Device::Cpu).unwrap();
        let mask = Tensor::new(mask, &Device::Cpu).unwrap();
        let hidden = model
            .forward(Input::padded(&ids, Some(&mask)), Rows::All, Mode::Inference)
            .unwrap();
        let logits = model.logits(&hidden).unwrap();
        for (i, row) in rows.iter().enumerate() {
            let start = if left { width - row.len() } else { 0 };
            let real = logits.get(i).unwrap().narrow(0, start, row.len()).unwrap();
            let how = if left { "left-padded" } else { "right-padded" };
            out.push((how.to_string(), i, real));
        }
    }
    let packed: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let hidden = model
        .forward(Input::Packed(&packed), Rows::All, Mode::Inference)
        .unwrap();
    let logits = model.logits(&hidden).unwrap().squeeze(0).unwrap();
    let mut start = 0;
    for (i, row) in rows.iter().enumerate() {
        out.push((
            "packed".to_string(),
            i,
            logits.narrow(0, start, row.len()).unwrap(),
        ));
        start += row.len();
    }
    out
}

#[test]
fn every_family_gives_transformers_logits_alone_padded_and_packed() {
    with_big_stack(|| {
        for family in FAMILIES {
            let r = reference(family);
            // transformers' f64 reference still takes its softmax and RMSNorm
            // statistics in f32, so even f64 agrees to about 1e-5 only.
            for (dtype, tol) in [(DType::F64, 1e-5), (DType::F32, 1e-4)] {
                let model = load(family, dtype, None);
                for (how, i, logits) in logits_every_way(&model, &r.rows) {
                    let expected = &r.tensors[&format!("logits.{i}")];
                    let d = max_abs_diff(&logits, expected);
                    assert!(
                        d <= tol,
                        "{family} {dtype:?} {how} row {i}: logits off by {d}"
                    );
                }
            }
        }
    });
}

/// KL(reference ‖ ours) per position, averaged: the q8_0 base against the
/// f64 transformers logits.
fn mean_kl(ours: &Tensor, reference: &Tensor) -> f64 {
    let p =
        candle_nn::ops::log_softmax(&reference.to_dtype(DType::F64).unwrap(), D::Minus1).unwrap();
    let q = candle_nn::ops::log_softmax(&ours.to_dtype(DType::F64).unwrap(), D::Minus1).unwrap();
    let kl = (p.exp().unwrap() * (p - q).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap();
    kl.mean_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn every_family_on_a_quantized_base_stays_within_a_stated_kl_of_transformers() {
    // q8_0 rounds each projection weight to 1/254 of its block's largest;
    // q4_k (q5_0 on these 32-wide rows) to 1/30. These random models have
    // logits of spread ~5, which amplifies the error. Measured (2026-12-06):
    // q8_0 at most 0.0033 nats a position (OLMo 2), q5_0 at most 0.12.
    for (quantization, max_kl) in [(Quantization::Q8_0, 1e-2), (Quantization::Q4K, 0.25)] {
        with_big_stack(move || {
            for family in FAMILIES {
                let r = reference(family);
                let model = load(family, DType::F32, Some(quantization));
                for (how, i, logits) in logits_every_way(&model, &r.rows) {
                    let kl = mean_kl(&logits, &r.tensors[&format!("logits.{i}")]);
                    let q = quantization.name();
                    assert!(kl < max_kl, "{family} {q} {how} row {i}: KL {kl}");
                    assert!(kl > 0.0, "{family}: {q} changed nothing");
                }
            }
        });
    }
}

#[test]
fn every_family_gives_peft_lora_loss_and_gradients_also_checkpointed() {
    with_big_stack(|| {
        for family in FAMILIES {
            let r = reference(family);
            for checkpointing in [false, true] {
                let mut model = load(family, DType::F64, None);
                load_adapter(&mut model, &fixtures().join("families").join(family)).unwrap();
                if checkpointing {
                    model.enable_checkpointing();
                }
                let width = r.rows.iter().map(Vec::len).max().unwrap();
                let ids: Vec<Vec<u32>> = r
                    .rows
                    .iter()
                    .map(|row| [row.clone(), vec![0; width - row.len()]].concat())
                    .collect();
                let mask: Vec<Vec<u32>> = r
                    .rows
                    .iter()
                    .map(|row| [vec![1; row.len()], vec![0; width - row.len()]].concat())
                    .collect();
                let targets: Vec<(usize, usize, u32)> = r
                    .rows
                    .iter()
                    .enumerate()
                    .flat_map(|(b, row)| (0..row.len() - 1).map(move |t| (b, t, row[t + 1])))
                    .collect();
                let ids = Tensor::new(ids, &Device::Cpu).unwrap();
                let mask = Tensor::new(mask, &Device::Cpu).unwrap();
                let hidden = model
                    .forward(Input::padded(&ids, Some(&mask)), Rows::All, Mode::Eval)
                    .unwrap();
                let logprobs = model.token_logprobs(&hidden, &targets).unwrap();
                let loss = (logprobs.sum_all().unwrap().neg().unwrap() / targets.len() as f64)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
                let value = loss.to_scalar::<f64>().unwrap();
                let rel = (value - r.lora_loss).abs() / r.lora_loss.abs();
                assert!(
                    rel < 1e-5,
                    "{family}: LoRA loss {value} vs PEFT {} ({rel})",
                    r.lora_loss
                );
                let grads = model.backward(&loss).unwrap();
                let params = model.lora_parameters();
                assert_eq!(
                    params.len(),
                    2 * model.config.projections().len() * 2,
                    "{family}: adapters on every projection"
                );
                assert_gradients_match(
                    &grads,
                    params,
                    &r.tensors,
                    |name| format!("grad.{name}"),
                    1e-4,
                    &format!("{family} (checkpointing {checkpointing})"),
                );
            }
        }
    });
}

#[test]
fn every_rope_type_gives_transformers_frequencies() {
    let text = std::fs::read(fixtures().join("rope-init.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let max = case["max_position_embeddings"].as_u64().unwrap() as usize;
        let head_dim = case["head_dim"].as_u64().unwrap() as usize;
        let seq_len = case["seq_len"].as_u64().unwrap() as usize;
        let rope = Rope::from_json(&case["rope_parameters"], 10_000.0, max).unwrap();
        let table = rope.table(head_dim, seq_len);
        let expected: Vec<f64> = serde_json::from_value(case["inv_freq"].clone()).unwrap();
        assert_eq!(table.inv_freq.len(), expected.len(), "{name}");
        for (i, (got, want)) in table.inv_freq.iter().zip(&expected).enumerate() {
            // transformers computes the frequencies in f32.
            let rel = (got - want).abs() / want.abs();
            assert!(rel < 1e-6, "{name}: inv_freq[{i}] {got} vs {want}");
        }
        let factor = case["attention_factor"].as_f64().unwrap();
        assert!(
            (table.attention_factor - factor).abs() < 1e-6,
            "{name}: attention factor {} vs {factor}",
            table.attention_factor
        );
    }
}

/// The older layout (top-level rope_theta / rope_scaling, no layer_types)
/// and transformers ≥ 5's give the same model.
#[test]
fn older_and_newer_config_layouts_read_the_same() {
    let p = std::path::Path::new("config.json");
    let base = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v, p).unwrap()
    };
    let pairs = [
        (
            serde_json::json!({"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
            serde_json::json!({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
        ),
        (
            serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2}),
            serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8,
                "layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]}),
        ),
        (
            serde_json::json!({"model_type": "gemma3_text", "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "sliding_window_pattern": 2, "sliding_window": 16, "query_pre_attn_scalar": 8}),
            serde_json::json!({"model_type": "gemma3_text", "sliding_window": 16, "query_pre_attn_scalar": 8,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        ),
        (
            serde_json::json!({"model_type": "smollm3", "no_rope_layer_interval": 2}),
            serde_json::json!({"model_type": "smollm3", "no_rope_layers": [1, 0, 1, 0], "rope_theta": 2000000.0}),
        ),
    ];
    for (older, newer) in pairs {
        let (a, b) = (base(older.clone()), base(newer));
        assert_eq!(a, b, "{older}");
        // And what this program writes reads back the same.
        assert_eq!(ModelConfig::from_json(&a.to_json(), p).unwrap(), a);
    }
    // Layers differ where they should.
    let qwen = base(
        serde_json::json!({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2}),
    );
    let windows: Vec<_> = qwen.layers.iter().map(|l| l.window).collect();
    assert_eq!(windows, [None, None, Some(8), Some(8)]);
    let gemma = base(
        serde_json::json!({"model_type": "gemma3_text", "sliding_window_pattern": 2, "sliding_window": 16}),
    );
    let thetas: Vec<_> = gemma
        .layers
        .iter()
        .map(|l| l.rope.as_ref().unwrap().theta)
        .collect();
    assert_eq!(thetas, [10000.0, 1e6, 10000.0, 1e6]);
    let smol = base(serde_json::json!({"model_type": "smollm3"}));
    let roped: Vec<_> = smol.layers.iter().map(|l| l.rope.is_some()).collect();
    assert_eq!(roped, [true, true, true, false]);
}

/// Keys that change the arithmetic and are not implemented are refused by
/// name; inert ones pass.
#[test]
fn keys_that_change_the_computation_are_never_ignored() {
    let p = std::path::Path::new("models/x/config.json");
    let with = |extra: serde_json::Value| {
        let mut v = serde_json::json!({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
            "transformers_version": "5.24.0", "use_cache": true, "pad_token_id": 0, "initializer_range": 0.02});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v, p)
    };
    assert!(with(serde_json::json!({})).is_ok());
    for (extra, expect) in [
        (
            serde_json::json!({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1e4}}),
            "mrope",
        ),
        (
            serde_json::json!({"attn_logit_softcapping": 50.0}),
            "attn_logit_softcapping",
        ),
        (serde_json::json!({"mlp_bias": true}), "mlp_bias"),
        (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
        (
            serde_json::json!({"attention_dropout": 0.1}),
            "attention_dropout",
        ),
        (
            serde_json::json!({"partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mystery": 1}}),
            "mystery",
        ),
        (
            serde_json::json!({"quantization_config": {"quant_method": "fp8"}}),
            "quantization_config",
        ),
        (
            serde_json::json!({"some_new_switch": true}),
            "some_new_switch",
        ),
        (
            serde_json::json!({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]}),
            "chunked_attention",
        ),
        (
            serde_json::json!({"model_type": "phimoe"}),
            "mixture-of-experts",
        ),
        (
            serde_json::json!({"model_type": "qwen3_moe"}),
            "mixture-of-experts",
        ),
    ] {
        let msg = with(extra.clone()).unwrap_err().to_string();
        assert!(
            msg.contains(expect) && msg.contains("models/x/config.json"),
            "{extra}: {msg}"
        );
    }
}

/// The adapter lora-runner trained on each family's checkpoint and
/// exported (`runner export` of an `sft` stage, committed under
/// families/<name>/trained/) gives, loaded in PEFT on transformers' model,
/// the loss this program computes with it (tests/fixtures/peft-exported.json,
/// from scripts/peft_load_exported.py); and exporting it again writes the
/// same bytes, so the check covers today's export code.
#[test]
fn every_family_exported_adapter_gives_peft_the_same_loss() {
    let text = std::fs::read(fixtures().join("peft-exported.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_slice(&text).unwrap();
    with_big_stack(move || {
        for family in FAMILIES {
            let r = reference(family);
            let folder = fixtures().join("families").join(family);
            let mut model = load(family, DType::F64, None);
            // Over every next-token target of both rows, as the script pools them.
            let mean_nll = |model: &Decoder| {
                let (mut total, mut count) = (0.0, 0);
                for row in &r.rows {
                    total += mean_nll(model, row) * (row.len() - 1) as f64;
                    count += row.len() - 1;
                }
                total / count as f64
            };
            let want = &expected["families"][family];
            let base = mean_nll(&model);
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
            assert!(
                rel(base, want["base_loss"].as_f64().unwrap()) < 1e-6,
                "{family}: base {base}"
            );
            load_adapter(&mut model, &folder.join("trained")).unwrap();
            let adapted = mean_nll(&model);
            let peft = want["adapter_loss"].as_f64().unwrap();
            assert!(
                rel(adapted, peft) < 1e-6,
                "{family}: ours {adapted}, PEFT {peft}"
            );
            assert!(
                rel(adapted, base) > 1e-3,
                "{family}: the adapter changes the loss"
            );
            let out = tempfile::tempdir().unwrap();
            lora_runner::model::formats::peft::save_adapter(&model, out.path(), family).unwrap();
            let file = "adapter_model.safetensors";
            assert_eq!(
                std::fs::read(out.path().join(file)).unwrap(),
                std::fs::read(folder.join("trained").join(file)).unwrap(),
                "{family}: export writes what PEFT read"
            );
        }
    });
}
