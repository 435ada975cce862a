//! Custom ops with a CPU forward and a backward that returns only the
//! gradients that are needed.
//!
//! candle's own fused softmax / rms_norm / rope have no backward, and its
//! matmul backward always computes the gradient of both operands. These ops
//! fix both: a frozen weight (a plain tensor, not a Var) gets no gradient
//! and costs no GEMM in backward. On non-CPU devices every op falls back to a
//! differentiable composition of candle ops (the `*_slow` functions), which
//! the tests also use as the reference.

use crate::model::kernels::cpu::{self, fused_kernels};
use crate::model::kernels::float::{per_float_dtype, Float};
use crate::model::kernels::recompute::{precomputed_forward, recomputed_rows, Precomputed};
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D,
};
use std::sync::Arc;

fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    cpu::slice(s, l, what, "input")
}

/// The common dtype of a two-input kernel's inputs.
fn same_dtype(op: &str, s1: &CpuStorage, s2: &CpuStorage) -> candle_core::Result<DType> {
    match (s1.dtype(), s2.dtype()) {
        (a, b) if a == b => Ok(a),
        (a, b) => bail!("{op}: unsupported dtypes {a:?}/{b:?}"),
    }
}

/// The common dtype of an elementwise kernel's two inputs, which must have
/// the same shape.
fn elementwise_dtype(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
) -> candle_core::Result<DType> {
    if l1.shape() != l2.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    same_dtype(op, s1, s2)
}

// ---------------------------------------------------------------- frozen matmul

struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        // y = x W^T: hand candle's gemm-backed matmul W with a transposed layout.
        let wt = l2.transpose(0, 1)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() {
            Some(grad.matmul(w)?)
        } else {
            None
        };
        // Only a trainable weight gets a gradient; a frozen one costs nothing.
        let gw = if w.track_op() {
            Some(grad.t()?.matmul(x)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// y = x W^T for x [..., in] and W [out, in]; backward returns the input
/// gradient, and a weight gradient only when W is trainable.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        bail!("frozen-matmul: scalar input")
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_features))?;
    let y = if fused_kernels(x.device()) {
        x2.contiguous()?.apply_op2(&w.contiguous()?, FrozenMatmul)?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}

/// y = x W^T + b with a frozen bias too: as `FrozenMatmul`, and the bias is
/// added inside the op so that backward keeps no gradient for it (a plain
/// broadcast_add would allocate and keep an [N, out] gradient for the bias).
struct FrozenLinearBias;

fn add_bias_rows<T: WithDType>(y: &mut [T], b: &[T]) {
    for row in y.chunks_exact_mut(b.len()) {
        for (v, bv) in row.iter_mut().zip(b) {
            *v += *bv;
        }
    }
}

impl CustomOp3 for FrozenLinearBias {
    fn name(&self) -> &'static str {
        "frozen-linear-bias"
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
        let (out, shape) = FrozenMatmul.cpu_fwd(s1, l1, s2, l2)?;
        let n = shape.dims()[1];
        if l3.shape().elem_count() != n {
            bail!(
                "frozen-linear-bias: bias has {} elements, expected {n}",
                l3.shape().elem_count()
            );
        }
        let name = self.name();
        let out = per_float_dtype!(name, out.dtype(), |T, A| {
            let mut y = T::cpu_storage_data(out)?;
            add_bias_rows(&mut y, contiguous_slice::<T>(s3, l3, name)?);
            y
        });
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = FrozenMatmul.bwd(x, w, res, grad)?;
        let gb = if b.track_op() {
            Some(grad.sum(0)?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

/// y = x W^T + b (b optional), like `frozen_matmul`; a frozen bias gets no gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(b) = b else {
        return frozen_matmul(x, w);
    };
    if !fused_kernels(x.device()) {
        return frozen_matmul(x, w)?.broadcast_add(b);
    }
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        bail!("frozen-linear: scalar input")
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, in_features))?.contiguous()?;
    let y = x2.apply_op3(&w.contiguous()?, &b.contiguous()?, FrozenLinearBias)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}

// ---------------------------------------------------------------- multiply by a constant

