//! DPO losses and TRL's metrics, from per-sequence log-probabilities.

use candle_core::{Result, Tensor, D};

use serde::{Deserialize, Serialize};

/// DPO loss variants.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// -log σ(β·m), with cDPO label smoothing.
    #[default]
    Sigmoid,
    /// (m - 1/(2β))², on length-normalised log-probs.
    Ipo,
    /// max(0, 1 - β·m).
    Hinge,
    /// Robust DPO (unbiased under label noise).
    Robust,
}

/// Per-sequence summed log-probabilities of one batch (shape [B] each).
pub struct PairLogps<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub reference_chosen: &'a Tensor,
    pub reference_rejected: &'a Tensor,
}

/// log σ(x), computed stably as -softplus(-x).
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // -softplus(-x) = -(max(-x, 0) + log(1 + exp(-|x|)))
    let neg = x.neg()?;
    let softplus = (neg.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    softplus.neg()
}

/// The mean loss over the batch, as TRL computes each variant. For `ipo`
/// the caller passes length-normalised (mean per token) log-probs.
pub fn dpo_loss(l: &PairLogps, loss: DpoLoss, beta: f64, label_smoothing: f64) -> Result<Tensor> {
    let logits =
        ((l.policy_chosen - l.policy_rejected)? - (l.reference_chosen - l.reference_rejected)?)?;
    let scaled = (&logits * beta)?;
    let losses = match loss {
        DpoLoss::Sigmoid => {
            let a = (log_sigmoid(&scaled)? * -(1.0 - label_smoothing))?;
            let b = (log_sigmoid(&scaled.neg()?)? * label_smoothing)?;
            (a - b)?
        }
        DpoLoss::Robust => {
            let a = (log_sigmoid(&scaled)? * -(1.0 - label_smoothing))?;
            let b = (log_sigmoid(&scaled.neg()?)? * label_smoothing)?;
            ((a + b)? / (1.0 - 2.0 * label_smoothing))?
        }
        DpoLoss::Hinge => (scaled.neg()? + 1.0)?.relu()?,
        DpoLoss::Ipo => (logits - 1.0 / (2.0 * beta))?.sqr()?,
    };
    losses.mean(D::Minus1)
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

/// Rewards are β·(policy − reference) log-prob per sequence; accuracy is the
/// share of pairs whose chosen reward exceeds the rejected one.
pub fn dpo_metrics(l: &PairLogps, beta: f64) -> Result<DpoMetrics> {
    let v =
        |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>() };
    let (pc, pr, rc, rr) = (
        v(l.policy_chosen)?,
        v(l.policy_rejected)?,
        v(l.reference_chosen)?,
        v(l.reference_rejected)?,
    );
    let n = pc.len().max(1) as f64;
    let chosen: Vec<f64> = pc.iter().zip(&rc).map(|(p, r)| beta * (p - r)).collect();
    let rejected: Vec<f64> = pr.iter().zip(&rr).map(|(p, r)| beta * (p - r)).collect();
    let mean = |x: &[f64]| x.iter().sum::<f64>() / n;
    Ok(DpoMetrics {
        rewards_chosen: mean(&chosen),
        rewards_rejected: mean(&rejected),
        rewards_accuracies: chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count() as f64 / n,
        rewards_margins: chosen
            .iter()
            .zip(&rejected)
            .map(|(c, r)| c - r)
            .sum::<f64>()
            / n,
        logps_chosen: mean(&pc),
        logps_rejected: mean(&pr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(x: &[f64]) -> Tensor {
        Tensor::new(x, &Device::Cpu).unwrap()
    }

    const PC: [f64; 3] = [-3.0, -10.0, -4.0];
    const PR: [f64; 3] = [-5.0, -9.0, -4.5];
    const RC: [f64; 3] = [-4.0, -9.5, -4.0];
    const RR: [f64; 3] = [-4.5, -9.5, -4.0];

    fn logits() -> Vec<f64> {
        (0..3).map(|i| (PC[i] - PR[i]) - (RC[i] - RR[i])).collect()
    }

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn loss(kind: DpoLoss, beta: f64, ls: f64) -> f64 {
        let (pc, pr, rc, rr) = (t(&PC), t(&PR), t(&RC), t(&RR));
        let l = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            reference_chosen: &rc,
            reference_rejected: &rr,
        };
        dpo_loss(&l, kind, beta, ls)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn each_loss_matches_its_closed_form() {
        let (beta, ls) = (0.5, 0.1);
        let z = logits(); // [1.5, -1.0, -0.5]
        let mean = |f: &dyn Fn(f64) -> f64| z.iter().map(|x| f(*x)).sum::<f64>() / 3.0;
        let cases: [(DpoLoss, f64); 4] = [
            (
                DpoLoss::Sigmoid,
                mean(&|x| -(1.0 - ls) * ln_sigmoid(beta * x) - ls * ln_sigmoid(-beta * x)),
            ),
            (
                DpoLoss::Robust,
                mean(&|x| {
                    (-(1.0 - ls) * ln_sigmoid(beta * x) + ls * ln_sigmoid(-beta * x))
                        / (1.0 - 2.0 * ls)
                }),
            ),
            (DpoLoss::Hinge, mean(&|x| (1.0 - beta * x).max(0.0))),
            (DpoLoss::Ipo, mean(&|x| (x - 1.0 / (2.0 * beta)).powi(2))),
        ];
        for (kind, want) in cases {
            let got = loss(kind, beta, ls);
            assert!((got - want).abs() < 1e-12, "{kind:?}: {got} vs {want}");
        }
        // No smoothing: plain DPO, -log σ(βz).
        let plain = mean(&|x| -ln_sigmoid(beta * x));
        assert!((loss(DpoLoss::Sigmoid, beta, 0.0) - plain).abs() < 1e-12);
    }

    #[test]
    fn log_sigmoid_is_stable_far_out() {
        let x = t(&[-800.0, 800.0]);
        let v: Vec<f64> = log_sigmoid(&x).unwrap().to_vec1().unwrap();
        assert!((v[0] + 800.0).abs() < 1e-9 && v[1].abs() < 1e-12, "{v:?}");
    }

    #[test]
    fn metrics_match_trl_definitions() {
        let (pc, pr, rc, rr) = (t(&PC), t(&PR), t(&RC), t(&RR));
        let l = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            reference_chosen: &rc,
            reference_rejected: &rr,
        };
        let m = dpo_metrics(&l, 0.1).unwrap();
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
    }
}
