//! Peak memory of a training step, estimated from shapes alone (what `plan`
//! shows before anything runs, and what `run` records beside the measured
//! peak).
//!
//! What the terms count, per token of a micro-batch (N = rows × seq_len):
//! - weights: the embeddings, norms and head in the compute dtype, the seven
//!   projections of each layer in it or in their quantized block format;
//! - the adapter: each LoRA parameter in f32 with its gradient, the summed
//!   gradient of accumulation and AdamW's two moments (20 bytes);
//! - activations the backward keeps, per layer: the layer input, the two
//!   norm outputs, the attention output and the residual (5·hidden), the
//!   query before and after rope and the attention result (3·q), the keys
//!   before and after rope and the values (3·kv), gate, up and their SwiGLU
//!   product (3·ffn); dropout masks in front of the adapters when dropout is
//!   on. The output head keeps the f32 logits of every supervised position.
//! - with checkpointing: one hidden state per layer, one layer's activations
//!   and their gradients while it is recomputed, and one chunk of 256 rows of
//!   head logits.
//! - on candle's compositions (a GPU, or half precision on the CPU) the
//!   same, plus the copies between graph nodes (merged heads, split values,
//!   a residual sum: hidden + q + kv), one attention tile's scores and
//!   their gradients while it runs (`TILE_SCORES` elements), and for the
//!   head one f32 [hidden] gradient a supervised token and two f32
//!   [rows, vocab] tensors of one chunk while it runs (`rows` from
//!   `head_logprobs::budget_rows`: 64 MiB of f32 logits, at most 256).
//!
//! Checked against measured peak RSS on a Qwen2-0.5B shape (README,
//! `scripts/bench-memory.sh`).

use crate::model::family::Activation;
use candle_core::DType;

use crate::model::config::ModelConfig;
use crate::model::decoder::HEAD_CHUNK_ROWS;
use crate::model::kernels::quantized::Quantization;
use crate::model::layers::lora::ResolvedTarget;
pub use crate::units::MemoryEstimate;

/// The process before any model: code, allocator, thread stacks, tokenizer
/// and data (measured: the whole demo, a 128-hidden model, peaks at 43 MB).
const RUNTIME_BYTES: u64 = 32 << 20;

/// What a training step's memory depends on.
#[derive(Clone, Debug)]
pub struct StepShape<'a> {
    pub config: &'a ModelConfig,
    /// Compute dtype of the base and the activations.
    pub dtype: DType,
    pub quantization: Option<Quantization>,
    /// Bits a projection weight takes in a GGUF's own blocks, when the base
    /// is held in them (`quantization` is None then).
    pub stored_bits: Option<f64>,
    /// The adapters trained (module name, rank).
    pub targets: &'a [ResolvedTarget],
    pub dropout: bool,
    /// Sequences in one micro-batch (a DPO pair is two).
    pub rows: usize,
    pub seq_len: usize,
    pub checkpointing: bool,
    /// DPO: a second copy of the weights is loaded for the reference pass.
    pub reference_model: bool,
    /// The fused CPU ops run (CPU, f32 or f64); otherwise candle's
    /// compositions, as on a GPU.
    pub fused: bool,
}

/// A stage that holds the whole model in `dtype` and `copies` more copies
/// of it (a merge's merged model, a model serialized to be written).
pub fn model_estimate(config: &ModelConfig, dtype: DType, copies: f64) -> MemoryEstimate {
    let weights = (config.parameter_count())
        .saturating_mul(dtype.size_in_bytes() as u128)
        .min(u64::MAX as u128 / 4) as u64;
    let copies_bytes = (weights as f64 * copies) as u64;
    MemoryEstimate {
        weights_bytes: weights,
        copies_bytes,
        runtime_bytes: RUNTIME_BYTES,
        estimate_bytes: weights
            .saturating_add(copies_bytes)
            .saturating_add(RUNTIME_BYTES),
        ..MemoryEstimate::default()
    }
}

