//! Preference losses: TRL 1.16's `loss_type` family, SimPO and ORPO, any
//! weighted sum of them, and TRL's DPO metrics.
//!
//! Every term is a function of a handful of numbers per pair (the policy's
//! and the reference's summed completion log-probs and the completion
//! lengths), so it is evaluated here in f64 together with its closed-form
//! derivative, and the derivative is attached to the policy's log-prob
//! tensor by one linear term ([`attach`]). The backward pass is therefore
//! exact everywhere: at Δ = 0, where every DPO run starts and where log σ
//! composed from relu and abs gets the subgradient wrong, and at the hinge,
//! whose subgradient is 0 as in PyTorch.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// One term of a preference loss, named as TRL names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossTerm {
    /// DPO: −log σ(βΔ); with `label_smoothing` ε > 0, cDPO: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ).
    Sigmoid,
    /// max(0, 1 − βΔ) (SLiC).
    Hinge,
    /// IPO: (Δ̄ − 1/(2β))², on per-token mean log-ratios.
    Ipo,
    /// EXO: KL between softmax(βΔ) over {chosen, rejected} and (1−ε, ε); needs ε > 0.
    ExoPair,
    /// NCA: −log σ(βρ⁺) − ½·log σ(−βρ⁺) − ½·log σ(−βρ⁻).
    NcaPair,
    /// Robust DPO: unbiased under labels flipped with probability ε.
    Robust,
    /// BCO on pairs: −log σ(βρ⁺) − log σ(−βρ⁻).
    BcoPair,
    /// SPPO with hard labels: (ρ⁺ − 1/(2β))² + (ρ⁻ + 1/(2β))².
    SppoHard,
    /// AOT: the sigmoid loss on the sorted policy and sorted reference log-ratio margins.
    Aot,
    /// AOT unpaired: the sigmoid loss on sorted ρ⁺ against sorted ρ⁻.
    AotUnpaired,
    /// APO-zero: 1 − σ(βρ⁺) + σ(βρ⁻).
    ApoZero,
    /// APO-down: σ(βρ⁺) + 1 − σ(βΔ).
    ApoDown,
    /// DiscoPOP: log-ratio modulated mix of the logistic and exponential losses (τ = `discopop_tau`).
    Discopop,
    /// Negative log-likelihood of the chosen completions (mean per token): TRL's `sft` / `rpo_alpha`.
    Sft,
    /// `sigmoid` on per-token mean log-ratios.
    SigmoidNorm,
    /// SimPO, no reference: −log σ(β·(l̄⁺ − l̄⁻) − γ) on per-token mean policy log-probs.
    Simpo,
    /// ORPO, no reference: NLL of chosen − β·log σ(log-odds ratio of the mean log-probs).
    Orpo,
}

/// How a term uses `label_smoothing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Smoothing {
    Unused,
    /// In [0, 0.5).
    Optional,
    /// In (0, 0.5).
    Required,
}

