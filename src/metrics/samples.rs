//! Completions of listed prompts, greedy and (optionally) sampled, for the
//! `eval` stage: what a person reads to see what training changed.

use serde::Serialize;

use crate::data::ModelTokenizer;
use crate::model::decoder::Decoder;
use crate::model::generate::{generate, GenerateOptions, Sampling};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub prompt: String,
    /// "greedy" or "sampled (temperature T)".
    pub mode: String,
    pub completion: String,
}

/// A prompt's token ids: one user message through `chat` with the
/// generation prompt (its special tokens in the text, so the tokenizer's
/// post-processor is not run), or plain text.
pub fn encode_prompt(
    tokenizer: &ModelTokenizer,
    chat: Option<&crate::data::ChatTemplate>,
    prompt: &str,
) -> anyhow::Result<Vec<u32>> {
    let ids = match chat {
        Some(template) => {
            let message = crate::data::Message {
                role: "user".into(),
                content: prompt.to_string(),
            };
            tokenizer.encode(&template.render(&[message], true)?, false)
        }
        None => tokenizer.encode(prompt, true),
    };
    ids.map_err(|e| anyhow::anyhow!("prompt {prompt:?}: {e}"))
}

/// How a sampled completion is labelled: "sampled (temperature T)", with
/// the nucleus when it is not the whole distribution.
pub fn sampled_mode(temperature: f64, top_p: f64) -> String {
    match top_p {
        1.0 => format!("sampled (temperature {temperature})"),
        p => format!("sampled (temperature {temperature}, top_p {p})"),
    }
}

/// Greedy completions of `prompts` (and sampled ones when `temperature` > 0,
/// seeded), stopping at the tokenizer's EOS.
/// `chat`: each prompt is one user message, rendered by this template with
/// the generation prompt (its special tokens in the text, so the
/// tokenizer's post-processor is not run); otherwise plain text.
pub fn complete(
    model: &Decoder,
    tokenizer: &ModelTokenizer,
    prompts: &[String],
    chat: Option<&crate::data::ChatTemplate>,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
) -> anyhow::Result<Vec<Sample>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| encode_prompt(tokenizer, chat, p))
        .collect::<anyhow::Result<_>>()?;
    let stop_tokens: Vec<u32> = tokenizer.eos().map(|e| e.id).into_iter().collect();
    let mut modes = vec![("greedy".to_string(), Sampling::Greedy)];
    if temperature > 0.0 {
        modes.push((
            sampled_mode(temperature, 1.0),
            Sampling::Sample {
                temperature,
                top_p: 1.0,
                seed,
            },
        ));
    }
    let mut out = Vec::new();
    for (mode, sampling) in modes {
        let options = GenerateOptions {
            max_new_tokens,
            stop_tokens: stop_tokens.clone(),
            sampling,
        };
        let generated = generate(model, &encoded, &options)?;
        for (prompt, ids) in prompts.iter().zip(generated) {
            out.push(Sample {
                prompt: prompt.clone(),
                mode: mode.clone(),
                completion: tokenizer.decode_completion(&ids, &stop_tokens)?,
            });
        }
    }
    Ok(out)
}
