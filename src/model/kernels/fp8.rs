//! FP8 projection weights in transformers' fine-grained layout (Qwen3's and
//! DeepSeek's official FP8 checkpoints): float8_e4m3fn codes [out, in] and
//! one f32 `weight_scale_inv` per block of `block[0]` rows × `block[1]`
//! columns (the last blocks may be partial), W = codes · scale_inv.
//! float8_e5m2 codes (`fmt = "e5m2"`) are read too.
//!
//! The codes stay in memory as they are (one byte a weight: candle's
//! `F8E4M3`, or for e5m2, which candle 0.11 has no dtype for, the raw bytes
//! as `U8`); each product dequantises its projection (as the quantized
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

/// The 8-bit float a checkpoint's codes are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no infinities,
    /// largest finite 448. Every FP8 checkpoint published so far.
    E4M3,
    /// float8_e5m2: f16's upper byte (5 exponent bits, 2 mantissa bits,
    /// infinities and NaNs as in IEEE), largest finite 57344.
    E5M2,
}

impl Fp8Format {
    /// From `quantization_config.fmt`.
    pub fn parse(fmt: &str) -> Option<Self> {
        match fmt {
            "e4m3" => Some(Fp8Format::E4M3),
            "e5m2" => Some(Fp8Format::E5M2),
            _ => None,
        }
    }

    /// As `quantization_config.fmt` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        }
    }

    /// As torch names the dtype.
    pub fn torch_name(self) -> &'static str {
        match self {
            Fp8Format::E4M3 => "float8_e4m3fn",
            Fp8Format::E5M2 => "float8_e5m2",
        }
    }

    /// The candle dtype the codes are held in.
    pub fn held_dtype(self) -> DType {
        match self {
            Fp8Format::E4M3 => DType::F8E4M3,
            Fp8Format::E5M2 => DType::U8,
        }
    }

    /// The safetensors dtype the codes are stored as.
    pub fn stored_dtype(self) -> safetensors::Dtype {
        match self {
            Fp8Format::E4M3 => safetensors::Dtype::F8_E4M3,
            Fp8Format::E5M2 => safetensors::Dtype::F8_E5M2,
        }
    }
}

/// How an FP8 checkpoint stores its projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fp8Scheme {
    pub format: Fp8Format,
    /// Rows × columns of weights sharing one scale.
    pub block: [usize; 2],
}

/// The value of a float8_e5m2 byte: it is the upper byte of an IEEE f16,
/// so the f16 with these bits, exactly (subnormals, ±inf and NaN included).
pub fn e5m2_value(code: u8) -> f32 {
    half::f16::from_bits(u16::from(code) << 8).to_f32()
}

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
    /// [out, in], in `format.held_dtype()`.
    pub codes: Tensor,
    pub format: Fp8Format,
    /// [ceil(out / block[0]), ceil(in / block[1])], f32.
    pub scale_inv: Tensor,
    pub block: [usize; 2],
}

impl Fp8Weight {
    /// Checks that the codes and scales fit each other and `scheme`.
    pub fn from_parts(
        codes: Tensor,
        scale_inv: Tensor,
        scheme: Fp8Scheme,
    ) -> candle_core::Result<Self> {
        let Fp8Scheme { format, block } = scheme;
        let (out, inp) = codes.dims2()?;
        let grid = block_grid(out, inp, block);
        if codes.dtype() != format.held_dtype() || scale_inv.dims() != grid || block.contains(&0) {
            candle_core::bail!(
                "an FP8 {} weight {:?} ({:?}) with blocks {block:?} needs {grid:?} f32 scales, found {:?}",
                format.name(),
                codes.dims(),
                codes.dtype(),
                scale_inv.dims()
            );
        }
        Ok(Fp8Weight {
            codes,
            format,
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
            format: Fp8Format::E4M3,
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
        (self.values()? * scale)?.to_dtype(dtype)
    }

    /// The codes' values in f32, unscaled.
    fn values(&self) -> candle_core::Result<Tensor> {
        match self.format {
            Fp8Format::E4M3 => self.codes.to_dtype(DType::F32),
            // A 256-entry table indexed by the bytes: index_select takes
            // u8 ids on every device.
            Fp8Format::E5M2 => {
                let table: Vec<f32> = (0..=255u8).map(e5m2_value).collect();
                let table = Tensor::from_vec(table, 256, self.codes.device())?;
                table
                    .index_select(&self.codes.flatten_all()?, 0)?
                    .reshape(self.codes.shape())
            }
        }
    }

    /// Bytes held: the codes and the scales.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * self.scale_inv.elem_count()
    }

    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Fp8Weight {
            codes: self.codes.to_device(device)?,
            format: self.format,
            scale_inv: self.scale_inv.to_device(device)?,
            block: self.block,
        })
    }
}
