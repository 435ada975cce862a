//! The fused attention op against the composition of candle ops it
//! replaces (forward and the gradients of q, k and v), against central
//! finite differences at the causal boundary, and across thread counts.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::fused_attention::{attention, attention_slow, AttentionMask};

/// The model's additive mask [B, t, past + t] for rows whose positions are
/// real (true) or padding: causal, padding hidden, optional sliding window.
fn mask(real: &[Vec<bool>], past: usize, window: Option<usize>) -> AttentionMask {
    let total = real[0].len();
    let mut m = Vec::new();
    for row in real {
        for query in past..total {
            for (key, &is_real) in row.iter().enumerate() {
                let ok = key <= query && is_real && window.is_none_or(|w| query - key < w);
                m.push(if ok { 0f32 } else { -1e30 });
            }
        }
    }
    AttentionMask::from_vec(m, (real.len(), total - past, total), &Device::Cpu).unwrap()
}

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// One attention call: q [B, G, rep*t, hd], k and v [B, G, past+t, hd].
struct Case {
    name: &'static str,
    real: Vec<Vec<bool>>,
    past: usize,
    kv_heads: usize,
    rep: usize,
    hd: usize,
    window: Option<usize>,
}

fn row(len: usize, pad_left: usize, pad_right: usize) -> Vec<bool> {
    (0..len)
        .map(|i| i >= pad_left && i < len - pad_right)
        .collect()
}

fn cases() -> Vec<Case> {
    vec![
        // 70 tokens cross a 64-row block; row 1 is right-padded, row 0
        // left-padded (its first queries see no key at all).
        Case {
            name: "blocks and padding",
            real: vec![row(70, 5, 0), row(70, 0, 20)],
            past: 0,
            kv_heads: 2,
            rep: 2,
            hd: 8,
            window: None,
        },
        // A KV cache: 3 cached tokens, 5 new ones, one query head per KV head.
        Case {
            name: "cached keys",
            real: vec![row(8, 0, 0)],
            past: 3,
            kv_heads: 1,
            rep: 1,
            hd: 4,
            window: None,
        },
        // A sliding window hides keys at the start of a row.
        Case {
            name: "sliding window",
            real: vec![row(20, 0, 2)],
            past: 0,
            kv_heads: 1,
            rep: 3,
            hd: 6,
            window: Some(4),
        },
    ]
}

struct Inputs {
    q: Var,
    k: Var,
    v: Var,
    mask: AttentionMask,
    weights: Tensor,
}

fn inputs(c: &Case, dtype: DType) -> Inputs {
    let b = c.real.len();
    let total = c.real[0].len();
    let t = total - c.past;
    let q_shape = [b, c.kv_heads, c.rep * t, c.hd];
    let kv_shape = [b, c.kv_heads, total, c.hd];
    Inputs {
        q: Var::from_tensor(&randn(&q_shape, dtype)).unwrap(),
        k: Var::from_tensor(&randn(&kv_shape, dtype)).unwrap(),
        v: Var::from_tensor(&randn(&kv_shape, dtype)).unwrap(),
        mask: mask(&c.real, c.past, c.window),
        weights: randn(&q_shape, dtype),
    }
}

type Attention = fn(&Tensor, &Tensor, &Tensor, &AttentionMask) -> candle_core::Result<Tensor>;

/// Output and the gradients of sum(output ∘ weights) by q, k, v.
fn run(f: Attention, x: &Inputs) -> [Tensor; 4] {
    let out = f(x.q.as_tensor(), x.k.as_tensor(), x.v.as_tensor(), &x.mask).unwrap();
    let grads = out
        .mul(&x.weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
    [out.clone(), g(&x.q), g(&x.k), g(&x.v)]
}

#[test]
fn fused_attention_matches_the_composition_with_gradients() {
    with_big_stack(|| {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-4)] {
            for c in cases() {
                let x = inputs(&c, dtype);
                let fast = run(|q, k, v, m| attention(q, k, v, m, None), &x);
                let slow = run(|q, k, v, m| attention_slow(q, k, v, m, None), &x);
                for (what, (f, s)) in ["output", "dq", "dk", "dv"]
                    .iter()
                    .zip(fast.iter().zip(&slow))
                {
                    let d = max_abs_diff(f, s);
                    assert!(d < tol, "{}, {dtype:?}: {what} differs by {d}", c.name);
                }
            }
        }
    });
}

