//! One trainable decoder for Llama, Mistral and Qwen2: embeddings, RMSNorm,
//! rope (with Llama-3 scaling), grouped-query attention with an explicit
//! head_dim, causal + padding (+ sliding window) mask, SwiGLU MLP, optional
//! tied embeddings, and LoRA on any of the seven projections.
//!
//! Base weights are plain tensors (never Vars), so backward only reaches the
//! LoRA Vars; the custom ops in `ops` keep frozen weights out of backward.

use crate::model::config::{ModelConfig, ATTENTION_PROJECTIONS, MLP_PROJECTIONS};
use crate::model::error::{ModelError, Result};
use crate::model::lora::{peft_tensor_name, LoraAdapter, LoraConfig};
use crate::model::ops::{
    frozen_linear, frozen_matmul, masked_softmax, mul_by_constant, rms_norm, rope,
};
use crate::model::rng::SplitMix64;
use crate::model::weights::{parse_torch_dtype, CheckpointFiles};
use candle_core::{DType, Device, Tensor, Var};
use std::path::Path;

/// Additive mask value for disallowed attention; finite so a fully masked
/// (padding) row never produces NaN.
const MASKED: f32 = -1e30;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype of the base weights; None keeps config.json's torch_dtype
    /// (or the checkpoint's dtype when config.json does not say).
    pub dtype: Option<DType>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
        }
    }
}

/// Forward-pass mode. Dropout only runs in `Train`, seeded per step so a
/// resumed run reproduces the same masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No dropout; the graph to the LoRA Vars is kept (backward possible).
    Eval,
    /// No dropout and no graph: LoRA weights are used detached, so
    /// intermediates are freed as the forward pass goes (evaluation, DPO
    /// reference log-probs).
    Inference,
    /// Dropout on, seeded by `dropout_seed` (derive it from seed and step).
    Train { dropout_seed: u64 },
}

/// A frozen linear projection with an optional LoRA adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// [out, in], frozen.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// y = x W^T + b + s · B(A(dropout(x))); only the adapter path is scaled.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut y = frozen_linear(x, &self.weight, self.bias.as_ref())?;
        if let Some(lora) = &self.lora {
            let dtype = x.dtype();
            let xin = match mode {
                Mode::Train { dropout_seed } if lora.dropout > 0.0 => {
                    dropout(x, lora.dropout, dropout_seed, &self.name)?
                }
                _ => x.clone(),
            };
            let (a, b) = if mode == Mode::Inference {
                (lora.a.as_detached_tensor(), lora.b.as_detached_tensor())
            } else {
                (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
            };
            // Scale the small [out, r] matrix rather than the [N, out] output.
            let (a, b) = (a.to_dtype(dtype)?, (b.to_dtype(dtype)? * lora.scale)?);
            let (lead, last) = xin.dims().split_at(xin.rank() - 1);
            let rows: usize = lead.iter().product();
            let x2 = xin.reshape((rows, last[0]))?;
            let h = x2.matmul(&a.t()?)?.matmul(&b.t()?)?;
            let h = h.reshape(y.shape())?;
            y = (y + h)?;
        }
        Ok(y)
    }
}

/// Inverted dropout with a mask drawn from (seed, module name).
fn dropout(x: &Tensor, p: f64, seed: u64, module: &str) -> Result<Tensor> {
    let mut rng = SplitMix64::for_stream(seed, module);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep as f32 })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(mul_by_constant(x, &mask)?)
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl DecoderLayer {
    pub fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// Per-call attention inputs shared by all layers.
struct AttentionContext {
    cos: Tensor,
    sin: Tensor,
    /// [B, T, T] additive mask in f32 (shared by all heads).
    mask: Tensor,
}

#[derive(Clone, Debug)]
pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// None when the embeddings are tied.
    pub lm_head: Option<Tensor>,
    pub dtype: DType,
    pub device: Device,
    /// The LoRA configuration applied, if any.
    pub lora_config: Option<LoraConfig>,
    inv_freq: Vec<f64>,
}