/// x * c where c is a constant tensor of the same shape (a dropout mask):
/// backward gives x its gradient and keeps none for c.
struct MulByConstant;

fn mul_elems<T: WithDType>(a: &[T], b: &[T]) -> Vec<T> {
    a.iter().zip(b).map(|(x, y)| *x * *y).collect()
}

impl CustomOp2 for MulByConstant {
    fn name(&self) -> &'static str {
        "mul-by-constant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.name();
        let dtype = elementwise_dtype(n, (s1, l1), (s2, l2))?;
        let out = per_float_dtype!(n, dtype, |T, A| mul_elems(
            contiguous_slice::<T>(s1, l1, n)?,
            contiguous_slice::<T>(s2, l2, n)?,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.mul(c)?), None))
    }
}

/// x * c for a constant c (same shape); no gradient is kept for c.
pub fn mul_by_constant(x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    if fused_kernels(x.device()) {
        return x.contiguous()?.apply_op2(&c.contiguous()?, MulByConstant);
    }
    let output = x.detach().mul(&c.detach())?;
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(ComposedMulByConstant {
        constant: c.detach(),
        output: Precomputed::new(output)?,
    })
}

/// `mul_by_constant` on the compositions (a GPU): candle's own product
/// would also compute, zero and add a gradient for the constant (a dropout
/// mask as large as the activations) in every LoRA projection's backward.
struct ComposedMulByConstant {
    constant: Tensor,
    output: Precomputed,
}

impl CustomOp1 for ComposedMulByConstant {
    fn name(&self) -> &'static str {
        "mul-by-constant-composed"
    }

    precomputed_forward!(1);

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.detach().mul(&self.constant)?))
    }
}

// ---------------------------------------------------------------- SwiGLU

/// silu(gate) * up in one pass, with a backward that computes both input
/// gradients in one pass more (the composition keeps silu's output and
/// spends five elementwise passes and their allocations in backward).
struct Swiglu;

/// silu(g)·u and its derivative: ∂/∂g = u·σ(g)·(1 + g·(1 − σ(g))), ∂/∂u = silu(g).
fn sigmoid<A: Float>(g: A) -> A {
    A::one() / (A::one() + (A::zero() - g).exp_fast())
}

fn swiglu_fwd<T: WithDType, A: Float>(g: &[T], u: &[T]) -> Vec<T> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| {
            let g = A::of(g);
            (g * sigmoid(g) * A::of(u)).to()
        })
        .collect()
}

/// [dgate..., dup...] for gate g, up u and the output gradient dy.
fn swiglu_bwd<T: WithDType, A: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); 2 * g.len()];
    let (dg, du) = out.split_at_mut(g.len());
    for i in 0..g.len() {
        let (gv, uv, d) = (A::of(g[i]), A::of(u[i]), A::of(dy[i]));
        let s = sigmoid(gv);
        dg[i] = (d * uv * s * (A::one() + gv * (A::one() - s))).to();
        du[i] = (d * gv * s).to();
    }
    out
}

/// Backward of [`Swiglu`]: both gradients stacked along a new first axis.
struct SwigluBackward;

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
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
        let n = self.name();
        let out = per_float_dtype!(n, same_dtype(n, s1, s2)?, |T, A| swiglu_bwd::<T, A>(
            contiguous_slice::<T>(s1, l1, n)?,
            contiguous_slice::<T>(s2, l2, n)?,
            contiguous_slice::<T>(s3, l3, n)?,
        ));
        let mut dims = vec![2];
        dims.extend(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.name();
        let dtype = elementwise_dtype(n, (s1, l1), (s2, l2))?;
        let out = per_float_dtype!(n, dtype, |T, A| swiglu_fwd::<T, A>(
            contiguous_slice::<T>(s1, l1, n)?,
            contiguous_slice::<T>(s2, l2, n)?,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwigluBackward)?;
        let (dg, du) = (both.get(0)?, both.get(1)?);
        Ok((g.track_op().then_some(dg), u.track_op().then_some(du)))
    }
}