/// sum(attention(q, k, v) ∘ weights) in f64.
fn objective(x: &Inputs, q: &Tensor, k: &Tensor) -> f64 {
    attention(q, k, x.v.as_tensor(), &x.mask, None)
        .unwrap()
        .mul(&x.weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Adds `h` to element `index` (flat) of `t`.
fn nudge(t: &Tensor, index: usize, h: f64) -> Tensor {
    let mut data = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    data[index] += h;
    Tensor::from_vec(data, t.shape(), t.device()).unwrap()
}

#[test]
fn fused_attention_gradients_match_finite_differences_at_the_causal_edge() {
    with_big_stack(|| {
        let c = &cases()[0];
        let mut x = inputs(c, DType::F64);
        // A query that sees no key (the left padding of row 0) spreads evenly
        // over all keys whatever the scores: flat in fact, but autograd (the
        // composition's too) passes its formal gradient. No loss reads such a
        // row, so this one does not either.
        let sees_a_key = mask(&c.real, c.past, c.window)
            .dense()
            .max_keepdim(2)
            .unwrap()
            .ge(-1e29)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap() // [B, t, 1]
            .unsqueeze(1)
            .unwrap()
            .repeat((1, c.kv_heads, c.rep, c.hd))
            .unwrap();
        x.weights = x.weights.mul(&sees_a_key).unwrap();
        let [_, dq, dk, _] = run(|q, k, v, m| attention(q, k, v, m, None), &x);
        let (t, hd) = (c.real[0].len(), c.hd);
        let dq = dq.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let dk = dk.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-5;
        // q of the first visible query of row 0 (it sees one key), of the
        // last row of the first 64-row block, and of a padded query in row 1.
        for (b, tok) in [(0usize, 5usize), (0, 63), (1, 60)] {
            let i = ((b * c.kv_heads) * c.rep * t + tok) * hd;
            let numeric = (objective(&x, &nudge(x.q.as_tensor(), i, h), x.k.as_tensor())
                - objective(&x, &nudge(x.q.as_tensor(), i, -h), x.k.as_tensor()))
                / (2.0 * h);
            assert!(
                (numeric - dq[i]).abs() < 1e-6,
                "dq at row {b} token {tok}: {} vs {numeric}",
                dq[i]
            );
        }
        // k of the key right at the diagonal of block two's first query,
        // and the last real key of row 1 (padding follows it).
        for (b, tok) in [(0usize, 64usize), (1, 49)] {
            let i = ((b * c.kv_heads) * t + tok) * hd + 1;
            let numeric = (objective(&x, x.q.as_tensor(), &nudge(x.k.as_tensor(), i, h))
                - objective(&x, x.q.as_tensor(), &nudge(x.k.as_tensor(), i, -h)))
                / (2.0 * h);
            assert!(
                (numeric - dk[i]).abs() < 1e-6,
                "dk at row {b} key {tok}: {} vs {numeric}",
                dk[i]
            );
        }
        // A key hidden from every query (padding) gets exactly no gradient.
        let hidden = ((c.kv_heads) * t + 69) * hd;
        assert_eq!(dk[hidden..hidden + hd], vec![0.0; hd][..]);
    });
}

#[test]
fn fused_attention_is_bitwise_the_same_on_one_thread_and_on_two() {
    with_big_stack(|| {
        let x = inputs(&cases()[0], DType::F32);
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(|q, k, v, m| attention(q, k, v, m, None), &x))
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        assert_eq!(on(1), on(2));
    });
}
