//! The gated MLP of a decoder layer: down(act(gate(x)) * up(x)), with
//! SiLU (SwiGLU, fused on the CPU) or tanh-GELU (Gemma's GeGLU, candle's
//! differentiable ops).

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::family::Activation;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::ops::swiglu;
use crate::model::layers::linear::Linear;
use crate::model::mode::Mode;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(w, c, layer, "gate_proj")?,
            up_proj: Linear::load(w, c, layer, "up_proj")?,
            down_proj: Linear::load(w, c, layer, "down_proj")?,
            activation: c.architecture.family().activation,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, mode)?;
        let up = self.up_proj.forward(x, mode)?;
        let gated = match self.activation {
            Activation::Silu => swiglu(&gate, &up)?,
            // candle's `gelu` is the tanh approximation ("gelu_pytorch_tanh").
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated, mode)
    }
}
