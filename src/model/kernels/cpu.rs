//! What the fused CPU ops (`ops`, `fused_attention`, `fused_linear`) share
//! besides their numbers (`float`): whether they run on a device, access to
//! a tensor's CPU storage, the threads one op may use, and
//! matrix products on slices through the `gemm` crate (the kernel candle's
//! own CPU matmul uses) with strides, an optional accumulate, and the
//! choice of threads left to the caller.

use candle_core::{bail, CpuStorage, Layout, Storage, Tensor, WithDType};

use crate::model::kernels::float::Float;

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
