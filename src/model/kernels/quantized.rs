//! A frozen base held quantized (QLoRA-style): the seven projections of
//! every decoder layer in one of llama.cpp's block formats through candle's
//! `quantized` module (CPU and CUDA kernels), LoRA on top in f32.
//!
//! Embeddings, norms and the output head stay in the compute dtype: the
//! embeddings are a row lookup (no product to speed up, and a tied head
//! shares them), the norms are a few thousand numbers, and the head's
//! logits are where quantization error reaches the loss most directly
//! (bitsandbytes' QLoRA keeps them unquantized too).
//!
//! Products dequantise the weight one projection at a time, forward and
//! backward (as bitsandbytes does for QLoRA), and use the dense product:
//! exact in the dequantised weight, never a dense copy of the model. Only
//! the input gets a gradient. On a GPU and for half-precision inputs the
//! forward is candle's quantized matmul, which rounds the input to 8-bit
//! blocks as llama.cpp does.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, WithDType};

use crate::model::kernels::cpu::{self, matmul, Mat, Threads};
use crate::model::kernels::float::per_float_dtype;
use crate::model::kernels::fp8::{self, Fp8Weight};
use serde::{Deserialize, Serialize};

/// How a base's projections are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
pub enum Quantization {
    /// 8-bit blocks of 32 weights with one f16 scale (8.5 bits a weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit super-blocks of 256 weights with 6-bit sub-block scales (4.5
    /// bits a weight); rows that are not a multiple of 256 use q5_0 (blocks
    /// of 32, 5.5 bits), as llama.cpp falls back.
    #[serde(rename = "q4_k")]
    Q4K,
    /// float8_e4m3fn in transformers' fine-grained layout: 128 × 128 blocks
    /// with one f32 scale each (8.002 bits a weight).
    #[serde(rename = "fp8")]
    Fp8,
}

impl Quantization {
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4_k",
            Quantization::Fp8 => "fp8",
        }
    }

    /// What the setting means, for `plan`.
    pub fn describe(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "8.5 bits a weight",
            Quantization::Q4K => {
                "4.5 bits a weight; q5_0, 5.5 bits, where a row is not a multiple of 256"
            }
            Quantization::Fp8 => {
                "float8_e4m3fn with an f32 scale per 128 × 128 block, 8.002 bits a weight"
            }
        }
    }

    /// The block format of a weight whose rows hold `in_features` values;
    /// None when no format's block divides the row (the weight stays dense).
    pub fn format_for(self, in_features: usize) -> Option<GgmlDType> {
        let preferred: &[GgmlDType] = match self {
            Quantization::Q8_0 => &[GgmlDType::Q8_0],
            Quantization::Q4K => &[GgmlDType::Q4K, GgmlDType::Q5_0],
            Quantization::Fp8 => &[],
        };
        preferred
            .iter()
            .copied()
            .find(|f| in_features.is_multiple_of(f.block_size()))
    }

    /// Bits a weight of a projection with rows of `in_features` takes held
    /// this way (scales included); None when it stays dense.
    pub fn bits_for(self, in_features: usize) -> Option<f64> {
        match self {
            Quantization::Fp8 => Some(fp8::bits_per_weight(fp8::DEFAULT_BLOCK)),
            blocks => blocks.format_for(in_features).map(Self::bits_per_weight),
        }
    }

    /// Bits a weight takes in `format` (scales included).
    pub fn bits_per_weight(format: GgmlDType) -> f64 {
        8.0 * format.type_size() as f64 / format.block_size() as f64
    }
}

/// Name of a block format as llama.cpp writes it.
pub fn format_name(format: GgmlDType) -> &'static str {
    match format {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// A frozen projection weight [out, in]: dense in the compute dtype, or quantized.
#[derive(Clone, Debug)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    /// FP8 codes with block scales (`fp8`: float8_e4m3fn; or a
    /// checkpoint's float8_e5m2).
    Fp8(Arc<Fp8Weight>),
}

