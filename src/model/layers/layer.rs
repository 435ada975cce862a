//! One decoder layer: attention then the MLP, each with a residual, with
//! the RMSNorms where the family puts them (`NormPlacement`): before each
//! block (Llama and most), before and after (Gemma), or after (OLMo 2).

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::family::NormPlacement;
use crate::model::formats::names;
use crate::model::formats::weights::WeightLoader;
use crate::model::layers::attention::{Attention, AttentionContext, LayerKv, QuerySelection};
use crate::model::layers::linear::Linear;
use crate::model::layers::mlp::Mlp;
use crate::model::layers::norm::Norm;
use crate::model::mode::Mode;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    /// Before attention (none in OLMo 2).
    pub input_layernorm: Option<Norm>,
    /// Before the MLP (Llama's naming), or on attention's output (Gemma,
    /// OLMo 2).
    pub post_attention_layernorm: Norm,
    /// Gemma: before the MLP.
    pub pre_feedforward_layernorm: Option<Norm>,
    /// Gemma, OLMo 2: on the MLP's output.
    pub post_feedforward_layernorm: Option<Norm>,
    pub self_attn: Attention,
    pub mlp: Mlp,
    placement: NormPlacement,
}

impl DecoderLayer {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        let h = c.hidden_size;
        let placement = c.architecture.family().norms;
        let norm = |name: String| Norm::load(w, c, &name, h);
        let (pre, sandwich) = (
            placement != NormPlacement::Post,
            placement == NormPlacement::Sandwich,
        );
        Ok(DecoderLayer {
            input_layernorm: pre
                .then(|| norm(names::input_layernorm(layer)))
                .transpose()?,
            post_attention_layernorm: norm(names::post_attention_layernorm(layer))?,
            pre_feedforward_layernorm: sandwich
                .then(|| norm(names::pre_feedforward_layernorm(layer)))
                .transpose()?,
            post_feedforward_layernorm: (placement != NormPlacement::Pre)
                .then(|| norm(names::post_feedforward_layernorm(layer)))
                .transpose()?,
            self_attn: Attention::load(w, c, layer)?,
            mlp: Mlp::load(w, c, layer)?,
            placement,
        })
    }

    /// The norms by HF tensor name, for saving.
    pub fn norms(&self, layer: usize) -> Vec<(String, &Norm)> {
        let mut out = Vec::new();
        if let Some(n) = &self.input_layernorm {
            out.push((names::input_layernorm(layer), n));
        }
        out.push((
            names::post_attention_layernorm(layer),
            &self.post_attention_layernorm,
        ));
        if let Some(n) = &self.pre_feedforward_layernorm {
            out.push((names::pre_feedforward_layernorm(layer), n));
        }
        if let Some(n) = &self.post_feedforward_layernorm {
            out.push((names::post_feedforward_layernorm(layer), n));
        }
        out.extend(self.self_attn.norms(layer));
        out
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
        let h = match &self.input_layernorm {
            Some(norm) => norm.forward(x)?,
            None => x.clone(),
        };
        let (attn, kv) = self.self_attn.forward(&h, ctx, mode, past, queries)?;
        let residual = match queries {
            Some(sel) => x.index_select(&sel.rows, 1)?,
            None => x.clone(),
        };
        let x = match self.placement {
            NormPlacement::Pre => {
                let x = (residual + attn)?;
                let h = self.post_attention_layernorm.forward(&x)?;
                (x + self.mlp.forward(&h, mode)?)?
            }
            NormPlacement::Sandwich | NormPlacement::Post => {
                let x = (residual + self.post_attention_layernorm.forward(&attn)?)?;
                let h = match &self.pre_feedforward_layernorm {
                    Some(norm) => norm.forward(&x)?,
                    None => x.clone(),
                };
                let out = self.mlp.forward(&h, mode)?;
                let post = self
                    .post_feedforward_layernorm
                    .as_ref()
                    .expect("loaded for these placements");
                (x + post.forward(&out)?)?
            }
        };
        Ok((x, kv))
    }

    /// The projections in the family's checkpoint order
    /// (`ModelConfig::projections`).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut all = self.self_attn.linears();
        all.extend(self.mlp.linears());
        all
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut all = self.self_attn.linears_mut();
        all.extend(self.mlp.linears_mut());
        all
    }
}
