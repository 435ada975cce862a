//! The SFT objective: mean cross-entropy over completion tokens (prompt and
//! padding masked), as TRL's completion-only loss.

use candle_core::{Device, Tensor};

use super::trainer::{Metrics, ShardOutput, TrainingObjective};
use crate::data::batch::sft_batch;
use crate::data::{Padding, SftDataset, SftExample};
use crate::model::decoder::{next_token_targets, packed_starts, Decoder, Input, Mode, Rows};

/// The longest packed row: its attention mask is dense, tokens² floats
/// (64 MiB at 4096), where a padded batch's is rows · seq_len².
const PACK_MAX_TOKENS: usize = 4096;

/// Rows per forward pass when evaluating.
const EVAL_BATCH: usize = 16;

pub struct SftObjective {
    pub train: SftDataset,
    pub eval: Option<SftDataset>,
    pub pad_id: u32,
    pub device: Device,
}

/// (row, position, next token) of each supervised position.
pub(crate) type Targets = Vec<(usize, usize, u32)>;

/// Next-token log-probs of a padded batch ([rows, t] row-major ids and masks)
/// at the positions `loss_mask` marks, with the (row, position, token) targets.
///
/// Right-padded rows are packed into one row without their padding
/// (`Decoder::forward` at `Rows::At`, which also runs the last layer's
/// query, output and MLP products only at the target positions): the same
/// log-probs, without computing the padding (a sixth of the tokens on the
/// peer benchmark's data), on every device: both attentions (fused, tiled)
/// compute only the keys each sequence sees. Other layouts and batches of
/// more than `PACK_MAX_TOKENS` real tokens (whose [tokens, tokens] mask
/// would outgrow a padded batch's) run padded.
/// With `want_sum_sq`, also each target's log Σ p² (no graph; WPO).
#[allow(clippy::too_many_arguments)]
pub(crate) fn masked_logprobs(
    model: &Decoder,
    input_ids: &[u32],
    attention_mask: &[f32],
    loss_mask: &[f32],
    (rows, t): (usize, usize),
    device: &Device,
    mode: Mode,
    want_sum_sq: bool,
) -> anyhow::Result<(Tensor, Targets, Option<Vec<f32>>)> {
    let id_rows: Vec<Vec<u32>> = input_ids.chunks(t).map(<[u32]>::to_vec).collect();
    let loss_rows: Vec<Vec<bool>> = loss_mask
        .chunks(t)
        .map(|r| r.iter().map(|m| *m > 0.5).collect())
        .collect();
    let targets = next_token_targets(&id_rows, &loss_rows)?;
    anyhow::ensure!(!targets.is_empty(), "a batch with no completion tokens");
    let packable = right_padded_lengths(attention_mask, t)
        .filter(|lengths| lengths.iter().sum::<usize>() <= PACK_MAX_TOKENS);
    let (logprobs, sum_sq) = match packable {
        Some(lengths) => {
            let sequences: Vec<&[u32]> = id_rows
                .iter()
                .zip(&lengths)
                .map(|(row, &len)| &row[..len])
                .collect();
            // Only the target positions' hidden states are computed past
            // the last layer's keys and values.
            let starts = packed_starts(&lengths);
            let at: Vec<usize> = targets
                .iter()
                .map(|&(row, pos, _)| starts[row] + pos)
                .collect();
            let hidden = model.forward(Input::Packed(&sequences), Rows::At(&at), mode)?;
            let rows: Vec<(usize, usize, u32)> = targets
                .iter()
                .enumerate()
                .map(|(i, &(_, _, token))| (0, i, token))
                .collect();
            let sum_sq = match want_sum_sq {
                true => Some(model.token_log_sum_sq_probs(&hidden, &rows)?),
                false => None,
            };
            (model.token_logprobs(&hidden, &rows)?, sum_sq)
        }
        None => {
            let ids = Tensor::from_vec(input_ids.to_vec(), (rows, t), device)?;
            let mask = Tensor::from_vec(attention_mask.to_vec(), (rows, t), device)?;
            let hidden = model.forward(Input::padded(&ids, Some(&mask)), Rows::All, mode)?;
            let sum_sq = match want_sum_sq {
                true => Some(model.token_log_sum_sq_probs(&hidden, &targets)?),
                false => None,
            };
            (model.token_logprobs(&hidden, &targets)?, sum_sq)
        }
    };
    Ok((logprobs, targets, sum_sq))
}

