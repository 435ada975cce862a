//! The DPO objective: chosen and rejected in one concatenated forward pass,
//! against reference log-probs computed once before training.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::preference_loss::{attach, dpo_metrics, PairBatch, PreferenceLoss};
use super::trainer::{Metrics, ShardOutput, TrainingObjective};
use crate::data::batch::dpo_batch;
use crate::data::{DpoDataset, DpoExample, Padding};
use crate::model::decoder::{sum_by_sequence, weighted_sum_by_sequence, Decoder, Mode};

/// Pairs per forward pass when computing reference log-probs and evaluating.
const EVAL_BATCH: usize = 16;

/// Per-pair summed completion log-probs and completion lengths.
#[derive(Clone, Debug, Default, PartialEq)]
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
    let out = pair_logprobs_with(model, pairs, pad_id, device, mode, PairWeighting::default())?;
    Ok((out.sums, out.counts))
}

/// How a DPO stage weighs its pairs (TRL's names): LD-DPO's `ld_alpha` on
/// each side's tokens past the shorter side's length, and WPO's
/// `use_weighting`, a detached weight per pair from the policy's own
/// probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairWeighting {
    pub ld_alpha: Option<f64>,
    pub wpo: bool,
}

/// One forward pass over pairs: rows B chosen, then B rejected.
pub struct PairLogprobs {
    /// Each row's summed completion log-probs (LD-DPO-weighted), with graph.
    pub sums: Tensor,
    /// Each row's completion tokens.
    pub counts: Vec<f32>,
    /// Each row's WPO weight (empty without WPO).
    pub wpo: Vec<f32>,
}

/// [`pair_logprobs`] weighed as `weighting` says: with `ld_alpha`, each
/// side's completion tokens past the shorter side's length weigh α in the
/// sum (TRL's shared/tail split), so verbosity earns less reward; with WPO,
/// each row's weight as well.
pub fn pair_logprobs_with(
    model: &Decoder,
    pairs: &[&DpoExample],
    pad_id: u32,
    device: &Device,
    mode: Mode,
    weighting: PairWeighting,
) -> anyhow::Result<PairLogprobs> {
    let batch = dpo_batch(pairs, pad_id, Padding::Longest).map_err(anyhow::Error::new)?;
    let rows_n = 2 * batch.pairs;
    let (logprobs, targets, sum_sq) = super::sft::masked_logprobs(
        model,
        &batch.input_ids,
        &batch.attention_mask,
        &batch.completion_mask,
        (rows_n, batch.width),
        device,
        mode,
        weighting.wpo,
    )?;
    let mut counts = vec![0f32; rows_n];
    for &(row, _, _) in &targets {
        counts[row] += 1.0;
    }
    let wpo = match sum_sq {
        Some(sum_sq) => {
            let values: Vec<f32> = logprobs.detach().to_dtype(DType::F32)?.to_vec1()?;
            wpo_weights(&values, &sum_sq, &targets, rows_n)
        }
        None => Vec::new(),
    };
    let sums = match weighting.ld_alpha {
        None => sum_by_sequence(&logprobs, &targets, rows_n)?,
        Some(alpha) => {
            let weights = ld_weights(&targets, &counts, alpha as f32);
            weighted_sum_by_sequence(&logprobs, &targets, &weights, rows_n)?
        }
    };
    Ok(PairLogprobs { sums, counts, wpo })
}

/// WPO's weight of each row (eq. 2 of the WPO paper, as TRL computes it):
/// exp of the mean over the row's completion tokens of log p(token) −
/// log Σᵥ pᵥ², the token's probability against the distribution's own
/// "aligned" mass; 1 for a row without tokens.
pub fn wpo_weights(
    logprobs: &[f32],
    sum_sq: &[f32],
    targets: &[(usize, usize, u32)],
    rows: usize,
) -> Vec<f32> {
    let (mut total, mut n) = (vec![0f64; rows], vec![0f64; rows]);
    for (i, &(row, _, _)) in targets.iter().enumerate() {
        total[row] += f64::from(logprobs[i]) - f64::from(sum_sq[i]);
        n[row] += 1.0;
    }
    total
        .iter()
        .zip(&n)
        .map(|(t, n)| (t / n.max(1.0)).exp() as f32)
        .collect()
}

