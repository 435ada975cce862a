//! Text generation with a KV cache.
//!
//! [`KvCache`] keeps, per layer, the keys and values (after rope) of every
//! token a batch of sequences has seen, so each step only runs the new
//! tokens through the model: the same layers as `Decoder::forward`
//! (same positions, mask rules, ops and dtypes), in `Mode::Inference`: no
//! graph is built and LoRA adapters are used detached.
//!
//! [`generate`] batches prompts of different lengths by left-padding them
//! with an attention mask: rope positions count only real tokens, so a
//! padded row computes what it would alone, and after the prompt every row
//! advances one token per step.

use crate::model::decoder::{check_vocabulary, Decoder, KvUpdate};
use crate::model::error::{ModelError, Result};
use crate::model::kernels::rng::SplitMix64;
use crate::model::layers::attention::LayerKv;
use candle_core::{DType, Tensor};

/// Token fed for padding; never attended to, so any valid id would do.
const PAD_TOKEN: u32 = 0;

/// Keys and values (after rope) of the tokens seen so far by a batch of
/// sequences, per layer. Every row holds the same number of positions;
/// padding positions are remembered so they are never attended to.
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Empty until the first forward pass, then one entry per layer.
    layers: Vec<LayerKv>,
    /// Per sequence and cached position: true for a token, false for padding.
    real: Vec<Vec<bool>>,
}

impl KvCache {
    /// An empty cache for `batch_size` sequences.
    pub fn new(batch_size: usize) -> Self {
        KvCache {
            layers: Vec::new(),
            real: vec![Vec::new(); batch_size],
        }
    }

    pub fn batch_size(&self) -> usize {
        self.real.len()
    }

    /// Cached positions per row, padding included.
    pub fn len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Real (non-padding) tokens cached for `row`; None for a row outside the batch.
    pub fn tokens_in_row(&self, row: usize) -> Option<usize> {
        self.real.get(row).map(|r| r.iter().filter(|&&x| x).count())
    }

    /// Runs only the new tokens `input_ids` ([batch][t], the same t for every
    /// row) through `model`, continuing each row after its cached tokens,
    /// appends their keys and values, and returns their final-norm hidden
    /// states [batch, t, hidden]. `attention_mask` marks padding (false) as
    /// in `Decoder::forward`; None means every new token is real. The result
    /// equals the matching rows of `Decoder::forward` over the whole sequence
    /// (cached + new tokens, same mask) in `Mode::Inference`. On error the
    /// cache is left unchanged.
    pub fn forward(
        &mut self,
        model: &Decoder,
        input_ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<bool>]>,
    ) -> Result<Tensor> {
        let new_tokens = self.validate_input(model, input_ids, attention_mask)?;
        let real: Vec<Vec<bool>> = match attention_mask {
            Some(mask) => self
                .real
                .iter()
                .zip(mask)
                .map(|(old, new)| [old.as_slice(), new.as_slice()].concat())
                .collect(),
            None => self
                .real
                .iter()
                .map(|old| [old.as_slice(), &vec![true; new_tokens]].concat())
                .collect(),
        };
        let ids = Tensor::from_vec(
            input_ids.concat(),
            (input_ids.len(), new_tokens),
            &model.device,
        )?;
        let mut kv = KvUpdate {
            past: &self.layers,
            next: Vec::with_capacity(model.layers.len()),
        };
        let hidden = model.forward_cached(&ids, &real, self.len(), &mut kv)?;
        // Commit only once everything succeeded.
        self.layers = kv.next;
        self.real = real;
        Ok(hidden)
    }

    /// Checks shapes, ids and that the cache fits `model`; returns the number of new tokens.
    fn validate_input(
        &self,
        model: &Decoder,
        input_ids: &[Vec<u32>],
        attention_mask: Option<&[Vec<bool>]>,
    ) -> Result<usize> {
        let c = &model.config;
        let batch = self.batch_size();
        if batch == 0 {
            return Err(ModelError::Input("the KV cache has a batch of 0".into()));
        }
        if input_ids.len() != batch {
            return Err(ModelError::Input(format!(
                "{} sequences of input for a KV cache of batch {batch}",
                input_ids.len()
            )));
        }
        let new_tokens = input_ids[0].len();
        if new_tokens == 0 {
            return Err(ModelError::Input("input_ids is empty".into()));
        }
        if let Some(row) = input_ids.iter().position(|r| r.len() != new_tokens) {
            return Err(ModelError::Input(format!(
                "every row needs {new_tokens} new tokens, row {row} has {}",
                input_ids[row].len()
            )));
        }
        check_vocabulary(input_ids.iter().flatten(), c.vocab_size)?;
        if let Some(mask) = attention_mask {
            if mask.len() != batch || mask.iter().any(|r| r.len() != new_tokens) {
                return Err(ModelError::Input(format!(
                    "attention_mask must be [{batch}, {new_tokens}] like input_ids"
                )));
            }
        }
        if let Some(first) = self.layers.first() {
            let expected = [batch, c.num_key_value_heads, self.len(), c.head_dim];
            if self.layers.len() != model.layers.len() || first.keys.dims() != expected {
                return Err(ModelError::Input(format!(
                    "this KV cache ({} layers, keys {:?}) was filled by a different model \
                     ({} layers, keys {expected:?} expected)",
                    self.layers.len(),
                    first.keys.dims(),
                    model.layers.len()
                )));
            }
        }
        Ok(new_tokens)
    }
}

