//! The DPO objective: chosen and rejected in one concatenated forward pass,
//! against reference log-probs computed once before training.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::dpo_loss::DpoLoss;
use super::dpo_loss::{dpo_loss, dpo_metrics, PairLogps};
use super::trainer::{Metrics, Objective};
use crate::data::batch::dpo_batch;
use crate::data::{DpoDataset, DpoExample, Padding};
use crate::model::decoder::{sum_by_sequence, Decoder, Mode};

/// Pairs per forward pass when computing reference log-probs and evaluating.
const EVAL_BATCH: usize = 16;

/// Per-pair summed completion log-probs and completion lengths.
#[derive(Clone, Debug, PartialEq)]
pub struct PairScores {
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
    pub chosen_tokens: Vec<f32>,
    pub rejected_tokens: Vec<f32>,
}

/// Summed completion log-probs of chosen (first B) and rejected (last B) in one forward pass, and token counts.
pub fn pair_logprobs(
    model: &Decoder,
    pairs: &[&DpoExample],
    pad_id: u32,
    device: &Device,
    mode: Mode,
) -> anyhow::Result<(Tensor, Vec<f32>)> {
    let batch = dpo_batch(pairs, pad_id, Padding::Longest).map_err(anyhow::Error::new)?;
    let rows_n = 2 * batch.pairs;
    let (logprobs, targets) = super::sft::masked_logprobs(
        model,
        &batch.input_ids,
        &batch.attention_mask,
        &batch.completion_mask,
        (rows_n, batch.seq_len),
        device,
        mode,
    )?;
    let mut counts = vec![0f32; rows_n];
    for &(row, _, _) in &targets {
        counts[row] += 1.0;
    }
    Ok((sum_by_sequence(&logprobs, &targets, rows_n)?, counts))
}

