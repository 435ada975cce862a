//! A frozen linear projection and its LoRA adapter as one CPU op:
//! y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ.
//!
//! As a composition of candle ops this is five graph nodes per projection
//! (two products, the scale, the add, the reshape), and candle's backward
//! allocates a zeroed gradient and adds into it at each: several passes over
//! an [N, out] tensor per projection and step. Here backward computes dx,
//! dA and dB straight from dy with five products and no elementwise pass;
//! the small x·Aᵀ is recomputed instead of kept. The frozen W and bias are
//! constants of the op and get no gradient; so is a dropout mask in front
//! of the adapter (y = x·Wᵀ + b + s·((x∘m)·Aᵀ)·Bᵀ).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};

use crate::model::kernels::cpu::{self, fused_for, matmul, Mat, Threads};
use crate::model::kernels::float::{per_float_dtype, Float};
use crate::model::kernels::ops::{frozen_linear, mul_by_constant};
use crate::model::kernels::quantized::{frozen_projection, FrozenWeight};
use crate::model::kernels::recompute::{precomputed_forward, Precomputed};

struct LoraLinear {
    /// [out, in], frozen; a quantized one is dequantised for each product.
    weight: FrozenWeight,
    /// [out], frozen.
    bias: Option<Tensor>,
    /// [n, in] dropout mask (0 or 1/(1-p)) on the adapter's input.
    dropout: Option<Tensor>,
    scale: f64,
}

/// Shapes of one call: `n` rows, `inp` input and `out` output features, rank `r`.
#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    inp: usize,
    out: usize,
    r: usize,
}

fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    cpu::slice(s, l, "lora-linear", what)
}

/// The adapter's input: x, or x∘m under dropout.
fn masked<'a, T: Float>(x: &'a [T], mask: Option<&[T]>) -> std::borrow::Cow<'a, [T]> {
    match mask {
        None => std::borrow::Cow::Borrowed(x),
        Some(m) => std::borrow::Cow::Owned(x.iter().zip(m).map(|(&v, &k)| v * k).collect()),
    }
}

/// h = x·Aᵀ [n, r].
fn adapter_input<T: Float>(d: Dims, x: &[T], a: &[T]) -> Vec<T> {
    let mut h = vec![T::zero(); d.n * d.r];
    matmul(
        (d.n, d.r, d.inp),
        &mut h,
        false,
        (Mat::rows(x, d.inp), Mat::transposed(a, d.inp)),
        T::one(),
        Threads::Pool,
    );
    h
}

fn forward<T: Float>(
    d: Dims,
    (x, a, b): (&[T], &[T], &[T]),
    (w, bias, mask): (&[T], Option<&[T]>, Option<&[T]>),
    scale: T,
) -> Vec<T> {
    let mut y = vec![T::zero(); d.n * d.out];
    matmul(
        (d.n, d.out, d.inp),
        &mut y,
        false,
        (Mat::rows(x, d.inp), Mat::transposed(w, d.inp)),
        T::one(),
        Threads::Pool,
    );
    let h = adapter_input(d, &masked(x, mask), a);
    matmul(
        (d.n, d.out, d.r),
        &mut y,
        true,
        (Mat::rows(&h, d.r), Mat::transposed(b, d.r)),
        scale,
        Threads::Pool,
    );
    if let Some(bias) = bias {
        for row in y.chunks_exact_mut(d.out) {
            for (v, &bv) in row.iter_mut().zip(bias) {
                *v += bv;
            }
        }
    }
    y
}