/// Writing a model as GGUF: the model as loaded (`weights`), every written
/// tensor held until the file is written (`written_bits` a weight), and
/// the conversion's f32 temporaries of the largest tensor, the embeddings
/// (the tensor, its written values, their difference, and the base's
/// blocks dequantised beside them).
pub fn gguf_export_estimate(c: &ModelConfig, weights: u64, written_bits: f64) -> MemoryEstimate {
    let written =
        (c.parameter_count() as f64 * written_bits / 8.0).min(u64::MAX as f64 / 4.0) as u64;
    let temporaries = 4 * 4 * (c.vocab_size as u64).saturating_mul(c.hidden_size as u64);
    let copies = written.saturating_add(temporaries);
    MemoryEstimate {
        weights_bytes: weights,
        copies_bytes: copies,
        runtime_bytes: RUNTIME_BYTES,
        estimate_bytes: RUNTIME_BYTES.saturating_add(weights).saturating_add(copies),
        ..MemoryEstimate::default()
    }
}

/// The model's weights as a stage holds them: embeddings, head and norms in
/// `dtype`, projections at their quantized or stored bits.
pub fn weights_bytes(
    c: &ModelConfig,
    dtype: DType,
    quantization: Option<Quantization>,
    stored_bits: Option<f64>,
) -> u64 {
    let dt = dtype.size_in_bytes() as u64;
    let (h, l, vocab) = (
        c.hidden_size as u64,
        c.num_hidden_layers as u64,
        c.vocab_size as u64,
    );
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    let mut weights = heads * vocab * h * dt + (2 * l + 1) * h * dt;
    for (projection, _) in c.projections() {
        let (out, inp) = c.projection_shape(projection).expect("known projection");
        let bits = quantization
            .and_then(|qz| qz.bits_for(inp))
            .or(stored_bits)
            .unwrap_or(8.0 * dt as f64);
        weights += l * ((out * inp) as f64 * bits / 8.0).ceil() as u64;
        if c.projection_has_bias(projection) {
            weights += l * out as u64 * dt;
        }
    }
    weights
}

/// An evaluation: the model (a reference for preference margins reuses
/// it, its adapter switched), and the larger of a scoring batch's logits
/// (rows of `seq_len`: the logits, their log-softmax and what scoring
/// keeps of them, 4 f32 copies measured) and a generation batch's KV cache.
pub fn eval_estimate(
    c: &ModelConfig,
    dtype: DType,
    weights: u64,
    (score_rows, generate_rows): (usize, usize),
    seq_len: usize,
    new_tokens: usize,
) -> MemoryEstimate {
    let dt = dtype.size_in_bytes() as u64;
    let logits = 4 * (score_rows * seq_len) as u64 * c.vocab_size as u64 * 4;
    let kv_cache = 2
        * (generate_rows * (seq_len + new_tokens)) as u64
        * c.num_hidden_layers as u64
        * (c.num_key_value_heads * c.head_dim) as u64
        * dt;
    let activations = logits.max(kv_cache);
    MemoryEstimate {
        weights_bytes: weights,
        activations_bytes: activations,
        runtime_bytes: RUNTIME_BYTES,
        estimate_bytes: RUNTIME_BYTES + weights + activations,
        ..MemoryEstimate::default()
    }
}

