//! Task skill on SFT rows with a known completion: does greedy decoding
//! from the prompt reproduce the completion exactly?

use std::sync::atomic::{AtomicBool, Ordering};

use crate::data::SftExample;
use crate::model::decoder::Decoder;
use crate::model::generate::{generate, GenerateOptions};
use crate::sink::{Interrupted, Progress};

/// Rows completed per batched generation.
const GENERATE_BATCH: usize = 32;

/// Greedy completions of every row's prompt (up to `max_new_tokens`,
/// stopping at a stop token), and for each row whether it equals the row's
/// completion token for token (stop tokens at the end left out of both).
pub fn greedy_exact_match(
    model: &Decoder,
    examples: &[SftExample],
    stop_tokens: &[u32],
    max_new_tokens: usize,
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> anyhow::Result<Vec<bool>> {
    let options = GenerateOptions::greedy(max_new_tokens, stop_tokens.to_vec());
    let strip = |ids: &[u32]| -> Vec<u32> {
        let end = ids
            .iter()
            .position(|id| stop_tokens.contains(id))
            .unwrap_or(ids.len());
        ids[..end].to_vec()
    };
    progress.set_total(examples.len() as u64);
    let mut matched = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(GENERATE_BATCH) {
        if interrupt.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt_ids().to_vec()).collect();
        let generated = generate(model, &prompts, &options)?;
        for (example, ids) in chunk.iter().zip(generated) {
            matched.push(strip(&ids) == strip(example.completion_ids()));
        }
        progress.set_position(matched.len() as u64, "greedy completions");
    }
    Ok(matched)
}
