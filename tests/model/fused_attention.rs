//! The fused attention op and the tiled one (every other device) against
//! the composition of candle ops they replace (forward and the gradients of
//! q, k and v), against central finite differences at the causal and tile
//! boundaries, and across thread counts.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::fused_attention::{
    attention, attention_slow, key_span, AttentionMask,
};
use lora_runner::model::kernels::tiled_attention::{tile_tokens, tiled_attention, TILE_SCORES};

/// The model's additive mask [B, t, past + t] for rows whose positions are
/// real (true) or padding: causal, padding hidden, optional sliding window.
fn mask(real: &[Vec<bool>], past: usize, window: Option<usize>) -> AttentionMask {
    let (m, dims) = mask_values(real, past, window);
    AttentionMask::from_vec(m, dims, &Device::Cpu).unwrap()
}

/// A mask's values, row-major, and its (B, t, T).
type MaskValues = (Vec<f32>, (usize, usize, usize));

/// `mask`'s values.
fn mask_values(real: &[Vec<bool>], past: usize, window: Option<usize>) -> MaskValues {
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
    (m, (real.len(), total - past, total))
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

/// Output and the gradients of sum(output ∘ weights) by q, k, v.
fn run(
    f: impl Fn(&Tensor, &Tensor, &Tensor, &AttentionMask) -> candle_core::Result<Tensor>,
    x: &Inputs,
) -> [Tensor; 4] {
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
                    // In f64: an f32 cast of two f64 values can land a
                    // whole f32 ulp apart (3.7e-9 here) however close they are.
                    let d = max_abs_diff_f64(f, s);
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
            .unwrap()
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

/// The mask of sequences of `lengths` packed into one row: each sees its
/// own earlier tokens (within `window`), as `AttentionContext::packed`.
fn packed_mask(lengths: &[usize], window: Option<usize>) -> AttentionMask {
    let (m, dims) = packed_mask_values(lengths, window);
    AttentionMask::from_vec(m, dims, &Device::Cpu).unwrap()
}

/// `packed_mask`'s values, row-major, and its (1, t, t).
fn packed_mask_values(lengths: &[usize], window: Option<usize>) -> MaskValues {
    let total: usize = lengths.iter().sum();
    let mut m = vec![-1e30f32; total * total];
    let mut start = 0;
    for &len in lengths {
        for pos in 0..len {
            let query = start + pos;
            for key in start..=query {
                if window.is_none_or(|w| query - key < w) {
                    m[query * total + key] = 0.0;
                }
            }
        }
        start += len;
    }
    (m, (1, total, total))
}

/// The cases above plus packed rows (with and without a window), each
/// with its inputs.
fn tiled_cases(dtype: DType) -> Vec<(String, Inputs)> {
    let mut out: Vec<(String, Inputs)> = cases()
        .iter()
        .map(|c| (c.name.to_string(), inputs(c, dtype)))
        .collect();
    for (name, window) in [("packed", None), ("packed, window 5", Some(5))] {
        let lengths = [9, 20, 1, 13];
        let c = Case {
            name: "packed",
            real: vec![row(43, 0, 0)],
            past: 0,
            kv_heads: 2,
            rep: 2,
            hd: 4,
            window: None,
        };
        let mut x = inputs(&c, dtype);
        x.mask = packed_mask(&lengths, window);
        out.push((name.to_string(), x));
    }
    out
}

#[test]
fn tiled_attention_matches_the_composition_with_gradients_at_any_tile_size() {
    with_big_stack(|| {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (name, x) in tiled_cases(dtype) {
                for softcap in [None, Some(2.0)] {
                    let slow = run(|q, k, v, m| attention_slow(q, k, v, m, softcap), &x);
                    // One token a tile, tiles that end off every boundary,
                    // the 64-row block, and one tile for everything.
                    for tile in [1, 7, 16, 64, 1000] {
                        let tiled = run(
                            |q, k, v, m| tiled_attention(q, k, v, m, softcap, Some(tile)),
                            &x,
                        );
                        for (what, (f, s)) in ["output", "dq", "dk", "dv"]
                            .iter()
                            .zip(tiled.iter().zip(&slow))
                        {
                            // Relative to the largest entry: a key's gradient sums
                            // over up to 70 tiles in f32 (random inputs put 1e-5
                            // absolute at the edge of its rounding).
                            let scale = max_abs_diff_f64(s, &s.zeros_like().unwrap()).max(1.0);
                            let d = max_abs_diff_f64(f, s);
                            assert!(
                                d < tol * scale,
                                "{name}, {dtype:?}, tile {tile}, cap {softcap:?}: {what} differs by {d} (largest {scale})"
                            );
                        }
                    }
                }
            }
        }
    });
}

#[test]
fn tiled_attention_in_bf16_is_as_accurate_as_the_composition() {
    with_big_stack(|| {
        for (name, x) in tiled_cases(DType::BF16) {
            // The truth: the same bf16 inputs, computed in f64.
            let var =
                |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
            let exact = Inputs {
                q: var(&x.q),
                k: var(&x.k),
                v: var(&x.v),
                mask: x.mask.clone(),
                weights: x.weights.to_dtype(DType::F64).unwrap(),
            };
            let truth = run(|q, k, v, m| attention_slow(q, k, v, m, None), &exact);
            let slow = run(|q, k, v, m| attention_slow(q, k, v, m, None), &x);
            let tiled = run(|q, k, v, m| tiled_attention(q, k, v, m, None, Some(16)), &x);
            for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
                let scale = max_abs_diff_f64(&truth[i], &truth[i].zeros_like().unwrap()).max(1.0);
                let ours = max_abs_diff_f64(&tiled[i], &truth[i]) / scale;
                let theirs = max_abs_diff_f64(&slow[i], &truth[i]) / scale;
                // bf16 keeps 8 bits (2^-8 = 0.004 relative): the tiles may
                // round differently from the composition, never by more.
                assert!(
                    ours <= 1.5 * theirs + 8e-3,
                    "{name}, bf16: {what} off by {ours} (relative), the composition by {theirs}"
                );
            }
        }
    });
}