/// LD-DPO's weight of each target (rows: B chosen, then B rejected, each
/// row's targets in order): 1 for a row's first min(chosen, rejected)
/// completion tokens, `alpha` after them.
pub fn ld_weights(targets: &[(usize, usize, u32)], counts: &[f32], alpha: f32) -> Vec<f32> {
    let b = counts.len() / 2;
    let mut seen = vec![0f32; counts.len()];
    targets
        .iter()
        .map(|&(row, _, _)| {
            let pair = row % b.max(1);
            let shared = counts[pair].min(counts[pair + b]);
            seen[row] += 1.0;
            if seen[row] <= shared {
                1.0
            } else {
                alpha
            }
        })
        .collect()
}

/// Tokens a pair's forward pass reads: the prompt twice, both completions.
fn pair_tokens(p: &DpoExample) -> usize {
    2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len()
}

/// Log-probs of `pairs` under `model` with no graph, in shards of pairs
/// spread over the threads on the CPU (`shards`), in one pass elsewhere.
fn score_batch(
    model: &Decoder,
    pairs: &[&DpoExample],
    pad_id: u32,
    device: &Device,
    ld_alpha: Option<f64>,
) -> anyhow::Result<PairScores> {
    let tokens: Vec<usize> = pairs.iter().map(|p| pair_tokens(p)).collect();
    let parts = super::shards::map(&tokens, device.is_cpu(), |range| {
        score_shard(model, &pairs[range], pad_id, device, ld_alpha)
    })?;
    let mut scores = PairScores::default();
    for part in &parts {
        scores.extend(part);
    }
    Ok(scores)
}

/// Log-probs of `pairs` under `model` in one forward pass with no graph.
fn score_shard(
    model: &Decoder,
    pairs: &[&DpoExample],
    pad_id: u32,
    device: &Device,
    ld_alpha: Option<f64>,
) -> anyhow::Result<PairScores> {
    let weighting = PairWeighting {
        ld_alpha,
        wpo: false,
    };
    let out = pair_logprobs_with(model, pairs, pad_id, device, Mode::Inference, weighting)?;
    let (sums, counts) = (out.sums, out.counts);
    let sums: Vec<f32> = sums.to_dtype(DType::F32)?.to_vec1()?;
    let b = pairs.len();
    Ok(PairScores {
        chosen: sums[..b].to_vec(),
        rejected: sums[b..].to_vec(),
        chosen_tokens: counts[..b].to_vec(),
        rejected_tokens: counts[b..].to_vec(),
    })
}

/// Log-probs of every pair under `model` with no graph (reference or
/// evaluation), LD-DPO-weighted with `ld_alpha`.
pub fn score_pairs(
    model: &Decoder,
    data: &DpoDataset,
    pad_id: u32,
    device: &Device,
    ld_alpha: Option<f64>,
) -> anyhow::Result<PairScores> {
    let mut s = PairScores::default();
    for chunk in data.examples.chunks(EVAL_BATCH) {
        let pairs: Vec<&DpoExample> = chunk.iter().collect();
        s.extend(&score_batch(model, &pairs, pad_id, device, ld_alpha)?);
    }
    Ok(s)
}

/// What [`score_pairs_into`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoringCount {
    /// Pairs read from earlier runs' files.
    pub reused: usize,
    /// Pairs computed now.
    pub computed: usize,
}

/// Pairs per saved file of a growing reference folder.
const SAVE_BATCH: usize = 4 * EVAL_BATCH;

