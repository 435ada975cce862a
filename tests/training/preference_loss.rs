//! Every preference loss against a closed form written out here: values on
//! fixed log-probs, and the gradient that reaches the policy's log-probs
//! through `attach` against central finite differences of that closed form,
//! at Δ = 0 (where every DPO run starts), at both signs, and at the kinks.

use candle_core::{DType, Device, Tensor, Var};
use lora_runner::train::preference_loss::{
    attach, Divergence, LossParams, LossTerm, PairBatch, PreferenceLoss,
};

/// Pair 0 sits at policy == reference (Δ = 0), pair 1 has Δ > 0, pair 2 Δ < 0.
fn batch(policy: &[f64]) -> PairBatch {
    let b = policy.len() / 2;
    PairBatch {
        policy_chosen: policy[..b].to_vec(),
        policy_rejected: policy[b..].to_vec(),
        reference_chosen: vec![-6.0, -9.5, -4.0],
        reference_rejected: vec![-7.0, -9.5, -4.0],
        chosen_tokens: vec![3.0, 4.0, 2.0],
        rejected_tokens: vec![2.0, 5.0, 3.0],
        weights: Vec::new(),
    }
}

/// Policy log-probs: chosen [-6, -8.2, -4.5], rejected [-7, -10, -3.0] (βΔ = 0, 0.9, -0.75).
const POLICY: [f64; 6] = [-6.0, -8.2, -4.5, -7.0, -10.0, -3.0];

const PARAMS: LossParams = LossParams {
    beta: 0.5,
    label_smoothing: 0.1,
    simpo_gamma: 0.3,
    discopop_tau: 0.05,
    divergence: Divergence::ReverseKl,
};

fn ln_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The loss written directly from the papers' / TRL 1.16's definitions.
fn closed_form(term: LossTerm, b: &PairBatch, p: &LossParams) -> f64 {
    let n = b.pairs();
    let (beta, eps) = (p.beta, p.label_smoothing);
    let rho_c = |i: usize| b.policy_chosen[i] - b.reference_chosen[i];
    let rho_r = |i: usize| b.policy_rejected[i] - b.reference_rejected[i];
    let delta = |i: usize| rho_c(i) - rho_r(i);
    let smoothed = |z: f64| -(1.0 - eps) * ln_sigmoid(z) - eps * ln_sigmoid(-z);
    let mean = |f: &dyn Fn(usize) -> f64| (0..n).map(f).sum::<f64>() / n as f64;
    let nll = -b.policy_chosen.iter().sum::<f64>() / b.chosen_tokens.iter().sum::<f64>();
    let sorted = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        v
    };
    match term {
        LossTerm::Sigmoid => mean(&|i| smoothed(beta * delta(i))),
        LossTerm::Hinge => mean(&|i| (1.0 - beta * delta(i)).max(0.0)),
        LossTerm::Ipo => mean(&|i| {
            let d = rho_c(i) / b.chosen_tokens[i] - rho_r(i) / b.rejected_tokens[i];
            (d - 1.0 / (2.0 * beta)).powi(2)
        }),
        LossTerm::ExoPair => mean(&|i| {
            // KL(softmax(β·[ρ⁺, ρ⁻]) || [1 − ε, ε]).
            let (qw, ql) = (sigmoid(beta * delta(i)), sigmoid(-beta * delta(i)));
            qw * (qw / (1.0 - eps)).ln() + ql * (ql / eps).ln()
        }),
        LossTerm::NcaPair => mean(&|i| {
            -ln_sigmoid(beta * rho_c(i))
                - 0.5 * ln_sigmoid(-beta * rho_c(i))
                - 0.5 * ln_sigmoid(-beta * rho_r(i))
        }),
        LossTerm::Robust => mean(&|i| {
            let z = beta * delta(i);
            (-(1.0 - eps) * ln_sigmoid(z) + eps * ln_sigmoid(-z)) / (1.0 - 2.0 * eps)
        }),
        LossTerm::BcoPair => mean(&|i| -ln_sigmoid(beta * rho_c(i)) - ln_sigmoid(-beta * rho_r(i))),
        LossTerm::SppoHard => {
            mean(&|i| (rho_c(i) - 0.5 / beta).powi(2) + (rho_r(i) + 0.5 / beta).powi(2))
        }
        LossTerm::Aot => {
            let policy = sorted(
                (0..n)
                    .map(|i| b.policy_chosen[i] - b.policy_rejected[i])
                    .collect(),
            );
            let reference = sorted(
                (0..n)
                    .map(|i| b.reference_chosen[i] - b.reference_rejected[i])
                    .collect(),
            );
            mean(&|k| smoothed(beta * (policy[k] - reference[k])))
        }
        LossTerm::AotUnpaired => {
            let c = sorted((0..n).map(rho_c).collect());
            let r = sorted((0..n).map(rho_r).collect());
            mean(&|k| smoothed(beta * (c[k] - r[k])))
        }
        LossTerm::ApoZero => mean(&|i| 1.0 - sigmoid(beta * rho_c(i)) + sigmoid(beta * rho_r(i))),
        LossTerm::ApoDown => mean(&|i| sigmoid(beta * rho_c(i)) + 1.0 - sigmoid(beta * delta(i))),
        LossTerm::Discopop => mean(&|i| {
            let z = beta * delta(i);
            let m = sigmoid(z / p.discopop_tau);
            -ln_sigmoid(z) * (1.0 - m) + (-z).exp() * m
        }),
        LossTerm::Sft => nll,
        LossTerm::SigmoidNorm => mean(&|i| {
            -ln_sigmoid(beta * (rho_c(i) / b.chosen_tokens[i] - rho_r(i) / b.rejected_tokens[i]))
        }),
        LossTerm::Simpo => mean(&|i| {
            let margin = b.policy_chosen[i] / b.chosen_tokens[i]
                - b.policy_rejected[i] / b.rejected_tokens[i];
            smoothed(beta * margin - p.simpo_gamma)
        }),
        LossTerm::Orpo => {
            // odds(p) = p / (1 − p) of the per-token mean probability.
            let log_odds = |logp: f64| logp - (1.0 - logp.exp()).ln();
            nll - beta
                * mean(&|i| {
                    ln_sigmoid(
                        log_odds(b.policy_chosen[i] / b.chosen_tokens[i])
                            - log_odds(b.policy_rejected[i] / b.rejected_tokens[i]),
                    )
                })
        }
    }
}