#[test]
fn tiled_attention_gradients_match_finite_differences_at_tile_and_causal_edges() {
    with_big_stack(|| {
        let c = &cases()[0];
        let mut x = inputs(c, DType::F64);
        // As above: no loss reads a query that sees no key.
        let sees_a_key = x
            .mask
            .dense()
            .unwrap()
            .max_keepdim(2)
            .unwrap()
            .ge(-1e29)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .unsqueeze(1)
            .unwrap()
            .repeat((1, c.kv_heads, c.rep, c.hd))
            .unwrap();
        x.weights = x.weights.mul(&sees_a_key).unwrap();
        let tile = 16;
        let f = |q: &Tensor, k: &Tensor| {
            tiled_attention(q, k, x.v.as_tensor(), &x.mask, None, Some(tile))
                .unwrap()
                .mul(&x.weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let [_, dq, dk, _] = run(
            |q, k, v, m| tiled_attention(q, k, v, m, None, Some(tile)),
            &x,
        );
        let (t, hd) = (c.real[0].len(), c.hd);
        let dq = dq.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let dk = dk.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-5;
        let (q0, k0) = (x.q.as_tensor(), x.k.as_tensor());
        // The first query that sees a key, the last of a tile and the first
        // of the next, and a padded query of row 1.
        for (b, tok) in [(0usize, 5usize), (0, 15), (0, 16), (1, 60)] {
            let i = ((b * c.kv_heads) * c.rep * t + tok) * hd;
            let numeric = (f(&nudge(q0, i, h), k0) - f(&nudge(q0, i, -h), k0)) / (2.0 * h);
            assert!(
                (numeric - dq[i]).abs() < 1e-6,
                "dq at row {b} token {tok}: {} vs {numeric}",
                dq[i]
            );
        }
        // The key on the diagonal of a tile's first query (which the tile
        // before never sees), the last key a tile sees, the last real key
        // of row 1.
        for (b, tok) in [(0usize, 16usize), (0, 31), (1, 49)] {
            let i = ((b * c.kv_heads) * t + tok) * hd + 1;
            let numeric = (f(q0, &nudge(k0, i, h)) - f(q0, &nudge(k0, i, -h))) / (2.0 * h);
            assert!(
                (numeric - dk[i]).abs() < 1e-6,
                "dk at row {b} key {tok}: {} vs {numeric}",
                dk[i]
            );
        }
        let hidden = (c.kv_heads * t + 69) * hd;
        assert_eq!(dk[hidden..hidden + hd], vec![0.0; hd][..]);
    });
}

#[test]
fn tiled_attention_without_a_graph_returns_the_same_output() {
    with_big_stack(|| {
        for (name, x) in tiled_cases(DType::F64) {
            let (q, k, v) = (
                x.q.as_tensor().detach(),
                x.k.as_tensor().detach(),
                x.v.as_tensor().detach(),
            );
            let tiled = tiled_attention(&q, &k, &v, &x.mask, None, Some(7)).unwrap();
            assert!(!tiled.track_op(), "{name}: a graph without Vars");
            let slow = attention_slow(&q, &k, &v, &x.mask, None).unwrap();
            assert!(max_abs_diff_f64(&tiled, &slow) < 1e-12, "{name}");
        }
    });
}

#[test]
fn a_tile_holds_at_most_its_budget_of_scores() {
    // The 0.5B shape at 2048 and 8192 tokens, a 7B shape at 8192.
    for (rows, heads, keys) in [(1, 14, 2048), (1, 14, 8192), (1, 28, 8192), (4, 28, 32768)] {
        let tile = tile_tokens(rows, heads, keys, keys);
        assert_eq!(tile % 16, 0);
        assert!(
            tile == 16 || rows * heads * tile * keys <= TILE_SCORES,
            "{rows}×{heads}×{tile}×{keys}"
        );
        assert!(rows * heads * (tile + 16) * keys > TILE_SCORES || tile == keys);
    }
    // Never more tokens than there are, never none.
    assert_eq!(tile_tokens(1, 2, 10, 10), 10);
    assert_eq!(tile_tokens(1, 1, 0, 0), 1);
}

#[test]
fn a_block_computes_the_union_of_its_rows_keys_and_nothing_for_no_rows() {
    assert_eq!(key_span(&[3..5, 1..4, 2..2]), 1..5);
    assert_eq!(key_span(&[]), 0..0);
    // No new queries (an empty step): an empty output, not an error.
    let q = Tensor::zeros((1, 2, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let kv = randn(&[1, 2, 3, 4], DType::F32);
    let m = AttentionMask::from_vec(vec![], (1, 0, 3), &Device::Cpu).unwrap();
    let out = tiled_attention(&q, &kv, &kv, &m, None, None).unwrap();
    assert_eq!(out.dims(), &[1, 2, 0, 4]);
}

/// The same mask with its values kept, not its spans.
fn dense_form(m: &AttentionMask) -> AttentionMask {
    let values = m
        .dense()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    AttentionMask::from_vec_dense(values, m.dims(), &Device::Cpu).unwrap()
}

/// The model's masks are kept as spans (`from_vec` finds them, `from_spans`
/// takes them), and every tile built from the spans holds the dense values
/// bit for bit: at the first and last token and key, across block,
/// padding, window, cache and packed-sequence edges, and for rows that see
/// no key. Query selection keeps them so; a mask with a hole keeps its
/// values.
#[test]
fn masks_kept_as_spans_build_the_dense_values_bit_for_bit() {
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    let mut masks: Vec<(String, MaskValues)> = cases()
        .iter()
        .map(|c| (c.name.to_string(), mask_values(&c.real, c.past, c.window)))
        .collect();
    masks.push((
        "packed, window 3".into(),
        packed_mask_values(&[5, 1, 9], Some(3)),
    ));
    masks.push(("packed".into(), packed_mask_values(&[7, 16], None)));
    for (name, (values, dims)) in masks {
        let (b, t, keys) = dims;
        let spans = AttentionMask::from_vec(values.clone(), dims, &Device::Cpu).unwrap();
        let dense = AttentionMask::from_vec_dense(values.clone(), dims, &Device::Cpu).unwrap();
        assert!(spans.is_spans() && !dense.is_spans(), "{name}");
        assert_eq!(spans.dims(), dims);
        assert_eq!(spans.visible(), dense.visible(), "{name}");
        let expected = |tokens: &std::ops::Range<usize>, ks: &std::ops::Range<usize>| {
            let mut out = Vec::new();
            for row in 0..b {
                for tok in tokens.clone() {
                    let at = (row * t + tok) * keys;
                    out.extend(
                        values[at + ks.start..at + ks.end]
                            .iter()
                            .map(|v| v.to_bits()),
                    );
                }
            }
            out
        };
        for tokens in [0..t, 0..1, t - 1..t, 1..t.min(17)] {
            for ks in [0..keys, 0..1, keys - 1..keys, 2..keys.min(9)] {
                let tile = spans.tile(tokens.clone(), ks.clone()).unwrap();
                assert_eq!(tile.dims(), [b, tokens.len(), ks.len()]);
                assert_eq!(
                    bits(&tile),
                    expected(&tokens, &ks),
                    "{name} {tokens:?} {ks:?}"
                );
            }
        }
        // The same queries selected from either form.
        let rows = [t - 1, 0, t / 2];
        let idx = Tensor::from_vec(rows.map(|r| r as u32).to_vec(), 3, &Device::Cpu).unwrap();
        let (a, z) = (
            spans.select_queries(&rows, &idx).unwrap(),
            dense.select_queries(&rows, &idx).unwrap(),
        );
        assert!(a.is_spans());
        assert_eq!(
            bits(&a.dense().unwrap()),
            bits(&z.dense().unwrap()),
            "{name}"
        );
        assert_eq!(a.visible(), z.visible());
    }
    // A row with a hole (key 1 hidden between shown keys) is no span.
    let holed = AttentionMask::from_vec(vec![0.0, -1e30, 0.0], (1, 1, 3), &Device::Cpu).unwrap();
    assert!(!holed.is_spans());
    // Spans outside the keys are refused, not a panic.
    let outside = [0..2, 1..4];
    let err = AttentionMask::from_spans(&outside, (1, 2, 3), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("outside 3 keys"), "{err}");
}

/// Attention over a mask kept as spans gives the output and gradients it
/// gives over the same mask's values, bit for bit, in f32 and f64: the
/// fused CPU kernel (which reads either) and the tiles (which build their
/// mask from either). The fused kernel over a mask with a hole matches the
/// composition.
#[test]
fn attention_over_spans_equals_it_over_the_dense_values() {
    with_big_stack(|| {
        for dtype in [DType::F32, DType::F64] {
            for (name, x) in tiled_cases(dtype) {
                let dense = Inputs {
                    mask: dense_form(&x.mask),
                    q: Var::from_tensor(x.q.as_tensor()).unwrap(),
                    k: Var::from_tensor(x.k.as_tensor()).unwrap(),
                    v: Var::from_tensor(x.v.as_tensor()).unwrap(),
                    weights: x.weights.clone(),
                };
                assert!(x.mask.is_spans() && !dense.mask.is_spans());
                let tiled = |q: &Tensor, k: &Tensor, v: &Tensor, m: &AttentionMask| {
                    tiled_attention(q, k, v, m, None, Some(16))
                };
                let fused = |q: &Tensor, k: &Tensor, v: &Tensor, m: &AttentionMask| {
                    attention(q, k, v, m, None)
                };
                for (a, z) in [
                    (run(tiled, &x), run(tiled, &dense)),
                    (run(fused, &x), run(fused, &dense)),
                ] {
                    for (i, (a, z)) in a.iter().zip(&z).enumerate() {
                        assert_eq!(max_abs_diff(a, z), 0.0, "{name} {dtype:?} [{i}]");
                    }
                }
            }
        }
        // Row 0 sees keys 0 and 2 but not 1; row 1 sees key 1 only.
        let m = AttentionMask::from_vec(
            vec![0.0, -1e30, 0.0, -1e30, 0.0, -1e30],
            (1, 2, 3),
            &Device::Cpu,
        )
        .unwrap();
        assert!(!m.is_spans());
        let x = Inputs {
            q: Var::from_tensor(&randn(&[1, 1, 2, 4], DType::F64)).unwrap(),
            k: Var::from_tensor(&randn(&[1, 1, 3, 4], DType::F64)).unwrap(),
            v: Var::from_tensor(&randn(&[1, 1, 3, 4], DType::F64)).unwrap(),
            mask: m,
            weights: randn(&[1, 1, 2, 4], DType::F64),
        };
        let fast = run(|q, k, v, m| attention(q, k, v, m, None), &x);
        let slow = run(|q, k, v, m| attention_slow(q, k, v, m, None), &x);
        for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
            assert!(max_abs_diff_f64(f, s) < 1e-12, "holed mask [{i}]");
        }
    });
}
