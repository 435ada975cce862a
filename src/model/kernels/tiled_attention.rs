//! Attention on any device (the GPU, half precision, a soft-capped family)
//! in tiles of query tokens, out of candle's own ops, keeping for backward
//! only q, k, v and the output.
//!
//! The plain composition `softmax(QKᵀ + mask)·V` keeps its f32 scores and
//! probabilities, [B, heads, t, T] each, for backward: at 2048 tokens of a
//! 0.5B model that alone is 2.6 GiB a layer. Here the forward pass runs one
//! tile of queries at a time without a graph, over only the keys that tile
//! can see (the causal triangle's rows up to their diagonal, a window's
//! band, a packed sequence's own tokens), and hands its output to one graph
//! node, which keeps q, k, v, the output and each query row's softmax max
//! and sum (f32). Backward recomputes each tile's probabilities from those,
//! P = exp(S − max) / sum, and applies FlashAttention's formulas: dV = Pᵀ·dO,
//! dP = dO·Vᵀ, dS = P∘(dP − rowsum(P∘dP)), dQ = dS·K, dK = dSᵀ·Q (times the
//! soft-cap's slope 1 − (S/cap)² when capped). So a tile's scores, its
//! probabilities and their gradient are the only [tile, keys] tensors alive
//! in either pass. Products run in the compute dtype and the softmax in f32
//! (f64 for f64), as the composition (`attention_slow`) does, which the
//! output equals: keys outside a tile's range add exactly 0 to its softmax.

use candle_core::{CustomOp3, DType, Tensor, D};
use std::ops::Range;

use crate::model::kernels::fused_attention::{key_span, AttentionMask};
use crate::model::kernels::recompute::{precomputed_forward, Precomputed};

/// Elements of one tile's scores, [B, heads, tile, keys]: 8 Mi, 32 MiB in
/// f32. Backward holds about four f32 tensors of that size (the
/// probabilities, their gradient, the difference and the product) while a
/// tile runs; smaller tiles would cost more kernel launches on a GPU.
pub const TILE_SCORES: usize = 1 << 23;

/// Query tokens per tile for `rows` sequences of `heads` query heads over
/// `keys` keys: as many as keep a tile's scores within `TILE_SCORES`, a
/// multiple of 16 (at least 16), at most `tokens`.
pub fn tile_tokens(rows: usize, heads: usize, keys: usize, tokens: usize) -> usize {
    let per_token = (rows * heads * keys).max(1);
    let fit = (TILE_SCORES / per_token) / 16 * 16;
    fit.max(16).min(tokens.max(1))
}

/// `LORA_RUNNER_ATTENTION_TILE=N`: tiles of N query tokens instead of
/// `tile_tokens`'s choice, so that tests on tiny models cross tile
/// boundaries (and a measurement can try other sizes).
fn tile_from_env() -> Option<usize> {
    static TILE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *TILE.get_or_init(|| {
        std::env::var("LORA_RUNNER_ATTENTION_TILE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
    })
}

/// softmax(q·kᵀ + mask)·v (see `fused_attention::attention` for the
/// shapes and the soft-cap) in tiles of `tile` query tokens, or of
/// `tile_tokens`'s choice when None.
pub fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    softcap: Option<f64>,
    tile: Option<usize>,
) -> candle_core::Result<Tensor> {
    let (b, g, r, hd) = q.dims4()?;
    let (_, t, keys) = mask.dims();
    if t == 0 {
        return q.zeros_like();
    }
    if r % t != 0 {
        candle_core::bail!("attention: {r} query rows are not a whole number of {t}-token heads");
    }
    let rep = r / t;
    let tile = tile
        .or_else(tile_from_env)
        .unwrap_or_else(|| tile_tokens(b, g * rep, keys, t))
        .max(1);
    let tiles = Tiles::new(mask, (b, t), tile);
    let dims = TileDims { b, g, rep, t, hd };
    let (parts, stats): (Vec<_>, Vec<_>) = tiles
        .iter()
        .map(|tl| tl.forward(dims, (q, k, v), mask, softcap))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let output = dims.join(&parts)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(output);
    }
    q.apply_op3(
        k,
        v,
        TiledAttention {
            mask: mask.clone(),
            softcap,
            dims,
            tiles,
            stats,
            output: Precomputed::new(output)?,
        },
    )
}

