//! A frozen linear projection with an optional LoRA adapter, and the seeded
//! dropout in front of the adapter.

use crate::model::config::ModelConfig;
use crate::model::error::Result;
use crate::model::formats::names;
use crate::model::formats::weights::WeightLoader;
use crate::model::kernels::fused_linear::{lora_linear_on, Adapter};
use crate::model::kernels::quantized::{frozen_projection, FrozenWeight};
use crate::model::kernels::rng::SplitMix64;
use crate::model::layers::lora::{Dora, LoraAdapter};
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

    /// Makes the attached adapter a DoRA one, with `magnitude` [out] or
    /// PEFT's initial ‖W + s·B·A‖. Does nothing without an adapter.
    pub fn attach_dora(&mut self, magnitude: Option<Tensor>) -> Result<()> {
        let Some(lora) = &self.lora else {
            return Ok(());
        };
        let dense = match &self.weight {
            FrozenWeight::Dense(w) => w.clone(),
            quantized => quantized.to_dense(candle_core::DType::F32)?,
        };
        let dora = Dora::attach(&dense, lora, magnitude)?;
        if let Some(lora) = &mut self.lora {
            lora.dora = Some(dora);
        }
        Ok(())
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// y = x W^T + b + s · B(A(dropout(x))); only the adapter path is scaled.
    /// With DoRA, see [`Linear::dora_forward`].
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let parts = self.adapter_parts(x, mode)?;
        if let (Some(parts), Some(dora)) =
            (&parts, self.lora.as_ref().and_then(|l| l.dora.as_ref()))
        {
            return self.dora_forward(x, parts, dora, mode);
        }
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

    /// DoRA as PEFT 0.21 computes it, with c = m / ‖W + s·B·A‖ per output
    /// row (the norm a constant of backward):
    /// without dropout y = c ∘ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b; with dropout
    /// (x_d = x∘mask) y = x·Wᵀ + b + (c − 1) ∘ (x_d·Wᵀ) + c ∘ s·(x_d·Aᵀ)·Bᵀ,
    /// i.e. the frozen product of x plus c ∘ z(x_d) − x_d·Wᵀ.
    fn dora_forward(
        &self,
        x: &Tensor,
        parts: &AdapterParts,
        dora: &Dora,
        mode: Mode,
    ) -> Result<Tensor> {
        let magnitude = if mode == Mode::Inference {
            dora.magnitude.as_detached_tensor()
        } else {
            dora.magnitude.as_tensor().clone()
        };
        let norm = self.dora_norm(&parts.a, &parts.b, parts.scale, &dora.base_norm_sq)?;
        let c = magnitude
            .to_dtype(norm.dtype())?
            .broadcast_div(&norm)?
            .to_dtype(x.dtype())?;
        let adapter = |input: &Tensor| {
            lora_linear_on(
                input,
                (&self.weight, None),
                &Adapter {
                    a: &parts.a,
                    b: &parts.b,
                    scale: parts.scale,
                    dropout: None,
                },
            )
        };
        let bias = self.bias.as_ref();
        Ok(match &parts.mask {
            None => {
                let y = adapter(x)?.broadcast_mul(&c)?;
                match bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                    None => y,
                }
            }
            Some(mask) => {
                let dropped = (x * mask)?;
                let base = frozen_projection(x, &self.weight, bias)?;
                let scaled = adapter(&dropped)?.broadcast_mul(&c)?;
                ((base + scaled)? - frozen_projection(&dropped, &self.weight, None)?)?
            }
        })
    }

    /// ‖W_i + s·(B·A)_i‖ [out] in `base_norm_sq`'s dtype from detached A and B, expanded as
    /// ‖W_i‖² + 2s·Σ_k B_ik (W·Aᵀ)_ik + s²·B_i (A·Aᵀ) B_iᵀ: one r-row product
    /// with W and no [out, in] temporary for a dense W (PEFT forms W + s·B·A
    /// itself; the two agree to rounding, tested against its gradients).
    fn dora_norm(
        &self,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        base_norm_sq: &Tensor,
    ) -> Result<Tensor> {
        let acc = base_norm_sq.dtype();
        let (a, b) = (a.detach().to_dtype(acc)?, b.detach().to_dtype(acc)?);
        // W·Aᵀ [out, r]; a quantized W is dequantised here (exact, on every device).
        let wa = match &self.weight {
            FrozenWeight::Dense(w) => w.matmul(&a.to_dtype(w.dtype())?.t()?)?.to_dtype(acc)?,
            quantized => quantized.to_dense(acc)?.matmul(&a.t()?)?,
        };
        let cross = (&b * &wa)?.sum(1)?;
        let gram = a.matmul(&a.t()?)?;
        let quad = (b.matmul(&gram)? * &b)?.sum(1)?;
        let sq = ((base_norm_sq + (cross * (2.0 * scale))?)? + (quad * (scale * scale))?)?;
        Ok(sq.sqrt()?)
    }

    /// The dropout mask training step `seed` draws for input `x`; None
    /// without an adapter or dropout.
    pub fn dropout_mask(&self, x: &Tensor, seed: u64) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(lora) if lora.dropout > 0.0 => {
                Ok(Some(dropout_mask(x, lora.dropout, seed, &self.name)?))
            }
            _ => Ok(None),
        }
    }

    /// The adapter's A and B (detached for inference), its dropout mask in
    /// training, and its scale.
    fn adapter_parts(&self, x: &Tensor, mode: Mode) -> Result<Option<AdapterParts>> {
        let Some(lora) = &self.lora else {
            return Ok(None);
        };
        let mask = match mode {
            Mode::Train { dropout_seed } => self.dropout_mask(x, dropout_seed)?,
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
