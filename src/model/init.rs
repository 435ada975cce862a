//! `init`: a seeded random model of a given shape, written as a real HF
//! folder (config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json) so demos and tests load it through the same code
//! as a downloaded checkpoint. Same spec and seed give identical bytes.

use crate::model::config::{Architecture, ModelConfig};
use crate::model::error::{ModelError, Result};
use crate::model::formats::io::{write_json_atomic, write_safetensors_atomic};
use crate::model::formats::names;
use crate::model::formats::tokenizer::{
    builtin_special_id, builtin_vocab_size, write_builtin_tokenizer, IM_END,
};
use crate::model::formats::weights::{torch_dtype_name, SINGLE_FILE};
use crate::model::kernels::rng::SplitMix64;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct RandomModel {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Defaults to hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    pub seed: u64,
    /// Standard deviation of the embeddings (and an untied output head).
    /// HF's initializer_range is 0.02; see `random_weights` for why a larger
    /// value suits a model that only LoRA will train.
    pub embedding_std: f64,
}

impl RandomModel {
    /// A small Qwen2-style default, for examples.
    pub fn tiny(seed: u64) -> Self {
        RandomModel {
            architecture: Architecture::Qwen2,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 64,
            vocab_size: 128,
            head_dim: None,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            dtype: DType::F32,
            seed,
            embedding_std: 0.02,
        }
    }

    /// The config.json this spec produces.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let err = |m: String| ModelError::Input(format!("init: {m}"));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err(err(
                "hidden_size, layers and intermediate_size must be positive".into(),
            ));
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(err(format!(
                "heads ({}) must be a positive multiple of kv_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "head_dim {head_dim} must be positive and even"
            )));
        }
        if self.vocab_size < builtin_vocab_size() {
            return Err(err(format!(
                "vocab_size {} is smaller than the built-in tokenizer's {} tokens",
                self.vocab_size,
                builtin_vocab_size()
            )));
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(err(format!(
                "dtype {:?} is not a float model dtype",
                self.dtype
            )));
        }
        // A config.json as a user's checkpoint would have it, read by the
        // same parser, so `init` gets each family's defaults (windows, rope
        // layers) exactly as a downloaded model of that family would.
        let family = self.architecture.family();
        let mut config = json!({
            "model_type": family.model_type,
            "architectures": [family.hf_class],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": 2048,
            "torch_dtype": torch_dtype_name(self.dtype),
            "eos_token_id": builtin_special_id(IM_END),
        });
        if family.gemma_attention {
            let obj = config.as_object_mut().expect("object");
            obj.insert("query_pre_attn_scalar".into(), json!(head_dim));
            if self.architecture == Architecture::Gemma2 {
                obj.insert("attn_logit_softcapping".into(), json!(50.0));
                obj.insert("final_logit_softcapping".into(), json!(30.0));
            }
        }
        ModelConfig::from_json(&config, Path::new("init"))
    }
}

/// Random tensors for every weight of `config`, by HF name. Matrices and
/// biases ~ N(0, 0.02²) (HF's initializer_range); norm weights 1 + N(0, 0.1²)
/// rather than exactly 1 so tests notice a norm weight that is ignored.
/// Embeddings and an untied output head ~ N(0, embedding_std²): after the
/// final RMSNorm a logit is at most about hidden·std, so with 0.02 a LoRA on
/// the linear layers can never make a confident prediction (logits within
/// ±1.3 at hidden 64); 1/sqrt(hidden) lets them reach ±sqrt(hidden).
/// Each tensor has its own stream (seed, name): order-independent.
pub fn random_weights(
    config: &ModelConfig,
    seed: u64,
    dtype: DType,
    embedding_std: f64,
) -> Result<Vec<(String, Tensor)>> {
    let mut shapes: Vec<(String, Vec<usize>, bool)> = vec![(
        names::EMBED_TOKENS.into(),
        vec![config.vocab_size, config.hidden_size],
        false,
    )];
    for i in 0..config.num_hidden_layers {
        for (name, size) in config.layer_norms(i) {
            shapes.push((name, vec![size], true));
        }
        for (proj, _) in config.projections() {
            let (o, inp) = config.projection_shape(proj).expect("known projection");
            let module = names::projection(i, proj);
            shapes.push((names::weight(&module), vec![o, inp], false));
            if config.projection_has_bias(proj) {
                shapes.push((names::bias(&module), vec![o], false));
            }
        }
    }
    shapes.push((names::FINAL_NORM.into(), vec![config.hidden_size], true));
    if !config.tie_word_embeddings {
        shapes.push((
            names::LM_HEAD.into(),
            vec![config.vocab_size, config.hidden_size],
            false,
        ));
    }
    // Gemma's norms scale by 1 + w: the same spread around 1.
    let norm_center = if config.architecture.family().norm_plus_one {
        0.0
    } else {
        1.0
    };
    let mut out = Vec::with_capacity(shapes.len());
    for (name, shape, is_norm) in shapes {
        let mut rng = SplitMix64::for_stream(seed, &name);
        let n: usize = shape.iter().product();
        let std = if name == names::EMBED_TOKENS || name == names::LM_HEAD {
            embedding_std
        } else {
            0.02
        };
        let values: Vec<f32> = (0..n)
            .map(|_| if is_norm { norm_center + 0.1 * rng.normal() } else { std * rng.normal() } as f32)
            .collect();
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?;
        out.push((name, t));
    }
    Ok(out)
}

/// Writes a seeded random model and the built-in tokenizer into `dir`
/// (created if needed) and returns its config.
pub fn init_model(spec: &RandomModel, dir: &Path) -> Result<ModelConfig> {
    let config = spec.model_config()?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights = random_weights(&config, spec.seed, spec.dtype, spec.embedding_std)?;
    write_safetensors_atomic(&dir.join(SINGLE_FILE), &weights)?;
    write_json_atomic(&dir.join("config.json"), &config.to_json())?;
    write_builtin_tokenizer(dir, config.max_position_embeddings)?;
    Ok(config)
}
