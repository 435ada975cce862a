//! The output head and the token log-probs on any device (the GPU, half
//! precision) without a [tokens, vocab] tensor kept for backward.
//!
//! log p(tok | x) = z_tok − logsumexp(z) with z = head(x) depends on its row
//! x [hidden] alone, so its gradient by x is one [hidden] vector a row:
//! J = (onehot(tok) − softmax(z)) · dz/dx, and for z = x·Wᵀ (soft-capped or
//! not) dz/dx is W scaled per vocabulary entry. The forward pass computes
//! the logits a chunk of rows at a time, and with them J, and keeps J
//! [tokens, hidden] instead of the logits [tokens, vocab] (1.2 GB at 2048
//! tokens of a 151936-entry vocabulary in f32; J is 7 MB). Backward is
//! grad · J: no second head product, which checkpointing's recomputed
//! chunks (`recompute::recomputed_rows`) pay. The head's weight is frozen
//! here, as everywhere in this program.

use candle_core::{CustomOp1, DType, Tensor, D};

use crate::model::kernels::recompute::{precomputed_forward, Precomputed};

/// Bytes one f32 [rows, vocab] tensor of a chunk may take. A chunk's
/// forward has up to three alive at once (logits, their exp, the
/// probabilities or their gradient), so this bounds the head's transient
/// at 192 MiB whatever the vocabulary: 96 rows for Qwen's 151936 entries,
/// where 256 rows took 467 MB, and 64 for Gemma 3's 262144 (0.8 GB at 256).
pub const CHUNK_BYTES: usize = 64 << 20;

/// Rows a chunk takes for a `vocab`-entry head: as many as fit
/// `CHUNK_BYTES` in f32, a multiple of 16 from 16 to 256
/// (`LORA_RUNNER_HEAD_CHUNK_ROWS=N` overrides it, for measurements).
pub fn chunk_rows(vocab: usize) -> usize {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let from_env = *ROWS.get_or_init(|| {
        std::env::var("LORA_RUNNER_HEAD_CHUNK_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
    });
    from_env.unwrap_or_else(|| budget_rows(vocab))
}

/// `chunk_rows` without the override: what the memory estimate counts.
pub fn budget_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / (4 * vocab.max(1))).clamp(16, 256) / 16 * 16
}

/// The logits of rows [n, hidden], in f32 (f64 for an f64 model), before
/// any soft-cap: the head's product as the model computes it.
pub type HeadProduct<'a> = &'a dyn Fn(&Tensor) -> candle_core::Result<Tensor>;

/// log_softmax(cap(product(rows)))[targets] ([N], the product's dtype) for
/// rows [N, hidden], computed `chunk` rows at a time; `cap` is cap·tanh(z /
/// cap) when Some. Differentiable by `rows` (see the module doc).
pub fn head_token_logprobs(
    rows: &Tensor,
    weight: &Tensor,
    product: HeadProduct,
    softcap: Option<f64>,
    targets: &[u32],
    chunk: usize,
) -> candle_core::Result<Tensor> {
    let n = rows.dim(0)?;
    if targets.len() != n {
        candle_core::bail!("head log-probs: {n} rows but {} targets", targets.len());
    }
    let track = rows.track_op();
    let detached = rows.detach();
    let (mut logprobs, mut jacobian) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(n - start);
        let x = detached.narrow(0, start, len)?;
        let raw = product(&x)?;
        let z = match softcap {
            Some(cap) => ((raw / cap)?.tanh()? * cap)?,
            None => raw,
        };
        let out_dtype = z.dtype();
        let idx = Tensor::from_vec(
            targets[start..start + len].to_vec(),
            (len, 1),
            rows.device(),
        )?;
        let lse = z.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
        logprobs.push(z.gather(&idx, 1)?.broadcast_sub(&lse)?.squeeze(1)?);
        if track {
            // d logp / dz = onehot − p; through the cap, dz/du = 1 − (z/cap)².
            // Each [rows, vocab] tensor is dropped once the next is made:
            // two are alive at a time.
            let slope = match softcap {
                Some(cap) => Some((1.0 - (&z / cap)?.sqr()?)?),
                None => None,
            };
            let p = z.broadcast_sub(&lse)?.exp()?;
            drop(z);
            let ones = Tensor::ones((len, 1), p.dtype(), p.device())?;
            let minus_p = p.neg()?;
            drop(p);
            let mut dz = minus_p.scatter_add(&idx, &ones, 1)?;
            drop(minus_p);
            if let Some(slope) = slope {
                dz = (dz * slope)?;
            }
            // As autograd would: the gradient enters the head's product in
            // the weight's dtype.
            let j = dz.to_dtype(weight.dtype())?.matmul(weight)?;
            jacobian.push(j.to_dtype(out_dtype)?);
        }
    }
    let logprobs = match logprobs.len() {
        0 => Tensor::zeros(0, DType::F32, rows.device())?,
        _ => Tensor::cat(&logprobs, 0)?,
    };
    if !track {
        return Ok(logprobs);
    }
    rows.apply_op1(HeadLogprobs {
        jacobian: Tensor::cat(&jacobian, 0)?,
        output: Precomputed::new(logprobs)?,
    })
}

struct HeadLogprobs {
    /// d logp_i / d row_i, [N, hidden].
    jacobian: Tensor,
    output: Precomputed,
}

impl CustomOp1 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "head-token-logprobs"
    }

    precomputed_forward!(1);

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res
            .detach()
            .to_dtype(self.jacobian.dtype())?
            .unsqueeze(1)?;
        let grad = self.jacobian.broadcast_mul(&g)?.to_dtype(arg.dtype())?;
        Ok(Some(grad))
    }
}