/// silu(gate) * up, the SwiGLU MLP's activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused_kernels(gate.device()) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu);
    }
    let output = swiglu_slow(&gate.detach(), &up.detach())?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(output);
    }
    gate.apply_op2(
        up,
        ComposedSwiglu {
            output: Precomputed::new(output)?,
        },
    )
}

/// SwiGLU on the compositions (a GPU): one node keeping gate and up only,
/// with its backward written out in candle ops. At most four [tokens, ffn]
/// tensors exist at once in it; autograd through `swiglu_slow` (run again
/// from copies of gate and up) held about twelve, the largest transient of
/// a checkpointed layer's backward (0.8 GB over the layer's own at 2048
/// tokens of the 0.5B shape).
struct ComposedSwiglu {
    output: Precomputed,
}

impl CustomOp2 for ComposedSwiglu {
    fn name(&self) -> &'static str {
        "swiglu-composed"
    }

    precomputed_forward!(2);

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u) = (gate.detach(), up.detach());
        let dy = grad.detach().to_dtype(g.dtype())?;
        let s = candle_nn::ops::sigmoid(&g)?;
        // d/du = silu(g) = g·s.
        let du = match up.track_op() {
            true => Some(((&g * &s)? * &dy)?),
            false => None,
        };
        // d/dg = u·s·(1 + g·(1 − s)).
        let dg = match gate.track_op() {
            true => {
                let slope = (g * s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?;
                Some((((slope * s)? * u)? * dy)?)
            }
            false => None,
        };
        Ok((dg, du))
    }
}

/// Reference: candle's silu times up.
pub fn swiglu_slow(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()? * up
}

// ---------------------------------------------------------------- softmax

struct SoftmaxLastDim;

fn softmax_rows<T: WithDType, A: Float>(src: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::zero(); src.len()];
    let mut tmp = vec![A::zero(); dim];
    for (row, orow) in src.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut max = A::neg_infinity();
        for (t, v) in tmp.iter_mut().zip(row) {
            *t = A::of(*v);
            max = num_traits::Float::max(max, *t);
        }
        softmax_into(&mut tmp, max, orow);
    }
    out
}

/// The softmax of a row whose values (and their `max`) are in `tmp`,
/// written into `out`; a fully masked row (max −∞) stays zeros, not NaN.
fn softmax_into<T: WithDType, A: Float>(tmp: &mut [A], max: A, out: &mut [T]) {
    if max == A::neg_infinity() {
        return;
    }
    let mut sum = A::zero();
    for t in tmp.iter_mut() {
        *t = (*t - max).exp_fast();
        sum += *t;
    }
    let inv = A::one() / sum;
    for (o, t) in out.iter_mut().zip(tmp.iter()) {
        *o = (*t * inv).to();
    }
}

/// Softmax's backward from its output `y`: dx = y · (g − Σ g·y).
fn softmax_backward(y: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    let gy = grad.mul(y)?;
    let s = gy.sum_keepdim(D::Minus1)?;
    gy - y.broadcast_mul(&s)?
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = l.dims().last().copied().unwrap_or(1).max(1);
        let n = self.name();
        let out = per_float_dtype!(n, s.dtype(), |T, A| softmax_rows::<T, A>(
            contiguous_slice::<T>(s, l, n)?,
            dim
        ));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(y, grad)?))
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_kernels(x.device()) {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        softmax_last_dim_slow(x)
    }
}

