//! Grouped-query self-attention with an explicit head_dim: rope (with
//! Llama-3 scaling), a causal + padding (+ sliding window) mask, softmax in
//! f32, and optional cached keys/values from earlier tokens, so training and
//! KV-cache generation run the same code.

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::fused_attention::{attention, AttentionMask};
use crate::model::kernels::ops::{merge_heads, split_heads, Heads, Rotary};
use crate::model::layers::linear::Linear;
use crate::model::mode::Mode;
use candle_core::{Device, Tensor};

/// Additive mask value for disallowed attention; finite so a fully masked
/// (padding) row never produces NaN.
const MASKED: f32 = -1e30;

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

/// Keys and values of one layer (keys after rope):
/// [batch, kv_heads, tokens, head_dim].
#[derive(Clone, Debug)]
pub struct LayerKv {
    pub keys: Tensor,
    pub values: Tensor,
}

/// Per-call attention inputs shared by all layers: rope tables and mask for
/// the new tokens of each row.
#[derive(Clone, Debug)]
pub struct AttentionContext {
    /// Rope angles [B, t, head_dim / 2] in f32.
    rotary: Rotary,
    /// [B, t, past + t] (shared by all heads and layers).
    mask: AttentionMask,
}

impl AttentionContext {
    /// `real[b]` marks, for every position of row b (the `past` cached ones
    /// then the new ones), a token (true) or padding. Rope position = number
    /// of real tokens before, so a left-padded row gets the positions of its
    /// unpadded form; the mask is causal in padded index space, hides
    /// padding and applies the sliding window.
    pub fn new(
        inv_freq: &[f64],
        sliding_window: Option<usize>,
        real: &[Vec<bool>],
        past: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = real.len();
        let total = real.first().map_or(0, Vec::len);
        let t = total - past;
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in real {
            let mut seen = row[..past].iter().filter(|&&x| x).count();
            for &is_real in &row[past..] {
                let pos = if is_real {
                    seen as f64
                } else {
                    seen.saturating_sub(1) as f64
                };
                if is_real {
                    seen += 1;
                }
                for f in inv_freq {
                    let angle = pos * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let mut mask = Vec::with_capacity(b * t * total);
        for row in real {
            for query in past..total {
                for (key, &is_real) in row.iter().enumerate() {
                    let allowed =
                        key <= query && is_real && sliding_window.is_none_or(|w| query - key < w);
                    mask.push(if allowed { 0.0 } else { MASKED });
                }
            }
        }
        Ok(AttentionContext {
            rotary: Rotary {
                cos: Tensor::from_vec(cos, (b, t, half), device)?,
                sin: Tensor::from_vec(sin, (b, t, half), device)?,
            },
            mask: AttentionMask::from_vec(mask, (b, t, total), device)?,
        })
    }

    /// Sequences of `lengths` tokens packed one after another into a single
    /// row (padding-free batching): each token's rope position counts from
    /// its own sequence's start and it sees only earlier tokens of that
    /// sequence, so every sequence is computed as it would be alone.
    pub fn packed(
        inv_freq: &[f64],
        sliding_window: Option<usize>,
        lengths: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let total: usize = lengths.iter().sum();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(total * half);
        let mut sin = Vec::with_capacity(total * half);
        let mut mask = vec![MASKED; total * total];
        let mut start = 0;
        for &len in lengths {
            for pos in 0..len {
                for f in inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
                let query = start + pos;
                let first =
                    start + pos.saturating_sub(sliding_window.map_or(pos, |w| w.saturating_sub(1)));
                mask[query * total + first..=query * total + query].fill(0.0);
            }
            start += len;
        }
        Ok(AttentionContext {
            rotary: Rotary {
                cos: Tensor::from_vec(cos, (1, total, half), device)?,
                sin: Tensor::from_vec(sin, (1, total, half), device)?,
            },
            mask: AttentionMask::from_vec(mask, (1, total, total), device)?,
        })
    }
}

/// The outputs a layer computes at a few query positions only (see
/// `DecoderLayer::forward`): the positions, and the attention context of
/// those queries (their rope angles and mask rows, over the same keys).
#[derive(Clone, Debug)]
pub struct QuerySelection {
    /// [n] u32 indices into the layer's new tokens (the same for every
    /// batch row).
    pub rows: Tensor,
    pub ctx: AttentionContext,
}

impl QuerySelection {
    pub fn new(ctx: &AttentionContext, rows: &[usize]) -> Result<Self> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), ctx.rotary.cos.device())?;
        let selected = AttentionContext {
            mask: ctx.mask.select_queries(rows, &idx)?,
            rotary: Rotary {
                cos: ctx.rotary.cos.index_select(&idx, 1)?,
                sin: ctx.rotary.sin.index_select(&idx, 1)?,
            },
        };
        Ok(QuerySelection {
            rows: idx,
            ctx: selected,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        Ok(Attention {
            q_proj: Linear::load(w, c, layer, "q_proj")?,
            k_proj: Linear::load(w, c, layer, "k_proj")?,
            v_proj: Linear::load(w, c, layer, "v_proj")?,
            o_proj: Linear::load(w, c, layer, "o_proj")?,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// Attention of the tokens `x` [B, t, hidden] over the `past` keys and
    /// values (if any) followed by their own. Returns the output and the
    /// keys/values including the new tokens (what a KV cache keeps). With
    /// `queries`, the output is only at those rows: keys and values still
    /// come from every token, but the query and output projections run on
    /// the selected rows alone.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        mode: Mode,
        past: Option<&LayerKv>,
        queries: Option<&QuerySelection>,
    ) -> Result<(Tensor, LayerKv)> {
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (xq, q_ctx) = match queries {
            Some(sel) => (x.index_select(&sel.rows, 1)?, &sel.ctx),
            None => (x.clone(), ctx),
        };
        let query_heads = Heads {
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
        };
        let kv_heads = Heads {
            heads: nkv,
            ..query_heads
        };
        // Grouped-query attention without copying K/V: query heads sharing a
        // KV head are stacked along the time axis ([B, nkv, rep*t, hd]).
        let scale = 1.0 / (hd as f64).sqrt();
        let q_proj = self.q_proj.forward(&xq, mode)?;
        let q = split_heads(&q_proj, query_heads, Some(&q_ctx.rotary), scale)?;
        let k_proj = self.k_proj.forward(x, mode)?;
        let k = split_heads(&k_proj, kv_heads, Some(&ctx.rotary), 1.0)?;
        let v = split_heads(&self.v_proj.forward(x, mode)?, kv_heads, None, 1.0)?;
        let (k, v) = match past {
            Some(p) => (
                Tensor::cat(&[&p.keys, &k], 2)?,
                Tensor::cat(&[&p.values, &v], 2)?,
            ),
            None => (k, v),
        };
        // Softmax in f32 (as HF does), fused on the CPU: no [heads, t, T]
        // scores or probabilities are kept for backward.
        let out = merge_heads(&attention(&q, &k, &v, &q_ctx.mask)?, query_heads)?;
        let out = self.o_proj.forward(&out, mode)?;
        Ok((out, LayerKv { keys: k, values: v }))
    }
}