impl LossTerm {
    pub const ALL: [LossTerm; 17] = [
        LossTerm::Sigmoid,
        LossTerm::Hinge,
        LossTerm::Ipo,
        LossTerm::ExoPair,
        LossTerm::NcaPair,
        LossTerm::Robust,
        LossTerm::BcoPair,
        LossTerm::SppoHard,
        LossTerm::Aot,
        LossTerm::AotUnpaired,
        LossTerm::ApoZero,
        LossTerm::ApoDown,
        LossTerm::Discopop,
        LossTerm::Sft,
        LossTerm::SigmoidNorm,
        LossTerm::Simpo,
        LossTerm::Orpo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossTerm::Sigmoid => "sigmoid",
            LossTerm::Hinge => "hinge",
            LossTerm::Ipo => "ipo",
            LossTerm::ExoPair => "exo_pair",
            LossTerm::NcaPair => "nca_pair",
            LossTerm::Robust => "robust",
            LossTerm::BcoPair => "bco_pair",
            LossTerm::SppoHard => "sppo_hard",
            LossTerm::Aot => "aot",
            LossTerm::AotUnpaired => "aot_unpaired",
            LossTerm::ApoZero => "apo_zero",
            LossTerm::ApoDown => "apo_down",
            LossTerm::Discopop => "discopop",
            LossTerm::Sft => "sft",
            LossTerm::SigmoidNorm => "sigmoid_norm",
            LossTerm::Simpo => "simpo",
            LossTerm::Orpo => "orpo",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the term compares the policy with a reference policy.
    pub fn needs_reference(self) -> bool {
        !matches!(self, LossTerm::Sft | LossTerm::Simpo | LossTerm::Orpo)
    }

    pub fn smoothing(self) -> Smoothing {
        match self {
            LossTerm::ExoPair => Smoothing::Required,
            LossTerm::Sigmoid
            | LossTerm::Robust
            | LossTerm::Aot
            | LossTerm::AotUnpaired
            | LossTerm::Simpo => Smoothing::Optional,
            _ => Smoothing::Unused,
        }
    }
}

impl LossTerm {
    /// Whether the term reads the chosen-rejected reward difference that an
    /// f-divergence reshapes (TRL's list; `sft` reads no reward and is
    /// allowed beside them). The others have no f-divergence form.
    pub fn takes_divergence(self) -> bool {
        matches!(
            self,
            LossTerm::Sigmoid
                | LossTerm::SigmoidNorm
                | LossTerm::Hinge
                | LossTerm::Ipo
                | LossTerm::ExoPair
                | LossTerm::Robust
                | LossTerm::Discopop
                | LossTerm::Sft
        )
    }
}

impl LossTerm {
    /// Whether WPO's per-pair weights apply: TRL refuses them for the AOT
    /// losses, which sort pairs, and its `sft` term fails under them (an
    /// expanded scalar multiplied in place); SimPO and ORPO are not its DPO
    /// trainer's.
    pub fn takes_weighting(self) -> bool {
        !matches!(
            self,
            LossTerm::Aot
                | LossTerm::AotUnpaired
                | LossTerm::Sft
                | LossTerm::Simpo
                | LossTerm::Orpo
        )
    }
}

/// The f-divergence between policy and reference that the reward
/// difference regularises (f-DPO; TRL's `f_divergence_type`): each side's
/// log-ratio ρ becomes the score f′(e^ρ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// Standard DPO: the score is ρ.
    ReverseKl,
    /// 1 − e^(−ρ).
    ForwardKl,
    /// Jensen-Shannon: log 2 + log σ(ρ).
    Js,
    /// α-divergence: (e^((α−1)ρ) − 1)/(α−1), ρ itself at α = 1.
    Alpha(f64),
}

impl Divergence {
    pub const NAMES: [&'static str; 4] = [
        "reverse_kl",
        "forward_kl",
        "js_divergence",
        "alpha_divergence",
    ];

    /// `name` with the α of `alpha_divergence`.
    pub fn from_name(name: &str, alpha: f64) -> Option<Self> {
        Some(match name {
            "reverse_kl" => Divergence::ReverseKl,
            "forward_kl" => Divergence::ForwardKl,
            "js_divergence" => Divergence::Js,
            "alpha_divergence" => Divergence::Alpha(alpha),
            _ => return None,
        })
    }

    /// The score of log-ratio `rho` and its derivative.
    pub fn score(self, rho: f64) -> (f64, f64) {
        match self {
            Divergence::ReverseKl => (rho, 1.0),
            Divergence::ForwardKl => {
                let e = (-rho).exp();
                (1.0 - e, e)
            }
            Divergence::Js => (std::f64::consts::LN_2 + log_sigmoid(rho), sigmoid(-rho)),
            // TRL falls back to ρ within 1e-6 of the limit α = 1.
            Divergence::Alpha(a) if (a - 1.0).abs() < 1e-6 => (rho, 1.0),
            Divergence::Alpha(a) => {
                // TRL clamps the exponent at 80 (its f32 limit); the clamp's
                // gradient is 0 beyond it, as torch.clamp's is.
                let t = (a - 1.0) * rho;
                let (e, de) = if t > ALPHA_CLAMP {
                    (ALPHA_CLAMP.exp(), 0.0)
                } else {
                    (t.exp(), t.exp())
                };
                ((e - 1.0) / (a - 1.0), de)
            }
        }
    }
}