/// Reference: differentiable composition of candle ops.
pub fn softmax_last_dim_slow(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

// ---------------------------------------------------------------- masked softmax

/// Softmax over the last dim of scores [B, G, R, T] after adding an additive
/// mask [B, Tq, T] where row r of each (b, g) block is query r % Tq (grouped
/// query heads are stacked along R). The mask is an input of the op rather
/// than a broadcast_add, so backward keeps no [B, G, R, T] gradient for it.
struct MaskedSoftmax;

fn masked_softmax_rows<T: WithDType, A: Float>(
    src: &[T],
    mask: &[f32],
    (b, g, r, t): (usize, usize, usize, usize),
    tq: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); src.len()];
    let mut tmp = vec![A::zero(); t];
    for bi in 0..b {
        for gi in 0..g {
            for ri in 0..r {
                let row_start = ((bi * g + gi) * r + ri) * t;
                let m = &mask[(bi * tq + ri % tq) * t..][..t];
                let row = &src[row_start..row_start + t];
                let mut max = A::neg_infinity();
                for ((dst, v), mv) in tmp.iter_mut().zip(row).zip(m) {
                    *dst = A::of(*v) + A::of_f32(*mv);
                    max = num_traits::Float::max(max, *dst);
                }
                softmax_into(&mut tmp, max, &mut out[row_start..row_start + t]);
            }
        }
    }
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims4()?;
        let (b, _g, r, t) = dims;
        let (mb, tq, mt) = l2.shape().dims3()?;
        if mb != b || mt != t || tq == 0 || r % tq != 0 {
            bail!(
                "masked-softmax: mask {:?} does not fit scores {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let n = self.name();
        let mask = contiguous_slice::<f32>(s2, l2, n)?;
        let out = per_float_dtype!(n, s1.dtype(), |T, A| masked_softmax_rows::<T, A>(
            contiguous_slice::<T>(s1, l1, n)?,
            mask,
            dims,
            tq,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(y, grad)?), None))
    }
}

/// Softmax of scores [B, G, R, T] plus mask [B, Tq, T] (f32), see [`MaskedSoftmax`].
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    if fused_kernels(scores.device()) {
        scores
            .contiguous()?
            .apply_op2(&mask.to_dtype(DType::F32)?.contiguous()?, MaskedSoftmax)
    } else {
        masked_softmax_slow(scores, mask)
    }
}

/// Reference: the mask expanded to [B, 1, R, T], added, then softmax (candle ops).
pub fn masked_softmax_slow(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, _g, r, t) = scores.dims4()?;
    let (_, tq, _) = mask.dims3()?;
    let rep = r / tq;
    let m = mask
        .to_dtype(scores.dtype())?
        .reshape((b, 1, 1, tq, t))?
        .broadcast_as((b, 1, rep, tq, t))?
        .reshape((b, 1, r, t))?
        .detach();
    softmax_last_dim_slow(&scores.broadcast_add(&m)?)
}

// ---------------------------------------------------------------- rms norm

struct RmsNorm {
    eps: f32,
}

