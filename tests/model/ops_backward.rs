//! Each custom op against the slow differentiable composition of candle
//! ops: forward values and backward gradients; frozen weights get none.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::ops;

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Gradient of sum(f(x) * r) with respect to `x`, where r is a fixed random tensor.
fn grad_of(x: &Var, y: &Tensor, r: &Tensor) -> Tensor {
    let loss = y.mul(r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    grads.get(x.as_tensor()).expect("input gradient").clone()
}

#[test]
fn frozen_matmul_matches_matmul_and_skips_weight_grad() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&randn(&[2, 5, 7], dtype)).unwrap();
            let w = randn(&[3, 7], dtype);
            let r = randn(&[2, 5, 3], dtype);
            let fast = ops::frozen_matmul(x.as_tensor(), &w).unwrap();
            let slow = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
            assert!(max_abs_diff(&fast, &slow) < 1e-5);
            let loss = fast.mul(&r).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(&w).is_none(), "frozen weight got a gradient");
            let g_fast = grads.get(x.as_tensor()).unwrap().clone();
            let g_slow = grad_of(&x, &slow, &r);
            assert!(max_abs_diff(&g_fast, &g_slow) < 1e-5);
        }
        // A trainable weight does get its (correct) gradient.
        let x = randn(&[4, 6], DType::F32);
        let w = Var::from_tensor(&randn(&[3, 6], DType::F32)).unwrap();
        let r = randn(&[4, 3], DType::F32);
        let g_fast = grad_of(&w, &ops::frozen_matmul(&x, w.as_tensor()).unwrap(), &r);
        let g_slow = grad_of(&w, &x.matmul(&w.as_tensor().t().unwrap()).unwrap(), &r);
        assert!(max_abs_diff(&g_fast, &g_slow) < 1e-5);
    });
}

#[test]
fn softmax_matches_composition() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&(randn(&[3, 4, 9], dtype) * 3.0).unwrap()).unwrap();
            let r = randn(&[3, 4, 9], dtype);
            let fast = ops::softmax_last_dim(x.as_tensor()).unwrap();
            let slow = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1).unwrap();
            assert!(max_abs_diff(&fast, &slow) < 1e-6);
            let d = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
            assert!(d < 1e-5, "softmax grad diff {d}");
        }
    });
}

#[test]
fn rms_norm_matches_composition() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&randn(&[2, 3, 16], dtype)).unwrap();
            let w = (randn(&[16], dtype) + 1.0).unwrap();
            let r = randn(&[2, 3, 16], dtype);
            let fast = ops::rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
            let slow = ops::rms_norm_slow(x.as_tensor(), &w, 1e-6).unwrap();
            assert!(max_abs_diff(&fast, &slow) < 1e-5);
            let d = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
            assert!(d < 1e-4, "rms_norm grad diff {d}");
        }
        // Weight gradient when the weight is trainable.
        let x = randn(&[5, 8], DType::F32);
        let w = Var::from_tensor(&randn(&[8], DType::F32)).unwrap();
        let r = randn(&[5, 8], DType::F32);
        let d = max_abs_diff(
            &grad_of(&w, &ops::rms_norm(&x, w.as_tensor(), 1e-6).unwrap(), &r),
            &grad_of(
                &w,
                &ops::rms_norm_slow(&x, w.as_tensor(), 1e-6).unwrap(),
                &r,
            ),
        );
        assert!(d < 1e-4, "rms_norm weight grad diff {d}");
    });
}

#[test]
fn rope_matches_composition() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let (b, h, t, d) = (2, 3, 5, 8);
            let x = Var::from_tensor(&randn(&[b, h, t, d], dtype)).unwrap();
            let angles = (randn(&[b, t, d / 2], DType::F32) * 3.0).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let r = randn(&[b, h, t, d], dtype);
            let fast = ops::rope(x.as_tensor(), &cos, &sin).unwrap();
            let slow = ops::rope_slow(x.as_tensor(), &cos, &sin).unwrap();
            assert!(max_abs_diff(&fast, &slow) < 1e-5);
            let diff = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
            assert!(diff < 1e-5, "rope grad diff {diff}");
        }
    });
}

#[test]
fn token_logprobs_match_composition() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&(randn(&[6, 50], dtype) * 4.0).unwrap()).unwrap();
            let targets = [0u32, 49, 7, 7, 23, 1];
            let r = randn(&[6], dtype);
            let fast = ops::token_logprobs(x.as_tensor(), &targets).unwrap();
            let slow = ops::token_logprobs_slow(x.as_tensor(), &targets).unwrap();
            // And against candle_nn's log_softmax + manual indexing.
            let ls = candle_nn::ops::log_softmax(x.as_tensor(), candle_core::D::Minus1).unwrap();
            let ls = ls.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            let f = fast.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for (i, &t) in targets.iter().enumerate() {
                assert!((f[i] - ls[i][t as usize]).abs() < 1e-5);
            }
            assert!(max_abs_diff(&fast, &slow) < 1e-5);
            let d = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
            assert!(d < 1e-5, "token_logprobs grad diff {d}");
        }
        assert!(ops::token_logprobs(&randn(&[2, 5], DType::F32), &[1, 5]).is_err());
    });
}