/// Log-probs of the pairs `wanted` (indices into `data`) under the model
/// `load` gives, kept in the grow-only folder `dir`: pairs already saved
/// there are read, the rest computed in batches, each batch saved as its
/// own file atomically, so Ctrl-C (checked before every forward pass) keeps
/// what is done and a longer run computes only the pairs it adds. The model
/// is loaded only when something is missing. Unwanted pairs are NaN.
#[allow(clippy::too_many_arguments)]
pub fn score_pairs_into(
    load: impl FnOnce() -> anyhow::Result<Decoder>,
    data: &DpoDataset,
    wanted: &[usize],
    dir: &std::path::Path,
    pad_id: u32,
    ld_alpha: Option<f64>,
    device: &Device,
    progress: &dyn crate::sink::Progress,
    interrupt: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<(PairScores, ScoringCount)> {
    let n = data.examples.len();
    let mut scores = PairScores::filled(n, f32::NAN);
    let mut have = vec![false; n];
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for file in &files {
        let (part, index) = PairScores::load_with_index(file)?;
        if let Some(i) = index.iter().find(|&&i| i >= n) {
            anyhow::bail!("{}: pair {i} is past the data's {n}", file.display());
        }
        scores.place(&index, &part);
        for &i in &index {
            have[i] = true;
        }
    }
    let missing: Vec<usize> = wanted.iter().copied().filter(|&i| !have[i]).collect();
    let count = ScoringCount {
        reused: wanted.len() - missing.len(),
        computed: missing.len(),
    };
    if missing.is_empty() {
        return Ok((scores, count));
    }
    let model = load()?;
    progress.set_total(missing.len() as u64);
    let started = std::time::Instant::now();
    let mut finished = 0usize;
    for (file_number, chunk) in missing.chunks(SAVE_BATCH).enumerate() {
        let mut part = PairScores::default();
        // Ctrl-C is checked before every forward pass; what is done is saved first.
        let mut stopped = false;
        for batch in chunk.chunks(EVAL_BATCH) {
            if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
                stopped = true;
                break;
            }
            let pairs: Vec<&DpoExample> = batch.iter().map(|&i| &data.examples[i]).collect();
            part.extend(&score_batch(&model, &pairs, pad_id, device, ld_alpha)?);
            finished += batch.len();
            let rate = finished as f64 / started.elapsed().as_secs_f64().max(1e-9);
            progress.set_position(
                finished as u64,
                &format!("reference log-probs, {rate:.1} pairs/s"),
            );
        }
        let done = &chunk[..part.chosen.len()];
        if !done.is_empty() {
            scores.place(done, &part);
            let name = format!(
                "pairs-{:08}-{}.safetensors",
                done[0],
                files.len() + file_number
            );
            part.save_with_index(&dir.join(name), done)?;
        }
        if stopped {
            return Err(crate::sink::Interrupted.into());
        }
    }
    Ok((scores, count))
}

impl PairScores {
    const NAMES: [&'static str; 4] = ["chosen", "rejected", "chosen_tokens", "rejected_tokens"];

    /// `n` pairs, every value `value`.
    fn filled(n: usize, value: f32) -> Self {
        PairScores {
            chosen: vec![value; n],
            rejected: vec![value; n],
            chosen_tokens: vec![value; n],
            rejected_tokens: vec![value; n],
        }
    }

    fn columns(&self) -> [&Vec<f32>; 4] {
        [
            &self.chosen,
            &self.rejected,
            &self.chosen_tokens,
            &self.rejected_tokens,
        ]
    }

    fn columns_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [
            &mut self.chosen,
            &mut self.rejected,
            &mut self.chosen_tokens,
            &mut self.rejected_tokens,
        ]
    }

    /// Appends `other`'s pairs.
    fn extend(&mut self, other: &PairScores) {
        for (mine, theirs) in self.columns_mut().into_iter().zip(other.columns()) {
            mine.extend_from_slice(theirs);
        }
    }

    /// Puts `part`'s k-th pair at index `at[k]`.
    fn place(&mut self, at: &[usize], part: &PairScores) {
        for (mine, theirs) in self.columns_mut().into_iter().zip(part.columns()) {
            for (&i, &v) in at.iter().zip(theirs) {
                mine[i] = v;
            }
        }
    }