/// TRL's clamp of the α-divergence's exponent in f32.
const ALPHA_CLAMP: f64 = 80.0;

/// The scalar parameters the terms share.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    /// Temperature of the implicit reward (τ of IPO, λ of ORPO).
    pub beta: f64,
    /// ε: probability that a preference label is flipped.
    pub label_smoothing: f64,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ.
    pub discopop_tau: f64,
    /// What the reward difference regularises (reverse KL: standard DPO).
    pub divergence: Divergence,
}

impl Default for LossParams {
    fn default() -> Self {
        LossParams {
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            divergence: Divergence::ReverseKl,
        }
    }
}

/// Σ wₖ·Lₖ over weighted terms, as TRL's `loss_type` + `loss_weights`.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferenceLoss {
    pub terms: Vec<(LossTerm, f64)>,
    pub params: LossParams,
}

impl PreferenceLoss {
    /// One term of weight 1.
    pub fn single(term: LossTerm, params: LossParams) -> Self {
        PreferenceLoss {
            terms: vec![(term, 1.0)],
            params,
        }
    }

    /// Whether any term needs reference log-probs.
    pub fn needs_reference(&self) -> bool {
        self.terms.iter().any(|(t, _)| t.needs_reference())
    }

    /// Whether rewards are logged on per-token mean log-probs: SimPO and
    /// ORPO without a reference, as TRL's CPO and ORPO trainers log them.
    pub fn rewards_per_token(&self) -> bool {
        !self.needs_reference()
            && self
                .terms
                .iter()
                .any(|(t, _)| matches!(t, LossTerm::Simpo | LossTerm::Orpo))
    }

    /// The total and each term's value, with the total's derivatives.
    pub fn evaluate(&self, batch: &PairBatch) -> LossBreakdown {
        let n = batch.pairs();
        let mut total = LossValue {
            value: 0.0,
            d_chosen: vec![0.0; n],
            d_rejected: vec![0.0; n],
        };
        let mut terms = Vec::with_capacity(self.terms.len());
        for &(term, weight) in &self.terms {
            let v = term_loss(term, batch, &self.params);
            total.value += weight * v.value;
            for i in 0..n {
                total.d_chosen[i] += weight * v.d_chosen[i];
                total.d_rejected[i] += weight * v.d_rejected[i];
            }
            terms.push((term, v.value));
        }
        LossBreakdown { total, terms }
    }
}

/// Per-pair inputs of one batch, on the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairBatch {
    /// Summed completion log-probs under the policy.
    pub policy_chosen: Vec<f64>,
    pub policy_rejected: Vec<f64>,
    /// The same under the reference (zeros when the loss needs none).
    pub reference_chosen: Vec<f64>,
    pub reference_rejected: Vec<f64>,
    /// Completion tokens of each side.
    pub chosen_tokens: Vec<f64>,
    pub rejected_tokens: Vec<f64>,
    /// WPO's weight of each pair, held constant (empty: every pair 1).
    pub weights: Vec<f64>,
}

impl PairBatch {
    pub fn pairs(&self) -> usize {
        self.policy_chosen.len()
    }
}

/// A mean loss over the batch and its derivatives with respect to the
/// policy's summed log-probs of each chosen and each rejected completion.
#[derive(Clone, Debug, PartialEq)]
pub struct LossValue {
    pub value: f64,
    pub d_chosen: Vec<f64>,
    pub d_rejected: Vec<f64>,
}

/// The weighted total and each term's (unweighted) value.
#[derive(Clone, Debug, PartialEq)]
pub struct LossBreakdown {
    pub total: LossValue,
    pub terms: Vec<(LossTerm, f64)>,
}