#[test]
fn frozen_linear_with_bias_matches_composition() {
    with_big_stack(|| {
        let x = Var::from_tensor(&randn(&[2, 3, 6], DType::F32)).unwrap();
        let w = randn(&[4, 6], DType::F32);
        let b = randn(&[4], DType::F32);
        let r = randn(&[2, 3, 4], DType::F32);
        let fast = ops::frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap();
        let slow = x
            .as_tensor()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5);
        let grads = fast.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(&w).is_none() && grads.get(&b).is_none(),
            "frozen weight/bias got a gradient"
        );
        let d = max_abs_diff(grads.get(x.as_tensor()).unwrap(), &grad_of(&x, &slow, &r));
        assert!(d < 1e-5, "{d}");
        // A trainable bias gets sum-over-rows.
        let bv = Var::from_tensor(&b).unwrap();
        let g_fast = grad_of(
            &bv,
            &ops::frozen_linear(x.as_tensor(), &w, Some(bv.as_tensor())).unwrap(),
            &r,
        );
        let g_slow = grad_of(
            &bv,
            &x.as_tensor()
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(bv.as_tensor())
                .unwrap(),
            &r,
        );
        assert!(max_abs_diff(&g_fast, &g_slow) < 1e-5);
    });
}

#[test]
fn mul_by_constant_matches_mul() {
    with_big_stack(|| {
        let x = Var::from_tensor(&randn(&[5, 7], DType::F32)).unwrap();
        let c = randn(&[5, 7], DType::F32);
        let r = randn(&[5, 7], DType::F32);
        let fast = ops::mul_by_constant(x.as_tensor(), &c).unwrap();
        let slow = x.as_tensor().mul(&c).unwrap();
        assert_eq!(max_abs_diff(&fast, &slow), 0.0);
        let grads = fast.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&c).is_none());
        assert!(max_abs_diff(grads.get(x.as_tensor()).unwrap(), &grad_of(&x, &slow, &r)) < 1e-6);
    });
}

#[test]
fn masked_softmax_matches_composition() {
    with_big_stack(|| {
        let (b, g, tq, t) = (2, 3, 4, 4);
        let rep = 2;
        // Causal mask for batch 0; batch 1 also hides key 0 (padding).
        let mut m = vec![0f32; b * tq * t];
        for bi in 0..b {
            for i in 0..tq {
                for j in 0..t {
                    if j > i || (bi == 1 && j == 0) {
                        m[(bi * tq + i) * t + j] = -1e30;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, tq, t), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&(randn(&[b, g, rep * tq, t], dtype) * 3.0).unwrap()).unwrap();
            let r = randn(&[b, g, rep * tq, t], dtype);
            let fast = ops::masked_softmax(x.as_tensor(), &mask).unwrap();
            let slow = ops::masked_softmax_slow(x.as_tensor(), &mask).unwrap();
            assert!(max_abs_diff(&fast, &slow) < 1e-6);
            let d = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
            assert!(d < 1e-5, "masked softmax grad diff {d}");
        }
    });
}

#[test]
fn swiglu_matches_composition_including_saturated_and_zero_gates() {
    with_big_stack(|| {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            // Random gates plus the edges: 0, tiny, and saturated either way.
            let mut g = Tensor::randn(0f32, 2.0, 24, &Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            g[..6].copy_from_slice(&[0.0, 1e-3, -100.0, 100.0, -20.0, 20.0]);
            let g = Tensor::from_vec(g, (2, 3, 4), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gate = Var::from_tensor(&g).unwrap();
            let up = Var::from_tensor(&randn(&[2, 3, 4], dtype)).unwrap();
            let r = randn(&[2, 3, 4], dtype);
            let fast = ops::swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
            let slow = ops::swiglu_slow(gate.as_tensor(), up.as_tensor()).unwrap();
            assert!(max_abs_diff(&fast, &slow) < tol);
            let grads = |y: &Tensor| {
                let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
                let gg = g.get(gate.as_tensor()).unwrap().clone();
                let gu = g.get(up.as_tensor()).unwrap().clone();
                (gg, gu)
            };
            let (fg, fu) = grads(&fast);
            let (sg, su) = grads(&slow);
            assert!(
                max_abs_diff(&fg, &sg) < tol,
                "dgate {}",
                max_abs_diff(&fg, &sg)
            );
            assert!(
                max_abs_diff(&fu, &su) < tol,
                "dup {}",
                max_abs_diff(&fu, &su)
            );
            let finite = fg.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            assert!(finite
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
        // d/dg silu(g) at 0 is 1/2 (closed form), so dgate = up/2 there.
        let gate = Var::from_tensor(&Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let up = Tensor::new(&[1.0f64, -2.0, 4.0], &Device::Cpu).unwrap();
        let y = ops::swiglu(gate.as_tensor(), &up).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let dg = g.get(gate.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(dg, vec![0.5, -1.0, 2.0]);
    });
}
