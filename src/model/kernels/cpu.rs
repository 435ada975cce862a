//! What the fused CPU ops (`ops`, `fused_attention`, `fused_linear`) share:
//! whether they run on a device, the element types they support, access to
//! a tensor's CPU storage, and
//! matrix products on slices through the `gemm` crate (the kernel candle's
//! own CPU matmul uses) with strides, an optional accumulate, and the
//! choice of threads left to the caller.

use candle_core::{bail, CpuStorage, Layout, Storage, Tensor, WithDType};

/// Whether the fused CPU kernels (`ops`, `fused_attention`, `fused_linear`) run on
/// `device`: on the CPU, unless `LORA_RUNNER_GENERIC_OPS=1` asks for the
/// compositions of candle ops a GPU runs, so that path can be measured and
/// tested on a CPU.
pub fn fused_kernels(device: &candle_core::Device) -> bool {
    static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let generic = *GENERIC.get_or_init(|| {
        std::env::var("LORA_RUNNER_GENERIC_OPS").is_ok_and(|v| !v.is_empty() && v != "0")
    });
    device.is_cpu() && !generic
}

/// Whether the fused kernels that compute in the data's own type (the
/// attention, the LoRA projection, the token log-probs: f32 and f64 only)
/// run for `dtype` on `device`; elsewhere their compositions do.
pub fn fused_for(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    fused_kernels(device) && matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64)
}

/// A contiguous tensor's elements in CPU storage; `op` and `what` name it
/// in the error.
pub fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&T::cpu_storage_as_slice(s)?[start..end]),
        None => bail!("{op}: {what} must be contiguous"),
    }
}

/// Runs `f` on the CPU storage and layout of each tensor, read-locked while
/// it runs (inside a custom op's backward, whose inputs are tensors).
pub fn with_cpu<R>(
    op: &str,
    tensors: &[&Tensor],
    f: impl FnOnce(&[(&CpuStorage, &Layout)]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut cpu = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(s) = &**storage else {
            bail!("{op}: a tensor is not on the CPU")
        };
        cpu.push((s, *layout));
    }
    f(&cpu)
}

/// Element types with a kernel here.
pub trait Float:
    num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + WithDType + Send + Sync + 'static
{
    fn of_f32(v: f32) -> Self;
    /// e^self: [`exp_f32`] for f32, libm's for f64.
    fn exp_fast(self) -> Self;
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

/// A matrix view for `gemm`: a slice with row and column strides.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with `cols` columns starting at `data`.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [T], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// Whether a (rows, cols) matrix at these strides lies inside the slice.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// How `gemm` may split one product over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// On the calling thread: the caller already runs products in parallel.
    One,
    /// Over as many threads as this thread may use ([`threads_here`]).
    Pool,
}

thread_local! {
    /// Set by [`with_threads`] on a thread that runs one of several shards.
    static THREADS_HERE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Threads the fused kernels may spread one op over when called from this
/// thread: its share under [`with_threads`], else the pool's size
/// (RAYON_NUM_THREADS, as candle's matmul reads it).
pub fn threads_here() -> usize {
    THREADS_HERE
        .with(std::cell::Cell::get)
        .unwrap_or_else(candle_core::utils::get_num_threads)
        .max(1)
}

/// Runs `f` with the fused kernels limited to `n` threads on this thread.
/// With 1 they run on it alone (no rayon pool): a training step's shards
/// on their own threads then share the cores without waking a pool.
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREADS_HERE.with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(THREADS_HERE.with(|t| t.replace(Some(n.max(1)))));
    f()
}

/// dst[m, n] (row-major) = scale · lhs[m, k] · rhs[k, n], or += when
/// `accumulate`. Panics if a view or dst is too short for its shape.
pub fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    (lhs, rhs): (Mat<T>, Mat<T>),
    scale: T,
    threads: Threads,
) {
    assert!(dst.len() >= m * n, "gemm: destination too short");
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "gemm: operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::Pool => match threads_here() {
            0 | 1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        },
    };
    // SAFETY: every element the product reads lies inside its slice
    // (`covers`), and dst holds m * n elements at row stride n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        )
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
