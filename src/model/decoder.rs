//! One trainable decoder for every family, laid out like
//! candle-transformers' `qwen2.rs`: the `Decoder` holds the embeddings, the
//! `DecoderLayer`s (`layers`), the final RMSNorm and the optional untied
//! output head, and loops over the layers; LoRA may sit on any of the seven
//! projections. One `forward` takes padded or packed input (`Input`) and
//! the positions to compute (`Rows`); one `backward` returns the LoRA
//! gradients, those of checkpointed layers included.
//!
//! Base weights are plain tensors (never Vars), so backward only reaches the
//! LoRA Vars; the custom ops in `kernels` keep frozen weights out of backward.

use crate::model::config::LayerAttention;
use crate::model::config::ModelConfig;
use crate::model::error::{ModelError, Result};
use crate::model::formats::names;
use crate::model::formats::weights::{parse_torch_dtype, WeightLoader, WeightSource};
use crate::model::kernels::head_logprobs::head_token_logprobs;
use crate::model::kernels::ops::frozen_matmul;
use crate::model::kernels::quantized::Quantization;
use crate::model::kernels::recompute::{
    backward_with_recomputed, checkpointed_layer, recomputed_rows, RowFunction,
};
use crate::model::layers::attention::{AttentionContext, LayerKv, QuerySelection};
use crate::model::layers::lora::{LoraAdapter, LoraConfig};
use crate::model::layers::norm::Norm;
use crate::model::rope::RopeTable;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use std::path::Path;
use std::sync::Arc;

pub use crate::model::layers::layer::DecoderLayer;
pub use crate::model::layers::linear::Linear;
pub use crate::model::mode::Mode;

/// The tokens of a forward pass and how they are laid out.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Rows `ids` [B, T] (u32) and an optional attention mask [B, T]
    /// (1 = token, 0 = padding; left or right padding).
    Padded {
        ids: &'a Tensor,
        mask: Option<&'a Tensor>,
    },
    /// Sequences packed into one row [1, Σ lengths] (each starts at its
    /// `packed_starts`): no padding is computed, and each sequence's states
    /// equal those it has alone (see `AttentionContext::packed`).
    Packed(&'a [&'a [u32]]),
}

impl<'a> Input<'a> {
    /// `Input::Padded`, in a call.
    pub fn padded(ids: &'a Tensor, mask: Option<&'a Tensor>) -> Self {
        Input::Padded { ids, mask }
    }
}

/// The positions of each row a forward pass computes.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    All,
    /// These positions only, equal to those rows of `All`. The last layer
    /// runs its query, output and MLP products on them alone (only its keys
    /// and values need every token), and so saves most of a layer when a
    /// loss reads a few positions a sequence, as SFT and DPO on short
    /// completions do.
    At(&'a [usize]),
}

/// Rows of output-head logits alive at once under checkpointing (256 rows
/// of a 151936-token vocabulary are 156 MB in f32); `memory` counts them.
pub(crate) const HEAD_CHUNK_ROWS: usize = 256;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype of the base weights; None keeps config.json's torch_dtype
    /// (or the checkpoint's dtype when config.json does not say).
    pub dtype: Option<DType>,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            device: Device::Cpu,
        }
    }
}

/// The model: embeddings, the decoder layers, the final norm and the output
/// head (the embeddings when tied).
#[derive(Clone, Debug)]
pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Norm,
    /// None when the embeddings are tied.
    pub lm_head: Option<Tensor>,
    pub dtype: DType,
    pub device: Device,
    /// The LoRA configuration applied, if any.
    pub lora_config: Option<LoraConfig>,
    /// How the layers' projections are held (None: dense in `dtype`).
    pub quantization: Option<Quantization>,
    /// Set by `enable_checkpointing`: forward passes that keep a graph keep
    /// only each layer's input, and backward recomputes the layer.
    checkpointing: bool,
}

/// The attention contexts of one pass: one per distinct (rope, window)
/// among the layers, and which one each layer uses.
pub(crate) struct LayerContexts {
    contexts: Vec<Arc<AttentionContext>>,
    of_layer: Vec<usize>,
}

