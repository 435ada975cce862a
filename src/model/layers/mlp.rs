//! The gated MLP of a decoder layer: down(act(gate(x)) * up(x)), with
//! SiLU (SwiGLU, fused on the CPU) or tanh-GELU (Gemma's GeGLU, candle's
//! differentiable ops); gate and up as two projections or Phi-3's one
//! `gate_up_proj` (gate, then up).

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::family::Activation;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::ops::swiglu;
use crate::model::layers::linear::Linear;
use crate::model::mode::Mode;
use candle_core::{Tensor, D};

/// The gate and up projections: two, or one fused.
#[derive(Clone, Debug)]
pub enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_up: GateUp,
    pub down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(w: &WeightLoader, c: &ModelConfig, layer: usize) -> Result<Self> {
        let gate_up = match c.architecture.family().fused_projections {
            true => GateUp::Fused {
                gate_up_proj: Linear::load(w, c, layer, "gate_up_proj")?,
            },
            false => GateUp::Separate {
                gate_proj: Linear::load(w, c, layer, "gate_proj")?,
                up_proj: Linear::load(w, c, layer, "up_proj")?,
            },
        };
        Ok(Mlp {
            gate_up,
            down_proj: Linear::load(w, c, layer, "down_proj")?,
            activation: c.architecture.family().activation,
        })
    }

    /// The projections in the family's checkpoint order.
    pub fn linears(&self) -> Vec<&Linear> {
        match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj, &self.down_proj],
            GateUp::Fused { gate_up_proj } => vec![gate_up_proj, &self.down_proj],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match &mut self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                vec![gate_proj, up_proj, &mut self.down_proj]
            }
            GateUp::Fused { gate_up_proj } => vec![gate_up_proj, &mut self.down_proj],
        }
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => {
                (gate_proj.forward(x, mode)?, up_proj.forward(x, mode)?)
            }
            GateUp::Fused { gate_up_proj } => {
                let both = gate_up_proj.forward(x, mode)?;
                let f = both.dim(D::Minus1)? / 2;
                (
                    both.narrow(D::Minus1, 0, f)?.contiguous()?,
                    both.narrow(D::Minus1, f, f)?.contiguous()?,
                )
            }
        };
        let gated = match self.activation {
            Activation::Silu => swiglu(&gate, &up)?,
            // candle's `gelu` is the tanh approximation ("gelu_pytorch_tanh").
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated, mode)
    }
}