/// The loss as a scalar tensor whose value is `loss.value` and whose
/// gradient with respect to `policy` (`[2B]`: chosen rows, then rejected)
/// is exactly the closed-form derivative: value + (g·p − stopgrad(g·p)).
pub fn attach(policy: &Tensor, loss: &LossValue) -> Result<Tensor> {
    let mut g: Vec<f64> = loss.d_chosen.clone();
    g.extend_from_slice(&loss.d_rejected);
    let g = Tensor::from_vec(g, policy.dims1()?, policy.device())?.to_dtype(policy.dtype())?;
    let linear = (policy * g)?.sum_all()?;
    let zero_with_gradient = (&linear - linear.detach())?;
    let value = Tensor::new(loss.value, policy.device())?.to_dtype(policy.dtype())?;
    value + zero_with_gradient
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x) without overflow on either side.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// log(1 − eˣ) for x < 0, switching form at −ln 2 to avoid cancellation.
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// The smoothed sigmoid loss −(1−ε)·log σ(z) − ε·log σ(−z) and its derivative in z.
fn smoothed_sigmoid(z: f64, eps: f64) -> (f64, f64) {
    (
        -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
        -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z),
    )
}

/// Token counts as divisors (an empty completion counts as one token, as TRL clamps).
fn tokens(n: f64) -> f64 {
    n.max(1.0)
}

/// The mean over pairs of `wᵢ·f(i)`, `f(i) = (ℓᵢ, ∂ℓᵢ/∂policy_chosenᵢ,
/// ∂ℓᵢ/∂policy_rejectedᵢ)`, `wᵢ` WPO's weight (1 when `weights` is empty).
fn mean_over_pairs(weights: &[f64], n: usize, f: impl Fn(usize) -> (f64, f64, f64)) -> LossValue {
    let scale = 1.0 / n.max(1) as f64;
    let mut out = LossValue {
        value: 0.0,
        d_chosen: vec![0.0; n],
        d_rejected: vec![0.0; n],
    };
    for i in 0..n {
        let (l, dc, dr) = f(i);
        let w = scale * weights.get(i).copied().unwrap_or(1.0);
        out.value += l * w;
        out.d_chosen[i] = dc * w;
        out.d_rejected[i] = dr * w;
    }
    out
}

/// Stable ascending order of `x` (ties keep their index order).
fn argsort(x: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    idx
}

/// AOT's loss: the smoothed sigmoid of β·(sorted u − sorted v), with the
/// derivative of each sorted position sent back to the pair it came from.
fn sorted_sigmoid(
    u: &[f64],
    v: &[f64],
    beta: f64,
    eps: f64,
    send: impl Fn(&mut LossValue, usize, usize, f64),
) -> LossValue {
    let n = u.len();
    let (pu, pv) = (argsort(u), argsort(v));
    let scale = 1.0 / n.max(1) as f64;
    let mut out = LossValue {
        value: 0.0,
        d_chosen: vec![0.0; n],
        d_rejected: vec![0.0; n],
    };
    for k in 0..n {
        let (l, dz) = smoothed_sigmoid(beta * (u[pu[k]] - v[pv[k]]), eps);
        out.value += l * scale;
        send(&mut out, pu[k], pv[k], beta * dz * scale);
    }
    out
}