/// Log-probs of every pair under `model` with no graph (reference or evaluation).
pub fn score_pairs(
    model: &Decoder,
    data: &DpoDataset,
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<PairScores> {
    let mut s = PairScores {
        chosen: Vec::new(),
        rejected: Vec::new(),
        chosen_tokens: Vec::new(),
        rejected_tokens: Vec::new(),
    };
    for chunk in data.examples.chunks(EVAL_BATCH) {
        let pairs: Vec<&DpoExample> = chunk.iter().collect();
        let (sums, counts) = pair_logprobs(model, &pairs, pad_id, device, Mode::Inference)?;
        let sums: Vec<f32> = sums.to_dtype(DType::F32)?.to_vec1()?;
        let b = pairs.len();
        s.chosen.extend_from_slice(&sums[..b]);
        s.rejected.extend_from_slice(&sums[b..]);
        s.chosen_tokens.extend_from_slice(&counts[..b]);
        s.rejected_tokens.extend_from_slice(&counts[b..]);
    }
    Ok(s)
}

impl PairScores {
    const NAMES: [&'static str; 4] = ["chosen", "rejected", "chosen_tokens", "rejected_tokens"];

    pub fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let mut map = HashMap::new();
        for (name, v) in Self::NAMES.iter().zip([
            &self.chosen,
            &self.rejected,
            &self.chosen_tokens,
            &self.rejected_tokens,
        ]) {
            map.insert(
                name.to_string(),
                Tensor::from_slice(v, v.len(), &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        let get = |n: &str| -> anyhow::Result<Vec<f32>> {
            Ok(map
                .get(n)
                .ok_or_else(|| anyhow::anyhow!("{}: no tensor `{n}`", path.display()))?
                .to_vec1()?)
        };
        Ok(PairScores {
            chosen: get("chosen")?,
            rejected: get("rejected")?,
            chosen_tokens: get("chosen_tokens")?,
            rejected_tokens: get("rejected_tokens")?,
        })
    }

    fn select(
        &self,
        v: &[f32],
        idx: &[usize],
        normalise: Option<&[f32]>,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        let x: Vec<f32> = idx
            .iter()
            .map(|&i| match normalise {
                Some(n) => v[i] / n[i].max(1.0),
                None => v[i],
            })
            .collect();
        Ok(Tensor::from_vec(x, idx.len(), device)?)
    }
}

/// The preference loss and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpoSettings {
    pub loss: DpoLoss,
    /// Temperature of the implicit reward.
    pub beta: f64,
    /// Probability that a preference label is flipped (cDPO, robust DPO).
    pub label_smoothing: f64,
}

pub struct DpoObjective {
    pub train: DpoDataset,
    pub train_reference: PairScores,
    pub eval: Option<(DpoDataset, PairScores)>,
    pub settings: DpoSettings,
    pub pad_id: u32,
    pub device: Device,
}

impl DpoObjective {
    fn ipo(&self) -> bool {
        self.settings.loss == DpoLoss::Ipo
    }

    /// Loss and metrics of `pairs` given policy sums/counts and reference scores at `idx`.
    fn score(
        &self,
        policy: &Tensor,
        counts: &[f32],
        reference: &PairScores,
        idx: &[usize],
    ) -> anyhow::Result<(Tensor, Metrics)> {
        let b = idx.len();
        let (mut chosen, mut rejected) = (policy.narrow(0, 0, b)?, policy.narrow(0, b, b)?);
        let (rc_tokens, rr_tokens): (Vec<f32>, Vec<f32>) = (
            idx.iter().map(|&i| reference.chosen_tokens[i]).collect(),
            idx.iter().map(|&i| reference.rejected_tokens[i]).collect(),
        );
        let ipo = self.ipo();
        if ipo {
            // IPO compares mean per-token log-probs.
            let norm = |c: &[f32]| {
                Tensor::from_vec(
                    c.iter().map(|x| 1.0 / x.max(1.0)).collect::<Vec<f32>>(),
                    c.len(),
                    &self.device,
                )
            };
            chosen = (chosen * norm(&counts[..b])?)?;
            rejected = (rejected * norm(&counts[b..])?)?;
        }
        let ref_chosen = reference.select(
            &reference.chosen,
            idx,
            ipo.then_some(rc_tokens.as_slice()),
            &self.device,
        )?;
        let ref_rejected = reference.select(
            &reference.rejected,
            idx,
            ipo.then_some(rr_tokens.as_slice()),
            &self.device,
        )?;
        let logps = PairLogps {
            policy_chosen: &chosen,
            policy_rejected: &rejected,
            reference_chosen: &ref_chosen,
            reference_rejected: &ref_rejected,
        };
        let loss = dpo_loss(
            &logps,
            self.settings.loss,
            self.settings.beta,
            self.settings.label_smoothing,
        )?;
        let m = dpo_metrics(&logps, self.settings.beta)?;
        let metrics = match serde_json::to_value(&m)? {
            serde_json::Value::Object(o) => o
                .into_iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
                .collect(),
            _ => Metrics::new(),
        };
        Ok((loss, metrics))
    }
}

impl Objective for DpoObjective {
    fn examples(&self) -> usize {
        self.train.examples.len()
    }

    fn loss(
        &self,
        model: &Decoder,
        examples: &[usize],
        mode: Mode,
    ) -> anyhow::Result<(Tensor, Metrics, usize)> {
        let pairs: Vec<&DpoExample> = examples.iter().map(|&i| &self.train.examples[i]).collect();
        let (policy, counts) = pair_logprobs(model, &pairs, self.pad_id, &self.device, mode)?;
        let (loss, metrics) = self.score(&policy, &counts, &self.train_reference, examples)?;
        let tokens = pairs
            .iter()
            .map(|p| 2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len())
            .sum();
        Ok((loss, metrics, tokens))
    }

    fn evaluate(&self, model: &Decoder) -> anyhow::Result<Metrics> {
        let Some((data, reference)) = &self.eval else {
            return Ok(Metrics::new());
        };
        let policy = score_pairs(model, data, self.pad_id, &self.device)?;
        let idx: Vec<usize> = (0..data.examples.len()).collect();
        let mut sums = policy.chosen.clone();
        sums.extend_from_slice(&policy.rejected);
        let mut counts = policy.chosen_tokens.clone();
        counts.extend_from_slice(&policy.rejected_tokens);
        let policy = Tensor::from_vec(sums, 2 * idx.len(), &self.device)?;
        let (loss, metrics) = self.score(&policy, &counts, reference, &idx)?;
        let mut out: Metrics = metrics
            .into_iter()
            .map(|(k, v)| (format!("eval/{k}"), v))
            .collect();
        out.insert("eval/loss".into(), loss.to_dtype(DType::F64)?.to_scalar()?);
        Ok(out)
    }
}
