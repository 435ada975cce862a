//! The fused LoRA projection (CPU) and the composed one (every other
//! device: one graph node out of candle's ops) against the composition of
//! candle ops they replace (output; gradients of x, A and B), with and
//! without a bias and a dropout mask, on dense and block-format weights,
//! and against central finite differences.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::fused_linear::{
    adapter_delta, lora_linear, lora_linear_composed, lora_linear_slow, Adapter,
};
use lora_runner::model::kernels::quantized::{frozen_projection, FrozenWeight, Quantization};

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// An inverted-dropout mask with p = 0.25 (every fourth entry dropped).
fn dropout_mask(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let m: Vec<f32> = (0..n)
        .map(|i| if i % 4 == 1 { 0.0 } else { 1.0 / 0.75 })
        .collect();
    Tensor::from_vec(m, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

struct Inputs {
    x: Var,
    w: Tensor,
    bias: Option<Tensor>,
    a: Var,
    b: Var,
    mask: Option<Tensor>,
    weights: Tensor,
}

/// x [2, 5, 12] through W [7, 12] with rank 3.
fn inputs(dtype: DType, bias: bool, dropout: bool) -> Inputs {
    Inputs {
        x: Var::from_tensor(&randn(&[2, 5, 12], dtype)).unwrap(),
        w: randn(&[7, 12], dtype),
        bias: bias.then(|| randn(&[7], dtype)),
        a: Var::from_tensor(&randn(&[3, 12], dtype)).unwrap(),
        b: Var::from_tensor(&randn(&[7, 3], dtype)).unwrap(),
        mask: dropout.then(|| dropout_mask(&[2, 5, 12], dtype)),
        weights: randn(&[2, 5, 7], dtype),
    }
}

type Projection = fn(&Tensor, (&Tensor, Option<&Tensor>), &Adapter) -> candle_core::Result<Tensor>;

const SCALE: f64 = 2.5;

fn project(f: Projection, i: &Inputs, a: &Tensor, x: &Tensor) -> Tensor {
    let adapter = Adapter {
        a,
        b: i.b.as_tensor(),
        scale: SCALE,
        dropout: i.mask.as_ref(),
    };
    f(x, (&i.w, i.bias.as_ref()), &adapter).unwrap()
}

/// sum(y ∘ weights), the scalar every test differentiates.
fn weighted_sum(y: &Tensor, i: &Inputs) -> Tensor {
    y.mul(&i.weights).unwrap().sum_all().unwrap()
}

/// Output and the gradients of sum(y ∘ weights) by x, A and B; W gets none.
fn run(f: Projection, i: &Inputs) -> [Tensor; 4] {
    let y = project(f, i, i.a.as_tensor(), i.x.as_tensor());
    let grads = weighted_sum(&y, i).backward().unwrap();
    assert!(
        grads.get(&i.w).is_none(),
        "the frozen weight got a gradient"
    );
    let g = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
    [y.clone(), g(&i.x), g(&i.a), g(&i.b)]
}

#[test]
fn fused_lora_projection_matches_the_composition_with_gradients() {
    with_big_stack(|| {
        for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 1e-4)] {
            for bias in [false, true] {
                for dropout in [false, true] {
                    let i = inputs(dtype, bias, dropout);
                    let fast = run(lora_linear, &i);
                    let slow = run(lora_linear_slow, &i);
                    for (what, (f, s)) in ["y", "dx", "dA", "dB"].iter().zip(fast.iter().zip(&slow))
                    {
                        let d = max_abs_diff_f64(f, s);
                        assert!(
                            d < tol,
                            "{dtype:?}, bias {bias}, dropout {dropout}: {what} differs by {d}"
                        );
                    }
                }
            }
        }
    });
}