/// One term's mean over the batch and its derivatives.
pub fn term_loss(term: LossTerm, b: &PairBatch, p: &LossParams) -> LossValue {
    let n = b.pairs();
    let (beta, eps) = (p.beta, p.label_smoothing);
    // ρ⁺ and ρ⁻: policy minus reference log-prob of chosen and rejected.
    let chosen: Vec<f64> = (0..n)
        .map(|i| b.policy_chosen[i] - b.reference_chosen[i])
        .collect();
    let rejected: Vec<f64> = (0..n)
        .map(|i| b.policy_rejected[i] - b.reference_rejected[i])
        .collect();
    let (nc, nr) = (
        |i: usize| tokens(b.chosen_tokens[i]),
        |i: usize| tokens(b.rejected_tokens[i]),
    );
    // The f-divergence's scores of ρ⁺ and ρ⁻ and their derivatives: what
    // the reward-difference terms read (ρ itself under reverse KL).
    let score =
        |rho: &[f64]| -> Vec<(f64, f64)> { rho.iter().map(|&r| p.divergence.score(r)).collect() };
    let (sc, sr) = (score(&chosen), score(&rejected));
    // A loss of z = β·Δ, Δ the score difference: (ℓ, ∂ℓ/∂z) → per-pair derivatives.
    let of_margin = |f: &dyn Fn(f64) -> (f64, f64)| {
        mean_over_pairs(&b.weights, n, |i| {
            let (l, dz) = f(beta * (sc[i].0 - sr[i].0));
            (l, beta * dz * sc[i].1, -beta * dz * sr[i].1)
        })
    };
    match term {
        LossTerm::Sigmoid => of_margin(&|z| smoothed_sigmoid(z, eps)),
        LossTerm::Hinge => of_margin(&|z| {
            // PyTorch's relu has subgradient 0 at its kink.
            if 1.0 - z > 0.0 {
                (1.0 - z, -1.0)
            } else {
                (0.0, 0.0)
            }
        }),
        LossTerm::Robust => of_margin(&|z| {
            let k = 1.0 / (1.0 - 2.0 * eps);
            (
                k * (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)),
                k * (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)),
            )
        }),
        LossTerm::ExoPair => of_margin(&|z| {
            let (qw, ql) = (sigmoid(z), sigmoid(-z));
            let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
            (
                qw * (log_sigmoid(z) - log_pw) + ql * (log_sigmoid(-z) - log_pl),
                // log σ(z) − log σ(−z) = z, so the derivative collapses to this.
                qw * ql * (z - (log_pw - log_pl)),
            )
        }),
        LossTerm::Discopop => of_margin(&|z| {
            let tau = p.discopop_tau;
            let m = sigmoid(z / tau);
            let dm = m * sigmoid(-z / tau) / tau;
            let e = (-z).exp();
            (
                -log_sigmoid(z) * (1.0 - m) + e * m,
                -sigmoid(-z) * (1.0 - m) + log_sigmoid(z) * dm - e * m + e * dm,
            )
        }),
        LossTerm::ApoDown => mean_over_pairs(&b.weights, n, |i| {
            let (a, z) = (beta * chosen[i], beta * (chosen[i] - rejected[i]));
            let (sa, sz) = (sigmoid(a), sigmoid(z));
            let (da, dz) = (sa * (1.0 - sa), sz * (1.0 - sz));
            (sa + 1.0 - sz, beta * (da - dz), beta * dz)
        }),
        LossTerm::ApoZero => mean_over_pairs(&b.weights, n, |i| {
            let (sa, sb) = (sigmoid(beta * chosen[i]), sigmoid(beta * rejected[i]));
            (
                1.0 - sa + sb,
                -beta * sa * (1.0 - sa),
                beta * sb * (1.0 - sb),
            )
        }),
        LossTerm::NcaPair => mean_over_pairs(&b.weights, n, |i| {
            let (a, r) = (beta * chosen[i], beta * rejected[i]);
            (
                -log_sigmoid(a) - 0.5 * log_sigmoid(-a) - 0.5 * log_sigmoid(-r),
                beta * (-sigmoid(-a) + 0.5 * sigmoid(a)),
                beta * 0.5 * sigmoid(r),
            )
        }),
        LossTerm::BcoPair => mean_over_pairs(&b.weights, n, |i| {
            let (a, r) = (beta * chosen[i], beta * rejected[i]);
            (
                -log_sigmoid(a) - log_sigmoid(-r),
                -beta * sigmoid(-a),
                beta * sigmoid(r),
            )
        }),
        LossTerm::SppoHard => mean_over_pairs(&b.weights, n, |i| {
            let (a, r) = (chosen[i] - 0.5 / beta, rejected[i] + 0.5 / beta);
            (a * a + r * r, 2.0 * a, 2.0 * r)
        }),
        LossTerm::Ipo => mean_over_pairs(&b.weights, n, |i| {
            let d = sc[i].0 / nc(i) - sr[i].0 / nr(i) - 1.0 / (2.0 * beta);
            (d * d, 2.0 * d * sc[i].1 / nc(i), -2.0 * d * sr[i].1 / nr(i))
        }),
        LossTerm::SigmoidNorm => mean_over_pairs(&b.weights, n, |i| {
            let z = beta * (sc[i].0 / nc(i) - sr[i].0 / nr(i));
            let (l, dz) = smoothed_sigmoid(z, 0.0);
            (l, beta * dz * sc[i].1 / nc(i), -beta * dz * sr[i].1 / nr(i))
        }),
        LossTerm::Simpo => mean_over_pairs(&b.weights, n, |i| {
            let mean_c = b.policy_chosen[i] / nc(i);
            let mean_r = b.policy_rejected[i] / nr(i);
            let (l, dz) = smoothed_sigmoid(beta * (mean_c - mean_r) - p.simpo_gamma, eps);
            (l, beta * dz / nc(i), -beta * dz / nr(i))
        }),
        LossTerm::Aot => {
            let policy: Vec<f64> = (0..n)
                .map(|i| b.policy_chosen[i] - b.policy_rejected[i])
                .collect();
            let reference: Vec<f64> = (0..n)
                .map(|i| b.reference_chosen[i] - b.reference_rejected[i])
                .collect();
            // Only the policy margins carry a gradient.
            sorted_sigmoid(&policy, &reference, beta, eps, |out, i, _, g| {
                out.d_chosen[i] += g;
                out.d_rejected[i] -= g;
            })
        }
        LossTerm::AotUnpaired => sorted_sigmoid(&chosen, &rejected, beta, eps, |out, i, j, g| {
            out.d_chosen[i] += g;
            out.d_rejected[j] -= g;
        }),
        LossTerm::Sft => chosen_nll(b),
        LossTerm::Orpo => {
            // Mean log-probs are ≤ 0; at exactly 0 the odds are infinite, so
            // stay a hair below (where the derivative is still finite).
            const BELOW_ZERO: f64 = -1e-9;
            let mut odds = mean_over_pairs(&b.weights, n, |i| {
                let lc = (b.policy_chosen[i] / nc(i)).min(BELOW_ZERO);
                let lr = (b.policy_rejected[i] / nr(i)).min(BELOW_ZERO);
                let log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr));
                // d log_odds / d lc = 1 / (1 − e^lc); d / d lr = −1 / (1 − e^lr).
                let dl = -beta * sigmoid(-log_odds);
                (
                    -beta * log_sigmoid(log_odds),
                    dl / (-lc.exp_m1()) / nc(i),
                    -dl / (-lr.exp_m1()) / nr(i),
                )
            });
            let nll = chosen_nll(b);
            odds.value += nll.value;
            for (d, g) in odds.d_chosen.iter_mut().zip(&nll.d_chosen) {
                *d += g;
            }
            odds
        }
    }
}