    fn tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        Self::NAMES
            .iter()
            .zip(self.columns())
            .map(|(name, v)| {
                Ok((
                    name.to_string(),
                    Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                ))
            })
            .collect()
    }

    /// Writes the scores with the pair index each belongs to, atomically.
    fn save_with_index(&self, path: &std::path::Path, index: &[usize]) -> anyhow::Result<()> {
        let index: Vec<u32> = index.iter().map(|&i| i as u32).collect();
        let mut tensors = self.tensors()?;
        tensors.push((
            "index".into(),
            Tensor::from_slice(&index, index.len(), &Device::Cpu)?,
        ));
        crate::model::formats::io::write_safetensors_atomic(path, &tensors)?;
        Ok(())
    }

    /// Scores and pair indices of a file written by `save_with_index`, read once.
    fn load_with_index(path: &std::path::Path) -> anyhow::Result<(Self, Vec<usize>)> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)?;
        let index: Vec<u32> = map
            .get("index")
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor `index`", path.display()))?
            .to_vec1()?;
        let scores = Self::read(path, &map)?;
        anyhow::ensure!(
            scores.columns().iter().all(|c| c.len() == index.len()),
            "{}: {} indices for a different number of scores",
            path.display(),
            index.len()
        );
        Ok((scores, index.into_iter().map(|i| i as usize).collect()))
    }

    fn read(path: &std::path::Path, map: &HashMap<String, Tensor>) -> anyhow::Result<Self> {
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
}

pub struct DpoObjective {
    pub train: DpoDataset,
    /// Reference log-probs of the training pairs; `None` when the loss needs none.
    pub train_reference: Option<PairScores>,
    pub eval: Option<(DpoDataset, Option<PairScores>)>,
    pub loss: PreferenceLoss,
    /// LD-DPO's α (policy and reference log-probs alike) and WPO.
    pub weighting: PairWeighting,
    pub pad_id: u32,
    pub device: Device,
}

impl DpoObjective {
    /// Loss and metrics of the pairs `idx`, given the policy's summed
    /// log-probs (`[2B]`, chosen then rejected), completion token counts and
    /// WPO row weights (empty without WPO), in the same order.
    fn score(
        &self,
        policy: &Tensor,
        counts: &[f32],
        wpo: &[f32],
        reference: Option<&PairScores>,
        idx: &[usize],
    ) -> anyhow::Result<(Tensor, Metrics)> {
        let b = idx.len();
        let sums: Vec<f64> = policy.to_dtype(DType::F64)?.to_vec1()?;
        let pick = |v: &[f32]| -> Vec<f64> { idx.iter().map(|&i| f64::from(v[i])).collect() };
        let (reference_chosen, reference_rejected) = match reference {
            Some(r) => (pick(&r.chosen), pick(&r.rejected)),
            None => (vec![0.0; b], vec![0.0; b]),
        };
        let widen = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| f64::from(x)).collect() };
        let batch = PairBatch {
            policy_chosen: sums[..b].to_vec(),
            policy_rejected: sums[b..].to_vec(),
            reference_chosen,
            reference_rejected,
            chosen_tokens: widen(&counts[..b]),
            rejected_tokens: widen(&counts[b..]),
            // A pair weighs its chosen row's weight times its rejected's.
            weights: match wpo.is_empty() {
                true => Vec::new(),
                false => (0..b).map(|i| f64::from(wpo[i] * wpo[b + i])).collect(),
            },
        };
        let evaluated = self.loss.evaluate(&batch);
        let loss = attach(policy, &evaluated.total)?;
        let m = dpo_metrics(&batch, self.loss.params.beta, self.loss.rewards_per_token());
        let mut metrics: Metrics = match serde_json::to_value(&m)? {
            serde_json::Value::Object(o) => o
                .into_iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
                .collect(),
            _ => Metrics::new(),
        };
        for (term, value) in &evaluated.terms {
            metrics.insert(format!("loss/{}", term.name()), *value);
        }
        Ok((loss, metrics))
    }
}

