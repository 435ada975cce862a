//! A frozen linear projection with an optional LoRA adapter, and the seeded
//! dropout in front of the adapter.

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::formats::names;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::fused_linear::{lora_linear_on, Adapter};
use crate::model::kernels::quantized::{frozen_projection, FrozenWeight};
use crate::model::kernels::rng::SplitMix64;
use crate::model::layers::lora::LoraAdapter;
use crate::model::mode::Mode;
use candle_core::Tensor;

/// A frozen linear projection with an optional LoRA adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// [out, in], frozen; dense or quantized.
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// Loads projection `proj` (e.g. "q_proj") of layer `layer`, with the bias
    /// the architecture has.
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize, proj: &str) -> Result<Self> {
        let name = names::projection(layer, proj);
        let (out_f, in_f) = c.projection_shape(proj).expect("known projection");
        let weight = w.projection(&names::weight(&name), &[out_f, in_f])?;
        let bias = if c.projection_has_bias(proj) {
            Some(w.get(&names::bias(&name), &[out_f])?)
        } else {
            None
        };
        Ok(Linear {
            name,
            weight,
            bias,
            lora: None,
        })
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// y = x W^T + b + s · B(A(dropout(x))); only the adapter path is scaled.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let parts = self.adapter_parts(x, mode)?;
        let adapter = parts.as_ref().map(|p| Adapter {
            a: &p.a,
            b: &p.b,
            scale: p.scale,
            dropout: p.mask.as_ref(),
        });
        let bias = self.bias.as_ref();
        Ok(match adapter {
            None => frozen_projection(x, &self.weight, bias)?,
            Some(adapter) => lora_linear_on(x, (&self.weight, bias), &adapter)?,
        })
    }

    /// The adapter's A and B (detached for inference), its dropout mask in
    /// training, and its scale.
    fn adapter_parts(&self, x: &Tensor, mode: Mode) -> Result<Option<AdapterParts>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let mask = match mode {
            Mode::Train { dropout_seed } if lora.dropout > 0.0 => {
                Some(dropout_mask(x, lora.dropout, dropout_seed, &self.name)?)
            }
            _ => None,
        };
        let (a, b) = if mode == Mode::Inference {
            (lora.a.as_detached_tensor(), lora.b.as_detached_tensor())
        } else {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        };
        Ok(Some(AdapterParts {
            a,
            b,
            mask,
            scale: lora.scale,
        }))
    }
}

/// What one forward pass gives the adapter op (`Adapter` borrows them).
struct AdapterParts {
    a: Tensor,
    b: Tensor,
    mask: Option<Tensor>,
    scale: f64,
}

/// The inverted-dropout mask (0 or 1/(1-p), shaped like x, in x's dtype)
/// drawn from (seed, module name).
fn dropout_mask(x: &Tensor, p: f64, seed: u64, module: &str) -> Result<Tensor> {
    let mut rng = SplitMix64::for_stream(seed, module);
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep as f32 })
        .collect();
    Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}
