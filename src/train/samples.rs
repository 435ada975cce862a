//! Completions of listed prompts, greedy and (optionally) sampled, for the
//! `eval` stage and the demo's before/after samples.

use serde::Serialize;

use crate::data::ModelTokenizer;
use crate::model::decoder::Decoder;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub prompt: String,
    /// "greedy" or "sampled (temperature T)".
    pub mode: String,
    pub completion: String,
}

/// Greedy completions of `prompts` (and sampled ones when `temperature` > 0, seeded).
pub fn complete(
    model: &Decoder,
    tokenizer: &ModelTokenizer,
    prompts: &[String],
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> anyhow::Result<Vec<Sample>> {
    let _ = (model, tokenizer, max_new_tokens, temperature, seed);
    anyhow::ensure!(
        prompts.is_empty(),
        "generation from prompts is not available yet"
    );
    Ok(Vec::new())
}