/// q's shape as tokens: `rep` query heads of `t` tokens per KV head.
#[derive(Clone, Copy, Debug)]
struct TileDims {
    b: usize,
    g: usize,
    rep: usize,
    t: usize,
    hd: usize,
}

impl TileDims {
    /// Query tokens `tokens` of every head of `x` [B, G, rep·t, hd], as
    /// [B, G, rep·len, hd].
    fn narrow(&self, x: &Tensor, tokens: &Range<usize>) -> candle_core::Result<Tensor> {
        let len = tokens.len();
        x.reshape((self.b, self.g, self.rep, self.t, self.hd))?
            .narrow(3, tokens.start, len)?
            .contiguous()?
            .reshape((self.b, self.g, self.rep * len, self.hd))
    }

    /// The tiles' [B, G, rep·len, hd] parts put back in token order.
    fn join(&self, parts: &[Tensor]) -> candle_core::Result<Tensor> {
        let parts = parts
            .iter()
            .map(|p| {
                let (_, _, rows, _) = p.dims4()?;
                p.reshape((self.b, self.g, self.rep, rows / self.rep, self.hd))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 3)?.reshape((self.b, self.g, self.rep * self.t, self.hd))
    }
}

/// One tile: query tokens `tokens`, which together see at most `keys`.
#[derive(Clone, Debug)]
struct Tile {
    tokens: Range<usize>,
    keys: Range<usize>,
}

impl Tile {
    /// The tile's query rows, keys, values and mask.
    fn inputs(
        &self,
        d: TileDims,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask: &AttentionMask,
    ) -> candle_core::Result<[Tensor; 4]> {
        let nk = self.keys.len();
        Ok([
            d.narrow(q, &self.tokens)?,
            k.narrow(2, self.keys.start, nk)?,
            v.narrow(2, self.keys.start, nk)?,
            mask.tile(self.tokens.clone(), self.keys.clone())?,
        ])
    }

    /// The tile's output [B, G, rep·len, hd] and each row's softmax max and
    /// sum [B, G, rep·len, 2] (f32, f64 for f64).
    fn forward(
        &self,
        d: TileDims,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        mask: &AttentionMask,
        softcap: Option<f64>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let [q, k, v, m] = self.inputs(d, (&q.detach(), &k.detach(), &v.detach()), mask)?;
        let (masked, _) = self.scores(d, &q, &k, &m, softcap)?;
        let max = masked.max_keepdim(D::Minus1)?;
        let e = masked.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let probs = e.broadcast_div(&sum)?;
        // The row's max and sum rather than their log-sum-exp: a row that
        // sees no key has scores of -1e30, where max + ln(sum) rounds back
        // to max and its probabilities would not come back.
        let stats = Tensor::cat(&[max, sum], D::Minus1)?;
        Ok((probs.to_dtype(q.dtype())?.matmul(&v)?, stats))
    }

    /// The tile's scores with the mask added, [B, G, rep·len, keys] in the
    /// softmax's dtype, and the soft-capped scores before the mask when
    /// capped (their slope is backward's).
    fn scores(
        &self,
        d: TileDims,
        q: &Tensor,
        k: &Tensor,
        m: &Tensor,
        softcap: Option<f64>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let softmax_dtype = match q.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let mut s = q.matmul(&k.t()?)?.to_dtype(softmax_dtype)?;
        let capped = match softcap {
            Some(cap) => {
                s = ((s / cap)?.tanh()? * cap)?;
                Some(s.clone())
            }
            None => None,
        };
        let (len, nk) = (self.tokens.len(), self.keys.len());
        let m = m.to_dtype(softmax_dtype)?.reshape((d.b, 1, 1, len, nk))?;
        let masked = s
            .reshape((d.b, d.g, d.rep, len, nk))?
            .broadcast_add(&m)?
            .reshape((d.b, d.g, d.rep * len, nk))?;
        Ok((masked, capped))
    }
}

/// The tiles of a call, found once from the mask's visible keys.
#[derive(Clone, Debug)]
struct Tiles(Vec<Tile>);

impl Tiles {
    fn new(mask: &AttentionMask, (b, t): (usize, usize), tile: usize) -> Self {
        let visible = mask.visible();
        let tiles = (0..t)
            .step_by(tile)
            .map(|start| {
                let tokens = start..(start + tile).min(t);
                // Over all the batch's rows: the mask is per row.
                let rows =
                    (0..b).flat_map(|row| &visible[row * t + tokens.start..row * t + tokens.end]);
                Tile {
                    keys: key_span(rows),
                    tokens,
                }
            })
            .collect();
        Tiles(tiles)
    }

