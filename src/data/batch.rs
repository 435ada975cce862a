//! Padded micro-batches as flat row-major vectors, ready to become tensors.
//!
//! The caller passes the order of examples (a permutation it derived from
//! its own seed), so batching itself is deterministic. Padding is on the
//! right; masks are 1.0 on real tokens and 0.0 on padding. Label, prompt and
//! completion masks are aligned with `input_ids` (not shifted): the trainer
//! compares the logits at `t - 1` with the token at `t` where the mask at `t`
//! is 1.

use crate::data::dpo::DpoExample;
use crate::data::error::DataError;
use crate::data::sft::SftExample;

/// How long a batch's rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// As long as the longest row of the batch.
    Longest,
    /// Exactly this long (e.g. `seq_len`, for fixed shapes); longer rows are an error.
    Fixed(usize),
}

/// `[batch_size, width]` SFT inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct SftBatch {
    pub batch_size: usize,
    /// Every row's padded length (the recipe's `seq_len` caps a row's tokens).
    pub width: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<f32>,
    /// 1.0 on completion tokens: where the loss is taken.
    pub label_mask: Vec<f32>,
}

/// `[2 * pairs, width]` DPO inputs: rows `0..pairs` are prompt+chosen,
/// rows `pairs..2*pairs` prompt+rejected in the same order, so one forward
/// pass scores both halves.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoBatch {
    pub pairs: usize,
    /// Every row's padded length.
    pub width: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<f32>,
    pub prompt_mask: Vec<f32>,
    /// 1.0 on chosen/rejected tokens: where log-probs are summed.
    pub completion_mask: Vec<f32>,
}

/// Splits `order` into micro-batches of `micro_batch_size` (the last may be
/// smaller) and pads each.
pub fn sft_micro_batches(
    examples: &[SftExample],
    order: &[usize],
    micro_batch_size: usize,
    pad_id: u32,
    padding: Padding,
) -> Result<Vec<SftBatch>, DataError> {
    chunks(examples, order, micro_batch_size)?
        .map(|chunk| sft_batch(&chunk, pad_id, padding))
        .collect()
}

/// Pads the given SFT examples into one batch.
pub fn sft_batch(
    examples: &[&SftExample],
    pad_id: u32,
    padding: Padding,
) -> Result<SftBatch, DataError> {
    let width = batch_len(examples.iter().map(|e| e.input_ids.len()), padding)?;
    let mut rows = Rows::new(width, pad_id);
    for example in examples {
        rows.push(&[
            (example.prompt_ids(), false),
            (example.completion_ids(), true),
        ]);
    }
    Ok(SftBatch {
        batch_size: examples.len(),
        width,
        input_ids: rows.input_ids,
        attention_mask: rows.attention_mask,
        label_mask: rows.completion_mask,
    })
}

/// Splits `order` into micro-batches of `micro_batch_size` pairs (the last
/// may be smaller) and pads each into the concatenated chosen+rejected form.
pub fn dpo_micro_batches(
    examples: &[DpoExample],
    order: &[usize],
    micro_batch_size: usize,
    pad_id: u32,
    padding: Padding,
) -> Result<Vec<DpoBatch>, DataError> {
    chunks(examples, order, micro_batch_size)?
        .map(|chunk| dpo_batch(&chunk, pad_id, padding))
        .collect()
}

/// Pads the given pairs into one concatenated chosen+rejected batch.
pub fn dpo_batch(
    examples: &[&DpoExample],
    pad_id: u32,
    padding: Padding,
) -> Result<DpoBatch, DataError> {
    let lengths = examples.iter().flat_map(|e| {
        let prompt = e.prompt_ids.len();
        [prompt + e.chosen_ids.len(), prompt + e.rejected_ids.len()]
    });
    let width = batch_len(lengths, padding)?;
    let mut rows = Rows::new(width, pad_id);
    for example in examples {
        rows.push(&[(&example.prompt_ids, false), (&example.chosen_ids, true)]);
    }
    for example in examples {
        rows.push(&[(&example.prompt_ids, false), (&example.rejected_ids, true)]);
    }
    Ok(DpoBatch {
        pairs: examples.len(),
        width,
        input_ids: rows.input_ids,
        attention_mask: rows.attention_mask,
        prompt_mask: rows.prompt_mask,
        completion_mask: rows.completion_mask,
    })
}

/// Accumulates right-padded rows.
struct Rows {
    width: usize,
    pad_id: u32,
    input_ids: Vec<u32>,
    attention_mask: Vec<f32>,
    prompt_mask: Vec<f32>,
    completion_mask: Vec<f32>,
}

impl Rows {
    fn new(width: usize, pad_id: u32) -> Self {
        Rows {
            width,
            pad_id,
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            prompt_mask: Vec::new(),
            completion_mask: Vec::new(),
        }
    }

    /// Appends one row made of `(ids, is_completion)` parts, then padding.
    /// The caller has checked the row fits `width`.
    fn push(&mut self, parts: &[(&[u32], bool)]) {
        let mut len = 0;
        for &(ids, is_completion) in parts {
            let (prompt, completion) = if is_completion {
                (0.0, 1.0)
            } else {
                (1.0, 0.0)
            };
            self.input_ids.extend_from_slice(ids);
            self.attention_mask
                .extend(std::iter::repeat_n(1.0, ids.len()));
            self.prompt_mask
                .extend(std::iter::repeat_n(prompt, ids.len()));
            self.completion_mask
                .extend(std::iter::repeat_n(completion, ids.len()));
            len += ids.len();
        }
        let pad = self.width - len;
        self.input_ids.extend(std::iter::repeat_n(self.pad_id, pad));
        for mask in [
            &mut self.attention_mask,
            &mut self.prompt_mask,
            &mut self.completion_mask,
        ] {
            mask.extend(std::iter::repeat_n(0.0, pad));
        }
    }
}

fn batch_len(lengths: impl Iterator<Item = usize>, padding: Padding) -> Result<usize, DataError> {
    let longest = lengths.max().unwrap_or(0);
    match padding {
        Padding::Longest => Ok(longest),
        Padding::Fixed(len) if longest <= len => Ok(len),
        Padding::Fixed(len) => Err(DataError::Batch(format!(
            "a row of {longest} tokens does not fit the fixed length {len}"
        ))),
    }
}

/// Checks `order` and yields the examples of each micro-batch.
fn chunks<'a, T>(
    examples: &'a [T],
    order: &'a [usize],
    micro_batch_size: usize,
) -> Result<impl Iterator<Item = Vec<&'a T>> + 'a, DataError> {
    if micro_batch_size == 0 {
        return Err(DataError::Batch(
            "micro_batch_size must be at least 1".into(),
        ));
    }
    if let Some(&bad) = order.iter().find(|&&i| i >= examples.len()) {
        return Err(DataError::Batch(format!(
            "index {bad} in the order is out of range for {} examples",
            examples.len()
        )));
    }
    Ok(order
        .chunks(micro_batch_size)
        .map(move |chunk| chunk.iter().map(|&i| &examples[i]).collect()))
}