fn rms_norm_rows<T: WithDType, A: Float>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let dim = w.len();
    let mut out = vec![T::zero(); x.len()];
    let inv_dim = A::one() / A::of_f32(dim as f32);
    for (row, orow) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut ss = A::zero();
        for v in row {
            let a = A::of(*v);
            ss += a * a;
        }
        let r = A::one() / (ss * inv_dim + A::of_f32(eps)).sqrt();
        for ((o, v), wv) in orow.iter_mut().zip(row).zip(w) {
            // Like HF: normalize in f32, cast to the input dtype, then scale.
            let n: T = (A::of(*v) * r).to();
            *o = (A::of(n) * A::of(*wv)).to();
        }
    }
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = l2.shape().elem_count();
        if l1.dims().last() != Some(&dim) {
            bail!(
                "rms-norm: input {:?} does not end in weight size {dim}",
                l1.dims()
            );
        }
        let n = self.name();
        let out = per_float_dtype!(n, same_dtype(n, s1, s2)?, |T, A| rms_norm_rows::<T, A>(
            contiguous_slice::<T>(s1, l1, n)?,
            contiguous_slice::<T>(s2, l2, n)?,
            self.eps,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        // The usual case, a frozen weight: dx in one pass over the rows
        // instead of a dozen elementwise ops.
        if !w.track_op() && fused_kernels(x.device()) {
            let gx = x.contiguous()?.apply_op3_no_bwd(
                &w.contiguous()?,
                &grad.contiguous()?,
                &RmsNormBackward { eps: self.eps },
            )?;
            return Ok((Some(gx), None));
        }
        let acc = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x32 = x.to_dtype(acc)?;
        let g32 = grad.to_dtype(acc)?;
        let w32 = w.to_dtype(acc)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let n = x32.broadcast_mul(&r)?;
        let gx = if x.track_op() {
            // dx = r * (g w - n * mean(g w n))
            let gw = g32.broadcast_mul(&w32)?;
            let m = gw.mul(&n)?.mean_keepdim(D::Minus1)?;
            Some(
                gw.sub(&n.broadcast_mul(&m)?)?
                    .broadcast_mul(&r)?
                    .to_dtype(dtype)?,
            )
        } else {
            None
        };
        let gw = if w.track_op() {
            let rows = n.elem_count() / w.elem_count();
            let prod = g32.mul(&n)?.reshape((rows, w.elem_count()))?;
            Some(prod.sum(0)?.reshape(w.shape())?.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// dx of RMSNorm for x, a frozen w and the output gradient g (same
/// shapes as the forward): per row, with r = 1/sqrt(mean(x²) + eps) and
/// n = x·r, dx = r·(g·w − n·mean(g·w·n)).
struct RmsNormBackward {
    eps: f32,
}

fn rms_norm_grad_rows<T: WithDType, A: Float>(x: &[T], w: &[T], g: &[T], eps: f32) -> Vec<T> {
    let dim = w.len();
    let mut out = vec![T::zero(); x.len()];
    let inv_dim = A::one() / A::of_f32(dim as f32);
    let rows = x.chunks_exact(dim).zip(g.chunks_exact(dim));
    for ((row, grow), orow) in rows.zip(out.chunks_exact_mut(dim)) {
        let ss = row.iter().fold(A::zero(), |s, v| s + A::of(*v) * A::of(*v));
        let r = A::one() / (ss * inv_dim + A::of_f32(eps)).sqrt();
        let mut dot = A::zero();
        for ((v, gv), wv) in row.iter().zip(grow).zip(w) {
            dot += A::of(*gv) * A::of(*wv) * (A::of(*v) * r);
        }
        let m = dot * inv_dim;
        for (((o, v), gv), wv) in orow.iter_mut().zip(row).zip(grow).zip(w) {
            let n = A::of(*v) * r;
            *o = (r * (A::of(*gv) * A::of(*wv) - n * m)).to();
        }
    }
    out
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
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
        let dim = l2.shape().elem_count();
        if l1.dims().last() != Some(&dim) || l1.shape() != l3.shape() {
            bail!(
                "rms-norm-backward: x {:?}, w {:?} and grad {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let n = self.name();
        same_dtype(n, s1, s3)?;
        let out = per_float_dtype!(
            n,
            same_dtype(n, s1, s2)?,
            |T, A| rms_norm_grad_rows::<T, A>(
                contiguous_slice::<T>(s1, l1, n)?,
                contiguous_slice::<T>(s2, l2, n)?,
                contiguous_slice::<T>(s3, l3, n)?,
                self.eps,
            )
        );
        Ok((out, l1.shape().clone()))
    }
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * w.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused_kernels(x.device()) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else if w.track_op() {
        rms_norm_slow(x, w, eps)
    } else {
        // A frozen weight (every norm here): keeps x only, not its f32
        // copy, square and normalised rows.
        let w = w.clone();
        recomputed_rows(
            x,
            x.dim(0)?,
            Arc::new(move |_, x| rms_norm_slow(x, &w, eps)),
        )
    }
}

/// Reference: differentiable composition of candle ops.
pub fn rms_norm_slow(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let acc = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x32 = x.to_dtype(acc)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    x32.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(w)
}

// ---------------------------------------------------------------- rope

/// Rotary embedding in the HF "rotate_half" layout, as a composition of
/// candle ops: x [B, H, T, D]; cos, sin [B, T, D/2] in f32 (per-batch
/// positions allow left padding). The model applies it inside
/// [`split_heads`].
pub fn rope_slow(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_b, _h, _t, d) = x.dims4()?;
    let half = d / 2;
    let cos = cos.unsqueeze(1)?.to_dtype(x.dtype())?;
    let sin = sin.unsqueeze(1)?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let y2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[y1, y2], D::Minus1)
}

// ---------------------------------------------------------------- attention heads

/// How attention lays out a projection's output [B, t, heads·hd]: as
/// [B, kv_heads, rep·t, hd], the rep = heads / kv_heads query heads that
/// share a KV head stacked along time (query head h reads KV head h / rep,
/// as HF's repeat_kv). Keys and values have heads = kv_heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Rotary angles of the tokens: cos and sin [B, t, hd/2] in f32.
#[derive(Clone, Debug)]
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// `split_heads` as one op: the reshape, transpose, copy, rope and scale of
/// the composition are six graph nodes, each with a gradient buffer zeroed
/// and added into in backward; this is one, and one pass each way. Its
/// adjoint (scale, rotate back, token-major) is its backward, and without
/// rope and scale it is `merge_heads`.
#[derive(Clone)]
struct SplitHeads {
    heads: Heads,
    rotary: Option<Rotary>,
    scale: f64,
    /// false: [B, t, heads·hd] → [B, kv, rep·t, hd], rotate, scale.
    /// true: scale, rotate by −angle, [B, kv, rep·t, hd] → [B, t, heads·hd].
    adjoint: bool,
}

fn split_heads_apply<T: WithDType, A: Float>(
    x: &[T],
    rotary: Option<(&[f32], &[f32])>,
    scale: f64,
    (heads, b, t): (Heads, usize, usize),
    adjoint: bool,
) -> Vec<T> {
    let (nh, nkv, hd, rep) = (heads.heads, heads.kv_heads, heads.head_dim, heads.rep());
    let half = hd / 2;
    let s: T = T::from_f64(scale);
    let mut out = vec![T::zero(); x.len()];
    for bi in 0..b {
        for ti in 0..t {
            for head in 0..nh {
                let token_major = ((bi * t + ti) * nh + head) * hd;
                let (g, j) = (head / rep, head % rep);
                let stacked = ((bi * nkv + g) * rep * t + j * t + ti) * hd;
                let (src, dst) = match adjoint {
                    false => (token_major, stacked),
                    true => (stacked, token_major),
                };
                let (xs, ys) = (&x[src..src + hd], &mut out[dst..dst + hd]);
                let Some((cos, sin)) = rotary else {
                    for (y, v) in ys.iter_mut().zip(xs) {
                        *y = *v * s;
                    }
                    continue;
                };
                let angles = (bi * t + ti) * half;
                for i in 0..half {
                    let (c, sn) = (A::of_f32(cos[angles + i]), A::of_f32(sin[angles + i]));
                    if adjoint {
                        // The composition's backward: scale, then rope by −angle.
                        let (g1, g2) = (A::of(xs[i] * s), A::of(xs[half + i] * s));
                        ys[i] = (g1 * c + g2 * sn).to();
                        ys[half + i] = (g2 * c - g1 * sn).to();
                    } else {
                        // Rounded after rope, then scaled, as rope then affine.
                        let (x1, x2) = (A::of(xs[i]), A::of(xs[half + i]));
                        let (y1, y2): (T, T) = ((x1 * c - x2 * sn).to(), (x2 * c + x1 * sn).to());
                        ys[i] = y1 * s;
                        ys[half + i] = y2 * s;
                    }
                }
            }
        }
    }
    out
}

impl SplitHeads {
    /// (B, t) of the input, checked against the layout and the angles.
    fn batch_tokens(&self, input: &Layout) -> candle_core::Result<(usize, usize)> {
        let h = self.heads;
        let fits =
            h.kv_heads > 0 && h.heads.is_multiple_of(h.kv_heads) && h.head_dim.is_multiple_of(2);
        let bt = match (self.adjoint, input.dims()) {
            (false, &[b, t, width]) if fits && width == h.heads * h.head_dim => Some((b, t)),
            (true, &[b, g, rows, d])
                if fits && g == h.kv_heads && d == h.head_dim && rows.is_multiple_of(h.rep()) =>
            {
                Some((b, rows / h.rep()))
            }
            _ => None,
        };
        let Some((b, t)) = bt else {
            bail!("split-heads: input {:?} does not fit {h:?}", input.dims());
        };
        if let Some(r) = &self.rotary {
            let expect = [b, t, h.head_dim / 2];
            if r.cos.dims() != expect || r.sin.dims() != expect {
                bail!(
                    "split-heads: cos/sin must be {expect:?}, got {:?}/{:?}",
                    r.cos.dims(),
                    r.sin.dims()
                );
            }
        }
        Ok((b, t))
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t) = self.batch_tokens(l1)?;
        let h = self.heads;
        let shape: Shape = match self.adjoint {
            false => (b, h.kv_heads, h.rep() * t, h.head_dim).into(),
            true => (b, t, h.heads * h.head_dim).into(),
        };
        let n = self.name();
        let angles: Vec<&Tensor> = self.rotary.iter().flat_map(|r| [&r.cos, &r.sin]).collect();
        let out = cpu::with_cpu(n, &angles, |c| {
            let rotary = match c {
                [(cs, cl), (ss, sl)] => Some((
                    contiguous_slice::<f32>(cs, cl, n)?,
                    contiguous_slice::<f32>(ss, sl, n)?,
                )),
                _ => None,
            };
            Ok(per_float_dtype!(n, s1.dtype(), |T, A| split_heads_apply::<
                T,
                A,
            >(
                contiguous_slice::<T>(s1, l1, n)?,
                rotary,
                self.scale,
                (h, b, t),
                self.adjoint,
            )))
        })?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let adjoint = SplitHeads {
            adjoint: !self.adjoint,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&adjoint)?))
    }
}