pub fn estimate(s: &StepShape) -> MemoryEstimate {
    let c = s.config;
    let dt = s.dtype.size_in_bytes() as u64;
    let (h, f, l) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_hidden_layers as u64,
    );
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let vocab = c.vocab_size as u64;

    let weights = weights_bytes(c, s.dtype, s.quantization, s.stored_bits);

    let mut lora_params = 0u64;
    let mut masks = 0u64;
    // DoRA keeps its unscaled output z [tokens, out] per module for the
    // magnitude's gradient (c ∘ z), and under dropout x∘mask too.
    let mut dora_kept = 0u64;
    for t in s.targets {
        let projection = t.module.rsplit('.').next().unwrap_or_default();
        if let Some((out, inp)) = c.projection_shape(projection) {
            lora_params += (t.r * (inp + out)) as u64;
            masks += inp as u64;
            if t.dora {
                lora_params += out as u64;
                dora_kept += (out + if s.dropout { inp } else { 0 }) as u64;
            }
        }
    }
    let adapter = lora_params * 20;

    let tokens = (s.rows * s.seq_len) as u64;
    // Elements kept per token and layer by the fused CPU ops; dropout masks
    // are per targeted module, summed over all layers already.
    let fused_layer = (5 * h + 3 * q + 3 * kv + 3 * f) * dt;
    // What the families' compositions add on the fused path: GeGLU keeps
    // gelu(gate) and the product; a soft-capped head keeps three more f32
    // logit tensors. Gemma 2's soft-capped attention runs tiled (below).
    let family = c.architecture.family();
    // One attention tile's f32 probabilities, their gradient, its difference
    // from the row sums and the product, and the probabilities and their
    // gradient in the compute dtype, while it runs in backward: the tiled
    // attention's only scores (every device but the fused CPU op's).
    let tile = (s.rows as u64 * c.num_attention_heads as u64 * (s.seq_len as u64).pow(2))
        .min(crate::model::kernels::tiled_attention::TILE_SCORES as u64);
    let tile_bytes = tile * (16 + 2 * dt);
    let geglu = match family.activation {
        Activation::GeluTanh => 2 * f * dt,
        Activation::Silu => 0,
    };
    let capped_head = if c.final_logit_softcapping.is_some() {
        12 * vocab
    } else {
        0
    };
    let masks = if s.dropout { masks * dt } else { 0 };
    // (per token and layer, head per supervised token kept, head per token
    // of one chunk, once per step).
    let (per_layer, head_kept, (head_chunk, chunk_rows), transient) = if s.fused {
        // Logits in f32 for the fused log-softmax; under checkpointing one
        // chunk of them at a time.
        let logits = 4 * vocab + capped_head;
        let (kept, chunk) = if s.checkpointing {
            (0, logits)
        } else {
            (logits, 0)
        };
        let tiled = if c.attn_logit_softcapping.is_some() {
            tile_bytes
        } else {
            0
        };
        (fused_layer + geglu, kept, (chunk, HEAD_CHUNK_ROWS), tiled)
    } else {
        // The compositions' graph nodes keep what the fused ops keep, plus
        // the copies between them: the heads merged for the output
        // projection, the values split into heads, the attention's output
        // and the residual sum before the norm (h + q + kv). Each LoRA
        // projection, norm, rope and SwiGLU is one node keeping its inputs
        // (`fused_linear::lora_linear_composed`, `recompute`); the attention
        // is tiled.
        // The head keeps one f32 [hidden] gradient a supervised token; two
        // of a chunk's f32 [rows, vocab] tensors (logits, probabilities,
        // their gradient), and the gradient in the compute dtype, exist
        // while it runs.
        let chunk = (8 + dt) * vocab + capped_head;
        let copies = (h + q + kv) * dt;
        let rows = crate::model::kernels::head_logprobs::budget_rows(c.vocab_size);
        (
            fused_layer + copies + geglu,
            4 * h,
            (chunk, rows),
            tile_bytes,
        )
    };
    let dora_kept = dora_kept * dt;
    let head = tokens * head_kept + tokens.min(chunk_rows as u64) * head_chunk;
    let activations = transient
        + head
        + if s.checkpointing {
            // A hidden state a layer; one layer's activations and their
            // gradients while it is recomputed.
            tokens * l * h * dt
                + 2 * tokens * per_layer
                + (masks + 2 * dora_kept) * tokens / l.max(1)
        } else {
            tokens * l * per_layer + (masks + dora_kept) * tokens
        };
    let training = weights + adapter + activations;
    let reference = if s.reference_model { 2 * weights } else { 0 };
    MemoryEstimate {
        weights_bytes: weights,
        adapter_bytes: adapter,
        activations_bytes: activations,
        copies_bytes: 0,
        runtime_bytes: RUNTIME_BYTES,
        estimate_bytes: RUNTIME_BYTES + training.max(reference),
    }
}

/// Whether a step on the CPU (not `on_gpu`) in `dtype` runs the fused ops.
pub fn fused_path(on_gpu: bool, dtype: DType) -> bool {
    !on_gpu && crate::model::kernels::cpu::fused_for(&candle_core::Device::Cpu, dtype)
}
