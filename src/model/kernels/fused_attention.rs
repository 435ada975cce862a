//! Attention (scores, masked softmax, weighted values) as one CPU op with
//! its own backward, in the manner of FlashAttention.
//!
//! The composition `softmax(QKᵀ + mask)·V` keeps the scores and the
//! probabilities, [B, heads, t, T] each, until backward: at 2048 tokens that
//! is most of a training step's memory, and writing and reading them is much
//! of its time. This op keeps only its output. Backward recomputes each
//! block's probabilities from Q and K, and both passes skip the keys no
//! query of a block can see (the causal upper triangle, trailing padding,
//! the other sequences of a packed row).
//!
//! Work is split by (row, KV head): each unit is computed by one thread in a
//! fixed order, so results do not depend on the thread count. Block products
//! go through the `gemm` crate (candle's own CPU matmul kernel) without
//! threads of their own. f32 and f64 only; other dtypes and other devices
//! take the composition (`attention_slow`), which the tests use as the
//! reference.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

use crate::model::kernels::cpu::{self, fused_for, matmul, Mat, Threads};
use crate::model::kernels::float::{per_float_dtype, Float};
use crate::model::kernels::ops::masked_softmax;
use crate::model::kernels::tiled_attention::tiled_attention;

/// Query rows per block: the transient scores of a block are
/// `QUERY_BLOCK × visible keys`, a few hundred KiB at 4096 keys.
const QUERY_BLOCK: usize = 64;

/// An additive mask entry at or below this hides its key (the model's mask
/// uses -1e30; 0 allows).
const HIDDEN_BELOW: f32 = -1e29;

/// Shapes of one call: `rows` query rows per (batch, KV head) unit, made of
/// `rep` query heads of `tq` tokens each; `keys` keys; `hd` head dim.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    kv_heads: usize,
    rep: usize,
    tq: usize,
    keys: usize,
    hd: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.rep * self.tq
    }
}

/// The value that hides a key in the model's masks: finite, so a row that
/// sees no key (padding) never produces NaN.
pub const HIDDEN: f32 = -1e30;

/// An additive attention mask [B, t, T] (f32: 0 shows a key, -1e30 hides
/// it) shared by all heads and layers, with each row's visible keys (see
/// `visible_keys`), found once per forward pass rather than in every layer.
///
/// Where every row sees exactly one span of keys (causal, windowed, packed
/// or left-padded rows: the model's masks), only the spans are kept: the
/// CPU's fused kernel reads them, and on other devices each attention tile
/// builds its part of the mask from two u32 a row. The dense mask would
/// take 4·t² bytes (256 MiB at 8192 tokens, 4 GiB at 32768). A mask with a
/// hole keeps its values.
#[derive(Clone, Debug)]
pub struct AttentionMask {
    values: MaskValues,
    dims: (usize, usize, usize),
    visible: Arc<[Range<usize>]>,
}

#[derive(Clone, Debug)]
enum MaskValues {
    Dense(Tensor),
    /// Each row's visible keys (empty for a row that sees none), on the
    /// host for the CPU kernel and as first and one-past-last key, u32
    /// [B, t, 1] each, on the device for the tiles.
    /// `dense` holds the values too where tiles read them (not the fused
    /// CPU kernel) and they take at most `DENSE_KEPT_BYTES`: narrowing them
    /// is one pass, where building a tile's mask from the spans is five.
    Spans {
        host: Arc<[Range<usize>]>,
        starts: Tensor,
        ends: Tensor,
        dense: Option<Tensor>,
    },
}

/// The largest mask also kept dense for the tiles: 64 MiB, 4096 tokens in
/// one packed row. Measured on the GPU path at 2048 tokens of the 0.5B
/// shape, building every tile's mask from spans took 1.06× the step's time.
const DENSE_KEPT_BYTES: usize = 64 << 20;

