//! `cargo bench --bench estimate_memory`: the peak-memory estimate `runner
//! plan` makes, for a Qwen2-7B shape (hidden 3584, 28 layers, 28/4 heads,
//! FFN 18944, vocab 152064, untied) on a GPU, SFT batch 1, LoRA r 16 on all
//! seven projections: each precision, sequence length and checkpointing.
//! Nothing is run; the estimate is checked against measured runs of a 0.5B
//! shape in README (`scripts/bench-memory.sh`).

use candle_core::DType;
use lora_runner::model::config::Architecture;
use lora_runner::model::init::RandomModel;
use lora_runner::model::kernels::quantized::Quantization;
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::model::memory::{estimate, fused_path, StepShape};

fn main() {
    let spec = RandomModel {
        architecture: Architecture::Qwen2,
        hidden_size: 3584,
        num_hidden_layers: 28,
        num_attention_heads: 28,
        num_key_value_heads: 4,
        intermediate_size: 18944,
        vocab_size: 152064,
        head_dim: None,
        rope_theta: 1_000_000.0,
        tie_word_embeddings: false,
        ..RandomModel::tiny(0)
    };
    let config = spec.model_config().expect("a valid shape");
    let targets = LoraConfig::new(16, 32.0, TargetModules::AllLinear)
        .resolve(&config)
        .expect("all-linear resolves");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("Qwen2-7B shape on a GPU, SFT batch 1, LoRA r 16 all-linear (GiB)");
    println!("| base | seq | checkpointing | estimate | weights | activations |");
    println!("|---|---|---|---|---|---|");
    for seq_len in [512, 2048, 4096] {
        for (name, dtype, quantization) in [
            ("bf16", DType::BF16, None),
            ("q8_0", DType::BF16, Some(Quantization::Q8_0)),
            ("q4_k", DType::BF16, Some(Quantization::Q4K)),
            ("fp8", DType::BF16, Some(Quantization::Fp8)),
        ] {
            for checkpointing in [false, true] {
                let e = estimate(&StepShape {
                    config: &config,
                    dtype,
                    quantization,
                    stored_bits: None,
                    targets: &targets,
                    dropout: false,
                    rows: 1,
                    seq_len,
                    checkpointing,
                    reference_model: false,
                    fused: fused_path(true, dtype),
                    on_gpu: true,
                });
                println!(
                    "| {name} | {seq_len} | {} | {:.1} | {:.1} | {:.1} |",
                    if checkpointing { "on" } else { "off" },
                    gib(e.estimate_bytes),
                    gib(e.weights_bytes),
                    gib(e.activations_bytes)
                );
            }
        }
    }
}
