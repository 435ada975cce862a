//! The numbers of the CPU kernels: the one numeric trait ([`Float`]), the
//! one dtype dispatch ([`per_float_dtype!`]) and a vectorising e^x.

use candle_core::WithDType;

/// The one per-dtype dispatch of the CPU kernels.
///
/// `per_float_dtype!(op, dtype, |T, A| body)`: every float dtype; `body` (a
/// `Vec<T>`) is evaluated with `T` bound to the element type of `dtype` and
/// `A` to its [`Float`] accumulator (f32 for f32/f16/bf16, f64 for f64), and
/// wrapped in the matching `CpuStorage`; other dtypes are an error naming `op`.
///
/// `per_float_dtype!(dtype, |T| body, other => fallback)`: the kernels that
/// compute in their data's own type, f32 and f64; `body` is evaluated with
/// `T` bound to it, `fallback` for any other dtype (bound to `other`).
macro_rules! per_float_dtype {
    ($op:expr, $dtype:expr, |$t:ident, $a:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                #[allow(dead_code)]
                type $a = f32;
                candle_core::CpuStorage::F32($body)
            }
            candle_core::DType::F64 => {
                type $t = f64;
                #[allow(dead_code)]
                type $a = f64;
                candle_core::CpuStorage::F64($body)
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                #[allow(dead_code)]
                type $a = f32;
                candle_core::CpuStorage::F16($body)
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                #[allow(dead_code)]
                type $a = f32;
                candle_core::CpuStorage::BF16($body)
            }
            dt => candle_core::bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
    ($dtype:expr, |$t:ident| $body:expr, $other:pat => $fallback:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            $other => $fallback,
        }
    };
}
pub(crate) use per_float_dtype;

/// The arithmetic of every CPU kernel: f32 and f64. The fused kernels
/// compute in their data's type; the `ops` kernels accumulate f16 and bf16
/// data in f32 (see [`per_float_dtype!`]), so an f64 model stays exact
/// enough for finite-difference checks.
pub trait Float:
    num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + WithDType + Send + Sync + 'static
{
    fn of_f32(v: f32) -> Self;
    /// e^self: [`exp_f32`] for f32, libm's for f64.
    fn exp_fast(self) -> Self;
    /// An element of any dtype in this type.
    #[inline(always)]
    fn of<T: WithDType>(v: T) -> Self {
        <Self as WithDType>::from_f64(v.to_f64())
    }
    /// This value as an element of any dtype.
    #[inline(always)]
    fn to<T: WithDType>(self) -> T {
        T::from_f64(WithDType::to_f64(self))
    }
}
impl Float for f32 {
    fn of_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}
impl Float for f64 {
    fn of_f32(v: f32) -> Self {
        v as f64
    }
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// e^x in f32 to within 2 ulp of the exact value (a test sweeps the whole
/// range), without a call or a branch, so that the loops of softmax and
/// SwiGLU around it vectorise: libm's expf, one call per element, was 5% of
/// an SFT step. Cephes' method: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by a
/// degree-7 polynomial, 2^n put in the exponent bits. Below −87.33 it gives
/// 0 (e^x would be subnormal), above 88.37 +inf, and NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer (the low bits of
    // the sum are that integer).
    const ROUND: f32 = 12_582_912.0;
    const LOW: f32 = -87.33;
    const HIGH: f32 = 88.37;
    let xc = x.clamp(LOW, HIGH);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n is in [-126, 128): 2^n as a normal f32.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    let y = two_n * e;
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// Distance in units in the last place between two finite f32 of one sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value_over_its_range() {
        let mut worst = (0, 0.0f32);
        let (lo, hi) = (-87.33f32, 88.36f32);
        let steps = 400_000;
        for i in 0..=steps {
            let x = lo + (hi - lo) * i as f32 / steps as f32;
            let exact = (x as f64).exp() as f32;
            let u = ulps(exp_f32(x), exact);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        // Where the reduction changes n (x near k·ln 2 ± ln 2 / 2) and near 0.
        for k in -125..=127 {
            for d in [-0.5f64, -1e-7, 0.0, 1e-7, 0.5] {
                let x = ((k as f64 + d) * std::f64::consts::LN_2) as f32;
                if (lo..=hi).contains(&x) {
                    let exact = (x as f64).exp() as f32;
                    assert!(ulps(exp_f32(x), exact) <= 2, "x = {x}");
                }
            }
        }
    }

    #[test]
    fn exp_f32_edges() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(1e-30), 1.0);
        assert_eq!(exp_f32(-1e-30), 1.0);
        // Below the normal range: 0 where e^x is subnormal (< 1.2e-38).
        assert_eq!(exp_f32(-87.34), 0.0);
        assert_eq!(exp_f32(-1e30), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(-87.33) > 0.0 && exp_f32(-87.33) < 1.3e-38);
        assert_eq!(exp_f32(88.38), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(88.37).is_finite());
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
