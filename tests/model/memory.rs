//! The memory estimate's weight and adapter terms against the bytes a loaded
//! model really holds (dense, q8_0 and q4_k), and its activation term's
//! direction: checkpointing and quantization lower it, tokens raise it.

use crate::support::model::*;
use candle_core::{DType, Device};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, LoadOptions};
use lora_runner::model::kernels::quantized::Quantization;
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::model::memory::{estimate, StepShape};

fn held_bytes(model: &Decoder) -> u64 {
    let dense = |t: &candle_core::Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let mut bytes = dense(&model.embed_tokens) + dense(&model.norm.weight);
    bytes += model.lm_head.as_ref().map_or(0, dense);
    for (i, layer) in model.layers.iter().enumerate() {
        bytes += layer
            .norms(i)
            .iter()
            .map(|(_, n)| dense(&n.weight))
            .sum::<u64>();
        for l in layer.linears() {
            bytes += l.weight.bytes() as u64 + l.bias.as_ref().map_or(0, dense);
        }
    }
    bytes
}

#[test]
fn the_estimate_counts_the_weights_and_adapter_a_loaded_model_holds() {
    // Untied, with biases (Qwen2), rows of 64 and 256: q8_0, q5_0 and q4_k all occur.
    let mut s = spec(Architecture::Qwen2, false, 3);
    s.hidden_size = 64;
    s.intermediate_size = 256;
    // Deep enough for checkpointing to pay: it keeps one hidden state per
    // layer plus one layer recomputed (two or three layers' worth).
    s.num_hidden_layers = 8;
    let dir = init_dir("memory", &s);
    let lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    for (dtype, quantization) in [
        (DType::F32, None),
        (DType::BF16, None),
        (DType::F32, Some(Quantization::Q8_0)),
        (DType::F32, Some(Quantization::Q4K)),
    ] {
        let opts = LoadOptions {
            dtype: Some(dtype),
            device: Device::Cpu,
        };
        let mut model = Decoder::load_quantized(&dir, &opts, quantization).unwrap();
        model.apply_lora(&lora, 1).unwrap();
        let targets = lora.resolve(&model.config).unwrap();
        let shape = StepShape {
            config: &model.config,
            dtype,
            quantization,
            stored_bits: None,
            targets: &targets,
            dropout: false,
            rows: 4,
            seq_len: 64,
            checkpointing: false,
            reference_model: false,
            fused: dtype == DType::F32,
        };
        let e = estimate(&shape);
        assert_eq!(
            e.weights_bytes,
            held_bytes(&model),
            "{dtype:?} {quantization:?}"
        );
        let params: u64 = model
            .lora_parameters()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum();
        assert_eq!(e.adapter_bytes, 20 * params);
        assert_eq!(
            e.estimate_bytes,
            e.runtime_bytes + e.weights_bytes + e.adapter_bytes + e.activations_bytes
        );

        let checkpointed = estimate(&StepShape {
            checkpointing: true,
            ..shape.clone()
        });
        assert!(checkpointed.activations_bytes < e.activations_bytes);
        let longer = estimate(&StepShape {
            seq_len: 128,
            ..shape.clone()
        });
        assert!(longer.activations_bytes > e.activations_bytes);
        // A reference pass holds two copies of the weights at once.
        let dpo = estimate(&StepShape {
            reference_model: true,
            rows: 1,
            seq_len: 2,
            ..shape.clone()
        });
        assert!(dpo.estimate_bytes >= dpo.runtime_bytes + 2 * dpo.weights_bytes);

        // DoRA: its magnitudes are counted with the adapter (20 bytes a
        // parameter, as A and B), and what it keeps for backward with the
        // activations.
        let mut dora = lora.clone();
        dora.use_dora = true;
        let dora_targets = dora.resolve(&model.config).unwrap();
        let d = estimate(&StepShape {
            targets: &dora_targets,
            ..shape.clone()
        });
        let mut model = model.clone();
        model.apply_lora(&dora, 1).unwrap();
        let dora_params: u64 = model
            .lora_parameters()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum();
        assert!(dora_params > params);
        assert_eq!(d.adapter_bytes, 20 * dora_params);
        assert!(d.activations_bytes > e.activations_bytes);
    }
}