/// Value and gradient with respect to the policy log-probs, through the
/// tensor path training uses.
fn through_tensors(loss: &PreferenceLoss, policy: &[f64]) -> (f64, Vec<f64>) {
    let var = Var::from_tensor(&Tensor::new(policy, &Device::Cpu).unwrap()).unwrap();
    let evaluated = loss.evaluate(&batch(policy));
    let t = attach(var.as_tensor(), &evaluated.total).unwrap();
    let grads = t.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
        g,
    )
}

/// Central differences of the closed form.
fn numeric_gradient(f: &dyn Fn(&[f64]) -> f64, at: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    (0..at.len())
        .map(|k| {
            let (mut up, mut down) = (at.to_vec(), at.to_vec());
            up[k] += h;
            down[k] -= h;
            (f(&up) - f(&down)) / (2.0 * h)
        })
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{k}]: {g} vs {w} (all: {got:?} vs {want:?})"
        );
    }
}

#[test]
fn every_term_matches_its_closed_form_in_value_and_gradient() {
    for term in LossTerm::ALL {
        let loss = PreferenceLoss::single(term, PARAMS);
        let (value, grad) = through_tensors(&loss, &POLICY);
        let want = closed_form(term, &batch(&POLICY), &PARAMS);
        assert!(
            (value - want).abs() < 1e-12 * (1.0 + want.abs()),
            "{term:?}: {value} vs {want}"
        );
        let numeric = numeric_gradient(&|p| closed_form(term, &batch(p), &PARAMS), &POLICY);
        assert_close(&format!("{term:?} gradient"), &grad, &numeric, 1e-6);
        assert!(grad.iter().any(|g| g.abs() > 1e-4), "{term:?}: no gradient");
    }
}

