//! An RMSNorm with its weight as stored and the scale it multiplies by:
//! the weight itself, or Gemma's 1 + weight (kept apart so that saving the
//! model writes back exactly the stored weight).

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::ops::rms_norm;
use candle_core::{DType, Tensor};

#[derive(Clone, Debug)]
pub struct Norm {
    /// As stored in the checkpoint.
    pub weight: Tensor,
    scale: Tensor,
    eps: f64,
}

impl Norm {
    /// Loads the norm weight `name` of `size` values.
    pub fn load(w: &WeightLoader, c: &ModelConfig, name: &str, size: usize) -> Result<Self> {
        let weight = w.get(name, &[size])?;
        let scale = match c.architecture.family().norm_plus_one {
            true if weight.dtype() == DType::F64 => weight.affine(1.0, 1.0)?,
            // transformers adds the 1 in f32.
            true => weight
                .to_dtype(DType::F32)?
                .affine(1.0, 1.0)?
                .to_dtype(weight.dtype())?,
            false => weight.clone(),
        };
        Ok(Norm {
            weight,
            scale,
            eps: c.rms_norm_eps,
        })
    }

    /// RMSNorm over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.scale, self.eps)?)
    }
}