/// Queries, keys or values for attention: `x` [B, t, heads·hd] as
/// [B, kv_heads, rep·t, hd] (see [`Heads`]), rotated by `rotary` when given
/// and multiplied by `scale`.
pub fn split_heads(
    x: &Tensor,
    heads: Heads,
    rotary: Option<&Rotary>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = SplitHeads {
        heads,
        rotary: rotary.cloned(),
        scale,
        adjoint: false,
    };
    // On every path, so that a layout that does not fit is named as such
    // rather than as a reshape's buffer size.
    op.batch_tokens(x.layout())?;
    if fused_kernels(x.device()) {
        x.contiguous()?.apply_op1(op)
    } else {
        // Keeps x only, not rope's half-products and copies.
        let rotary = op.rotary;
        recomputed_rows(
            x,
            x.dim(0)?,
            Arc::new(move |_, x| split_heads_slow(x, heads, rotary.as_ref(), scale)),
        )
    }
}

/// Reference: differentiable composition of candle ops.
pub fn split_heads_slow(
    x: &Tensor,
    heads: Heads,
    rotary: Option<&Rotary>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (heads.heads, heads.kv_heads, heads.head_dim);
    let y = x.reshape((b, t, nh, hd))?.transpose(1, 2)?;
    let y = match rotary {
        Some(r) => rope_slow(&y, &r.cos, &r.sin)?,
        None => y.contiguous()?,
    };
    let y = if scale == 1.0 { y } else { (y * scale)? };
    y.reshape((b, nkv, heads.rep() * t, hd))
}