#[test]
fn sigmoid_at_policy_equal_reference_is_ln2_with_half_beta_gradient() {
    // One pair at Δ = 0: loss ln 2, ∂/∂chosen = −β·σ(0) = −β/2, ∂/∂rejected = +β/2.
    let beta = 0.1;
    let loss = PreferenceLoss::single(
        LossTerm::Sigmoid,
        LossParams {
            beta,
            label_smoothing: 0.0,
            ..LossParams::default()
        },
    );
    let b = PairBatch {
        policy_chosen: vec![-3.0],
        policy_rejected: vec![-5.0],
        reference_chosen: vec![-3.0],
        reference_rejected: vec![-5.0],
        chosen_tokens: vec![2.0],
        rejected_tokens: vec![2.0],
        weights: Vec::new(),
    };
    let e = loss.evaluate(&b);
    assert!((e.total.value - std::f64::consts::LN_2).abs() < 1e-15);
    assert_eq!(e.total.d_chosen, vec![-beta / 2.0]);
    assert_eq!(e.total.d_rejected, vec![beta / 2.0]);
    // And through the tensor path, in f32 as training runs.
    let var = Var::from_tensor(&Tensor::new(&[-3.0f32, -5.0], &Device::Cpu).unwrap()).unwrap();
    let t = attach(var.as_tensor(), &e.total).unwrap();
    let g = t
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(g, vec![-0.05f32, 0.05]);
    assert_eq!(t.to_scalar::<f32>().unwrap(), std::f32::consts::LN_2);
}

#[test]
fn zero_margin_gradients_of_the_logistic_terms_are_their_closed_forms() {
    // At Δ = 0 and ρ⁺ = ρ⁻ = 0, the derivative in the chosen log-prob: of
    // robust −β/(2(1−2ε)), of cDPO −β(1−2ε)/2, of apo_zero −β/4, of
    // sigmoid_norm −β/2 per token, of hinge −β.
    let p = LossParams {
        beta: 0.4,
        label_smoothing: 0.2,
        ..LossParams::default()
    };
    let b = PairBatch {
        policy_chosen: vec![-2.0],
        policy_rejected: vec![-3.0],
        reference_chosen: vec![-2.0],
        reference_rejected: vec![-3.0],
        chosen_tokens: vec![1.0],
        rejected_tokens: vec![1.0],
        weights: Vec::new(),
    };
    let d = |term| PreferenceLoss::single(term, p).evaluate(&b).total.d_chosen[0];
    assert!((d(LossTerm::Robust) - -0.4 / (2.0 * 0.6)).abs() < 1e-15);
    assert!((d(LossTerm::Sigmoid) - -0.4 * 0.6 / 2.0).abs() < 1e-15);
    assert!((d(LossTerm::ApoZero) - -0.1).abs() < 1e-15);
    assert!((d(LossTerm::SigmoidNorm) - -0.2).abs() < 1e-15);
    assert_eq!(d(LossTerm::Hinge), -0.4);
}

#[test]
fn hinge_has_subgradient_zero_at_its_kink_and_minus_beta_before_it() {
    let p = LossParams {
        beta: 0.5,
        ..LossParams::default()
    };
    let at = |delta: f64| {
        let b = PairBatch {
            policy_chosen: vec![delta],
            policy_rejected: vec![0.0],
            reference_chosen: vec![0.0],
            reference_rejected: vec![0.0],
            chosen_tokens: vec![1.0],
            rejected_tokens: vec![1.0],
            weights: Vec::new(),
        };
        PreferenceLoss::single(LossTerm::Hinge, p)
            .evaluate(&b)
            .total
    };
    // βΔ = 1 is the kink: loss 0 and, as PyTorch's relu, gradient 0.
    assert_eq!((at(2.0).value, at(2.0).d_chosen[0]), (0.0, 0.0));
    assert_eq!(at(1.999).d_chosen[0], -0.5);
    assert_eq!((at(3.0).value, at(3.0).d_chosen[0]), (0.0, 0.0));
}

#[test]
fn logistic_losses_stay_finite_far_out() {
    let p = LossParams {
        beta: 1.0,
        ..LossParams::default()
    };
    let b = PairBatch {
        policy_chosen: vec![800.0, -800.0],
        policy_rejected: vec![0.0, 0.0],
        reference_chosen: vec![0.0, 0.0],
        reference_rejected: vec![0.0, 0.0],
        chosen_tokens: vec![1.0, 1.0],
        rejected_tokens: vec![1.0, 1.0],
        weights: Vec::new(),
    };
    let e = PreferenceLoss::single(LossTerm::Sigmoid, p)
        .evaluate(&b)
        .total;
    // −log σ(800) ≈ 0, −log σ(−800) = 800; mean 400. Gradients 0 and −1, halved.
    assert!((e.value - 400.0).abs() < 1e-9, "{}", e.value);
    assert_close("far-out gradient", &e.d_chosen, &[0.0, -0.5], 1e-12);
}