// ---------------------------------------------------------------- generation

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token; ties go to the lowest id.
    Greedy,
    /// Nucleus sampling: softmax(logits / temperature), restricted to the
    /// most likely tokens whose probabilities sum to at least `top_p`.
    /// Deterministic for a seed: row i of a batch draws from its own stream
    /// derived from (seed, i), so it does not depend on the other rows.
    Sample {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Generation of a row ends after it produces one of these (e.g. EOS);
    /// the stop token is included as the row's last token.
    pub stop_tokens: Vec<u32>,
    pub sampling: Sampling,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, stopping at `stop_tokens`.
    pub fn greedy(max_new_tokens: usize, stop_tokens: Vec<u32>) -> Self {
        GenerateOptions {
            max_new_tokens,
            stop_tokens,
            sampling: Sampling::Greedy,
        }
    }

    fn validate(&self) -> Result<()> {
        if let Sampling::Sample {
            temperature, top_p, ..
        } = self.sampling
        {
            check_sampling_parameters(temperature, top_p)?;
        }
        Ok(())
    }
}

fn check_sampling_parameters(temperature: f64, top_p: f64) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(ModelError::Input(format!(
            "temperature must be positive and finite, got {temperature} (use Sampling::Greedy for 0)"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ModelError::Input(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    Ok(())
}

/// Generates a continuation for each prompt (token ids, none empty) and
/// returns only the new tokens, per prompt in order. A row ends at
/// `max_new_tokens` or right after a stop token, which is kept as its last
/// token (so the caller can tell the two apart). Prompts are left-padded
/// into one batch and share one KV cache.
pub fn generate(
    model: &Decoder,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>> {
    generate_with(model, prompts, opts, &mut |_, _| true)
}

/// [`generate`], calling `on_token(row, token)` for each token as it is
/// chosen (for streaming); when it returns false, generation stops there
/// and the tokens so far are returned (for Ctrl-C).
pub fn generate_with(
    model: &Decoder,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32) -> bool,
) -> Result<Vec<Vec<u32>>> {
    opts.validate()?;
    if let Some(row) = prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::Input(format!("prompt {row} is empty")));
    }
    if let Some(bad) = prompts
        .iter()
        .flatten()
        .find(|&&id| id as usize >= model.config.vocab_size)
    {
        return Err(ModelError::Input(format!(
            "prompt token {bad} is outside the vocabulary of size {}",
            model.config.vocab_size
        )));
    }
    let batch = prompts.len();
    let mut outputs = vec![Vec::new(); batch];
    if batch == 0 || opts.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let mut pickers: Vec<TokenPicker> = (0..batch)
        .map(|row| TokenPicker::new(&opts.sampling, row))
        .collect();

    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch);
    let mut mask = Vec::with_capacity(batch);
    for prompt in prompts {
        let pad = longest - prompt.len();
        ids.push([vec![PAD_TOKEN; pad], prompt.clone()].concat());
        mask.push([vec![false; pad], vec![true; prompt.len()]].concat());
    }
    let mut cache = KvCache::new(batch);
    let hidden = cache.forward(model, &ids, Some(&mask))?;
    let mut active: Vec<usize> = (0..batch).collect();
    // Left padding puts every row's last prompt token at the last position.
    let mut logits = last_logits(model, &hidden, &active, longest - 1)?;

    loop {
        let mut next_ids = vec![vec![PAD_TOKEN]; batch];
        let mut next_real = vec![vec![false]; batch];
        let mut still_active = Vec::with_capacity(active.len());
        let mut go_on = true;
        for (&row, row_logits) in active.iter().zip(&logits) {
            let token = pickers[row].pick(row_logits)?;
            outputs[row].push(token);
            go_on &= on_token(row, token);
            let done =
                opts.stop_tokens.contains(&token) || outputs[row].len() >= opts.max_new_tokens;
            if !done {
                next_ids[row][0] = token;
                next_real[row][0] = true;
                still_active.push(row);
            }
        }
        active = still_active;
        if active.is_empty() || !go_on {
            return Ok(outputs);
        }
        // Finished rows are fed masked padding: they keep the batch
        // rectangular and are never read.
        let hidden = cache.forward(model, &next_ids, Some(&next_real))?;
        logits = last_logits(model, &hidden, &active, 0)?;
    }
}