#[test]
fn fused_lora_projection_gradients_match_finite_differences() {
    with_big_stack(|| {
        let i = inputs(DType::F64, true, true);
        let [_, dx, da, _] = run(lora_linear, &i);
        let objective = |a: &Tensor, x: &Tensor| {
            weighted_sum(&project(lora_linear, &i, a, x), &i)
                .to_scalar::<f64>()
                .unwrap()
        };
        let nudge = |t: &Tensor, index: usize, h: f64| {
            let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[index] += h;
            Tensor::from_vec(v, t.shape(), t.device()).unwrap()
        };
        let h = 1e-6;
        let da = da.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for index in [0, 13, 35] {
            let numeric = (objective(&nudge(i.a.as_tensor(), index, h), i.x.as_tensor())
                - objective(&nudge(i.a.as_tensor(), index, -h), i.x.as_tensor()))
                / (2.0 * h);
            assert!(
                (numeric - da[index]).abs() < 1e-6,
                "dA[{index}]: {} vs {numeric}",
                da[index]
            );
        }
        // x entries whose dropout mask is 0 (index 1) and 1/(1-p) (index 2).
        let dx = dx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for index in [1, 2] {
            let numeric = (objective(i.a.as_tensor(), &nudge(i.x.as_tensor(), index, h))
                - objective(i.a.as_tensor(), &nudge(i.x.as_tensor(), index, -h)))
                / (2.0 * h);
            assert!(
                (numeric - dx[index]).abs() < 1e-6,
                "dx[{index}]: {} vs {numeric}",
                dx[index]
            );
        }
    });
}

#[test]
fn a_frozen_input_gets_no_gradient_and_the_adapter_still_does() {
    with_big_stack(|| {
        let i = inputs(DType::F32, false, false);
        let x = i.x.as_tensor().detach();
        let y = project(lora_linear, &i, i.a.as_tensor(), &x);
        let grads = weighted_sum(&y, &i).backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(i.a.as_tensor()).is_some() && grads.get(i.b.as_tensor()).is_some());
    });
}

fn composed(
    x: &Tensor,
    (w, bias): (&Tensor, Option<&Tensor>),
    adapter: &Adapter,
) -> candle_core::Result<Tensor> {
    lora_linear_composed(x, (&FrozenWeight::Dense(w.clone()), bias), adapter)
}

#[test]
fn composed_lora_projection_matches_the_composition_with_gradients() {
    with_big_stack(|| {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            for bias in [false, true] {
                for dropout in [false, true] {
                    let i = inputs(dtype, bias, dropout);
                    let ours = run(composed, &i);
                    let slow = run(lora_linear_slow, &i);
                    for (what, (f, s)) in ["y", "dx", "dA", "dB"].iter().zip(ours.iter().zip(&slow))
                    {
                        let scale = max_abs_diff_f64(s, &s.zeros_like().unwrap()).max(1.0);
                        let d = max_abs_diff_f64(f, s) / scale;
                        assert!(
                            d < tol,
                            "{dtype:?}, bias {bias}, dropout {dropout}: {what} differs by {d}"
                        );
                    }
                }
            }
        }
    });
}

/// bf16 compute with the adapter held in f32, as training holds it: the
/// gradients come back in f32 and agree with autograd's composition.
#[test]
fn composed_lora_projection_in_bf16_gives_f32_adapter_gradients() {
    with_big_stack(|| {
        let mut i = inputs(DType::BF16, true, true);
        i.a = Var::from_tensor(&randn(&[3, 12], DType::F32)).unwrap();
        i.b = Var::from_tensor(&randn(&[7, 3], DType::F32)).unwrap();
        let ours = run(composed, &i);
        let slow = run(lora_linear_slow, &i);
        assert_eq!(ours[2].dtype(), DType::F32);
        assert_eq!(ours[3].dtype(), DType::F32);
        for (what, (f, s)) in ["y", "dx", "dA", "dB"].iter().zip(ours.iter().zip(&slow)) {
            let scale = max_abs_diff_f64(s, &s.zeros_like().unwrap()).max(1.0);
            let d = max_abs_diff_f64(f, s) / scale;
            assert!(d < 2e-2, "{what} differs by {d} (relative)");
        }
    });
}

