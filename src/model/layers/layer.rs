//! One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)).

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::formats::names;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::ops::rms_norm;
use crate::model::layers::attention::{Attention, AttentionContext, LayerKv, QuerySelection};
use crate::model::layers::linear::Linear;
use crate::model::layers::mlp::Mlp;
use crate::model::mode::Mode;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub self_attn: Attention,
    pub mlp: Mlp,
    rms_norm_eps: f64,
}

impl DecoderLayer {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        let h = c.hidden_size;
        Ok(DecoderLayer {
            input_layernorm: w.get(&names::input_layernorm(layer), &[h])?,
            post_attention_layernorm: w.get(&names::post_attention_layernorm(layer), &[h])?,
            self_attn: Attention::load(w, c, layer)?,
            mlp: Mlp::load(w, c, layer)?,
            rms_norm_eps: c.rms_norm_eps,
        })
    }

    /// The layer applied to `x` [B, t, hidden]; attention also sees `past`
    /// keys/values when given. Returns the output and this layer's
    /// keys/values including the new tokens. With `queries`, the output is
    /// only at those rows ([B, n, hidden]): every token still feeds
    /// attention's keys and values, so this equals the selected rows of the
    /// full output, at the cost of the K and V projections alone for the
    /// other tokens.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        mode: Mode,
        past: Option<&LayerKv>,
        queries: Option<&QuerySelection>,
    ) -> Result<(Tensor, LayerKv)> {
        let h = rms_norm(x, &self.input_layernorm, self.rms_norm_eps)?;
        let (attn, kv) = self.self_attn.forward(&h, ctx, mode, past, queries)?;
        let residual = match queries {
            Some(sel) => x.index_select(&sel.rows, 1)?,
            None => x.clone(),
        };
        let x = (residual + attn)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, self.rms_norm_eps)?;
        let x = (x + self.mlp.forward(&h, mode)?)?;
        Ok((x, kv))
    }

    /// The seven projections in `names::PROJECTIONS` order.
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}