#[test]
fn weighted_combinations_sum_their_terms() {
    let combos: [&[(LossTerm, f64)]; 3] = [
        &[(LossTerm::Sigmoid, 1.0), (LossTerm::Sft, 0.2)],
        &[
            (LossTerm::Ipo, 0.5),
            (LossTerm::Hinge, 2.0),
            (LossTerm::BcoPair, 0.0),
        ],
        &[(LossTerm::Simpo, 1.0), (LossTerm::Sft, 1.0)],
    ];
    for terms in combos {
        let loss = PreferenceLoss {
            terms: terms.to_vec(),
            params: PARAMS,
        };
        let sum = |p: &[f64]| {
            terms
                .iter()
                .map(|&(t, w)| w * closed_form(t, &batch(p), &PARAMS))
                .sum::<f64>()
        };
        let (value, grad) = through_tensors(&loss, &POLICY);
        assert!((value - sum(&POLICY)).abs() < 1e-12, "{terms:?}");
        assert_close(
            &format!("{terms:?}"),
            &grad,
            &numeric_gradient(&sum, &POLICY),
            1e-6,
        );
        // Each term is reported unweighted.
        let e = loss.evaluate(&batch(&POLICY));
        for (&(t, _), &(reported, v)) in terms.iter().zip(&e.terms) {
            assert_eq!(t, reported);
            assert!((v - closed_form(t, &batch(&POLICY), &PARAMS)).abs() < 1e-12);
        }
    }
}

#[test]
fn only_reference_free_terms_skip_the_reference() {
    let free: Vec<LossTerm> = LossTerm::ALL
        .into_iter()
        .filter(|t| !t.needs_reference())
        .collect();
    assert_eq!(free, [LossTerm::Sft, LossTerm::Simpo, LossTerm::Orpo]);
    let mixed = PreferenceLoss {
        terms: vec![(LossTerm::Simpo, 1.0), (LossTerm::Sigmoid, 1.0)],
        params: PARAMS,
    };
    assert!(mixed.needs_reference());
    // SimPO and ORPO do not read the reference at all.
    for term in [LossTerm::Simpo, LossTerm::Orpo] {
        let loss = PreferenceLoss::single(term, PARAMS);
        let mut moved = batch(&POLICY);
        moved.reference_chosen = vec![1.0, 2.0, 3.0];
        assert_eq!(loss.evaluate(&moved), loss.evaluate(&batch(&POLICY)));
    }
}