/// Gradients of x, A and B (each only when `want` says so).
fn backward<T: Float>(
    d: Dims,
    (x, a, b): (&[T], &[T], &[T]),
    (w, mask): (&[T], Option<&[T]>),
    dy: &[T],
    scale: T,
    want: [bool; 3],
) -> [Option<Vec<T>>; 3] {
    let xm = masked(x, mask);
    // dh = s · dy·B [n, r]
    let mut dh = vec![T::zero(); d.n * d.r];
    matmul(
        (d.n, d.r, d.out),
        &mut dh,
        false,
        (Mat::rows(dy, d.out), Mat::rows(b, d.r)),
        scale,
        Threads::Pool,
    );
    let dx = want[0].then(|| {
        // dx = dy·W + (dh·A)∘m
        let mut dx = vec![T::zero(); d.n * d.inp];
        matmul(
            (d.n, d.inp, d.out),
            &mut dx,
            false,
            (Mat::rows(dy, d.out), Mat::rows(w, d.inp)),
            T::one(),
            Threads::Pool,
        );
        let adapter = (Mat::rows(&dh, d.r), Mat::rows(a, d.inp));
        match mask {
            None => matmul(
                (d.n, d.inp, d.r),
                &mut dx,
                true,
                adapter,
                T::one(),
                Threads::Pool,
            ),
            Some(m) => {
                let mut dxa = vec![T::zero(); d.n * d.inp];
                matmul(
                    (d.n, d.inp, d.r),
                    &mut dxa,
                    false,
                    adapter,
                    T::one(),
                    Threads::Pool,
                );
                for ((v, &g), &k) in dx.iter_mut().zip(&dxa).zip(m) {
                    *v += g * k;
                }
            }
        }
        dx
    });
    let da = want[1].then(|| {
        // dA = dhᵀ·x [r, in]
        let mut da = vec![T::zero(); d.r * d.inp];
        matmul(
            (d.r, d.inp, d.n),
            &mut da,
            false,
            (Mat::transposed(&dh, d.r), Mat::rows(&xm, d.inp)),
            T::one(),
            Threads::Pool,
        );
        da
    });
    let db = want[2].then(|| {
        // dB = s · dyᵀ·h [out, r]
        let h = adapter_input(d, &xm, a);
        let mut db = vec![T::zero(); d.out * d.r];
        matmul(
            (d.out, d.r, d.n),
            &mut db,
            false,
            (Mat::transposed(dy, d.out), Mat::rows(&h, d.r)),
            scale,
            Threads::Pool,
        );
        db
    });
    [dx, da, db]
}

impl LoraLinear {
    /// x is [..., in]: its leading dims are the rows.
    fn dims(&self, x: &Layout, a: &Layout, b: &Layout) -> candle_core::Result<Dims> {
        let Some((&inp, lead)) = x.dims().split_last() else {
            bail!("lora-linear: scalar input")
        };
        let n = lead.iter().product();
        let (r, a_in) = a.shape().dims2()?;
        let (out, b_r) = b.shape().dims2()?;
        let (w_out, w_in) = self.weight.dims();
        let bias_ok = self.bias.as_ref().is_none_or(|b| b.dims() == [out]);
        let mask_ok = self.dropout.as_ref().is_none_or(|m| m.dims() == [n, inp]);
        if (a_in, b_r, w_out, w_in) != (inp, r, out, inp) || !bias_ok || !mask_ok {
            bail!(
                "lora-linear: x {:?}, A {:?}, B {:?}, W {:?} do not fit",
                x.dims(),
                a.dims(),
                b.dims(),
                self.weight.dims()
            );
        }
        Ok(Dims { n, inp, out, r })
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let weight = self.weight.to_dense(s1.dtype())?;
        let constants = [Some(&weight), self.bias.as_ref(), self.dropout.as_ref()];
        let present: Vec<&Tensor> = constants.iter().flatten().copied().collect();
        let y = cpu::with_cpu("lora-linear", &present, |c| {
            // c holds W, then the bias and the mask where present.
            let mut rest = c[1..].iter();
            let bias = self.bias.as_ref().and_then(|_| rest.next());
            let mask = self.dropout.as_ref().and_then(|_| rest.next());
            Ok(per_float_dtype!(
                s1.dtype(),
                |T| T::to_cpu_storage_owned(forward::<T>(
                    d,
                    (
                        cpu_slice(s1, l1, "x")?,
                        cpu_slice(s2, l2, "A")?,
                        cpu_slice(s3, l3, "B")?,
                    ),
                    (
                        cpu_slice(c[0].0, c[0].1, "W")?,
                        bias.map(|b| cpu_slice(b.0, b.1, "the bias")).transpose()?,
                        mask.map(|m| cpu_slice(m.0, m.1, "the dropout mask"))
                            .transpose()?,
                    ),
                    self.scale as T,
                )),
                dt => bail!("lora-linear: unsupported dtype {dt:?}")
            ))
        })?;
        // Shaped like x with `out` features last: no reshape nodes around
        // the op, whose gradients candle would zero and add into.
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked by dims") = d.out;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let want = [x.track_op(), a.track_op(), b.track_op()];
        let weight = self.weight.to_dense(x.dtype())?;
        let mut tensors = vec![x, a, b, &weight, &grad];
        tensors.extend(self.dropout.as_ref());
        let grads = cpu::with_cpu("lora-linear", &tensors, |c| {
            let d = self.dims(c[0].1, c[1].1, c[2].1)?;
            Ok(per_float_dtype!(
                x.dtype(),
                |T| {
                    let s = |i: usize, what| cpu_slice::<T>(c[i].0, c[i].1, what);
                    let [dx, da, db] = backward::<T>(
                        d,
                        (s(0, "x")?, s(1, "A")?, s(2, "B")?),
                        (
                            s(3, "W")?,
                            c.get(5)
                                .map(|m| cpu_slice::<T>(m.0, m.1, "the dropout mask"))
                                .transpose()?,
                        ),
                        s(4, "the gradient")?,
                        self.scale as T,
                        want,
                    );
                    let tensor = |v: Option<Vec<T>>, like: &Tensor| {
                        v.map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                            .transpose()
                    };
                    (tensor(dx, x)?, tensor(da, a)?, tensor(db, b)?)
                },
                dt => bail!("lora-linear: unsupported dtype {dt:?}")
            ))
        })?;
        Ok(grads)
    }
}