/// −(Σ chosen log-probs)/(Σ chosen tokens): the token-mean NLL of the chosen completions.
fn chosen_nll(b: &PairBatch) -> LossValue {
    let n = b.pairs();
    let total_tokens = tokens(b.chosen_tokens.iter().sum());
    LossValue {
        value: -b.policy_chosen.iter().sum::<f64>() / total_tokens,
        d_chosen: vec![-1.0 / total_tokens; n],
        d_rejected: vec![0.0; n],
    }
}

/// TRL's DPO metrics for one batch.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct DpoMetrics {
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

/// Rewards are β·(policy − reference) log-prob per sequence, or with
/// `per_token` β·(policy − reference) per completion token (the reference
/// is 0 for reference-free losses); accuracy is the share of pairs whose
/// chosen reward exceeds the rejected one.
pub fn dpo_metrics(b: &PairBatch, beta: f64, per_token: bool) -> DpoMetrics {
    let n = b.pairs().max(1) as f64;
    let reward = |p: &[f64], r: &[f64], len: &[f64]| -> Vec<f64> {
        p.iter()
            .zip(r)
            .zip(len)
            .map(|((p, r), len)| {
                let per = if per_token { tokens(*len) } else { 1.0 };
                beta * (p - r) / per
            })
            .collect()
    };
    let chosen = reward(&b.policy_chosen, &b.reference_chosen, &b.chosen_tokens);
    let rejected = reward(
        &b.policy_rejected,
        &b.reference_rejected,
        &b.rejected_tokens,
    );
    let mean = |x: &[f64]| x.iter().sum::<f64>() / n;
    DpoMetrics {
        rewards_chosen: mean(&chosen),
        rewards_rejected: mean(&rejected),
        rewards_accuracies: chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64 / n,
        rewards_margins: chosen
            .iter()
            .zip(&rejected)
            .map(|(c, r)| c - r)
            .sum::<f64>()
            / n,
        logps_chosen: mean(&b.policy_chosen),
        logps_rejected: mean(&b.policy_rejected),
    }
}