impl AttentionMask {
    /// The mask of row-major `values` shaped (B, t, T), on `device`.
    pub fn from_vec(
        values: Vec<f32>,
        (b, t, keys): (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<Self> {
        if values.len() != b * t * keys {
            bail!(
                "attention mask: {} values for {:?}",
                values.len(),
                (b, t, keys)
            );
        }
        match exact_spans(&values, keys) {
            Some(spans) => Self::from_spans(&spans, (b, t, keys), device),
            None => Self::from_vec_dense(values, (b, t, keys), device),
        }
    }

    /// The mask in which row b·t + token sees exactly the keys
    /// `spans[b·t + token]` (none when empty) and hides the rest.
    pub fn from_spans(
        spans: &[Range<usize>],
        (b, t, keys): (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<Self> {
        if spans.len() != b * t {
            bail!(
                "attention mask: {} rows of spans for {:?}",
                spans.len(),
                (b, t, keys)
            );
        }
        if let Some(bad) = spans.iter().find(|s| s.start > s.end || s.end > keys) {
            bail!("attention mask: span {bad:?} is outside {keys} keys");
        }
        let column = |end: bool| {
            let v: Vec<u32> = spans
                .iter()
                .map(|s| if end { s.end } else { s.start } as u32)
                .collect();
            Tensor::from_vec(v, (b, t, 1), device)
        };
        let visible = spans
            .iter()
            .map(|s| if s.is_empty() { 0..keys } else { s.clone() })
            .collect();
        let mut mask = AttentionMask {
            values: MaskValues::Spans {
                host: spans.into(),
                starts: column(false)?,
                ends: column(true)?,
                dense: None,
            },
            dims: (b, t, keys),
            visible,
        };
        if !cpu::fused_kernels(device) && b * t * keys * 4 <= DENSE_KEPT_BYTES {
            let values = mask.dense()?;
            if let MaskValues::Spans { dense, .. } = &mut mask.values {
                *dense = Some(values);
            }
        }
        Ok(mask)
    }

    /// The mask of `values` kept as they are, even where spans would do
    /// (for comparisons).
    pub fn from_vec_dense(
        values: Vec<f32>,
        (b, t, keys): (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(AttentionMask {
            visible: visible_keys(&values, keys).into(),
            values: MaskValues::Dense(Tensor::from_vec(values, (b, t, keys), device)?),
            dims: (b, t, keys),
        })
    }

    /// (B, t, T): rows, query tokens, keys.
    pub fn dims(&self) -> (usize, usize, usize) {
        self.dims
    }

    pub fn device(&self) -> &Device {
        match &self.values {
            MaskValues::Dense(m) => m.device(),
            MaskValues::Spans { starts, .. } => starts.device(),
        }
    }

    /// Whether only the spans are kept (no [B, t, T] tensor).
    pub fn is_spans(&self) -> bool {
        matches!(self.values, MaskValues::Spans { .. })
    }

    /// The mask as a tensor [B, t, T] (f32), built from the spans when
    /// only they are kept.
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        let (_, t, keys) = self.dims;
        self.tile(0..t, 0..keys)
    }

    /// The mask of query tokens `tokens` over keys `keys`, [B, tokens, keys].
    pub fn tile(&self, tokens: Range<usize>, keys: Range<usize>) -> candle_core::Result<Tensor> {
        match &self.values {
            MaskValues::Dense(m) | MaskValues::Spans { dense: Some(m), .. } => m
                .narrow(1, tokens.start, tokens.len())?
                .narrow(2, keys.start, keys.len()),
            MaskValues::Spans { starts, ends, .. } => {
                let (b, len, nk) = (self.dims.0, tokens.len(), keys.len());
                let (starts, ends) = (
                    starts.narrow(1, tokens.start, len)?,
                    ends.narrow(1, tokens.start, len)?,
                );
                let key = Tensor::arange(keys.start as u32, keys.end as u32, starts.device())?
                    .reshape((1, 1, nk))?;
                let seen = key
                    .broadcast_ge(&starts)?
                    .mul(&key.broadcast_lt(&ends)?)?
                    .to_dtype(DType::F32)?;
                // 1 → 0 and 0 → HIDDEN, exactly (1e30 − 1e30 is 0 in f32).
                seen.affine(-f64::from(HIDDEN), f64::from(HIDDEN))?
                    .reshape((b, len, nk))
            }
        }
    }

    /// Each mask row's visible keys (row b·t + token), see `visible_keys`.
    pub fn visible(&self) -> &[Range<usize>] {
        &self.visible
    }

    /// The mask of the query tokens `rows` only ([B, rows.len(), T]): what
    /// attention needs when only some positions' outputs are wanted. `idx`
    /// holds the same rows as a u32 tensor.
    pub fn select_queries(&self, rows: &[usize], idx: &Tensor) -> candle_core::Result<Self> {
        let (b, t, keys) = self.dims;
        if let Some(&bad) = rows.iter().find(|&&r| r >= t) {
            bail!("query row {bad} is outside a mask of {t} queries");
        }
        let pick = |of: &[Range<usize>]| -> Arc<[Range<usize>]> {
            (0..b)
                .flat_map(|batch| rows.iter().map(move |&r| of[batch * t + r].clone()))
                .collect()
        };
        let visible = pick(&self.visible);
        let values = match &self.values {
            MaskValues::Dense(m) => MaskValues::Dense(m.index_select(idx, 1)?),
            MaskValues::Spans {
                host,
                starts,
                ends,
                dense,
            } => MaskValues::Spans {
                host: pick(host),
                starts: starts.index_select(idx, 1)?,
                ends: ends.index_select(idx, 1)?,
                dense: dense.as_ref().map(|m| m.index_select(idx, 1)).transpose()?,
            },
        };
        Ok(AttentionMask {
            values,
            dims: (b, rows.len(), keys),
            visible,
        })
    }
}

/// Each row's visible keys when every row shows exactly one span (0) and
/// hides the rest (`HIDDEN`), as the model's masks do; None otherwise (a
/// row with a hole, or other values), which keeps the dense values.
fn exact_spans(mask: &[f32], keys: usize) -> Option<Vec<Range<usize>>> {
    if keys == 0 {
        return None;
    }
    mask.chunks_exact(keys)
        .map(|row| {
            let first = row.iter().position(|&m| m == 0.0).unwrap_or(0);
            let end = row.iter().rposition(|&m| m == 0.0).map_or(0, |l| l + 1);
            let exact = row.iter().enumerate().all(|(j, &m)| {
                let shown = j >= first && j < end;
                m.to_bits() == if shown { 0f32 } else { HIDDEN }.to_bits()
            });
            exact.then_some(first..end.max(first))
        })
        .collect()
}

/// The attention op; the mask rides along as a constant, since it gets no
/// gradient.
struct FusedAttention {
    mask: AttentionMask,
}

/// For each mask row, the keys from its first to its last visible one
/// (keys outside add exactly 0 to the softmax), or all keys when it sees
/// none: the composition then spreads such a row evenly over every key, and
/// so does this op. Causal rows end at their diagonal; rows of a packed
/// sequence also start at their segment.
fn visible_keys(mask: &[f32], keys: usize) -> Vec<Range<usize>> {
    mask.chunks_exact(keys)
        .map(|row| {
            let visible = |m: &f32| *m > HIDDEN_BELOW;
            match (row.iter().position(visible), row.iter().rposition(visible)) {
                (Some(first), Some(last)) => first..last + 1,
                _ => 0..keys,
            }
        })
        .collect()
}

/// One block of query rows: rows `first..first + len` of the unit (all of
/// one query head), which use mask rows `token..token + len` and see at
/// most the `keys` keys from `key0`.
struct Block {
    first: usize,
    token: usize,
    len: usize,
    key0: usize,
    keys: usize,
}

/// The keys any of `rows` sees: from the first row's earliest visible key to
/// the latest (0..0 for no rows). Blocks of queries, fused or tiled, compute
/// only these.
pub fn key_span<'a>(rows: impl IntoIterator<Item = &'a Range<usize>>) -> Range<usize> {
    let (lo, hi) = rows.into_iter().fold((usize::MAX, 0), |(lo, hi), r| {
        (lo.min(r.start), hi.max(r.end))
    });
    lo.min(hi)..hi
}

fn blocks(d: Dims, visible: &[Range<usize>]) -> Vec<Block> {
    let mut out = Vec::new();
    for head in 0..d.rep {
        for token in (0..d.tq).step_by(QUERY_BLOCK) {
            let len = QUERY_BLOCK.min(d.tq - token);
            let span = key_span(&visible[token..token + len]);
            out.push(Block {
                first: head * d.tq + token,
                token,
                len,
                key0: span.start,
                keys: span.len(),
            });
        }
    }
    out
}

/// One batch row's mask as the CPU kernel reads it: the values [t, T], or
/// each token's span of visible keys (empty when it sees none).
#[derive(Clone, Copy)]
enum HostMask<'a> {
    Values(&'a [f32]),
    Spans(&'a [Range<usize>]),
}

impl<'a> HostMask<'a> {
    /// Batch row `b`'s part, of `tq` tokens over `keys` keys.
    fn of_row(self, b: usize, tq: usize, keys: usize) -> Self {
        match self {
            HostMask::Values(m) => HostMask::Values(&m[b * tq * keys..][..tq * keys]),
            HostMask::Spans(s) => HostMask::Spans(&s[b * tq..][..tq]),
        }
    }
}

/// probs[len, keys] = softmax(q_block · k[key0..key0 + keys]ᵀ + mask) row
/// by row, with the same arithmetic as the model's masked softmax.
fn block_probs<T: Float>(d: Dims, blk: &Block, q: &[T], k: &[T], mask: HostMask, probs: &mut [T]) {
    let (len, nk, hd) = (blk.len, blk.keys, d.hd);
    let probs = &mut probs[..len * nk];
    matmul(
        (len, nk, hd),
        probs,
        false,
        (
            Mat::rows(&q[blk.first * hd..], hd),
            Mat::transposed(&k[blk.key0 * hd..], hd),
        ),
        T::one(),
        Threads::One,
    );
    for (i, row) in probs.chunks_exact_mut(nk).enumerate() {
        let token = blk.token + i;
        match mask {
            HostMask::Values(m) => {
                let m = &m[token * d.keys + blk.key0..][..nk];
                for (s, &mv) in row.iter_mut().zip(m) {
                    *s += T::of_f32(mv);
                }
                let max = row_max(row);
                // A hidden key's exp underflows to exactly 0 when the row
                // sees some key: skip it. A row that sees none spreads
                // evenly, as the composition does.
                let sees_none = max <= T::of_f32(HIDDEN_BELOW);
                for (s, &mv) in row.iter_mut().zip(m) {
                    *s = if sees_none || mv > HIDDEN_BELOW {
                        (*s - max).exp_fast()
                    } else {
                        T::zero()
                    };
                }
            }
            HostMask::Spans(spans) => {
                let clip = |j: usize| j.clamp(blk.key0, blk.key0 + nk) - blk.key0;
                let span = &spans[token];
                // Clipping keeps start <= end (`from_spans` checks it).
                let shown = clip(span.start)..clip(span.end);
                if shown.is_empty() {
                    // Sees none: every key hidden alike, as the values say.
                    for s in row.iter_mut() {
                        *s += T::of_f32(HIDDEN);
                    }
                    let max = row_max(row);
                    for s in row.iter_mut() {
                        *s = (*s - max).exp_fast();
                    }
                } else {
                    // The hidden keys' exp is exactly 0 and they do not
                    // change the max: the values' arithmetic, bit for bit,
                    // over the shown keys only.
                    let (before, rest) = row.split_at_mut(shown.start);
                    let (seen, after) = rest.split_at_mut(shown.len());
                    let max = row_max(seen);
                    for s in seen.iter_mut() {
                        *s = (*s - max).exp_fast();
                    }
                    before.fill(T::zero());
                    after.fill(T::zero());
                }
            }
        }
        let inv = T::one() / row_sum(row);
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
}

/// Independent accumulators of the row reductions: one running max or sum
/// waits on each add's latency; eight let the loop vectorise.
const LANES: usize = 8;

/// The largest element (NaN elements are passed over, as `f32::max` does);
/// exact, whatever the order.
fn row_max<T: Float>(row: &[T]) -> T {
    let larger = |a: T, b: T| if b > a { b } else { a };
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = larger(*a, v);
        }
    }
    rest.iter()
        .fold(acc.into_iter().fold(T::neg_infinity(), larger), |m, &v| {
            larger(m, v)
        })
}

/// The sum, in eight interleaved partial sums added pairwise at the end.
fn row_sum<T: Float>(row: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    let total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    rest.iter().fold(total, |s, &v| s + v)
}

/// The fewest (batch, KV head) units rayon may hand one task: one where
/// this thread may use several threads; all of them where it may use one
/// (a shard of several on its own thread), so the loop never splits and
/// runs on the calling thread without waking the pool.
fn units_per_task() -> usize {
    if cpu::threads_here() > 1 {
        1
    } else {
        usize::MAX
    }
}

/// Output rows of one (batch, KV head) unit.
fn forward_unit<T: Float>(
    d: Dims,
    blocks: &[Block],
    (q, k, v): (&[T], &[T], &[T]),
    mask: HostMask,
    out: &mut [T],
) {
    let hd = d.hd;
    let mut probs = vec![T::zero(); QUERY_BLOCK * d.keys];
    for blk in blocks {
        block_probs(d, blk, q, k, mask, &mut probs);
        matmul(
            (blk.len, hd, blk.keys),
            &mut out[blk.first * hd..][..blk.len * hd],
            false,
            (
                Mat::rows(&probs, blk.keys),
                Mat::rows(&v[blk.key0 * hd..], hd),
            ),
            T::one(),
            Threads::One,
        );
    }
}

/// Gradients of one unit's q, k and v (`dk`, `dv` start at zero).
#[allow(clippy::too_many_arguments)]
fn backward_unit<T: Float>(
    d: Dims,
    blocks: &[Block],
    (q, k, v): (&[T], &[T], &[T]),
    (out, dout): (&[T], &[T]),
    mask: HostMask,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let hd = d.hd;
    let mut probs = vec![T::zero(); QUERY_BLOCK * d.keys];
    let mut dprobs = vec![T::zero(); QUERY_BLOCK * d.keys];
    for blk in blocks {
        let (len, nk) = (blk.len, blk.keys);
        let rows = blk.first * hd..(blk.first + len) * hd;
        let seen = blk.key0 * hd..(blk.key0 + nk) * hd;
        block_probs(d, blk, q, k, mask, &mut probs);
        let (p, dp) = (&probs[..len * nk], &mut dprobs[..len * nk]);
        // dV += Pᵀ · dO
        matmul(
            (nk, hd, len),
            &mut dv[seen.clone()],
            true,
            (Mat::transposed(p, nk), Mat::rows(&dout[rows.clone()], hd)),
            T::one(),
            Threads::One,
        );
        // dP = dO · Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)) in place.
        matmul(
            (len, nk, hd),
            dp,
            false,
            (
                Mat::rows(&dout[rows.clone()], hd),
                Mat::transposed(&v[seen.clone()], hd),
            ),
            T::one(),
            Threads::One,
        );
        for i in 0..len {
            let o = &out[rows.start + i * hd..][..hd];
            let g = &dout[rows.start + i * hd..][..hd];
            let delta = o.iter().zip(g).fold(T::zero(), |acc, (&a, &b)| acc + a * b);
            for (ds, &pv) in dp[i * nk..][..nk].iter_mut().zip(&p[i * nk..][..nk]) {
                *ds = pv * (*ds - delta);
            }
        }
        // dQ = dS · K ; dK += dSᵀ · Q
        matmul(
            (len, hd, nk),
            &mut dq[rows.clone()],
            false,
            (Mat::rows(dp, nk), Mat::rows(&k[seen.clone()], hd)),
            T::one(),
            Threads::One,
        );
        matmul(
            (nk, hd, len),
            &mut dk[seen],
            true,
            (Mat::transposed(dp, nk), Mat::rows(&q[rows], hd)),
            T::one(),
            Threads::One,
        );
    }
}

fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    cpu::slice(s, l, "fused-attention", what)
}

impl FusedAttention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> candle_core::Result<Dims> {
        let (b, g, r, hd) = q.shape().dims4()?;
        let (kb, kg, t, khd) = k.shape().dims4()?;
        let (mb, tq, mt) = self.mask.dims();
        let consistent = k.shape() == v.shape()
            && (kb, kg, khd) == (b, g, hd)
            && (mb, mt) == (b, t)
            && tq > 0
            && r % tq == 0;
        if !consistent {
            bail!(
                "fused-attention: q {:?}, k {:?}, v {:?} and mask {:?} do not fit",
                q.dims(),
                k.dims(),
                v.dims(),
                self.mask.dims()
            );
        }
        Ok(Dims {
            batch: b,
            kv_heads: g,
            rep: r / tq,
            tq,
            keys: t,
            hd,
        })
    }

    /// The mask as the kernel reads it, with each mask row's visible keys.
    fn with_mask<R>(
        &self,
        f: impl FnOnce(HostMask, &[Range<usize>]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match &self.mask.values {
            MaskValues::Spans { host, .. } => f(HostMask::Spans(host), &self.mask.visible),
            MaskValues::Dense(dense) => cpu::with_cpu("fused-attention", &[dense], |c| {
                f(
                    HostMask::Values(cpu_slice::<f32>(c[0].0, c[0].1, "the mask")?),
                    &self.mask.visible,
                )
            }),
        }
    }

    fn forward<T: Float>(&self, d: Dims, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<Vec<T>> {
        let (rows, hd, keys) = (d.rows(), d.hd, d.keys);
        let mut out = vec![T::zero(); d.batch * d.kv_heads * rows * hd];
        self.with_mask(|mask, visible| {
            out.par_chunks_mut(rows * hd)
                .enumerate()
                .with_min_len(units_per_task())
                .for_each(|(unit, out)| {
                    let b = unit / d.kv_heads;
                    let bl = blocks(d, &visible[b * d.tq..][..d.tq]);
                    let kv = unit * keys * hd..(unit + 1) * keys * hd;
                    forward_unit(
                        d,
                        &bl,
                        (&q[unit * rows * hd..][..rows * hd], &k[kv.clone()], &v[kv]),
                        mask.of_row(b, d.tq, keys),
                        out,
                    );
                });
            Ok(())
        })?;
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Float>(
        &self,
        d: Dims,
        (q, k, v): (&[T], &[T], &[T]),
        (out, dout): (&[T], &[T]),
    ) -> candle_core::Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let (rows, hd, keys) = (d.rows(), d.hd, d.keys);
        let units = d.batch * d.kv_heads;
        let mut dq = vec![T::zero(); units * rows * hd];
        let mut dk = vec![T::zero(); units * keys * hd];
        let mut dv = vec![T::zero(); units * keys * hd];
        self.with_mask(|mask, visible| {
            dq.par_chunks_mut(rows * hd)
                .zip(dk.par_chunks_mut(keys * hd))
                .zip(dv.par_chunks_mut(keys * hd))
                .enumerate()
                .with_min_len(units_per_task())
                .for_each(|(unit, ((dq, dk), dv))| {
                    let b = unit / d.kv_heads;
                    let bl = blocks(d, &visible[b * d.tq..][..d.tq]);
                    let qr = unit * rows * hd..(unit + 1) * rows * hd;
                    let kv = unit * keys * hd..(unit + 1) * keys * hd;
                    backward_unit(
                        d,
                        &bl,
                        (&q[qr.clone()], &k[kv.clone()], &v[kv]),
                        (&out[qr.clone()], &dout[qr]),
                        mask.of_row(b, d.tq, keys),
                        dq,
                        dk,
                        dv,
                    );
                });
            Ok(())
        })?;
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l1, l2, l3)?;
        let dtypes = (s1.dtype(), s2.dtype(), s3.dtype());
        if dtypes.0 != dtypes.1 || dtypes.0 != dtypes.2 {
            bail!("fused-attention: unsupported dtypes {dtypes:?}");
        }
        let out = per_float_dtype!(
            dtypes.0,
            |T| T::to_cpu_storage_owned(self.forward::<T>(
                d,
                cpu_slice(s1, l1, "q")?,
                cpu_slice(s2, l2, "k")?,
                cpu_slice(s3, l3, "v")?,
            )?),
            _ => bail!("fused-attention: unsupported dtypes {dtypes:?}")
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = cpu::with_cpu("fused-attention", &[q, k, v, res, &grad], |cpu| {
            let d = self.dims(cpu[0].1, cpu[1].1, cpu[2].1)?;
            Ok(per_float_dtype!(
                q.dtype(),
                |T| {
                    let s = |i: usize, what| cpu_slice::<T>(cpu[i].0, cpu[i].1, what);
                    let (dq, dk, dv) = self.backward::<T>(
                        d,
                        (s(0, "q")?, s(1, "k")?, s(2, "v")?),
                        (s(3, "the output")?, s(4, "the gradient")?),
                    )?;
                    let dev = q.device();
                    (
                        Tensor::from_vec(dq, q.shape(), dev)?,
                        Tensor::from_vec(dk, k.shape(), dev)?,
                        Tensor::from_vec(dv, v.shape(), dev)?,
                    )
                },
                dt => bail!("fused-attention: unsupported dtype {dt:?}")
            ))
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// softmax(q·kᵀ + mask)·v for q [B, G, R, hd] (already scaled; the R rows
/// of each KV head are its query heads' t tokens, stacked), k and v
/// [B, G, T, hd], and a mask [B, t, T] shared by the heads. With `softcap`
/// (Gemma 2), the scores are cap·tanh(q·kᵀ / cap) before the mask.
/// Fused on the CPU for f32 and f64 without a soft-cap; otherwise in
/// tiles of queries (`tiled_attention`), which keep no scores for backward
/// and equal [`attention_slow`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    if softcap.is_none() && fused_for(q.device(), q.dtype()) {
        let op = FusedAttention { mask: mask.clone() };
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        tiled_attention(q, k, v, mask, softcap, None)
    }
}

/// The composition: scores in f32 (f64 for f64 models), soft-capped when
/// asked, the model's masked softmax, probabilities cast back, times v.
pub fn attention_slow(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let softmax_dtype = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut scores = q.matmul(&k.t()?)?.to_dtype(softmax_dtype)?;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let probs = masked_softmax(&scores, &mask.dense()?)?.to_dtype(q.dtype())?;
    probs.matmul(v)
}
