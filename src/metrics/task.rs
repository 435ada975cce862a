//! Task skill on SFT rows with a known completion, per row: greedy decoding
//! from the prompt against the completion (exact and prefix match), and
//! teacher-forced loss and token accuracy.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, D};

use crate::data::batch::sft_batch;
use crate::data::{Padding, SftExample};
use crate::model::decoder::{Decoder, Input, Mode, Rows};
use crate::model::generate::{generate, GenerateOptions};
use crate::sink::{Interrupted, Progress};

/// Rows completed per batched generation.
pub const GENERATE_BATCH: usize = 32;
/// Rows per teacher-forced forward pass.
pub const SCORE_BATCH: usize = 16;

/// How one row's greedy completion compares with its completion (stop
/// tokens at the end left out of both).
#[derive(Clone, Debug, PartialEq)]
pub struct Greedy {
    /// Equal token for token.
    pub exact: bool,
    /// Share of the completion's tokens reproduced from its start, in [0, 1].
    pub prefix: f64,
    /// The generated tokens, up to the first stop token.
    pub generated: Vec<u32>,
}

/// Greedy completions of every row's prompt (up to `max_new_tokens`,
/// stopping at a stop token), compared with each row's completion.
pub fn greedy_match(
    model: &Decoder,
    examples: &[SftExample],
    stop_tokens: &[u32],
    max_new_tokens: usize,
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> anyhow::Result<Vec<Greedy>> {
    let options = GenerateOptions::greedy(max_new_tokens, stop_tokens.to_vec());
    let strip = |ids: &[u32]| -> Vec<u32> {
        let end = ids
            .iter()
            .position(|id| stop_tokens.contains(id))
            .unwrap_or(ids.len());
        ids[..end].to_vec()
    };
    progress.set_total(examples.len() as u64);
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(GENERATE_BATCH) {
        if interrupt.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt_ids().to_vec()).collect();
        let generated = generate(model, &prompts, &options)?;
        for (example, ids) in chunk.iter().zip(generated) {
            let (got, want) = (strip(&ids), strip(example.completion_ids()));
            let common = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            out.push(Greedy {
                exact: got == want,
                prefix: if want.is_empty() {
                    f64::from(u8::from(got.is_empty()))
                } else {
                    common as f64 / want.len() as f64
                },
                generated: got,
            });
        }
        progress.set_position(out.len() as u64, "greedy completions");
    }
    Ok(out)
}

/// `text` with every run of whitespace made one space and the ends trimmed
/// (what `normalize_whitespace` exact match compares).
pub fn normalize_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One row's completion under teacher forcing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TeacherForced {
    /// Summed negative log-likelihood of the completion tokens.
    pub nll: f64,
    pub tokens: usize,
    /// Completion tokens that are the model's most likely next token.
    pub correct: usize,
}

/// Teacher-forced NLL and argmax accuracy of every row's completion.
pub fn teacher_forced(
    model: &Decoder,
    examples: &[SftExample],
    pad_id: u32,
    device: &Device,
) -> anyhow::Result<Vec<TeacherForced>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(SCORE_BATCH) {
        let rows: Vec<&SftExample> = chunk.iter().collect();
        let batch = sft_batch(&rows, pad_id, Padding::Longest).map_err(anyhow::Error::new)?;
        let t = batch.width;
        let ids = Tensor::from_vec(batch.input_ids.clone(), (rows.len(), t), device)?;
        let mask = Tensor::from_vec(batch.attention_mask.clone(), (rows.len(), t), device)?;
        let id_rows: Vec<Vec<u32>> = batch.input_ids.chunks(t).map(<[u32]>::to_vec).collect();
        let loss_rows: Vec<Vec<bool>> = batch
            .label_mask
            .chunks(t)
            .map(|r| r.iter().map(|m| *m > 0.5).collect())
            .collect();
        let targets = crate::model::decoder::next_token_targets(&id_rows, &loss_rows)?;
        let hidden = model.forward(Input::padded(&ids, Some(&mask)), Rows::All, Mode::Inference)?;
        let positions: Vec<(usize, usize)> = targets.iter().map(|&(b, p, _)| (b, p)).collect();
        let logits = model.logits_at(&hidden, &positions)?.to_dtype(DType::F32)?;
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let logprobs: Vec<Vec<f32>> = logprobs.to_vec2()?;
        let mut scores = vec![
            TeacherForced {
                nll: 0.0,
                tokens: 0,
                correct: 0,
            };
            rows.len()
        ];
        for (k, &(row, _, token)) in targets.iter().enumerate() {
            let s = &mut scores[row];
            s.nll -= f64::from(logprobs[k][token as usize]);
            s.tokens += 1;
            s.correct += usize::from(best[k] == token);
        }
        out.extend(scores);
    }
    Ok(out)
}