    fn iter(&self) -> impl Iterator<Item = &Tile> {
        self.0.iter()
    }
}

struct TiledAttention {
    mask: AttentionMask,
    softcap: Option<f64>,
    dims: TileDims,
    tiles: Tiles,
    /// Each tile's softmax max and sum per query row, [B, G, rep·len, 2].
    stats: Vec<Tensor>,
    output: Precomputed,
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    precomputed_forward!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let dtype = q.dtype();
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let grad = grad_res.detach().to_dtype(dtype)?;
        // Key and value gradients summed over tiles in f32 (a bf16 sum
        // would round at every tile) or f64, cast once at the end.
        let sum_dtype = match dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let kv_shape = k.shape().clone();
        let mut dk = Tensor::zeros(&kv_shape, sum_dtype, k.device())?;
        let mut dv = Tensor::zeros(&kv_shape, sum_dtype, v.device())?;
        let mut dq = Vec::with_capacity(self.tiles.0.len());
        for (tile, stats) in self.tiles.iter().zip(&self.stats) {
            let [tq, tk, tv, m] = tile.inputs(d, (&q, &k, &v), &self.mask)?;
            let (masked, capped) = tile.scores(d, &tq, &tk, &m, self.softcap)?;
            // The forward's probabilities, bit for bit.
            let (max, sum) = (
                stats.narrow(D::Minus1, 0, 1)?,
                stats.narrow(D::Minus1, 1, 1)?,
            );
            let probs = masked.broadcast_sub(&max)?.exp()?.broadcast_div(&sum)?;
            drop(masked);
            let g = d.narrow(&grad, &tile.tokens)?;
            let tv_grad = probs.to_dtype(dtype)?.t()?.matmul(&g)?;
            let dp = g.matmul(&tv.t()?)?.to_dtype(sum_dtype)?;
            // Softmax's backward per row, Σ_j P_ij·dP_ij, in f32. FlashAttention's
            // rowsum(dO∘O) is the same sum, but O is rounded to the compute
            // dtype: in bf16 that made dq and dk 3-5 times less accurate than
            // the composition's (the bf16 test).
            let row = (&probs * &dp)?.sum_keepdim(D::Minus1)?;
            let mut ds = (probs * dp.broadcast_sub(&row)?)?;
            if let (Some(cap), Some(capped)) = (self.softcap, capped) {
                ds = (ds * (1.0 - (capped / cap)?.sqr()?)?)?;
            }
            let ds = ds.to_dtype(dtype)?;
            dq.push(ds.matmul(&tk)?);
            let tk_grad = ds.t()?.matmul(&tq)?;
            dk = add_at(&dk, &tk_grad, &tile.keys)?;
            dv = add_at(&dv, &tv_grad, &tile.keys)?;
        }
        Ok((
            Some(d.join(&dq)?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}

/// `acc` [B, G, T, hd] with `part` [B, G, keys.len(), hd] added at `keys`.
fn add_at(acc: &Tensor, part: &Tensor, keys: &Range<usize>) -> candle_core::Result<Tensor> {
    if keys.is_empty() {
        return Ok(acc.clone());
    }
    let sum = (acc.narrow(2, keys.start, keys.len())? + part.to_dtype(acc.dtype())?)?;
    let (b, g, _, hd) = acc.dims4()?;
    acc.slice_assign(&[0..b, 0..g, keys.clone(), 0..hd], &sum)
}