/// Attention's output [B, kv_heads, rep·t, hd] back to [B, t, heads·hd],
/// the layout the output projection reads.
pub fn merge_heads(o: &Tensor, heads: Heads) -> candle_core::Result<Tensor> {
    let op = SplitHeads {
        heads,
        rotary: None,
        scale: 1.0,
        adjoint: true,
    };
    op.batch_tokens(o.layout())?;
    if fused_kernels(o.device()) {
        o.contiguous()?.apply_op1(op)
    } else {
        merge_heads_slow(o, heads)
    }
}

/// Reference: differentiable composition of candle ops.
pub fn merge_heads_slow(o: &Tensor, heads: Heads) -> candle_core::Result<Tensor> {
    let (b, _, rows, hd) = o.dims4()?;
    let t = rows / heads.rep();
    o.reshape((b, heads.heads, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, heads.heads * hd))
}

// ---------------------------------------------------------------- log-softmax + gather

/// log_softmax(logits)[n, targets[n]] for logits [N, V] in f32/f64: the
/// per-token log-probability a loss needs, without materialising the
/// [N, V] log-softmax (and its intermediates) for backward.
struct TokenLogProb {
    targets: std::sync::Arc<Vec<u32>>,
}

// Only run for f32/f64 logits, where A is T and the conversions are exact.
fn token_logprob_rows<T: WithDType, A: Float>(logits: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    logits
        .chunks_exact(v)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().fold(A::neg_infinity(), |m, &x| {
                num_traits::Float::max(m, A::of(x))
            });
            let sum = row
                .iter()
                .fold(A::zero(), |s, &x| s + (A::of(x) - max).exp_fast());
            (A::of(row[t as usize]) - max - sum.ln()).to()
        })
        .collect()
}

