//! FP8 projection weights in transformers' fine-grained layout (Qwen3's and
//! DeepSeek's official FP8 checkpoints): float8_e4m3fn codes [out, in] and
//! one f32 `weight_scale_inv` per block of `block[0]` rows × `block[1]`
//! columns (the last blocks may be partial), W = codes · scale_inv.
//!
//! The codes stay in memory as they are (one byte a weight, candle's
//! `F8E4M3`); each product dequantises its projection (as the quantized
//! GGUF blocks are), so a step is exact in the dequantised weight. Making
//! codes from a dense weight follows transformers 5.24's `Fp8Quantize`
//! (scale = 448 / max|w| per block, 1 for an all-zero block;
//! codes = clamp(w · scale, ±448) rounded to nearest even;
//! scale_inv = 1 / scale), bit for bit (tests/fixtures/fp8, from torch).

use candle_core::{DType, Device, Tensor};
use float8::F8E4M3;

/// The largest finite float8_e4m3fn.
pub const FP8_MAX: f32 = 448.0;

/// Block size when quantizing a dense base (`quantize = "fp8"`): Qwen3's
/// and DeepSeek-V3's.
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// The float8_e4m3fn byte of `x` after clamping to ±448 (NaN stays NaN).
pub fn code(x: f32) -> u8 {
    F8E4M3::from_f32(x.clamp(-FP8_MAX, FP8_MAX)).to_bits()
}

/// Bits a weight takes: one byte plus its share of the block's f32 scale.
pub fn bits_per_weight(block: [usize; 2]) -> f64 {
    8.0 + 32.0 / (block[0] * block[1]).max(1) as f64
}

/// Blocks along each side of an [out, in] weight.
pub fn block_grid(out: usize, inp: usize, block: [usize; 2]) -> [usize; 2] {
    [out.div_ceil(block[0]), inp.div_ceil(block[1])]
}

#[derive(Clone, Debug)]
pub struct Fp8Weight {
    /// [out, in], `F8E4M3`.
    pub codes: Tensor,
    /// [ceil(out / block[0]), ceil(in / block[1])], f32.
    pub scale_inv: Tensor,
    pub block: [usize; 2],
}

impl Fp8Weight {
    /// Checks that the codes and scales fit each other and `block`.
    pub fn from_parts(
        codes: Tensor,
        scale_inv: Tensor,
        block: [usize; 2],
    ) -> candle_core::Result<Self> {
        let (out, inp) = codes.dims2()?;
        let grid = block_grid(out, inp, block);
        if codes.dtype() != DType::F8E4M3 || scale_inv.dims() != grid || block.contains(&0) {
            candle_core::bail!(
                "an FP8 weight {:?} ({:?}) with blocks {block:?} needs {grid:?} f32 scales, found {:?}",
                codes.dims(),
                codes.dtype(),
                scale_inv.dims()
            );
        }
        Ok(Fp8Weight {
            codes,
            scale_inv: scale_inv.to_dtype(DType::F32)?,
            block,
        })
    }

    /// Codes and scales of `dense` [out, in], on `device`.
    pub fn quantize(
        dense: &Tensor,
        block: [usize; 2],
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (out, inp) = dense.dims2()?;
        let [rows, cols] = block_grid(out, inp, block);
        let w = dense
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut codes = vec![F8E4M3::from_bits(0); out * inp];
        let mut scale_inv = vec![1f32; rows * cols];
        for br in 0..rows {
            for bc in 0..cols {
                let (r0, r1) = (br * block[0], ((br + 1) * block[0]).min(out));
                let (c0, c1) = (bc * block[1], ((bc + 1) * block[1]).min(inp));
                let max_abs = (r0..r1)
                    .flat_map(|r| w[r * inp + c0..r * inp + c1].iter())
                    .fold(0f32, |m, v| m.max(v.abs()));
                // torch evaluates `448 / t` as reciprocal(t) · 448: two
                // roundings, kept so that the scales are its own.
                let scale = if max_abs > 0.0 {
                    (1.0 / max_abs) * FP8_MAX
                } else {
                    1.0
                };
                scale_inv[br * cols + bc] = 1.0 / scale;
                for r in r0..r1 {
                    for c in c0..c1 {
                        codes[r * inp + c] = F8E4M3::from_bits(code(w[r * inp + c] * scale));
                    }
                }
            }
        }
        Ok(Fp8Weight {
            codes: Tensor::from_vec(codes, (out, inp), &Device::Cpu)?.to_device(device)?,
            scale_inv: Tensor::from_vec(scale_inv, (rows, cols), &Device::Cpu)?
                .to_device(device)?,
            block,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        let d = self.codes.dims();
        (d[0], d[1])
    }

    /// codes · scale_inv in f32 (each scale over its block), cast to `dtype`.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let (out, inp) = self.dims();
        let (rows, cols) = self.scale_inv.dims2()?;
        let [bm, bn] = self.block;
        let scale = self
            .scale_inv
            .reshape((rows, 1, cols, 1))?
            .broadcast_as((rows, bm, cols, bn))?
            .reshape((rows * bm, cols * bn))?
            .narrow(0, 0, out)?
            .narrow(1, 0, inp)?;
        (self.codes.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)
    }

    /// Bytes held: the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.scale_inv.elem_count()
    }

    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Fp8Weight {
            codes: self.codes.to_device(device)?,
            scale_inv: self.scale_inv.to_device(device)?,
            block: self.block,
        })
    }
}