#[test]
fn autodiff_through_the_relu_abs_composition_misses_at_zero() {
    // Why the losses carry their own derivative: log σ(x) written as
    // −(relu(−x) + log(1 + e^(−|x|))), the form used before, gets candle's
    // subgradients of relu and abs at 0, not σ(0) = 1/2.
    let x = Var::from_tensor(&Tensor::new(&[0.0f64], &Device::Cpu).unwrap()).unwrap();
    let t = x.as_tensor();
    let softplus = (t.neg().unwrap().relu().unwrap()
        + (t.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap())
    .unwrap();
    let log_sigmoid = softplus.neg().unwrap().sum_all().unwrap();
    let g = log_sigmoid
        .backward()
        .unwrap()
        .get(t)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!((g - 0.5).abs() > 0.1, "candle's composition now gives {g}");
    // The closed form used instead.
    let b = PairBatch {
        policy_chosen: vec![0.0],
        policy_rejected: vec![0.0],
        reference_chosen: vec![0.0],
        reference_rejected: vec![0.0],
        chosen_tokens: vec![1.0],
        rejected_tokens: vec![1.0],
        weights: Vec::new(),
    };
    let p = LossParams {
        beta: 1.0,
        ..LossParams::default()
    };
    let d = PreferenceLoss::single(LossTerm::Sigmoid, p)
        .evaluate(&b)
        .total
        .d_chosen[0];
    assert_eq!(d, -0.5);
}

#[test]
fn metrics_match_trl_definitions() {
    use lora_runner::train::preference_loss::dpo_metrics;
    let b = PairBatch {
        policy_chosen: vec![-3.0, -10.0, -4.0],
        policy_rejected: vec![-5.0, -9.0, -4.5],
        reference_chosen: vec![-4.0, -9.5, -4.0],
        reference_rejected: vec![-4.5, -9.5, -4.0],
        chosen_tokens: vec![2.0, 4.0, 1.0],
        rejected_tokens: vec![1.0, 2.0, 5.0],
        weights: Vec::new(),
    };
    let m = dpo_metrics(&b, 0.1, false);
    // chosen rewards 0.1·[1, -0.5, 0]; rejected 0.1·[-0.5, 0.5, -0.5]
    assert!((m.rewards_chosen - 0.1 * 0.5 / 3.0).abs() < 1e-12);
    assert!((m.rewards_rejected - 0.1 * -0.5 / 3.0).abs() < 1e-12);
    assert!((m.rewards_accuracies - 2.0 / 3.0).abs() < 1e-12);
    assert!((m.rewards_margins - 0.1 * (1.5 - 1.0 + 0.5) / 3.0).abs() < 1e-12);
    assert!((m.logps_chosen - (-17.0 / 3.0)).abs() < 1e-12);
    assert!((m.logps_rejected - (-18.5 / 3.0)).abs() < 1e-12);
    let json = serde_json::to_value(&m).unwrap();
    assert!(
        json.get("rewards/accuracies").is_some(),
        "TRL's metric names"
    );
    // Per token (SimPO, ORPO): chosen 0.1·[0.5, -0.125, 0], rejected 0.1·[-0.5, 0.25, -0.1].
    let m = dpo_metrics(&b, 0.1, true);
    assert!((m.rewards_chosen - 0.1 * 0.375 / 3.0).abs() < 1e-12);
    assert!((m.rewards_rejected - 0.1 * -0.35 / 3.0).abs() < 1e-12);
    assert!((m.rewards_accuracies - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn every_term_matches_trl_1_16_itself() {
    // Made by scripts/trl_losses.py: TRL's own loss code, float64 autograd.
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/trl-1.16-losses.json")).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let b = &fixture["batch"];
    let batch = PairBatch {
        policy_chosen: floats(&b["policy_chosen"]),
        policy_rejected: floats(&b["policy_rejected"]),
        reference_chosen: floats(&b["reference_chosen"]),
        reference_rejected: floats(&b["reference_rejected"]),
        chosen_tokens: floats(&b["chosen_tokens"]),
        rejected_tokens: floats(&b["rejected_tokens"]),
        weights: Vec::new(),
    };
    let losses = fixture["losses"].as_object().unwrap();
    assert_eq!(losses.len(), LossTerm::ALL.len());
    for term in LossTerm::ALL {
        // The recipe's (serde) name and the one matched here are TRL's.
        assert_eq!(serde_json::to_value(term).unwrap(), term.name());
        assert_eq!(LossTerm::from_name(term.name()), Some(term));
        let want = &losses[term.name()];
        let params = LossParams {
            beta: fixture["params"]["beta"].as_f64().unwrap(),
            label_smoothing: want["label_smoothing"].as_f64().unwrap(),
            simpo_gamma: fixture["params"]["simpo_gamma"].as_f64().unwrap(),
            discopop_tau: fixture["params"]["discopop_tau"].as_f64().unwrap(),
            divergence: Divergence::ReverseKl,
        };
        let got = PreferenceLoss::single(term, params).evaluate(&batch).total;
        let value = want["value"].as_f64().unwrap();
        // TRL's ORPO casts the log-probs to float32 first.
        let tol = if term == LossTerm::Orpo { 1e-7 } else { 1e-12 };
        assert!(
            (got.value - value).abs() < tol * (1.0 + value.abs()),
            "{term:?}: {} vs TRL {value}",
            got.value
        );
        assert_close(
            &format!("{term:?} d_chosen"),
            &got.d_chosen,
            &floats(&want["d_chosen"]),
            tol,
        );
        assert_close(
            &format!("{term:?} d_rejected"),
            &got.d_rejected,
            &floats(&want["d_rejected"]),
            tol,
        );
    }
}

fn trl_fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("../fixtures/trl-1.16-losses.json")).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn fixture_params(fixture: &serde_json::Value, case: &serde_json::Value) -> LossParams {
    LossParams {
        beta: fixture["params"]["beta"].as_f64().unwrap(),
        label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        simpo_gamma: fixture["params"]["simpo_gamma"].as_f64().unwrap(),
        discopop_tau: fixture["params"]["discopop_tau"].as_f64().unwrap(),
        divergence: Divergence::ReverseKl,
    }
}

/// f-DPO: every loss that takes a divergence, under forward KL, JS and α
/// (0.5; 1, its reverse-KL limit; −200, past TRL's clamp), against TRL's
/// own `_compute_loss`.
#[test]
fn f_divergences_match_trl_1_16_itself() {
    let fixture = trl_fixture();
    let batch = batch(&POLICY);
    let cases = fixture["divergences"].as_array().unwrap();
    assert_eq!(cases.len(), 34);
    for case in cases {
        let term = LossTerm::from_name(case["loss"].as_str().unwrap()).unwrap();
        assert!(term.takes_divergence(), "{term:?}");
        let divergence = Divergence::from_name(
            case["f_divergence_type"].as_str().unwrap(),
            case["f_alpha_divergence_coef"].as_f64().unwrap(),
        )
        .unwrap();
        let params = LossParams {
            divergence,
            ..fixture_params(&fixture, case)
        };
        let got = PreferenceLoss::single(term, params).evaluate(&batch).total;
        // TRL's α-divergence runs in float32 (it has no float64 clamp).
        let tol = if case["float32"].as_bool().unwrap() {
            3e-6
        } else {
            1e-12
        };
        let what = format!("{term:?} {divergence:?}");
        let value = case["value"].as_f64().unwrap();
        assert!(
            (got.value - value).abs() <= tol * (1.0 + value.abs()),
            "{what}: {} vs TRL {value}",
            got.value
        );
        assert_close(&what, &got.d_chosen, &floats(&case["d_chosen"]), tol);
        assert_close(&what, &got.d_rejected, &floats(&case["d_rejected"]), tol);
    }
}

/// Each divergence's score derivative against central differences of its
/// score, at 0, both signs, and either side of the α clamp.
#[test]
fn divergence_scores_have_their_derivatives() {
    for d in [
        Divergence::ReverseKl,
        Divergence::ForwardKl,
        Divergence::Js,
        Divergence::Alpha(0.5),
        Divergence::Alpha(1.0 + 1e-7),
        Divergence::Alpha(3.0),
    ] {
        for rho in [-4.0, -0.5, 0.0, 0.5, 4.0] {
            let h = 1e-6;
            let numeric = (d.score(rho + h).0 - d.score(rho - h).0) / (2.0 * h);
            let (_, analytic) = d.score(rho);
            assert!(
                (numeric - analytic).abs() < 1e-6 * (1.0 + analytic.abs()),
                "{d:?} at {rho}: {analytic} vs {numeric}"
            );
        }
    }
    // At ρ = 0 (policy = reference) the scores are 0; the slope is 1, JS's ½.
    for d in [Divergence::ForwardKl, Divergence::Alpha(0.5)] {
        assert_eq!(d.score(0.0), (0.0, 1.0), "{d:?}");
    }
    assert!(Divergence::Js.score(0.0).0.abs() < 1e-15);
    assert_eq!(Divergence::Js.score(0.0).1, 0.5);
    // α = −1: the exponent −2ρ passes TRL's clamp (80) at ρ = −40: the
    // score stops there and its derivative is 0, as torch.clamp's.
    let a = Divergence::Alpha(-1.0);
    let (below, d_below) = a.score(-39.9);
    let (past, d_past) = a.score(-40.1);
    assert!(d_below > 0.0 && d_past == 0.0);
    assert!(past < below && past == a.score(-60.0).0);
}

/// One of TRL's token-level cases (LD-DPO, WPO): per-token log-probs that
/// differ within a row, summed as the trainer sums them (the tokens past
/// the shorter side weighed α, policy and reference alike), WPO's pair
/// weights from the per-token log-probs and log Σ p²; value and every
/// completion token's gradient against TRL's.
fn check_token_level_case(fixture: &serde_json::Value, case: &serde_json::Value, tol: f64) {
    use lora_runner::model::decoder::weighted_sum_by_sequence;
    use lora_runner::train::dpo::{ld_weights, wpo_weights};
    let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array().unwrap().iter().map(floats).collect()
    };
    let (mask, policy) = (rows(&case["mask"]), rows(&case["policy"]));
    // Targets as the model gives them: each row's completion tokens in
    // order (the mask's position k + 1 predicts log-prob k).
    let mut targets = Vec::new();
    for (row, m) in mask.iter().enumerate() {
        for k in 0..m.len() - 1 {
            if m[k + 1] == 1.0 {
                targets.push((row, k, 0u32));
            }
        }
    }
    let mut counts = vec![0f32; mask.len()];
    for &(row, _, _) in &targets {
        counts[row] += 1.0;
    }
    let alpha = case["ld_alpha"].as_f64();
    let weights = match alpha {
        Some(a) => ld_weights(&targets, &counts, a as f32),
        None => vec![1.0; targets.len()],
    };
    let gather =
        |v: &[Vec<f64>]| -> Vec<f64> { targets.iter().map(|&(r, k, _)| v[r][k]).collect() };
    let var = Var::from_tensor(&Tensor::new(gather(&policy), &Device::Cpu).unwrap()).unwrap();
    let sums = weighted_sum_by_sequence(var.as_tensor(), &targets, &weights, mask.len()).unwrap();
    let b = mask.len() / 2;
    let (reference_chosen, reference_rejected) = match case.get("reference") {
        Some(reference) => {
            let r: Vec<f64> = weighted_sum_by_sequence(
                &Tensor::new(gather(&rows(reference)), &Device::Cpu).unwrap(),
                &targets,
                &weights,
                mask.len(),
            )
            .unwrap()
            .to_vec1()
            .unwrap();
            (r[..b].to_vec(), r[b..].to_vec())
        }
        None => (
            floats(&case["reference_chosen"]),
            floats(&case["reference_rejected"]),
        ),
    };
    let pair_weights = match case.get("log_sum_sq_probs") {
        Some(sum_sq) => {
            let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
            let w = wpo_weights(
                &f32s(gather(&policy)),
                &f32s(gather(&rows(sum_sq))),
                &targets,
                mask.len(),
            );
            (0..b)
                .map(|i| f64::from(w[i]) * f64::from(w[b + i]))
                .collect()
        }
        None => Vec::new(),
    };
    let s: Vec<f64> = sums.to_vec1().unwrap();
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let pairs = PairBatch {
        policy_chosen: s[..b].to_vec(),
        policy_rejected: s[b..].to_vec(),
        reference_chosen,
        reference_rejected,
        chosen_tokens: widen(&counts[..b]),
        rejected_tokens: widen(&counts[b..]),
        weights: pair_weights,
    };
    let term = LossTerm::from_name(case["loss"].as_str().unwrap()).unwrap();
    let loss = PreferenceLoss::single(term, fixture_params(fixture, case));
    let evaluated = loss.evaluate(&pairs);
    let what = format!("{term:?} ld_alpha {alpha:?}");
    let value = case["value"].as_f64().unwrap();
    assert!(
        (evaluated.total.value - value).abs() < tol * (1.0 + value.abs()),
        "{what}: {} vs TRL {value}",
        evaluated.total.value
    );
    // TRL's gradient at the completion tokens (its shared mask also
    // reaches padding after a row, where log-probs are 0); none where
    // TRL's own backward fails.
    if !case["grad"].is_null() {
        let t = attach(&sums, &evaluated.total).unwrap();
        let got: Vec<f64> = t
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_close(&what, &got, &gather(&rows(&case["grad"])), tol);
    }
    match alpha {
        Some(a) if a != 1.0 => assert!(weights.contains(&(a as f32)), "{what}: a tail"),
        _ => assert!(weights.iter().all(|&w| w == 1.0)),
    }
}

/// LD-DPO, α 0, 0.5 and 1 on sigmoid, ipo and hinge.
#[test]
fn ld_dpo_matches_trl_1_16_itself() {
    let fixture = trl_fixture();
    let cases = fixture["ld_alpha"].as_array().unwrap();
    assert_eq!(cases.len(), 9);
    for case in cases {
        check_token_level_case(&fixture, case, 1e-12);
    }
}

/// WPO on sigmoid, ipo, robust, hinge (TRL's value only: its backward
/// fails there) and sigmoid with LD-DPO; the weights come through f32, as
/// the trainer's log-probs do.
#[test]
fn wpo_matches_trl_1_16_itself() {
    let fixture = trl_fixture();
    let cases = fixture["use_weighting"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        check_token_level_case(&fixture, case, 1e-6);
    }
    // The weights matter: without them the first case's value differs.
    let case = &cases[0];
    let mut unweighted = case.clone();
    unweighted
        .as_object_mut()
        .unwrap()
        .remove("log_sum_sq_probs");
    let result = std::panic::catch_unwind(|| check_token_level_case(&fixture, &unweighted, 1e-6));
    assert!(result.is_err(), "WPO's weights change the loss");
}