fn token_logprob_grad_rows<T: WithDType, A: Float>(
    logits: &[T],
    grad: &[T],
    v: usize,
    targets: &[u32],
) -> Vec<T> {
    let mut out = vec![T::zero(); logits.len()];
    for ((row, orow), (&g, &t)) in logits
        .chunks_exact(v)
        .zip(out.chunks_exact_mut(v))
        .zip(grad.iter().zip(targets))
    {
        let g = A::of(g);
        let max = row.iter().fold(A::neg_infinity(), |m, &x| {
            num_traits::Float::max(m, A::of(x))
        });
        let sum = row
            .iter()
            .fold(A::zero(), |s, &x| s + (A::of(x) - max).exp_fast());
        let scale = g / sum;
        // d/dlogits = g * (onehot(t) - softmax)
        for (o, &x) in orow.iter_mut().zip(row) {
            *o = (A::zero() - scale * (A::of(x) - max).exp_fast()).to();
        }
        let at_target = A::of(orow[t as usize]);
        orow[t as usize] = (at_target + g).to();
    }
    out
}

/// Logits must be f32 or f64: log-probs are never computed in half precision.
fn check_logits_dtype(op: &str, dtype: DType) -> candle_core::Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        dt => bail!("{op}: logits must be f32 or f64, got {dt:?}"),
    }
}

impl TokenLogProb {
    fn check(&self, l: &Layout) -> candle_core::Result<usize> {
        let (n, v) = l.shape().dims2()?;
        if n != self.targets.len() {
            bail!("token-logprob: {n} rows but {} targets", self.targets.len());
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("token-logprob: target {t} outside vocabulary of {v}");
        }
        Ok(v)
    }
}

impl CustomOp1 for TokenLogProb {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = self.check(l)?;
        let n = self.name();
        check_logits_dtype(n, s.dtype())?;
        let out = per_float_dtype!(n, s.dtype(), |T, A| token_logprob_rows::<T, A>(
            contiguous_slice::<T>(s, l, n)?,
            v,
            &self.targets,
        ));
        Ok((out, Shape::from(self.targets.len())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(logits.apply_op2_no_bwd(
            &g,
            &TokenLogProbGrad {
                targets: self.targets.clone(),
            },
        )?))
    }
}

struct TokenLogProbGrad {
    targets: std::sync::Arc<Vec<u32>>,
}

impl CustomOp2 for TokenLogProbGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = TokenLogProb {
            targets: self.targets.clone(),
        }
        .check(l1)?;
        let n = self.name();
        let dtype = same_dtype(n, s1, s2)?;
        check_logits_dtype(n, dtype)?;
        let out = per_float_dtype!(n, dtype, |T, A| token_logprob_grad_rows::<T, A>(
            contiguous_slice::<T>(s1, l1, n)?,
            contiguous_slice::<T>(s2, l2, n)?,
            v,
            &self.targets,
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// log_softmax(logits, -1) gathered at `targets`: logits [N, V] (f32/f64),
/// result [N]. Backward recomputes the softmax instead of storing it.
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    if cpu::fused_for(logits.device(), logits.dtype()) {
        logits.contiguous()?.apply_op1(TokenLogProb {
            targets: std::sync::Arc::new(targets.to_vec()),
        })
    } else {
        token_logprobs_slow(logits, targets)
    }
}

/// Reference: differentiable composition of candle ops.
pub fn token_logprobs_slow(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), logits.device())?;
    logp.gather(&idx, 1)?.squeeze(1)
}
