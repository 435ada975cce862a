//! The head's token log-probs on the compositions' path (`head_logprobs`):
//! against the plain composition (logits, log-softmax, gather) with its
//! autograd gradient, soft-capped or not, across chunk boundaries, at
//! saturated logits, and by finite differences.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor, Var};
use lora_runner::model::kernels::head_logprobs::head_token_logprobs;
use lora_runner::model::kernels::ops::token_logprobs_slow;

struct Case {
    rows: Var,
    weight: Tensor,
    targets: Vec<u32>,
    /// Per-row weights of the objective Σ wᵢ·logpᵢ.
    weights: Tensor,
}

fn case(dtype: DType, (n, hidden, vocab): (usize, usize, usize), scale: f64) -> Case {
    let randn = |shape: (usize, usize), s: f64| {
        (Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap() * s)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    Case {
        rows: Var::from_tensor(&randn((n, hidden), scale)).unwrap(),
        weight: randn((vocab, hidden), 1.0),
        // The first and the last vocabulary entry among the targets.
        targets: (0..n)
            .map(|i| ((i * 7) % vocab) as u32)
            .chain([vocab as u32 - 1])
            .take(n)
            .collect(),
        weights: randn((n, 1), 1.0).squeeze(1).unwrap(),
    }
}

fn product(weight: &Tensor) -> impl Fn(&Tensor) -> candle_core::Result<Tensor> + '_ {
    move |x: &Tensor| {
        let z = x.matmul(&weight.t()?)?;
        match z.dtype() {
            DType::F64 => Ok(z),
            _ => z.to_dtype(DType::F32),
        }
    }
}

/// Log-probs and the gradient of Σ w·logp by the rows: `chunk` Some runs
/// the op, None the composition.
fn run(c: &Case, softcap: Option<f64>, chunk: Option<usize>) -> (Tensor, Tensor) {
    let rows = c.rows.as_tensor();
    let logp = match chunk {
        Some(chunk) => head_token_logprobs(
            rows,
            &c.weight,
            &product(&c.weight),
            softcap,
            &c.targets,
            chunk,
        )
        .unwrap(),
        None => {
            let mut z = product(&c.weight)(rows).unwrap();
            if let Some(cap) = softcap {
                z = ((z / cap).unwrap().tanh().unwrap() * cap).unwrap();
            }
            token_logprobs_slow(&z, &c.targets).unwrap()
        }
    };
    let w = c.weights.to_dtype(logp.dtype()).unwrap();
    let grads = (&logp * w).unwrap().sum_all().unwrap().backward().unwrap();
    (logp, grads.get(rows).expect("a gradient").clone())
}

#[test]
fn head_logprobs_match_the_composition_and_its_gradient_across_chunks() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
        // Comfortable logits, and saturated ones (the softmax all but
        // one-hot, the cap's tanh flat).
        for scale in [0.3, 30.0] {
            let c = case(dtype, (11, 6, 37), scale);
            for softcap in [None, Some(5.0)] {
                let (want, want_grad) = run(&c, softcap, None);
                for chunk in [1, 4, 11, 64] {
                    let (got, grad) = run(&c, softcap, Some(chunk));
                    let scale_of =
                        |t: &Tensor| max_abs_diff_f64(t, &t.zeros_like().unwrap()).max(1.0);
                    let d = max_abs_diff_f64(&got, &want) / scale_of(&want);
                    assert!(
                        d < tol,
                        "{dtype:?} ×{scale} cap {softcap:?} chunk {chunk}: log-probs {d}"
                    );
                    let d = max_abs_diff_f64(&grad, &want_grad) / scale_of(&want_grad);
                    assert!(
                        d < tol,
                        "{dtype:?} ×{scale} cap {softcap:?} chunk {chunk}: gradient {d}"
                    );
                }
            }
        }
    }
}

#[test]
fn head_logprobs_gradient_matches_finite_differences() {
    let c = case(DType::F64, (5, 4, 9), 1.0);
    let softcap = Some(1.5);
    let (_, grad) = run(&c, softcap, Some(2));
    let grad = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let objective = |rows: &Tensor| {
        let logp =
            head_token_logprobs(rows, &c.weight, &product(&c.weight), softcap, &c.targets, 2)
                .unwrap();
        (logp * &c.weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let base = c.rows.as_tensor().detach();
    let h = 1e-6;
    for i in 0..base.elem_count() {
        let nudge = |d: f64| {
            let mut v = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            v[i] += d;
            Tensor::from_vec(v, base.shape(), base.device()).unwrap()
        };
        let numeric = (objective(&nudge(h)) - objective(&nudge(-h))) / (2.0 * h);
        assert!(
            (numeric - grad[i]).abs() < 1e-7,
            "element {i}: {} vs {numeric}",
            grad[i]
        );
    }
}

#[test]
fn head_logprobs_in_bf16_stay_with_the_composition() {
    let c = case(DType::BF16, (9, 16, 50), 1.0);
    let (want, want_grad) = run(&c, None, None);
    let (got, grad) = run(&c, None, Some(4));
    assert_eq!(got.dtype(), DType::F32, "log-probs in f32 for a bf16 model");
    assert!(max_abs_diff_f64(&got, &want) < 1e-5);
    let scale = max_abs_diff_f64(&want_grad, &want_grad.zeros_like().unwrap());
    let d = max_abs_diff_f64(&grad, &want_grad) / scale;
    assert!(d < 2e-2, "bf16 gradient differs by {d} (relative)");
}

#[test]
fn head_logprobs_refuse_a_target_count_that_is_not_the_row_count() {
    let c = case(DType::F32, (3, 4, 5), 1.0);
    let err = head_token_logprobs(
        c.rows.as_tensor(),
        &c.weight,
        &product(&c.weight),
        None,
        &[1],
        2,
    )
    .unwrap_err();
    assert!(err.to_string().contains("3 rows but 1 targets"), "{err}");
}

/// A chunk's f32 logits stay within `CHUNK_BYTES` for any vocabulary that
/// allows 16 rows, in whole 16-row steps, never past 256 rows: 96 rows of
/// Qwen's 151936 entries, 64 of Gemma 3's 262144, 256 of a small vocabulary.
#[test]
fn head_chunks_are_bounded_by_bytes() {
    use lora_runner::model::kernels::head_logprobs::{budget_rows, CHUNK_BYTES};
    assert_eq!(budget_rows(151_936), 96);
    assert_eq!(budget_rows(262_144), 64);
    assert_eq!(budget_rows(100), 256);
    assert_eq!(budget_rows(0), 256);
    assert_eq!(budget_rows(10_000_000), 16);
    for vocab in [1, 1000, 32_000, 65_537, 128_256, 151_936, 256_000, 1 << 20] {
        let rows = budget_rows(vocab);
        assert!(
            rows.is_multiple_of(16) && (16..=256).contains(&rows),
            "{vocab}: {rows}"
        );
        assert!(
            rows == 16 || rows * vocab * 4 <= CHUNK_BYTES,
            "{vocab}: {rows}"
        );
        assert!(
            rows == 256 || (rows + 16) * vocab * 4 > CHUNK_BYTES,
            "{vocab}: {rows}"
        );
    }
}