/// The LoRA adapter of a projection: A [r, in], B [out, r], the scale, and
/// an optional dropout mask shaped like the input (0 or 1/(1-p)).
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<&'a Tensor>,
}

/// y = x·Wᵀ + bias + scale·((x∘mask)·Aᵀ)·Bᵀ for x [..., in] and W [out, in];
/// W, the bias and the mask are constants. Fused on the CPU when all are
/// f32 or all f64; otherwise candle's composition ([`lora_linear_slow`]).
pub fn lora_linear(
    x: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    lora_linear_on(x, (&FrozenWeight::Dense(weight.clone()), bias), adapter)
}

/// [`lora_linear`] on a frozen weight that may be quantized. The fused op
/// dequantises a quantized W for each product, forward and backward, so the
/// graph never holds a dense copy; elsewhere the frozen part is
/// [`frozen_projection`] and the adapter a composition.
pub fn lora_linear_on(
    x: &Tensor,
    (weight, bias): (&FrozenWeight, Option<&Tensor>),
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let weight_fits = weight.as_dense().is_none_or(|w| w.dtype() == dtype);
    let same_dtype = weight_fits
        && [adapter.a, adapter.b]
            .into_iter()
            .chain(bias)
            .chain(adapter.dropout)
            .all(|t| t.dtype() == dtype);
    if !(fused_for(x.device(), dtype) && same_dtype) {
        return lora_linear_composed(x, (weight, bias), adapter);
    }
    let (a, b) = (adapter.a, adapter.b);
    let Some((&inp, lead)) = x.dims().split_last() else {
        bail!("lora-linear: scalar input")
    };
    let rows: usize = lead.iter().product();
    let constant = |t: &Tensor| t.contiguous().map(|t| t.detach());
    let op = LoraLinear {
        weight: match weight {
            FrozenWeight::Dense(w) => FrozenWeight::Dense(constant(w)?),
            quantized => quantized.clone(),
        },
        bias: bias.map(constant).transpose()?,
        dropout: adapter
            .dropout
            .map(|m| constant(&m.reshape((rows, inp))?))
            .transpose()?,
        scale: adapter.scale,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The composition: the frozen projection plus the adapter path (dropout
/// as a constant factor), the scale on the small [out, r] matrix, A and B
/// cast to x's dtype.
pub fn lora_linear_slow(
    x: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    let y = frozen_linear(x, weight, bias)?;
    y + adapter_delta(x, adapter)?
}

/// s·((x∘m)·Aᵀ)·Bᵀ as a composition of candle ops, shaped like x with the
/// adapter's output features last.
pub fn adapter_delta(x: &Tensor, adapter: &Adapter) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let a = adapter.a.to_dtype(dtype)?;
    let b = (adapter.b.to_dtype(dtype)? * adapter.scale)?;
    let xin = match adapter.dropout {
        Some(m) => mul_by_constant(x, &m.to_dtype(dtype)?)?,
        None => x.clone(),
    };
    let (lead, last) = xin.dims().split_at(xin.rank() - 1);
    let rows: usize = lead.iter().product();
    let h = xin
        .reshape((rows, last[0]))?
        .matmul(&a.t()?)?
        .matmul(&b.t()?)?;
    let mut dims = lead.to_vec();
    dims.push(b.dim(0)?);
    h.reshape(dims)
}

/// [`lora_linear_on`] on every other device (the GPU, half precision): the
/// same y out of candle's ops, as one graph node that keeps only x (and
/// A, B), not the composition's [N, out] frozen product, adapter output and
/// sum (two [N, out] tensors a projection, most of what the compositions
/// kept for a layer). Backward computes dx, dA and dB from dy with candle's
/// products, in x's dtype, as autograd would.
pub fn lora_linear_composed(
    x: &Tensor,
    (weight, bias): (&FrozenWeight, Option<&Tensor>),
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    let (a, b) = (adapter.a.detach(), adapter.b.detach());
    let detached = Adapter {
        a: &a,
        b: &b,
        ..*adapter
    };
    let xd = x.detach();
    let y = (frozen_projection(&xd, weight, bias)? + adapter_delta(&xd, &detached)?)?;
    if !(x.track_op() || adapter.a.track_op() || adapter.b.track_op()) {
        return Ok(y);
    }
    let op = ComposedLoraLinear {
        weight: weight.clone(),
        dropout: adapter.dropout.map(Tensor::detach),
        scale: adapter.scale,
        output: Precomputed::new(y)?,
    };
    x.apply_op3(adapter.a, adapter.b, op)
}

struct ComposedLoraLinear {
    weight: FrozenWeight,
    /// Shaped like x.
    dropout: Option<Tensor>,
    scale: f64,
    output: Precomputed,
}

impl CustomOp3 for ComposedLoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear-composed"
    }

    precomputed_forward!(3);

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let Some((&inp, lead)) = dims.split_last() else {
            bail!("lora-linear: scalar input")
        };
        let rows: usize = lead.iter().product();
        let out = b.dim(0)?;
        let x2 = x.detach().reshape((rows, inp))?;
        let dy = grad.detach().reshape((rows, out))?.to_dtype(dtype)?;
        let mask = match &self.dropout {
            Some(m) => Some(m.reshape((rows, inp))?.to_dtype(dtype)?),
            None => None,
        };
        let xin = match &mask {
            Some(m) => (&x2 * m)?,
            None => x2,
        };
        let a_c = a.detach().to_dtype(dtype)?;
        let b_s = (b.detach().to_dtype(dtype)? * self.scale)?;
        // dy·(sB) [n, r]: what both dx's adapter term and dA start from.
        let dyb = dy.matmul(&b_s)?;
        let dx = x.track_op().then(|| -> candle_core::Result<Tensor> {
            let mut through_adapter = dyb.matmul(&a_c)?;
            if let Some(m) = &mask {
                through_adapter = (through_adapter * m)?;
            }
            // dy·W, W dequantised for this product only, as the frozen
            // projections' own backward does.
            let frozen = dy.matmul(&self.weight.to_dense(dtype)?)?;
            (frozen + through_adapter)?.reshape(dims.as_slice())
        });
        let da = a
            .track_op()
            .then(|| dyb.t()?.matmul(&xin)?.to_dtype(a.dtype()));
        let db = b.track_op().then(|| {
            let h = xin.matmul(&a_c.t()?)?;
            (dy.t()?.matmul(&h)? * self.scale)?.to_dtype(b.dtype())
        });
        Ok((dx.transpose()?, da.transpose()?, db.transpose()?))
    }
}