/// Each row's length when every row is real tokens then padding (and not
/// empty); None otherwise.
fn right_padded_lengths(attention_mask: &[f32], t: usize) -> Option<Vec<usize>> {
    attention_mask
        .chunks(t)
        .map(|row| {
            let len = row.iter().take_while(|m| **m > 0.5).count();
            (len > 0 && row[len..].iter().all(|m| *m <= 0.5)).then_some(len)
        })
        .collect()
}

/// The log-probability of each completion token of `examples` ([n], in order).
pub fn completion_logprobs(
    model: &Decoder,
    examples: &[&SftExample],
    pad_id: u32,
    device: &Device,
    mode: Mode,
) -> anyhow::Result<Tensor> {
    let batch = sft_batch(examples, pad_id, Padding::Longest).map_err(anyhow::Error::new)?;
    let (logprobs, _, _) = masked_logprobs(
        model,
        &batch.input_ids,
        &batch.attention_mask,
        &batch.label_mask,
        (batch.batch_size, batch.width),
        device,
        mode,
        false,
    )?;
    Ok(logprobs)
}

/// Summed log-probability of the completion tokens of `examples`, and their count.
pub fn completion_logprob(
    model: &Decoder,
    examples: &[&SftExample],
    pad_id: u32,
    device: &Device,
    mode: Mode,
) -> anyhow::Result<(Tensor, usize)> {
    let logprobs = completion_logprobs(model, examples, pad_id, device, mode)?;
    Ok((logprobs.sum_all()?, logprobs.elem_count()))
}

impl TrainingObjective for SftObjective {
    fn examples(&self) -> usize {
        self.train.examples.len()
    }

    fn tokens(&self, i: usize) -> usize {
        self.train.examples[i].input_ids.len()
    }

    fn forward(
        &self,
        model: &Decoder,
        examples: &[usize],
        mode: Mode,
    ) -> anyhow::Result<ShardOutput> {
        let rows: Vec<&SftExample> = examples.iter().map(|&i| &self.train.examples[i]).collect();
        Ok(ShardOutput {
            values: completion_logprobs(model, &rows, self.pad_id, &self.device, mode)?,
            counts: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// Mean negative log-likelihood over every completion token of the
    /// micro-batch (not a mean of the shards' means).
    fn loss(
        &self,
        shards: &[ShardOutput],
        _examples: &[usize],
    ) -> anyhow::Result<(Tensor, Metrics)> {
        let parts: Vec<&Tensor> = shards.iter().map(|s| &s.values).collect();
        let logprobs = Tensor::cat(&parts, 0)?;
        let n = logprobs.elem_count();
        let loss = (logprobs.sum_all()?.neg()? / n as f64)?;
        Ok((loss, Metrics::new()))
    }

    fn evaluate(&self, model: &Decoder) -> anyhow::Result<Metrics> {
        let Some(eval) = &self.eval else {
            return Ok(Metrics::new());
        };
        let loss = mean_completion_loss(model, &eval.examples, self.pad_id, &self.device)?;
        Ok(Metrics::from([
            ("eval/loss".to_string(), loss),
            ("eval/perplexity".to_string(), loss.exp()),
        ]))
    }
}

/// Mean negative log-likelihood per completion token over all `examples`.
pub fn mean_completion_loss(
    model: &Decoder,
    examples: &[SftExample],
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<f64> {
    let (mut total, mut count) = (0.0f64, 0usize);
    for chunk in examples.chunks(EVAL_BATCH) {
        // Shards of examples over the threads on the CPU (`shards`).
        let tokens: Vec<usize> = chunk.iter().map(|e| e.input_ids.len()).collect();
        let parts = super::shards::map(&tokens, device.is_cpu(), |range| {
            let rows: Vec<&SftExample> = chunk[range].iter().collect();
            let (sum, n) = completion_logprob(model, &rows, pad_id, device, Mode::Inference)?;
            Ok((
                sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
                n,
            ))
        })?;
        for (sum, n) in parts {
            total -= sum;
            count += n;
        }
    }
    Ok(total / count.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::right_padded_lengths;

    #[test]
    fn only_right_padded_batches_with_no_empty_row_pack() {
        let right = [1., 1., 1., 0., 1., 0., 0., 0.];
        assert_eq!(right_padded_lengths(&right, 4), Some(vec![3, 1]));
        let left = [1., 1., 1., 1., 0., 1., 1., 1.];
        assert_eq!(right_padded_lengths(&left, 4), None);
        let empty_row = [1., 1., 0., 0., 0., 0., 0., 0.];
        assert_eq!(right_padded_lengths(&empty_row, 4), None);
        let hole = [1., 0., 1., 0.];
        assert_eq!(right_padded_lengths(&hole, 4), None);
    }
}
