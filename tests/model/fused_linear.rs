//! The fused LoRA projection against the composition of candle ops it
//! replaces (output; gradients of x, A and B), with and without a bias and
//! a dropout mask, and against central finite differences.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::fused_linear::{lora_linear, lora_linear_slow, Adapter};

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
                        let d = max_abs_diff(f, s);
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