#[test]
fn composed_lora_projection_gradients_match_finite_differences() {
    with_big_stack(|| {
        let i = inputs(DType::F64, true, true);
        let [_, dx, da, db] = run(composed, &i);
        let objective = |x: &Tensor, a: &Tensor, b: &Tensor| {
            let adapter = Adapter {
                a,
                b,
                scale: SCALE,
                dropout: i.mask.as_ref(),
            };
            weighted_sum(&composed(x, (&i.w, i.bias.as_ref()), &adapter).unwrap(), &i)
                .to_scalar::<f64>()
                .unwrap()
        };
        let nudge = |t: &Tensor, index: usize, h: f64| {
            let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[index] += h;
            Tensor::from_vec(v, t.shape(), t.device()).unwrap()
        };
        let (x, a, b) = (i.x.as_tensor(), i.a.as_tensor(), i.b.as_tensor());
        let h = 1e-6;
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (dx, da, db) = (flat(&dx), flat(&da), flat(&db));
        for index in [0, 13, 35] {
            let numeric = (objective(x, &nudge(a, index, h), b)
                - objective(x, &nudge(a, index, -h), b))
                / (2.0 * h);
            assert!(
                (numeric - da[index]).abs() < 1e-6,
                "dA[{index}]: {} vs {numeric}",
                da[index]
            );
        }
        for index in [0, 11, 20] {
            let numeric = (objective(x, a, &nudge(b, index, h))
                - objective(x, a, &nudge(b, index, -h)))
                / (2.0 * h);
            assert!(
                (numeric - db[index]).abs() < 1e-6,
                "dB[{index}]: {} vs {numeric}",
                db[index]
            );
        }
        // x entries whose dropout mask is 0 (index 1) and 1/(1-p) (index 2).
        for index in [1, 2] {
            let numeric = (objective(&nudge(x, index, h), a, b)
                - objective(&nudge(x, index, -h), a, b))
                / (2.0 * h);
            assert!(
                (numeric - dx[index]).abs() < 1e-6,
                "dx[{index}]: {} vs {numeric}",
                dx[index]
            );
        }
    });
}

/// On q8_0 blocks and FP8 codes: the same as the composition of the block
/// format's own product and the adapter, which the GPU's path ran before.
#[test]
fn composed_lora_projection_on_block_formats_matches_their_composition() {
    with_big_stack(|| {
        let x = Var::from_tensor(&randn(&[2, 5, 64], DType::F32)).unwrap();
        let a = Var::from_tensor(&randn(&[3, 64], DType::F32)).unwrap();
        let b = Var::from_tensor(&randn(&[7, 3], DType::F32)).unwrap();
        let bias = randn(&[7], DType::F32);
        let weights = randn(&[2, 5, 7], DType::F32);
        let mask = dropout_mask(&[2, 5, 64], DType::F32);
        for quantization in [Quantization::Q8_0, Quantization::Fp8] {
            let w = FrozenWeight::quantize(randn(&[7, 64], DType::F32), quantization, &Device::Cpu)
                .unwrap();
            assert!(w.as_dense().is_none(), "{quantization:?} held as blocks");
            let adapter = Adapter {
                a: a.as_tensor(),
                b: b.as_tensor(),
                scale: SCALE,
                dropout: Some(&mask),
            };
            let grads_of = |y: Tensor| {
                let g = y
                    .mul(&weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                [y, get(&x), get(&a), get(&b)]
            };
            let ours =
                grads_of(lora_linear_composed(x.as_tensor(), (&w, Some(&bias)), &adapter).unwrap());
            let want = grads_of(
                (frozen_projection(x.as_tensor(), &w, Some(&bias)).unwrap()
                    + adapter_delta(x.as_tensor(), &adapter).unwrap())
                .unwrap(),
            );
            for (what, (f, s)) in ["y", "dx", "dA", "dB"].iter().zip(ours.iter().zip(&want)) {
                let d = max_abs_diff_f64(f, s);
                assert!(d < 1e-4, "{quantization:?}: {what} differs by {d}");
            }
        }
    });
}

#[test]
fn composed_projection_gives_a_frozen_input_no_gradient_and_needs_no_graph_without_vars() {
    with_big_stack(|| {
        let i = inputs(DType::F32, false, false);
        let x = i.x.as_tensor().detach();
        let y = project(composed, &i, i.a.as_tensor(), &x);
        let grads = weighted_sum(&y, &i).backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(i.a.as_tensor()).is_some() && grads.get(i.b.as_tensor()).is_some());
        // A frozen adapter on a frozen input (evaluation): no graph at all.
        let (a, b) = (i.a.as_tensor().detach(), i.b.as_tensor().detach());
        let adapter = Adapter {
            a: &a,
            b: &b,
            scale: SCALE,
            dropout: None,
        };
        let y = composed(&x, (&i.w, None), &adapter).unwrap();
        assert!(!y.track_op());
        let want = lora_linear_slow(&x, (&i.w, None), &adapter).unwrap();
        assert!(max_abs_diff_f64(&y, &want) < 1e-5);
    });
}