impl FrozenWeight {
    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        let dims = match self {
            FrozenWeight::Dense(t) => t.dims(),
            FrozenWeight::Quantized(q) => q.shape().dims(),
            FrozenWeight::Fp8(f) => f.codes.dims(),
        };
        (dims[0], dims[1])
    }

    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(t) => Some(t),
            FrozenWeight::Quantized(_) | FrozenWeight::Fp8(_) => None,
        }
    }

    /// The GGUF block format when held in one.
    pub fn format(&self) -> Option<GgmlDType> {
        match self {
            FrozenWeight::Dense(_) | FrozenWeight::Fp8(_) => None,
            FrozenWeight::Quantized(q) => Some(q.dtype()),
        }
    }

    /// "dense", a GGUF block format's name, "fp8" (e4m3) or "fp8_e5m2".
    pub fn label(&self) -> &'static str {
        match self {
            FrozenWeight::Dense(_) => "dense",
            FrozenWeight::Quantized(q) => format_name(q.dtype()),
            FrozenWeight::Fp8(f) => match f.format {
                fp8::Fp8Format::E4M3 => "fp8",
                fp8::Fp8Format::E5M2 => "fp8_e5m2",
            },
        }
    }

    /// The weight as a dense tensor in `dtype` (dequantised in f32 first).
    pub fn to_dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(t) => t.to_dtype(dtype),
            FrozenWeight::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            FrozenWeight::Fp8(f) => f.dequantize(dtype),
        }
    }

    /// Bytes the weight takes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenWeight::Quantized(q) => q.storage_size_in_bytes(),
            FrozenWeight::Fp8(f) => f.bytes(),
        }
    }

    /// `dense` [out, in] quantized in the format `quantization` gives its
    /// rows, on `device`; dense as it is when no format fits.
    pub fn quantize(
        dense: Tensor,
        quantization: Quantization,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (_, in_features) = dense.dims2()?;
        if quantization == Quantization::Fp8 {
            let weight = Fp8Weight::quantize(&dense, fp8::DEFAULT_BLOCK, device)?;
            return Ok(FrozenWeight::Fp8(Arc::new(weight)));
        }
        match quantization.format_for(in_features) {
            Some(format) => {
                let cpu = dense.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                Ok(FrozenWeight::Quantized(Arc::new(QTensor::quantize_onto(
                    &cpu, format, device,
                )?)))
            }
            None => Ok(FrozenWeight::Dense(dense.to_device(device)?)),
        }
    }
}

/// x·Wᵀ + b for a frozen W [out, in], dense or quantized; only x gets a
/// gradient.
pub fn frozen_projection(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    match weight {
        FrozenWeight::Dense(w) => crate::model::kernels::ops::frozen_linear(x, w, bias),
        FrozenWeight::Quantized(q) => {
            let y = quantized_matmul(x, q)?;
            match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                None => Ok(y),
            }
        }
        FrozenWeight::Fp8(f) => {
            let w = f.dequantize(x.dtype())?;
            crate::model::kernels::ops::frozen_linear(x, &w, bias)
        }
    }
}

/// x·Wᵀ for a quantized W [out, in] and x [..., in] (f32, bf16 or f16);
/// backward gives x its gradient and W none.
pub fn quantized_matmul(x: &Tensor, weight: &Arc<QTensor>) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(QuantizedMatmul {
        weight: weight.clone(),
    })
}

struct QuantizedMatmul {
    weight: Arc<QTensor>,
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    /// f32 and f64 inputs: the weight dequantised and multiplied with the
    /// project's gemm, exact in the dequantised weight (with candle's
    /// quantized product instead, a q4_k SFT step of the 0.5B shape at 512
    /// tokens ran at 6 tokens/s against 44); other dtypes: candle's product.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = self.weight.shape().dims2()?;
        let dims = l.shape().dims();
        let rows = l.shape().elem_count() / inp.max(1);
        let mut y_dims = dims.to_vec();
        if y_dims.pop() != Some(inp) {
            candle_core::bail!("quantized-matmul: input {dims:?} does not end in {inp}");
        }
        y_dims.push(out);
        let w = self.weight.dequantize(&Device::Cpu)?;
        let y = per_float_dtype!(
            s.dtype(),
            |T| {
                let w = w.to_dtype(T::DTYPE)?;
                T::to_cpu_storage_owned(cpu::with_cpu("quantized-matmul", &[&w], |c| {
                    let x = cpu::slice::<T>(s, l, "quantized-matmul", "x")?;
                    let w = cpu::slice::<T>(c[0].0, c[0].1, "quantized-matmul", "W")?;
                    let mut y = vec![T::default(); rows * out];
                    matmul(
                        (rows, out, inp),
                        &mut y,
                        false,
                        (Mat::rows(x, inp), Mat::transposed(w, inp)),
                        1.0,
                        Threads::Pool,
                    );
                    Ok(y)
                })?)
            },
            _ => return self.weight.as_ref().cpu_fwd(s, l)
        );
        Ok((y, Shape::from(y_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.weight.as_ref().cuda_fwd(s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dx = dy·W with W dequantised for this product only.
        let w = self
            .weight
            .dequantize(arg.device())?
            .to_dtype(grad_res.dtype())?;
        let dims = grad_res.dims().to_vec();
        let (out, lead) = dims.split_last().expect("a product's output has rank >= 2");
        let rows: usize = lead.iter().product();
        let dx = grad_res.reshape((rows, *out))?.matmul(&w)?;
        let mut x_dims = lead.to_vec();
        x_dims.push(w.dim(1)?);
        Ok(Some(dx.reshape(x_dims)?.to_dtype(arg.dtype())?))
    }
}