impl DpoObjective {
    /// Held-out pairs' sums, counts and WPO weights, all chosen rows then
    /// all rejected rows, with no graph (batches of `EVAL_BATCH` pairs).
    fn eval_with_weights(
        &self,
        model: &Decoder,
        data: &DpoDataset,
    ) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let mut halves: [(Vec<f32>, Vec<f32>, Vec<f32>); 2] = Default::default();
        for chunk in data.examples.chunks(EVAL_BATCH) {
            let pairs: Vec<&DpoExample> = chunk.iter().collect();
            let out = pair_logprobs_with(
                model,
                &pairs,
                self.pad_id,
                &self.device,
                Mode::Inference,
                self.weighting,
            )?;
            let sums: Vec<f32> = out.sums.to_dtype(DType::F32)?.to_vec1()?;
            let b = pairs.len();
            for (half, (s, c, w)) in halves.iter_mut().enumerate() {
                s.extend_from_slice(&sums[half * b..][..b]);
                c.extend_from_slice(&out.counts[half * b..][..b]);
                w.extend_from_slice(&out.wpo[half * b..][..b]);
            }
        }
        let [(mut s, mut c, mut w), (s2, c2, w2)] = halves;
        s.extend(s2);
        c.extend(c2);
        w.extend(w2);
        Ok((s, c, w))
    }
}

impl TrainingObjective for DpoObjective {
    fn examples(&self) -> usize {
        self.train.examples.len()
    }

    fn tokens(&self, i: usize) -> usize {
        pair_tokens(&self.train.examples[i])
    }

    /// Each pair's chosen then rejected summed log-probs ([2 · pairs]).
    fn forward(
        &self,
        model: &Decoder,
        examples: &[usize],
        mode: Mode,
    ) -> anyhow::Result<ShardOutput> {
        let pairs: Vec<&DpoExample> = examples.iter().map(|&i| &self.train.examples[i]).collect();
        let out = pair_logprobs_with(
            model,
            &pairs,
            self.pad_id,
            &self.device,
            mode,
            self.weighting,
        )?;
        Ok(ShardOutput {
            values: out.sums,
            counts: out.counts,
            weights: out.wpo,
        })
    }

    fn loss(
        &self,
        shards: &[ShardOutput],
        examples: &[usize],
    ) -> anyhow::Result<(Tensor, Metrics)> {
        // Every shard's chosen, then every shard's rejected, as one batch.
        let (mut values, mut counts, mut wpo) = (Vec::new(), Vec::new(), Vec::new());
        for half in 0..2 {
            for s in shards {
                let b = s.counts.len() / 2;
                values.push(s.values.narrow(0, half * b, b)?);
                counts.extend_from_slice(&s.counts[half * b..][..b]);
                if !s.weights.is_empty() {
                    wpo.extend_from_slice(&s.weights[half * b..][..b]);
                }
            }
        }
        let policy = Tensor::cat(&values, 0)?;
        self.score(
            &policy,
            &counts,
            &wpo,
            self.train_reference.as_ref(),
            examples,
        )
    }

    fn evaluate(&self, model: &Decoder) -> anyhow::Result<Metrics> {
        let Some((data, reference)) = &self.eval else {
            return Ok(Metrics::new());
        };
        let idx: Vec<usize> = (0..data.examples.len()).collect();
        let (sums, counts, wpo) = if self.weighting.wpo {
            self.eval_with_weights(model, data)?
        } else {
            let policy = score_pairs(
                model,
                data,
                self.pad_id,
                &self.device,
                self.weighting.ld_alpha,
            )?;
            let mut sums = policy.chosen.clone();
            sums.extend_from_slice(&policy.rejected);
            let mut counts = policy.chosen_tokens.clone();
            counts.extend_from_slice(&policy.rejected_tokens);
            (sums, counts, Vec::new())
        };
        let policy = Tensor::from_vec(sums, 2 * idx.len(), &self.device)?;
        let (loss, metrics) = self.score(&policy, &counts, &wpo, reference.as_ref(), &idx)?;
        let mut out: Metrics = metrics
            .into_iter()
            .map(|(k, v)| (format!("eval/{k}"), v))
            .collect();
        out.insert("eval/loss".into(), loss.to_dtype(DType::F64)?.to_scalar()?);
        Ok(out)
    }
}