impl LayerContexts {
    fn of(&self, layer: usize) -> &AttentionContext {
        &self.contexts[self.of_layer.get(layer).copied().unwrap_or(0)]
    }

    fn shared(&self, layer: usize) -> Arc<AttentionContext> {
        self.contexts[self.of_layer[layer]].clone()
    }
}

/// Per-layer keys/values for a forward pass that continues a KV cache:
/// `past` as cached (empty before the first pass); the pass fills `next`
/// with the past plus the new tokens'.
pub(crate) struct KvUpdate<'a> {
    pub past: &'a [LayerKv],
    pub next: Vec<LayerKv>,
}

impl Decoder {
    /// Loads config.json and model.safetensors (or shards + index) from `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_quantized(dir, opts, None)
    }

    /// `load`, with the decoder layers' projections held in `quantize`'s
    /// block formats (see `quantized`); needs an f32, bf16 or f16 dtype.
    pub fn load_quantized(
        dir: &Path,
        opts: &LoadOptions,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ModelConfig::from_file(&config_path)?;
        let files = WeightSource::open(dir)?;
        let dtype = opts
            .dtype
            .or_else(|| config.torch_dtype.as_deref().and_then(parse_torch_dtype))
            .or_else(|| files.first_float_dtype())
            .unwrap_or(DType::F32);
        if quantize.is_some_and(|q| q != Quantization::Fp8) && dtype == DType::F64 {
            return Err(ModelError::Input(
                "a quantized base computes in f32, bf16 or f16, not f64".into(),
            ));
        }
        let w = WeightLoader {
            files: &files,
            dtype,
            device: &opts.device,
            quantize,
            fp8: config.fp8,
        };
        Self::from_checkpoint(config, &w)
    }

    fn from_checkpoint(config: ModelConfig, w: &WeightLoader) -> Result<Self> {
        let c = &config;
        let embed_tokens = w.get(names::EMBED_TOKENS, &[c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, c, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::load(w, c, names::FINAL_NORM, c.hidden_size)?;
        // Some tied checkpoints still carry lm_head.weight; it equals the embeddings then.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.get(names::LM_HEAD, &[c.vocab_size, c.hidden_size])?)
        };
        Ok(Decoder {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            dtype: w.dtype,
            device: w.device.clone(),
            lora_config: None,
            quantization: w.quantize,
            checkpointing: false,
        })
    }

    /// The weight used for logits ([vocab, hidden]).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Final-norm hidden states of `input` laid out as it says, at `rows`
    /// of each row: [B, T, hidden] for every row, [B, at.len(), hidden] at
    /// selected ones. Logits are left to `logits_at` / `token_logprobs` so
    /// that only the positions a loss needs pay for the vocabulary GEMM.
    pub fn forward(&self, input: Input, rows: Rows, mode: Mode) -> Result<Tensor> {
        let (ids, ctx) = match input {
            Input::Padded { ids, mask } => self.padded(ids, mask)?,
            Input::Packed(sequences) => self.pack(sequences)?,
        };
        let at = match rows {
            Rows::All => None,
            Rows::At(at) => {
                let total = ids.dim(1)?;
                if let Some(&bad) = at.iter().find(|&&p| p >= total) {
                    let what = match input {
                        Input::Padded { .. } => "tokens of a row",
                        Input::Packed(_) => "packed tokens",
                    };
                    return Err(ModelError::Input(format!(
                        "position {bad} is outside the {total} {what}"
                    )));
                }
                Some(at)
            }
        };
        self.forward_in_context(&ids, &ctx, mode, None, at)
    }

    /// Embeds the new tokens `input_ids` [B, t] (u32) of a pass that
    /// continues a KV cache, runs them through every layer and the final
    /// norm, without a graph. `real[b]` marks each position of row b, the
    /// `past` cached ones then the t new ones (true = token); attention also
    /// sees the cached keys/values and `kv.next` gets each layer's extended
    /// ones.
    pub(crate) fn forward_cached(
        &self,
        input_ids: &Tensor,
        real: &[Vec<bool>],
        past: usize,
        kv: &mut KvUpdate,
    ) -> Result<Tensor> {
        let longest = real.iter().map(|r| r.iter().filter(|&&x| x).count());
        let ctx = self.contexts(longest.max().unwrap_or(0), |rope, window| {
            AttentionContext::new(rope, window, real, past, &self.device)
        })?;
        self.forward_in_context(input_ids, &ctx, Mode::Inference, Some(kv), None)
    }

    /// The padded rows' ids (u32) and their attention context.
    fn padded(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, LayerContexts)> {
        let c = &self.config;
        let (b, t) = input_ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(ModelError::Input("input_ids is empty".into()));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        check_vocabulary(ids.to_vec2::<u32>()?.iter().flatten(), c.vocab_size)?;
        let mask: Vec<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(ModelError::Input(format!(
                        "attention_mask must be [{b}, {t}], got {:?}",
                        m.dims()
                    )));
                }
                m.to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| r.into_iter().map(|v| v > 0.5).collect())
                    .collect()
            }
            None => vec![vec![true; t]; b],
        };
        let longest = mask.iter().map(|r| r.iter().filter(|&&x| x).count());
        let ctx = self.contexts(longest.max().unwrap_or(0), |rope, window| {
            AttentionContext::new(rope, window, &mask, 0, &self.device)
        })?;
        Ok((ids, ctx))
    }

    /// The packed row's ids [1, Σ lengths] and its attention context.
    fn pack(&self, sequences: &[&[u32]]) -> Result<(Tensor, LayerContexts)> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        if lengths.contains(&0) || lengths.is_empty() {
            return Err(ModelError::Input(
                "packed sequences must be at least one token each".into(),
            ));
        }
        check_vocabulary(sequences.iter().copied().flatten(), self.config.vocab_size)?;
        let total: usize = lengths.iter().sum();
        let ids = Tensor::from_vec(sequences.concat(), (1, total), &self.device)?;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let ctx = self.contexts(longest, |rope, window| {
            AttentionContext::packed(rope, window, &lengths, &self.device)
        })?;
        Ok((ids, ctx))
    }

    /// One attention context per distinct (rope, window) among the layers,
    /// made by `make` from the rope table of a pass whose longest row has
    /// `longest` positions.
    fn contexts(
        &self,
        longest: usize,
        make: impl Fn(Option<&RopeTable>, Option<usize>) -> Result<AttentionContext>,
    ) -> Result<LayerContexts> {
        let c = &self.config;
        let mut kinds: Vec<&LayerAttention> = Vec::new();
        let mut of_layer = Vec::with_capacity(c.layers.len());
        for layer in &c.layers {
            let i = match kinds.iter().position(|k| *k == layer) {
                Some(i) => i,
                None => {
                    kinds.push(layer);
                    kinds.len() - 1
                }
            };
            of_layer.push(i);
        }
        let contexts = kinds
            .iter()
            .map(|k| {
                let table = k.rope.as_ref().map(|r| r.table(c.head_dim, longest));
                Ok(Arc::new(make(table.as_ref(), k.window)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LayerContexts { contexts, of_layer })
    }

    /// The layers and the final norm over `input_ids` [B, t]; with `at`,
    /// only those positions of each row come out ([B, at.len(), hidden]).
    fn forward_in_context(
        &self,
        input_ids: &Tensor,
        ctx: &LayerContexts,
        mode: Mode,
        mut kv: Option<&mut KvUpdate>,
        at: Option<&[usize]>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?.to_device(&self.device)?;
        let mut x = self
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, t, c.hidden_size))?;
        if c.architecture.family().scaled_embeddings {
            // Gemma: × √hidden, rounded to the model's dtype as transformers does.
            let scale = Tensor::new((c.hidden_size as f64).sqrt() as f32, &self.device)?
                .to_dtype(x.dtype())?;
            x = x.broadcast_mul(&scale)?;
        }
        // Inference keeps no graph, and a KV-cache pass never runs backward.
        let recompute =
            self.checkpointing && matches!(mode, Mode::Eval | Mode::Train { .. }) && kv.is_none();
        let last = self.layers.len().saturating_sub(1);
        let selection = match at {
            Some(at) => Some(QuerySelection::new(ctx.of(last), at)?),
            None => None,
        };
        if recompute {
            for (i, layer) in self.layers.iter().enumerate() {
                x = checkpointed_layer(layer, &x, &ctx.shared(i), mode)?;
            }
            // Checkpointed layers keep their whole output; select after.
            if let Some(sel) = &selection {
                x = x.index_select(&sel.rows, 1)?;
            }
            return self.norm.forward(&x);
        }
        // The last layer computes only the selected rows (no layers: select
        // the embeddings).
        if let (true, Some(sel)) = (self.layers.is_empty(), &selection) {
            x = x.index_select(&sel.rows, 1)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = kv.as_ref().and_then(|kv| kv.past.get(i));
            let queries = selection.as_ref().filter(|_| i == last);
            let (y, layer_kv) = layer.forward(&x, ctx.of(i), mode, layer_past, queries)?;
            x = y;
            if let Some(kv) = kv.as_mut() {
                kv.next.push(layer_kv);
            }
        }
        self.norm.forward(&x)
    }

    /// Logits (f32, or f64 for an f64 model) at every position: [B, T, vocab]. Prefer `logits_at`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(head(
            hidden,
            self.lm_head_weight(),
            self.config.final_logit_softcapping,
        )?)
    }

    fn gather_rows(&self, hidden: &Tensor, positions: &[(usize, usize)]) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let mut idx = Vec::with_capacity(positions.len());
        for &(bi, ti) in positions {
            if bi >= b || ti >= t {
                return Err(ModelError::Input(format!(
                    "position ({bi}, {ti}) is outside hidden states [{b}, {t}]"
                )));
            }
            idx.push((bi * t + ti) as u32);
        }
        let idx = Tensor::from_vec(idx, positions.len(), hidden.device())?;
        Ok(hidden.reshape((b * t, h))?.index_select(&idx, 0)?)
    }

    /// Logits (f32) only at the given (batch, position) pairs: [N, vocab].
    pub fn logits_at(&self, hidden: &Tensor, positions: &[(usize, usize)]) -> Result<Tensor> {
        let rows = self.gather_rows(hidden, positions)?;
        Ok(head(
            &rows,
            self.lm_head_weight(),
            self.config.final_logit_softcapping,
        )?)
    }

    /// log p(token | prefix) (f32, [N]) for each (batch, position, token):
    /// the logits at `position` scored against `token` (normally the input
    /// token at position + 1). Differentiable with respect to the LoRA Vars.
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[(usize, usize, u32)],
    ) -> Result<Tensor> {
        let positions: Vec<(usize, usize)> = targets.iter().map(|&(b, t, _)| (b, t)).collect();
        let mut tok = Vec::with_capacity(targets.len());
        for &(_, _, id) in targets {
            if id as usize >= self.config.vocab_size {
                return Err(ModelError::Input(format!(
                    "target token {id} is outside the vocabulary"
                )));
            }
            tok.push(id);
        }
        if !crate::model::kernels::cpu::fused_for(&self.device, self.dtype) {
            // The compositions (a GPU, half precision): chunked logits, and
            // for backward one [hidden] gradient a row instead of them.
            let rows = self.gather_rows(hidden, &positions)?;
            let weight = self.lm_head_weight();
            let product = |x: &Tensor| upcast(&frozen_matmul(x, weight)?);
            return Ok(head_token_logprobs(
                &rows,
                weight,
                &product,
                self.config.final_logit_softcapping,
                &tok,
                crate::model::kernels::head_logprobs::chunk_rows(self.config.vocab_size),
            )?);
        }
        if self.checkpointing {
            // The [rows, vocab] logits exist for one chunk of rows at a time.
            let rows = self.gather_rows(hidden, &positions)?;
            let (weight, tok) = (self.lm_head_weight().clone(), Arc::new(tok));
            let cap = self.config.final_logit_softcapping;
            let scores: RowFunction = Arc::new(move |range, x| {
                let logits = head(x, &weight, cap)?;
                crate::model::kernels::ops::token_logprobs(&logits, &tok[range])
            });
            return Ok(recomputed_rows(&rows, HEAD_CHUNK_ROWS, scores)?);
        }
        let logits = self.logits_at(hidden, &positions)?;
        Ok(crate::model::kernels::ops::token_logprobs(&logits, &tok)?)
    }

    /// log Σᵥ pᵥ² (f32, [N]) of each target position's next-token
    /// distribution, with no graph: what WPO's weights compare a token's
    /// log-prob with (TRL's `log_sum_sq_probs`). The head runs again, on
    /// `HEAD_CHUNK_ROWS` rows at a time, so no [N, vocab] tensor is kept.
    pub fn token_log_sum_sq_probs(
        &self,
        hidden: &Tensor,
        targets: &[(usize, usize, u32)],
    ) -> Result<Vec<f32>> {
        let positions: Vec<(usize, usize)> = targets.iter().map(|&(b, t, _)| (b, t)).collect();
        let rows = self.gather_rows(&hidden.detach(), &positions)?;
        let cap = self.config.final_logit_softcapping;
        let mut out = Vec::with_capacity(positions.len());
        for start in (0..positions.len()).step_by(HEAD_CHUNK_ROWS) {
            let len = HEAD_CHUNK_ROWS.min(positions.len() - start);
            // No graph: the rows are detached and the head is frozen.
            let logits = head(&rows.narrow(0, start, len)?, self.lm_head_weight(), cap)?
                .to_dtype(DType::F32)?;
            // log Σ p² = logsumexp(2z) − 2·logsumexp(z).
            let sum_sq = ((&logits * 2.0)?.log_sum_exp(D::Minus1)?
                - (logits.log_sum_exp(D::Minus1)? * 2.0)?)?;
            out.extend(sum_sq.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Activation checkpointing from now on: forward passes that keep a
    /// graph store one hidden state per layer instead of its activations;
    /// backward (`Decoder::backward`) runs each layer again.
    pub fn enable_checkpointing(&mut self) {
        self.checkpointing = true;
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The gradients of `loss` (a scalar of this model's forward passes):
    /// candle's backward, plus the LoRA gradients that checkpointed layers
    /// recompute during it. Use it for every backward through this model: a
    /// checkpointed layer refuses a plain `Tensor::backward`.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(backward_with_recomputed(loss)?)
    }

    // ------------------------------------------------------------ LoRA

    /// Attaches freshly initialised LoRA adapters (PEFT init, seeded) to every
    /// module `lora` targets. Replaces adapters already present.
    pub fn apply_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        let targets = lora.resolve(&self.config)?;
        self.remove_lora();
        for target in &targets {
            let device = self.device.clone();
            let linear = self.linear_mut(&target.module).ok_or_else(|| {
                ModelError::LoraConfig(format!("no module named {}", target.module))
            })?;
            linear.lora = Some(LoraAdapter::init(
                target,
                linear.in_features(),
                linear.out_features(),
                lora.dropout,
                seed,
                &device,
            )?);
            if lora.use_dora {
                linear.attach_dora(None)?;
            }
        }
        self.lora_config = Some(lora.clone());
        Ok(())
    }

    /// Drops every adapter.
    pub fn remove_lora(&mut self) {
        for layer in &mut self.layers {
            for l in layer.linears_mut() {
                l.lora = None;
            }
        }
        self.lora_config = None;
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    pub fn linear(&self, module: &str) -> Option<&Linear> {
        self.linears().find(|l| l.name == module)
    }

    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .find(|l| l.name == module)
    }

    /// Trainable Vars by PEFT tensor name
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`),
    /// in a fixed order: layer, projection, A, B, then DoRA's magnitude.
    pub fn lora_parameters(&self) -> Vec<(String, Var)> {
        self.linears()
            .filter_map(|l| l.lora.as_ref().map(|a| a.named_vars(&l.name)))
            .flatten()
            .collect()
    }

    /// All trainable Vars (for an optimizer), in `lora_parameters` order.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_parameters().into_iter().map(|(_, v)| v).collect()
    }

    /// Base weights by HF tensor name (adapters not merged), for saving;
    /// quantized projections are dequantised into `dtype`.
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(names::EMBED_TOKENS.to_string(), self.embed_tokens.clone())];
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, norm) in layer.norms(i) {
                out.push((name, norm.weight.clone()));
            }
            for l in layer.linears() {
                out.push((names::weight(&l.name), l.weight.to_dense(self.dtype)?));
                if let Some(b) = &l.bias {
                    out.push((names::bias(&l.name), b.clone()));
                }
            }
        }
        out.push((names::FINAL_NORM.to_string(), self.norm.weight.clone()));
        if let Some(h) = &self.lm_head {
            out.push((names::LM_HEAD.to_string(), h.clone()));
        }
        Ok(out)
    }
}

/// Where each of sequences of `lengths` tokens starts when packed into one row.
pub fn packed_starts(lengths: &[usize]) -> Vec<usize> {
    lengths
        .iter()
        .scan(0, |next, &len| {
            let start = *next;
            *next += len;
            Some(start)
        })
        .collect()
}

/// An error naming the first token id outside a vocabulary of `vocab_size`.
pub(crate) fn check_vocabulary<'a>(
    ids: impl IntoIterator<Item = &'a u32>,
    vocab_size: usize,
) -> Result<()> {
    match ids.into_iter().find(|&&id| id as usize >= vocab_size) {
        Some(bad) => Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary of size {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// Next-token targets for `Decoder::token_logprobs`: for every position t
/// whose *next* token is marked in `loss_mask` (e.g. the completion tokens
/// of an SFT example), yields (batch, t, input_ids[batch][t + 1]).
pub fn next_token_targets(
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<bool>],
) -> Result<Vec<(usize, usize, u32)>> {
    if input_ids.len() != loss_mask.len() {
        return Err(ModelError::Input(format!(
            "{} sequences but {} loss masks",
            input_ids.len(),
            loss_mask.len()
        )));
    }
    let mut out = Vec::new();
    for (b, (ids, mask)) in input_ids.iter().zip(loss_mask).enumerate() {
        if ids.len() != mask.len() {
            return Err(ModelError::Input(format!(
                "sequence {b}: {} tokens but {} mask entries",
                ids.len(),
                mask.len()
            )));
        }
        for t in 1..ids.len() {
            if mask[t] {
                out.push((b, t - 1, ids[t]));
            }
        }
    }
    Ok(out)
}

/// Sums per-token log-probs ([N], in `targets` order) into one value per
/// sequence ([batch]) — what DPO needs — keeping the graph differentiable.
pub fn sum_by_sequence(
    token_logprobs: &Tensor,
    targets: &[(usize, usize, u32)],
    batch: usize,
) -> Result<Tensor> {
    weighted_sum_by_sequence(token_logprobs, targets, &vec![1.0; targets.len()], batch)
}

/// Σ wᵢ·log-probᵢ per sequence: [`sum_by_sequence`] with a weight per target.
pub fn weighted_sum_by_sequence(
    token_logprobs: &Tensor,
    targets: &[(usize, usize, u32)],
    weights: &[f32],
    batch: usize,
) -> Result<Tensor> {
    let n = targets.len();
    if token_logprobs.dims() != [n] || weights.len() != n {
        return Err(ModelError::Input(format!(
            "expected {n} log-probs and weights, got shape {:?} and {} weights",
            token_logprobs.dims(),
            weights.len()
        )));
    }
    let mut onehot = vec![0f32; batch * n];
    for (i, &(b, _, _)) in targets.iter().enumerate() {
        if b >= batch {
            return Err(ModelError::Input(format!(
                "target batch index {b} >= batch size {batch}"
            )));
        }
        onehot[b * n + i] = weights[i];
    }
    let onehot = Tensor::from_vec(onehot, (batch, n), token_logprobs.device())?
        .to_dtype(token_logprobs.dtype())?;
    Ok(onehot.matmul(&token_logprobs.unsqueeze(1)?)?.squeeze(1)?)
}

/// The output head: logits in f32 (f64 for an f64 model), soft-capped as
/// cap·tanh(logits / cap) when the family says (Gemma 2), before any
/// softmax reads them.
fn head(rows: &Tensor, weight: &Tensor, softcap: Option<f64>) -> candle_core::Result<Tensor> {
    let logits = upcast(&frozen_matmul(rows, weight)?)?;
    match softcap {
        Some(cap) => (logits / cap)?.tanh()? * cap,
        None => Ok(logits),
    }
}

/// Logits and log-probs are computed in f32 (f64 when the model runs in f64).
fn upcast(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == DType::F64 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}