/// Logits (as f64) at `position` for each row in `rows`.
fn last_logits(
    model: &Decoder,
    hidden: &Tensor,
    rows: &[usize],
    position: usize,
) -> Result<Vec<Vec<f64>>> {
    let positions: Vec<(usize, usize)> = rows.iter().map(|&r| (r, position)).collect();
    Ok(model
        .logits_at(hidden, &positions)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?)
}

/// Per-row token choice, with the row's own random stream when sampling.
enum TokenPicker {
    Greedy,
    Sample {
        temperature: f64,
        top_p: f64,
        rng: SplitMix64,
    },
}

impl TokenPicker {
    fn new(sampling: &Sampling, row: usize) -> Self {
        match *sampling {
            Sampling::Greedy => TokenPicker::Greedy,
            Sampling::Sample {
                temperature,
                top_p,
                seed,
            } => TokenPicker::Sample {
                temperature,
                top_p,
                rng: SplitMix64::for_stream(seed, &format!("generate-row-{row}")),
            },
        }
    }

    fn pick(&mut self, logits: &[f64]) -> Result<u32> {
        match self {
            TokenPicker::Greedy => greedy_token(logits),
            TokenPicker::Sample {
                temperature,
                top_p,
                rng,
            } => sample_token(logits, *temperature, *top_p, rng),
        }
    }
}

fn check_logits(logits: &[f64]) -> Result<()> {
    if logits.is_empty() {
        return Err(ModelError::Input("no logits to choose a token from".into()));
    }
    if logits.iter().any(|v| v.is_nan() || *v == f64::INFINITY) {
        return Err(ModelError::Input("logits contain NaN or +inf".into()));
    }
    Ok(())
}

/// The id of the largest logit; ties go to the lowest id.
pub fn greedy_token(logits: &[f64]) -> Result<u32> {
    check_logits(logits)?;
    let mut best = 0;
    for (id, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = id;
        }
    }
    Ok(best as u32)
}

/// Draws a token from softmax(logits / temperature) restricted to the
/// smallest set of most likely tokens (ties: lower id first) whose
/// probability reaches `top_p`; one draw from `rng`. With a tiny `top_p`
/// only the most likely token is left, i.e. the greedy choice.
pub fn sample_token(
    logits: &[f64],
    temperature: f64,
    top_p: f64,
    rng: &mut SplitMix64,
) -> Result<u32> {
    check_sampling_parameters(temperature, top_p)?;
    check_logits(logits)?;
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return Err(ModelError::Input("every logit is -inf".into()));
    }
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let kept = if top_p >= 1.0 {
        order.as_slice()
    } else {
        // Sort by logit (exact, unlike the rounded weights); the stable sort
        // keeps lower ids first among ties.
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let mut count = 0;
        for &id in &order {
            mass += weights[id];
            count += 1;
            if mass >= top_p * total {
                break;
            }
        }
        &order[..count]
    };
    let kept_mass: f64 = kept.iter().map(|&id| weights[id]).sum();
    let target = rng.next_f64() * kept_mass;
    let mut mass = 0.0;
    for &id in kept {
        mass += weights[id];
        if target < mass {
            return Ok(id as u32);
        }
    }
    // Rounding can leave target just above the last partial sum.
    let last = kept
        .iter()
        .rev()
        .find(|&&id| weights[id] > 0.0)
        .copied()
        .unwrap_or(kept[0]);
    Ok(last as u32)
}
