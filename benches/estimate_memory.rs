//! `cargo bench --bench estimate_memory`: the peak-memory estimate `runner
//! plan` makes for a GPU (candle's compositions, tiled attention, chunked
//! head) on a Qwen2-7B shape (hidden 3584, 28 layers, 28/4 heads, FFN
//! 18944, vocab 152064, untied) and a Qwen2.5-32B shape (hidden 5120, 64
//! layers, 40/8 heads, FFN 27648, vocab 152064, untied), SFT batch 1, LoRA
//! r 16 on all seven projections, bf16 compute: each base precision,
//! sequence length and checkpointing, beside what PyTorch + PEFT with
//! FlashAttention-2 would need for the same step (`flash_attention_2`,
//! computed from the same shapes). Nothing is run; the estimate is checked
//! against measured runs of a 0.5B shape in README
//! (`scripts/bench-memory.sh`).

use candle_core::DType;
use lora_runner::model::config::{Architecture, ModelConfig};
use lora_runner::model::init::RandomModel;
use lora_runner::model::kernels::quantized::Quantization;
use lora_runner::model::layers::lora::{LoraConfig, ResolvedTarget, TargetModules};
use lora_runner::model::memory::{estimate, fused_path, StepShape};

/// PyTorch + transformers + PEFT with FlashAttention-2 in bf16, batch 1, as
/// a count (bytes): the weights (bf16, or bitsandbytes' NF4 at 4.127 bits
/// for a 4-bit base: 4 bits and a double-quantized absmax per 64); the
/// adapter in f32 with its gradient and AdamW's two moments (16 bytes a
/// parameter); autograd's saved tensors per token and layer, in bf16: the
/// two norms' inputs and outputs (4h), q, k, v before and after rope
/// (2q + 4kv), the attention output and FA-2's f32 log-sum-exp per head, the
/// residual (h), gate, up, their SiLU and product (4f), and each adapter's
/// x·Aᵀ (r a module); with gradient checkpointing one hidden state a layer
/// plus one layer's activations; the head's bf16 logits, their f32 upcast
/// and f32 log-softmax for the loss (10 bytes a vocabulary entry a token);
/// and 0.5 GiB of CUDA context.
fn flash_attention_2(
    c: &ModelConfig,
    targets: &[ResolvedTarget],
    four_bit: bool,
    seq: u64,
    checkpointing: bool,
) -> u64 {
    let (h, f, l, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
        c.vocab_size as u64,
    );
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let params = c.parameter_count() as u64;
    let projections = l * (h * (q + 2 * kv) + q * h + 3 * h * f);
    let weights = if four_bit {
        (params - projections) * 2 + projections * 4127 / 8000
    } else {
        params * 2
    };
    let (mut adapter, mut lora_kept) = (0u64, 0u64);
    for t in targets {
        let projection = t.module.rsplit('.').next().unwrap_or_default();
        if let Some((out, inp)) = c.projection_shape(projection) {
            adapter += (t.r * (inp + out)) as u64 * 16;
            lora_kept += t.r as u64;
        }
    }
    let per_layer = 2 * (4 * h + 2 * q + 4 * kv + q + h + 4 * f)
        + lora_kept * 2 / l.max(1)
        + 4 * c.num_attention_heads as u64;
    let activations = if checkpointing {
        seq * l * h * 2 + seq * per_layer
    } else {
        seq * l * per_layer
    };
    weights + adapter + activations + seq * v * 10 + (1 << 29)
}

fn main() {
    let shapes = [
        (
            "7B",
            RandomModel {
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
            },
        ),
        (
            "32B",
            RandomModel {
                architecture: Architecture::Qwen2,
                hidden_size: 5120,
                num_hidden_layers: 64,
                num_attention_heads: 40,
                num_key_value_heads: 8,
                intermediate_size: 27648,
                vocab_size: 152064,
                head_dim: None,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: false,
                ..RandomModel::tiny(0)
            },
        ),
    ];
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let fits = |b: u64| match gib(b) {
        x if x <= 24.0 => "24 GiB",
        x if x <= 80.0 => "80 GiB",
        _ => "neither",
    };
    println!("SFT batch 1, LoRA r 16 all-linear, bf16 compute, on a GPU (GiB)");
    println!(
        "| shape | base | seq | checkpointing | this program | fits | PyTorch + FA-2 | fits |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (shape, spec) in shapes {
        let config = spec.model_config().expect("a valid shape");
        let targets = LoraConfig::new(16, 32.0, TargetModules::AllLinear)
            .resolve(&config)
            .expect("all-linear resolves");
        for (name, quantization) in [("bf16", None), ("q4_k", Some(Quantization::Q4K))] {
            for seq_len in [2048, 8192] {
                for checkpointing in [false, true] {
                    let e = estimate(&StepShape {
                        config: &config,
                        dtype: DType::BF16,
                        quantization,
                        stored_bits: None,
                        targets: &targets,
                        dropout: false,
                        rows: 1,
                        seq_len,
                        checkpointing,
                        reference_model: false,
                        fused: fused_path(true, DType::BF16),
                    });
                    let peer = flash_attention_2(
                        &config,
                        &targets,
                        quantization.is_some(),
                        seq_len as u64,
                        checkpointing,
                    );
                    println!(
                        "| {shape} | {name} | {seq_len} | {} | {:.1} | {} | {:.1} | {} |",
                        if checkpointing { "on" } else { "off" },
                        gib(e.estimate_bytes),
                        fits(e.estimate_bytes),
                        gib(peer),
                        fits(peer),
                    );
                }
            }
        }
    }
}
