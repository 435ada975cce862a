//! Grouped-query self-attention with an explicit head_dim: an optional
//! RMSNorm on queries and keys, rope (any of `rope`'s types, or none), a
//! causal + padding (+ sliding window) mask, an optional soft-cap, softmax
//! in f32, and optional cached keys/values from earlier tokens, so training
//! and KV-cache generation run the same code.

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::family::QkNorm;
use crate::model::formats::names;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::fused_attention::{attention, AttentionMask, HIDDEN};
use crate::model::kernels::ops::{merge_heads, split_heads, Heads, Rotary};
use crate::model::layers::linear::Linear;
use crate::model::layers::norm::Norm;
use crate::model::mode::Mode;
use crate::model::rope::RopeTable;
use candle_core::{Device, Tensor, D};

/// cos and sin of `positions` (each row's list) at the table's
/// frequencies, times its attention factor, as [B, t, head_dim / 2] f32.
/// In f32 throughout, as transformers computes them whatever the model's
/// dtype: the angles a checkpoint was trained with.
fn rotary(table: &RopeTable, positions: &[Vec<f64>], device: &Device) -> Result<Rotary> {
    let (b, t, half) = (
        positions.len(),
        positions.first().map_or(0, Vec::len),
        table.inv_freq.len(),
    );
    let inv_freq: Vec<f32> = table.inv_freq.iter().map(|&f| f as f32).collect();
    let factor = table.attention_factor as f32;
    let mut cos = Vec::with_capacity(b * t * half);
    let mut sin = Vec::with_capacity(b * t * half);
    for &pos in positions.iter().flatten() {
        for f in &inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos() * factor);
            sin.push(angle.sin() * factor);
        }
    }
    Ok(Rotary {
        cos: Tensor::from_vec(cos, (b, t, half), device)?,
        sin: Tensor::from_vec(sin, (b, t, half), device)?,
    })
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
    /// Rope angles [B, t, head_dim / 2] in f32; None for a layer without rope.
    rotary: Option<Rotary>,
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
        rope: Option<&RopeTable>,
        sliding_window: Option<usize>,
        real: &[Vec<bool>],
        past: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = real.len();
        let total = real.first().map_or(0, Vec::len);
        let t = total - past;
        let positions: Vec<Vec<f64>> = real
            .iter()
            .map(|row| {
                let mut seen = row[..past].iter().filter(|&&x| x).count();
                row[past..]
                    .iter()
                    .map(|&is_real| {
                        let pos = if is_real {
                            seen
                        } else {
                            seen.saturating_sub(1)
                        };
                        seen += usize::from(is_real);
                        pos as f64
                    })
                    .collect()
            })
            .collect();
        let mut mask = Vec::with_capacity(b * t * total);
        for row in real {
            for query in past..total {
                for (key, &is_real) in row.iter().enumerate() {
                    let allowed =
                        key <= query && is_real && sliding_window.is_none_or(|w| query - key < w);
                    mask.push(if allowed { 0.0 } else { HIDDEN });
                }
            }
        }
        Ok(AttentionContext {
            rotary: rope.map(|r| rotary(r, &positions, device)).transpose()?,
            mask: AttentionMask::from_vec(mask, (b, t, total), device)?,
        })
    }

    /// Sequences of `lengths` tokens packed one after another into a single
    /// row (padding-free batching): each token's rope position counts from
    /// its own sequence's start and it sees only earlier tokens of that
    /// sequence, so every sequence is computed as it would be alone.
    pub fn packed(
        rope: Option<&RopeTable>,
        sliding_window: Option<usize>,
        lengths: &[usize],
        device: &Device,
    ) -> Result<Self> {
        let total: usize = lengths.iter().sum();
        let mut positions = Vec::with_capacity(total);
        // Each query's visible keys as a span: never a total² mask (4 GiB
        // at 32768 tokens), on the host or the device (`AttentionMask`).
        let mut spans = Vec::with_capacity(total);
        let mut start = 0;
        for &len in lengths {
            for pos in 0..len {
                positions.push(pos as f64);
                let query = start + pos;
                let first =
                    start + pos.saturating_sub(sliding_window.map_or(pos, |w| w.saturating_sub(1)));
                spans.push(first..query + 1);
            }
            start += len;
        }
        Ok(AttentionContext {
            rotary: rope.map(|r| rotary(r, &[positions], device)).transpose()?,
            mask: AttentionMask::from_spans(&spans, (1, total, total), device)?,
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
        let idx = Tensor::from_vec(idx, rows.len(), ctx.mask.device())?;
        let rotary = match &ctx.rotary {
            Some(r) => Some(Rotary {
                cos: r.cos.index_select(&idx, 1)?,
                sin: r.sin.index_select(&idx, 1)?,
            }),
            None => None,
        };
        let selected = AttentionContext {
            mask: ctx.mask.select_queries(rows, &idx)?,
            rotary,
        };
        Ok(QuerySelection {
            rows: idx,
            ctx: selected,
        })
    }
}

/// The query, key and value projections: three, or Phi-3's one `qkv_proj`
/// whose output is q, then k, then v.
// One per layer, never in a collection: the unequal variants cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Qkv {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    Fused {
        qkv_proj: Linear,
    },
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Qkv,
    pub o_proj: Linear,
    /// RMSNorms on the query and key projections (Qwen3, Gemma 3, OLMo 2).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    qk_norm: QkNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        let family = c.architecture.family();
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let qk_norm = match family.qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((c.head_dim, c.head_dim)),
            QkNorm::Whole => Some((q, kv)),
        };
        let qkv = match family.fused_projections {
            true => Qkv::Fused {
                qkv_proj: Linear::load(w, c, layer, "qkv_proj")?,
            },
            false => Qkv::Separate {
                q_proj: Linear::load(w, c, layer, "q_proj")?,
                k_proj: Linear::load(w, c, layer, "k_proj")?,
                v_proj: Linear::load(w, c, layer, "v_proj")?,
            },
        };
        Ok(Attention {
            qkv,
            o_proj: Linear::load(w, c, layer, "o_proj")?,
            q_norm: qk_norm
                .map(|(q, _)| Norm::load(w, c, &names::qk_norm(layer, 'q'), q))
                .transpose()?,
            k_norm: qk_norm
                .map(|(_, k)| Norm::load(w, c, &names::qk_norm(layer, 'k'), k))
                .transpose()?,
            qk_norm: family.qk_norm,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: c.attention_scale(),
            softcap: c.attn_logit_softcapping,
        })
    }

    /// The projections in the family's checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => vec![q_proj, k_proj, v_proj, &self.o_proj],
            Qkv::Fused { qkv_proj } => vec![qkv_proj, &self.o_proj],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                vec![q_proj, k_proj, v_proj, &mut self.o_proj]
            }
            Qkv::Fused { qkv_proj } => vec![qkv_proj, &mut self.o_proj],
        }
    }

    /// The query projection at `xq`'s rows and the key and value
    /// projections at `x`'s ([B, t, width] each); `rows` selects the
    /// queries' rows of a fused projection computed on `x`.
    fn project(
        &self,
        x: &Tensor,
        xq: &Tensor,
        rows: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            Qkv::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => Ok((
                q_proj.forward(xq, mode)?,
                k_proj.forward(x, mode)?,
                v_proj.forward(x, mode)?,
            )),
            Qkv::Fused { qkv_proj } => {
                let all = qkv_proj.forward(x, mode)?;
                let (q, kv) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                let mut query = all.narrow(D::Minus1, 0, q)?.contiguous()?;
                if let Some(rows) = rows {
                    query = query.index_select(rows, 1)?;
                }
                Ok((
                    query,
                    all.narrow(D::Minus1, q, kv)?.contiguous()?,
                    all.narrow(D::Minus1, q + kv, kv)?.contiguous()?,
                ))
            }
        }
    }

    /// The q/k norms by HF tensor name, for saving.
    pub fn norms(&self, layer: usize) -> Vec<(String, &Norm)> {
        let named = [('q', &self.q_norm), ('k', &self.k_norm)];
        named
            .into_iter()
            .filter_map(|(which, n)| n.as_ref().map(|n| (names::qk_norm(layer, which), n)))
            .collect()
    }

    /// The q/k norm over `proj` [B, t, heads·head_dim]: per head or whole.
    fn normed(&self, norm: Option<&Norm>, proj: Tensor, heads: usize) -> Result<Tensor> {
        let Some(norm) = norm else {
            return Ok(proj);
        };
        match self.qk_norm {
            QkNorm::PerHead => {
                let (b, t, _) = proj.dims3()?;
                let per_head = proj.reshape((b, t, heads, self.head_dim))?;
                Ok(norm
                    .forward(&per_head)?
                    .reshape((b, t, heads * self.head_dim))?)
            }
            QkNorm::Whole | QkNorm::None => norm.forward(&proj),
        }
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
        let (q_proj, k_proj, v_proj) = self.project(x, &xq, queries.map(|sel| &sel.rows), mode)?;
        let q_proj = self.normed(self.q_norm.as_ref(), q_proj, nh)?;
        let q = split_heads(&q_proj, query_heads, q_ctx.rotary.as_ref(), self.scale)?;
        let k_proj = self.normed(self.k_norm.as_ref(), k_proj, nkv)?;
        let k = split_heads(&k_proj, kv_heads, ctx.rotary.as_ref(), 1.0)?;
        let v = split_heads(&v_proj, kv_heads, None, 1.0)?;
        let (k, v) = match past {
            Some(p) => (
                Tensor::cat(&[&p.keys, &k], 2)?,
                Tensor::cat(&[&p.values, &v], 2)?,
            ),
            None => (k, v),
        };
        // Softmax in f32 (as HF does), fused on the CPU: no [heads, t, T]
        // scores or probabilities are kept for backward.
        let out = attention(&q, &k, &v, &q_ctx.mask, self.softcap)?;
        let out = merge_heads(&out, query_heads)?;
        let out = self.o_proj.forward(&out, mode)?;
        Ok((out, LayerKv { keys: k, values: v }))
    }
}
