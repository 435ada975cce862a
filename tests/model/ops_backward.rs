//! Each custom op against the slow differentiable composition of candle
//! ops: forward values and backward gradients; frozen weights get none.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::ops;

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

/// The one-pass dx of RMSNorm (frozen weight) in f64 against the
/// composition's and against central differences, on rows where the norm
/// is ordinary, all zeros (r = 1/sqrt(eps)), tiny against eps, and huge.
#[test]
fn rms_norm_backward_in_one_pass_matches_composition_and_differences() {
    with_big_stack(|| {
        let dim = 6;
        let base = randn(&[4, dim], DType::F64).to_vec2::<f64>().unwrap();
        let rows = [
            base[0].clone(),
            vec![0.0; dim],
            base[2].iter().map(|v| v * 1e-5).collect(),
            base[3].iter().map(|v| v * 1e4).collect(),
        ];
        let flat: Vec<f64> = rows.concat();
        let x = Var::from_vec(flat.clone(), (4, dim), &Device::Cpu).unwrap();
        let w = (randn(&[dim], DType::F64) + 1.0).unwrap();
        let r = randn(&[4, dim], DType::F64);
        let eps = 1e-6;
        let fast = grad_of(&x, &ops::rms_norm(x.as_tensor(), &w, eps).unwrap(), &r);
        let slow = grad_of(&x, &ops::rms_norm_slow(x.as_tensor(), &w, eps).unwrap(), &r);
        let (fast, slow) = (
            fast.to_vec2::<f64>().unwrap(),
            slow.to_vec2::<f64>().unwrap(),
        );
        let loss = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), (4, dim), &Device::Cpu).unwrap();
            let y = ops::rms_norm_slow(&t, &w, eps).unwrap();
            y.mul(&r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for row in 0..4 {
            let scale = fast[row].iter().fold(1e-30f64, |m, v| m.max(v.abs()));
            for i in 0..dim {
                // 1e-8: the fused op holds eps in f32 (1e-6 rounds by 3e-9
                // relative), which the all-zero row's r = 1/sqrt(eps) shows.
                let d = (fast[row][i] - slow[row][i]).abs();
                assert!(
                    d <= 1e-8 * scale,
                    "row {row} [{i}]: {} vs {}",
                    fast[row][i],
                    slow[row][i]
                );
            }
            // Central differences with a step relative to the row's size.
            let size = rows[row].iter().fold(0f64, |m, v| m.max(v.abs()));
            let h = 1e-5 * size.max(1e-3);
            for i in 0..dim {
                let (mut up, mut down) = (flat.clone(), flat.clone());
                up[row * dim + i] += h;
                down[row * dim + i] -= h;
                let numeric = (loss(&up) - loss(&down)) / (2.0 * h);
                let d = (numeric - fast[row][i]).abs();
                assert!(
                    d <= 1e-5 * scale.max(1.0),
                    "row {row} [{i}]: analytic {} numeric {numeric}",
                    fast[row][i]
                );
            }
        }
    });
}

/// split_heads (rope, scale, grouped-query layout in one op) and
/// merge_heads against the reshape/transpose/rope/affine composition:
/// values exactly equal (the op rounds where the composition does), and
/// gradients, for grouped queries (4 heads on 2), keys (rep 1) and values
/// (no rope).
#[test]
fn split_and_merge_heads_match_composition() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            let (b, t, hd) = (2, 5, 8);
            let angles = (randn(&[b, t, hd / 2], DType::F32) * 3.0).unwrap();
            let rotary = ops::Rotary {
                cos: angles.cos().unwrap(),
                sin: angles.sin().unwrap(),
            };
            let cases = [
                (4, 2, Some(&rotary), 0.35),
                (2, 2, Some(&rotary), 1.0),
                (2, 2, None, 1.0),
            ];
            for (heads, kv_heads, rot, scale) in cases {
                let layout = ops::Heads {
                    heads,
                    kv_heads,
                    head_dim: hd,
                };
                let x = Var::from_tensor(&randn(&[b, t, heads * hd], dtype)).unwrap();
                let fast = ops::split_heads(x.as_tensor(), layout, rot, scale).unwrap();
                let slow = ops::split_heads_slow(x.as_tensor(), layout, rot, scale).unwrap();
                assert_eq!(fast.dims(), [b, kv_heads, heads / kv_heads * t, hd]);
                assert_eq!(max_abs_diff(&fast, &slow), 0.0, "{heads}/{kv_heads} values");
                let r = randn(fast.dims(), dtype);
                let d = max_abs_diff(&grad_of(&x, &fast, &r), &grad_of(&x, &slow, &r));
                assert!(d < 1e-6, "{heads}/{kv_heads} {rot:?}: split grad diff {d}");

                let o = Var::from_tensor(&randn(fast.dims(), dtype)).unwrap();
                let fast = ops::merge_heads(o.as_tensor(), layout).unwrap();
                let slow = ops::merge_heads_slow(o.as_tensor(), layout).unwrap();
                assert_eq!(fast.dims(), [b, t, heads * hd]);
                assert_eq!(max_abs_diff(&fast, &slow), 0.0, "{heads}/{kv_heads} merge");
                let r = randn(&[b, t, heads * hd], dtype);
                let d = max_abs_diff(&grad_of(&o, &fast, &r), &grad_of(&o, &slow, &r));
                assert_eq!(d, 0.0, "merge grad diff");
            }
        }
        // A layout that does not fit is an error, not a panic.
        let x = randn(&[1, 3, 20], DType::F32);
        let bad = ops::Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let err = ops::split_heads(&x, bad, None, 1.0).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let o = randn(&[1, 3, 4, 8], DType::F32);
        let err = ops::merge_heads(&o, bad).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
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

/// The GPU's SwiGLU node (its backward written out in candle ops) against
/// the same composition, at the same edges.
#[test]
fn swiglu_matches_composition_on_the_gpu_code_path() {
    passes_on_the_generic_path(
        "ops_backward::swiglu_matches_composition_including_saturated_and_zero_gates",
    );
}
