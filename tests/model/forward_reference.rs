//! Our decoder's logits against candle-transformers' Llama and Qwen2
//! (independent implementations) for the same weights.

use crate::support::model::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use std::path::Path;

const TOL: f32 = 1e-4;

fn reference_vb(dir: &Path) -> VarBuilder<'static> {
    unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }
}

/// candle-transformers' Llama only returns the last position's logits, so
/// run it once per prefix length.
fn llama_reference_logits(dir: &Path, ids: &[u32]) -> Tensor {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: llama::LlamaConfig = serde_json::from_str(&text).unwrap();
    let cfg = cfg.into_config(false);
    let model = llama::Llama::load(reference_vb(dir), &cfg).unwrap();
    let rows: Vec<Tensor> = (1..=ids.len())
        .map(|n| {
            let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
            let x = Tensor::new(&ids[..n], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .forward(&x, 0, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

fn qwen2_reference_logits(dir: &Path, ids: &[u32]) -> Tensor {
    let ours =
        lora_runner::model::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let cfg = qwen2::Config {
        vocab_size: ours.vocab_size,
        hidden_size: ours.hidden_size,
        intermediate_size: ours.intermediate_size,
        num_hidden_layers: ours.num_hidden_layers,
        num_attention_heads: ours.num_attention_heads,
        num_key_value_heads: ours.num_key_value_heads,
        max_position_embeddings: ours.max_position_embeddings,
        sliding_window: 4096,
        max_window_layers: 0,
        tie_word_embeddings: ours.tie_word_embeddings,
        rope_theta: ours.layers[0].rope.as_ref().expect("rope").theta,
        rms_norm_eps: ours.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = reference_vb(dir);
    let embed = vb
        .get(
            (cfg.vocab_size, cfg.hidden_size),
            "model.embed_tokens.weight",
        )
        .unwrap();
    let mut model = qwen2::Model::new(&cfg, vb.clone()).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let hidden = model.forward(&x, 0, None).unwrap().squeeze(0).unwrap();
    hidden.matmul(&embed.t().unwrap()).unwrap()
}

fn our_logits(dir: &Path, ids: &[Vec<u32>], mask: Option<&[Vec<u32>]>) -> Tensor {
    let model = Decoder::load(dir, &LoadOptions::default()).unwrap();
    let mask = mask.map(ids_tensor);
    let hidden = model
        .forward(
            Input::padded(&ids_tensor(ids), mask.as_ref()),
            Rows::All,
            Mode::Eval,
        )
        .unwrap();
    model.logits(&hidden).unwrap()
}

#[test]
fn llama_logits_match_candle_transformers() {
    let dir = init_dir_amplified("llama-ref", &spec(Architecture::Llama, false, 11));
    let ids = random_ids(1, 10, 128, 5);
    let ours = our_logits(&dir, &ids, None).i(0).unwrap();
    let reference = llama_reference_logits(&dir, &ids[0]);
    let d = max_abs_diff(&ours, &reference);
    assert!(d < TOL, "max |diff| = {d}");
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    let dir = init_dir_amplified("llama3-ref", &spec(Architecture::Llama, true, 12));
    // Scaling parameters chosen so that, with head_dim 8 and theta 1e4, one
    // frequency is kept, one is smoothed and two are divided by the factor.
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let ids = random_ids(1, 12, 128, 6);
    let ours = our_logits(&dir, &ids, None).i(0).unwrap();
    let reference = llama_reference_logits(&dir, &ids[0]);
    let d = max_abs_diff(&ours, &reference);
    assert!(d < TOL, "max |diff| = {d}");
    // And the scaling must matter: without it the logits differ.
    cfg["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let unscaled = our_logits(&dir, &ids, None).i(0).unwrap();
    let d_unscaled = max_abs_diff(&unscaled, &reference);
    assert!(
        d_unscaled > 100.0 * TOL,
        "scaling has no effect: {d_unscaled}"
    );
}

#[test]
fn qwen2_logits_match_candle_transformers() {
    let dir = init_dir_amplified("qwen2-ref", &spec(Architecture::Qwen2, true, 13));
    let ids = random_ids(1, 12, 128, 7);
    let ours = our_logits(&dir, &ids, None).i(0).unwrap();
    let reference = qwen2_reference_logits(&dir, &ids[0]);
    let d = max_abs_diff(&ours, &reference);
    assert!(d < TOL, "max |diff| = {d}");
}

#[test]
fn padded_batch_matches_unpadded_reference() {
    let dir = init_dir_amplified("qwen2-pad", &spec(Architecture::Qwen2, true, 14));
    let a = random_ids(1, 8, 128, 8).remove(0);
    let b = random_ids(1, 5, 128, 9).remove(0);
    let pad = 0u32;
    // Row 0: full length; row 1 left-padded; then the same with right padding.
    let mut left = b.clone();
    left.splice(0..0, [pad; 3]);
    let mut right = b.clone();
    right.extend([pad; 3]);
    let ids = vec![a.clone(), left, right];
    let mask = vec![
        vec![1u32; 8],
        [vec![0; 3], vec![1; 5]].concat(),
        [vec![1; 5], vec![0; 3]].concat(),
    ];
    let ours = our_logits(&dir, &ids, Some(&mask));
    let ref_a = qwen2_reference_logits(&dir, &a);
    let ref_b = qwen2_reference_logits(&dir, &b);
    let d0 = max_abs_diff(&ours.i(0).unwrap(), &ref_a);
    let d_left = max_abs_diff(&ours.i((1, 3..8)).unwrap(), &ref_b);
    let d_right = max_abs_diff(&ours.i((2, 0..5)).unwrap(), &ref_b);
    assert!(
        d0 < TOL && d_left < TOL && d_right < TOL,
        "diffs {d0} {d_left} {d_right}"
    );
}

/// Sliding-window attention (Mistral): with one layer and rope (scores
/// depend only on relative position), the output at position t must equal
/// the last-position output of a run over just the window ending at t.
#[test]
fn mistral_sliding_window_matches_windowed_runs() {
    let mut s = spec(Architecture::Mistral, false, 15);
    s.num_hidden_layers = 1;
    let dir = init_dir_amplified("mistral-window", &s);
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(3);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let ids = random_ids(1, 9, 128, 10);
    let full = our_logits(&dir, &ids, None);
    for t in 2..9 {
        let window = vec![ids[0][t - 2..=t].to_vec()];
        let w = our_logits(&dir, &window, None);
        let d = max_abs_diff(&full.i((0, t)).unwrap(), &w.i((0, 2)).unwrap());
        assert!(d < TOL, "position {t}: {d}");
    }
    // Without the window, early tokens would change the result.
    cfg["sliding_window"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let unwindowed = our_logits(&dir, &ids, None);
    assert!(max_abs_diff(&unwindowed.i((0, 8)).unwrap(), &full.i((0, 8)).unwrap()) > 1e-3);
}

/// Explicit head_dim (16, not hidden/heads = 8) with GQA, against
/// candle-transformers' Mistral, which honours `head_dim`. (Its sliding
/// window admits one more token than transformers', so it is compared
/// without a window; the window has its own test above.)
#[test]
fn explicit_head_dim_matches_candle_transformers_mistral() {
    let mut s = spec(Architecture::Mistral, false, 16);
    s.head_dim = Some(16);
    let dir = init_dir_amplified("mistral-head-dim", &s);
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: candle_transformers::models::mistral::Config = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg.head_dim, Some(16));
    let mut model =
        candle_transformers::models::mistral::Model::new(&cfg, reference_vb(&dir)).unwrap();
    let ids = random_ids(1, 8, 128, 12);
    let rows: Vec<Tensor> = (1..=8)
        .map(|n| {
            model.clear_kv_cache();
            let x = Tensor::new(&ids[0][..n], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            model
                .forward(&x, 0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect();
    let reference = Tensor::stack(&rows, 0).unwrap();
    let ours = our_logits(&dir, &ids, None).i(0).unwrap();
    let d = max_abs_diff(&ours, &reference);
    assert!(d < TOL, "max |diff| = {d}");
}