/// Rope inverse frequencies, with Llama-3 scaling when configured
/// (same piecewise rule as transformers' `_compute_llama3_parameters`).
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f64> {
    let d = config.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let Some(s) = &config.rope_scaling else {
        return base;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

impl Decoder {
    /// Loads config.json and model.safetensors (or shards + index) from `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let files = CheckpointFiles::open(dir)?;
        let dtype = opts
            .dtype
            .or_else(|| config.torch_dtype.as_deref().and_then(parse_torch_dtype))
            .or_else(|| files.first_float_dtype())
            .unwrap_or(DType::F32);
        Self::from_checkpoint(config, &files, dtype, &opts.device)
    }

    fn from_checkpoint(
        config: ModelConfig,
        files: &CheckpointFiles,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let load = |name: &str, shape: &[usize]| files.load(name, shape, dtype, device);
        let embed_tokens = load("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let linear = |group: &str, proj: &str| -> Result<Linear> {
                let name = format!("model.layers.{i}.{group}.{proj}");
                let (out_f, in_f) = c.projection_shape(proj).expect("known projection");
                let weight = load(&format!("{name}.weight"), &[out_f, in_f])?;
                let bias = if c.projection_has_bias(proj) {
                    Some(load(&format!("{name}.bias"), &[out_f])?)
                } else {
                    None
                };
                Ok(Linear {
                    name,
                    weight,
                    bias,
                    lora: None,
                })
            };
            layers.push(DecoderLayer {
                input_layernorm: load(
                    &format!("model.layers.{i}.input_layernorm.weight"),
                    &[c.hidden_size],
                )?,
                post_attention_layernorm: load(
                    &format!("model.layers.{i}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                )?,
                q_proj: linear("self_attn", "q_proj")?,
                k_proj: linear("self_attn", "k_proj")?,
                v_proj: linear("self_attn", "v_proj")?,
                o_proj: linear("self_attn", "o_proj")?,
                gate_proj: linear("mlp", "gate_proj")?,
                up_proj: linear("mlp", "up_proj")?,
                down_proj: linear("mlp", "down_proj")?,
            });
        }
        let norm = load("model.norm.weight", &[c.hidden_size])?;
        // Some tied checkpoints still carry lm_head.weight; it equals the embeddings then.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(load("lm_head.weight", &[c.vocab_size, c.hidden_size])?)
        };
        let inv_freq = rope_inv_freq(c);
        Ok(Decoder {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype,
            device: device.clone(),
            lora_config: None,
            inv_freq,
        })
    }

    /// The weight used for logits ([vocab, hidden]).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    fn attention_context(&self, ids: &[Vec<u32>], mask: &[Vec<bool>]) -> Result<AttentionContext> {
        let b = ids.len();
        let t = ids.first().map_or(0, |r| r.len());
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in mask {
            // Position = number of real tokens before this one, so a
            // left-padded row gets the same positions as its unpadded form.
            let mut seen = 0usize;
            for &real in row {
                let pos = seen.saturating_sub(1) as f64;
                let pos = if real { seen as f64 } else { pos };
                if real {
                    seen += 1;
                }
                for f in &self.inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let window = self.config.sliding_window;
        let mut m = Vec::with_capacity(b * t * t);
        for row in mask {
            for i in 0..t {
                for (j, &real) in row.iter().enumerate() {
                    let allowed = j <= i && real && window.is_none_or(|w| i - j < w);
                    m.push(if allowed { 0.0 } else { MASKED });
                }
            }
        }
        let dev = &self.device;
        Ok(AttentionContext {
            cos: Tensor::from_vec(cos, (b, t, half), dev)?,
            sin: Tensor::from_vec(sin, (b, t, half), dev)?,
            mask: Tensor::from_vec(m, (b, t, t), dev)?,
        })
    }

    fn attention(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        ctx: &AttentionContext,
        mode: Mode,
    ) -> Result<Tensor> {
        Ok(self
            .attend(layer, x, &ctx.cos, &ctx.sin, &ctx.mask, mode, None)?
            .0)
    }

    /// Attention of the tokens `x` [B, t, hidden] over `past` keys/values
    /// (already roped, [B, kv_heads, T, head_dim]) followed by their own.
    /// Returns the output and the keys/values including the new tokens, so
    /// the KV cache of `generate` shares this code with training.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        mode: Mode,
        past: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let q = layer
            .q_proj
            .forward(x, mode)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?;
        let k = layer
            .k_proj
            .forward(x, mode)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let v = layer
            .v_proj
            .forward(x, mode)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = (rope(&q, cos, sin)? * (1.0 / (hd as f64).sqrt()))?;
        let k = rope(&k, cos, sin)?;
        let (k, v) = match past {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        // Grouped-query attention without copying K/V: query heads sharing a
        // KV head are stacked along the time axis ([B, nkv, rep*t, hd]).
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        // Softmax in f32 (as HF does) unless the model already runs in f64.
        let softmax_dtype = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let scores = q.matmul(&k.t()?)?.to_dtype(softmax_dtype)?;
        let probs = masked_softmax(&scores, mask)?.to_dtype(x.dtype())?;
        let out = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok((layer.o_proj.forward(&out, mode)?, k, v))
    }

    pub(crate) fn mlp(&self, layer: &DecoderLayer, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let gate = layer.gate_proj.forward(x, mode)?.silu()?;
        let up = layer.up_proj.forward(x, mode)?;
        layer.down_proj.forward(&(gate * up)?, mode)
    }

    /// Final-norm hidden states [B, T, hidden] for `input_ids` [B, T] (u32)
    /// and an optional `attention_mask` [B, T] (1 = token, 0 = padding; left
    /// or right padding). Logits are left to `logits_at` / `token_logprobs`
    /// so that only the positions a loss needs pay for the vocabulary GEMM.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = input_ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(ModelError::Input("input_ids is empty".into()));
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        check_vocabulary(ids.iter().flatten(), c.vocab_size)?;
        let mask: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(ModelError::Input(format!(
                        "attention_mask must be [{b}, {t}], got {:?}",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v > 0.5).collect())
                    .collect()
            }
            None => vec![vec![true; t]; b],
        };
        let ctx = self.attention_context(&ids, &mask)?;
        let flat = input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_device(&self.device)?;
        let mut x = self
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, t, c.hidden_size))?;
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps)?;
            x = (x + self.attention(layer, &h, &ctx, mode)?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            x = (x + self.mlp(layer, &h, mode)?)?;
        }
        Ok(rms_norm(&x, &self.norm, c.rms_norm_eps)?)
    }

    /// Logits (f32, or f64 for an f64 model) at every position: [B, T, vocab]. Prefer `logits_at`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        upcast(&frozen_matmul(hidden, self.lm_head_weight())?)
    }

    fn gather_rows(&self, hidden: &Tensor, positions: &[(usize, usize)]) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let mut idx = Vec::with_capacity(positions.len());
        for &(bi, ti) in positions {
            if bi >= b || ti >= t {
                return Err(ModelError::Input(format!(
                    "position ({bi}, {ti}) is outside hidden states [{b}, {t}]"
                )));
            }
            idx.push((bi * t + ti) as u32);
        }
        let idx = Tensor::from_vec(idx, positions.len(), hidden.device())?;
        Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
    }

    /// Logits (f32) only at the given (batch, position) pairs: [N, vocab].
    pub fn logits_at(&self, hidden: &Tensor, positions: &[(usize, usize)]) -> Result<Tensor> {
        let rows = self.gather_rows(hidden, positions)?;
        upcast(&frozen_matmul(&rows, self.lm_head_weight())?)
    }

    /// log p(token | prefix) (f32, [N]) for each (batch, position, token):
    /// the logits at `position` scored against `token` (normally the input
    /// token at position + 1). Differentiable with respect to the LoRA Vars.
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[(usize, usize, u32)],
    ) -> Result<Tensor> {
        let positions: Vec<(usize, usize)> = targets.iter().map(|&(b, t, _)| (b, t)).collect();
        let logits = self.logits_at(hidden, &positions)?;
        let mut tok = Vec::with_capacity(targets.len());
        for &(_, _, id) in targets {
            if id as usize >= self.config.vocab_size {
                return Err(ModelError::Input(format!(
                    "target token {id} is outside the vocabulary"
                )));
            }
            tok.push(id);
        }
        Ok(crate::model::ops::token_logprobs(&logits, &tok)?)
    }

    // ------------------------------------------------------------ LoRA

    /// Attaches freshly initialised LoRA adapters (PEFT init, seeded) to every
    /// module `lora` targets. Replaces adapters already present.
    pub fn apply_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        let targets = lora.resolve(&self.config)?;
        self.remove_lora();
        for target in &targets {
            let device = self.device.clone();
            let linear = self.linear_mut(&target.module).ok_or_else(|| {
                ModelError::LoraConfig(format!("no module named {}", target.module))
            })?;
            linear.lora = Some(LoraAdapter::init(
                target,
                linear.in_features(),
                linear.out_features(),
                lora.dropout,
                seed,
                &device,
            )?);
        }
        self.lora_config = Some(lora.clone());
        Ok(())
    }

    /// Drops every adapter.
    pub fn remove_lora(&mut self) {
        for layer in &mut self.layers {
            for l in layer.linears_mut() {
                l.lora = None;
            }
        }
        self.lora_config = None;
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    pub fn linear(&self, module: &str) -> Option<&Linear> {
        self.linears().find(|l| l.name == module)
    }

    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .find(|l| l.name == module)
    }

    /// Trainable Vars by PEFT tensor name
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`),
    /// in a fixed order: layer, projection, A then B.
    pub fn lora_parameters(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for l in self.linears() {
            if let Some(a) = &l.lora {
                out.push((peft_tensor_name(&l.name, 'A'), a.a.clone()));
                out.push((peft_tensor_name(&l.name, 'B'), a.b.clone()));
            }
        }
        out
    }

    /// All trainable Vars (for an optimizer), in `lora_parameters` order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_parameters().into_iter().map(|(_, v)| v).collect()
    }

    /// Base weights by HF tensor name (adapters not merged), for saving.
    pub fn base_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
            for l in layer.linears() {
                out.push((format!("{}.weight", l.name), l.weight.clone()));
                if let Some(b) = &l.bias {
                    out.push((format!("{}.bias", l.name), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }
}

/// An error naming the first token id outside a vocabulary of `vocab_size`.
pub(crate) fn check_vocabulary<'a>(
    ids: impl IntoIterator<Item = &'a u32>,
    vocab_size: usize,
) -> Result<()> {
    match ids.into_iter().find(|&&id| id as usize >= vocab_size) {
        Some(bad) => Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary of size {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// Next-token targets for `Decoder::token_logprobs`: for every position t
/// whose *next* token is marked in `loss_mask` (e.g. the completion tokens
/// of an SFT example), yields (batch, t, input_ids[batch][t + 1]).
pub fn next_token_targets(
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<bool>],
) -> Result<Vec<(usize, usize, u32)>> {
    if input_ids.len() != loss_mask.len() {
        return Err(ModelError::Input(format!(
            "{} sequences but {} loss masks",
            input_ids.len(),
            loss_mask.len()
        )));
    }
    let mut out = Vec::new();
    for (b, (ids, mask)) in input_ids.iter().zip(loss_mask).enumerate() {
        if ids.len() != mask.len() {
            return Err(ModelError::Input(format!(
                "sequence {b}: {} tokens but {} mask entries",
                ids.len(),
                mask.len()
            )));
        }
        for t in 1..ids.len() {
            if mask[t] {
                out.push((b, t - 1, ids[t]));
            }
        }
    }
    Ok(out)
}

/// Sums per-token log-probs ([N], in `targets` order) into one value per
/// sequence ([batch]) — what DPO needs — keeping the graph differentiable.
pub fn sum_by_sequence(
    token_logprobs: &Tensor,
    targets: &[(usize, usize, u32)],
    batch: usize,
) -> Result<Tensor> {
    let n = targets.len();
    if token_logprobs.dims() != [n] {
        return Err(ModelError::Input(format!(
            "expected {n} log-probs, got shape {:?}",
            token_logprobs.dims()
        )));
    }
    let mut onehot = vec![0f32; batch * n];
    for (i, &(b, _, _)) in targets.iter().enumerate() {
        if b >= batch {
            return Err(ModelError::Input(format!(
                "target batch index {b} >= batch size {batch}"
            )));
        }
        onehot[b * n + i] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (batch, n), token_logprobs.device())?
        .to_dtype(token_logprobs.dtype())?;
    Ok(onehot.matmul(&token_logprobs.unsqueeze(1)?)?.squeeze(1)?)
}

/// Logits and log-probs are computed in f32 (f64 when the model runs in f64).
fn upcast(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F64 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// Names of the projections in the order `DecoderLayer::linears` returns them.
pub fn projection_names() -> [&'static str; 7] {
    let [q, k, v, o] = ATTENTION_PROJECTIONS;
    let [g, u, d] = MLP_PROJECTIONS;
    [q, k, v, o, g, u, d]
}
