//! GGUF files (llama.cpp's format) as base models: the architecture and
//! shapes from the metadata, read into the same config.json a Hugging Face
//! folder has (so every check `ModelConfig::from_json` makes applies); the
//! tensors under their Hugging Face names, quantized ones kept in their own
//! block format, with llama.cpp's q/k row permutation undone for the llama
//! architecture; and the tokenizer (vocabulary, merges, pre-tokenizer,
//! special tokens, chat template) as tokenizer.json and
//! tokenizer_config.json. Metadata this program does not understand is
//! refused by name, as config.json keys are.

use crate::model::config::ModelConfig;
use crate::model::error::{ModelError, Result};
use crate::model::family::{Architecture, NormPlacement};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// llama.cpp's per-frequency rope factors (Llama 3.x's rope scaling).
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";

/// The name a GGUF weight file has inside a `base` artifact.
pub const GGUF_FILE: &str = "model.gguf";

/// An open GGUF file: its metadata and where each tensor lies.
pub struct GgufModel {
    path: PathBuf,
    content: Content,
    /// `general.architecture`.
    arch: String,
}

/// How llama.cpp names each architecture this program reads, the family it
/// is, and whether its converter permuted the q/k rows (llama.cpp's
/// "normal" rope; the others use the NeoX rotation, rows as in HF).
pub(crate) const ARCHITECTURES: [(&str, Architecture, bool); 7] = [
    ("llama", Architecture::Llama, true),
    ("qwen2", Architecture::Qwen2, false),
    ("qwen3", Architecture::Qwen3, false),
    ("gemma2", Architecture::Gemma2, false),
    ("gemma3", Architecture::Gemma3, false),
    ("phi3", Architecture::Phi3, false),
    ("olmo2", Architecture::Olmo2, false),
];

/// Architectures llama.cpp writes that are refused, with why.
const REFUSED: [(&str, &str); 3] = [
    (
        "smollm3",
        "SmolLM3 GGUFs are not supported yet (its NoPE layers are hardcoded in llama.cpp)",
    ),
    ("qwen3moe", "mixture-of-experts models are not supported"),
    (
        "gemma",
        "Gemma 1 is not supported (Gemma 2 and Gemma 3 are)",
    ),
];

/// Layer counts of the models whose attention scale llama.cpp takes from
/// hidden/heads instead of head_dim (Gemma 2 27B, Gemma 3 27B): it does not
/// read `query_pre_attn_scalar` but decides by size.
pub(crate) fn gemma_attention_scalar(
    arch: Architecture,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> usize {
    match (arch, layers) {
        (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62) => hidden / heads.max(1),
        _ => head_dim,
    }
}

/// llama.cpp's default period of sliding and global layers (the last of
/// each period global).
pub(crate) fn default_window_period(arch: Architecture) -> usize {
    match arch {
        Architecture::Gemma3 => 6,
        _ => 2,
    }
}

/// `{arch}.` keys that are read, and those known not to change the
/// computation.
const READ_KEYS: [&str; 20] = [
    "attention.sliding_window",
    "attention.sliding_window_pattern",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope.freq_base_swa",
    "rope.scaling.attn_factor",
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "context_length",
];
const INERT_ARCH_KEYS: [&str; 2] = ["vocab_size", "rope.scaling.finetuned"];

fn config_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::config(path, message.into())
}

impl GgufModel {
    /// Reads the header and metadata of `path` (the tensor data stays on
    /// disk until a tensor is asked for).
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = Content::read(&mut file).map_err(|e| {
            config_error(path, format!("not a GGUF file this program can read: {e}"))
        })?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(a)) => a.clone(),
            _ => {
                return Err(config_error(
                    path,
                    "GGUF metadata has no general.architecture",
                ))
            }
        };
        Ok(GgufModel {
            path: path.to_path_buf(),
            content,
            arch,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn arch_key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        let full = self.arch_key(key);
        let Some(v) = self.meta(&full) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => *x as f64,
            Value::I8(x) => *x as f64,
            Value::U16(x) => *x as f64,
            Value::I16(x) => *x as f64,
            Value::U32(x) => *x as f64,
            Value::I32(x) => *x as f64,
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            _ => return Err(config_error(&self.path, format!("{full} must be a number"))),
        };
        Ok(Some(n))
    }

    fn count(&self, key: &str) -> Result<Option<usize>> {
        match self.number(key)? {
            Some(n) if n >= 0.0 && n.fract() == 0.0 => Ok(Some(n as usize)),
            Some(n) => Err(config_error(
                &self.path,
                format!(
                    "{} must be a non-negative integer, got {n}",
                    self.arch_key(key)
                ),
            )),
            None => Ok(None),
        }
    }

    fn require(&self, key: &str) -> Result<usize> {
        self.count(key)?.ok_or_else(|| {
            config_error(
                &self.path,
                format!("GGUF metadata lacks {}", self.arch_key(key)),
            )
        })
    }

    /// The family and whether q/k rows are permuted.
    fn family(&self) -> Result<(Architecture, bool)> {
        if let Some((_, why)) = REFUSED.iter().find(|(a, _)| *a == self.arch) {
            return Err(config_error(
                &self.path,
                format!("GGUF architecture {:?}: {why}", self.arch),
            ));
        }
        ARCHITECTURES
            .iter()
            .find(|(a, _, _)| *a == self.arch)
            .map(|&(_, family, permuted)| (family, permuted))
            .ok_or_else(|| {
                let known: Vec<&str> = ARCHITECTURES.iter().map(|(a, _, _)| *a).collect();
                config_error(
                    &self.path,
                    format!(
                        "GGUF architecture {:?} is not supported (supported: {})",
                        self.arch,
                        known.join(", ")
                    ),
                )
            })
    }

    /// Where the norms sit in a layer (which HF norm each GGUF one is).
    fn placement(&self) -> NormPlacement {
        self.family()
            .map_or(NormPlacement::Pre, |(a, _)| a.family().norms)
    }

    /// The config.json a Hugging Face folder of this model would have.
    pub fn config_json(&self) -> Result<Json> {
        let (arch, _) = self.family()?;
        let family = arch.model_type();
        let prefix = format!("{}.", self.arch);
        for key in self.content.metadata.keys() {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            if !READ_KEYS.contains(&rest) && !INERT_ARCH_KEYS.contains(&rest) {
                return Err(config_error(
                    &self.path,
                    format!("GGUF metadata {key} is not one this program implements; it may change what the model computes, so it is refused rather than ignored"),
                ));
            }
        }
        if let Some(name) = self.content.tensor_infos.keys().find(|n| {
            n.starts_with("rope_freqs") && (*n != ROPE_FREQS || arch != Architecture::Llama)
        }) {
            return Err(config_error(
                &self.path,
                format!(
                    "GGUF tensor {name} (per-frequency rope factors) is not supported for {}",
                    self.arch
                ),
            ));
        }
        let hidden = self.require("embedding_length")?;
        let heads = self.require("attention.head_count")?;
        let kv_heads = self.count("attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match self.count("attention.key_length")? {
            Some(k) => k,
            None => hidden / heads.max(1),
        };
        if let Some(v) = self.count("attention.value_length")? {
            if v != head_dim {
                return Err(config_error(
                    &self.path,
                    format!(
                        "{} ({v}) differs from the key length ({head_dim})",
                        self.arch_key("attention.value_length")
                    ),
                ));
            }
        }
        if let Some(r) = self.count("rope.dimension_count")? {
            if r != head_dim {
                return Err(config_error(
                    &self.path,
                    format!(
                        "{} = {r}: rope on part of each head ({head_dim}) is not supported",
                        self.arch_key("rope.dimension_count")
                    ),
                ));
            }
        }
        let vocab = self
            .token_list("tokenizer.ggml.tokens")?
            .map(|t| t.len())
            .or(self.count("vocab_size")?)
            .ok_or_else(|| {
                config_error(
                    &self.path,
                    "GGUF metadata has neither tokenizer.ggml.tokens nor a vocab_size",
                )
            })?;
        let mut config = json!({
            "model_type": family,
            "hidden_size": hidden,
            "intermediate_size": self.require("feed_forward_length")?,
            "num_hidden_layers": self.require("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "rms_norm_eps": self.number("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            "rope_theta": self.number("rope.freq_base")?.unwrap_or(10_000.0),
            "max_position_embeddings": self.count("context_length")?.unwrap_or(4096),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "torch_dtype": "float32",
        });
        let obj = config.as_object_mut().expect("object");
        if let Some(Value::String(kind)) = self.meta(&self.arch_key("rope.scaling.type")) {
            if kind != "none" {
                let mut rope = Map::new();
                rope.insert("rope_type".into(), json!(kind));
                if let Some(f) = self.number("rope.scaling.factor")? {
                    rope.insert("factor".into(), json!(f));
                }
                if let Some(o) = self.count("rope.scaling.original_context_length")? {
                    rope.insert("original_max_position_embeddings".into(), json!(o));
                }
                obj.insert("rope_scaling".into(), Json::Object(rope));
            }
        }
        if family == "llama" {
            let bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
            obj.insert("attention_bias".into(), json!(bias));
            if self.content.tensor_infos.contains_key(ROPE_FREQS) {
                let theta = self.number("rope.freq_base")?.unwrap_or(10_000.0);
                obj.insert("rope_scaling".into(), self.llama3_scaling(theta, head_dim)?);
            }
        }
        match arch {
            Architecture::Gemma2 | Architecture::Gemma3 => {
                self.gemma_config(arch, obj, hidden, heads, head_dim)?
            }
            Architecture::Phi3 => self.phi3_config(obj)?,
            _ => {
                for key in [
                    "attention.sliding_window",
                    "attn_logit_softcapping",
                    "final_logit_softcapping",
                    "rope.freq_base_swa",
                    "attention.sliding_window_pattern",
                    "rope.scaling.attn_factor",
                ] {
                    if self.meta(&self.arch_key(key)).is_some() {
                        return Err(config_error(&self.path, format!("GGUF metadata {} is not one llama.cpp's {} architecture reads; it is refused rather than ignored", self.arch_key(key), self.arch)));
                    }
                }
            }
        }
        for (key, id) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(v) = self.meta(id).and_then(|v| v.to_u32().ok()) {
                obj.insert(key.into(), json!(v));
            }
        }
        Ok(config)
    }

    /// Llama 3.x's rope as `rope_scaling`, from the per-frequency factors
    /// llama.cpp's converter computed from it (`rope_freqs.weight`, each
    /// base frequency over the scaled one). The file keeps only the
    /// factors: the largest is `factor`; with Meta's low and high
    /// frequency factors (1 and 4) a factor between 1 and `factor` gives
    /// the original context (8192 when none is), and the whole list is
    /// then recomputed and must match, or the file is refused.
    fn llama3_scaling(&self, theta: f64, head_dim: usize) -> Result<Json> {
        let stored: Vec<f64> = self
            .tensor_in_file_order(ROPE_FREQS)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let refuse = || {
            config_error(&self.path, format!("GGUF tensor {ROPE_FREQS}: these rope factors are not Llama 3's rule with low/high frequency factors 1 and 4 (not supported)"))
        };
        if stored.len() != head_dim / 2 {
            return Err(refuse());
        }
        let factor = stored.iter().cloned().fold(f64::MIN, f64::max);
        let (low, high) = (1.0, 4.0);
        let wavelength =
            |i: usize| 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64);
        let original = stored
            .iter()
            .position(|f| *f > 1.0 + 1e-6 && *f < factor * (1.0 - 1e-6))
            .map(|i| {
                let smooth = (1.0 / stored[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
                (wavelength(i) * (smooth * (high - low) + low)).round() as usize
            })
            .unwrap_or(8192);
        let rope = crate::model::rope::Rope {
            theta,
            scaling: crate::model::rope::RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            },
        };
        let matches = crate::model::rope::llama_cpp_factors(&rope, head_dim)
            .iter()
            .zip(&stored)
            .all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0));
        if !matches {
            return Err(refuse());
        }
        Ok(
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                  "high_freq_factor": high, "original_max_position_embeddings": original}),
        )
    }

    /// Gemma 2 and 3 as llama.cpp computes them: layers sliding by its
    /// pattern (its default period, or `sliding_window_pattern`), the
    /// attention scale by model size, Gemma 2's soft-caps (50 and 30 when
    /// the file does not say), Gemma 3's local rope base (10000 unless
    /// `rope.freq_base_swa`), its linear scaling on global layers only.
    fn gemma_config(
        &self,
        arch: Architecture,
        obj: &mut Map<String, Json>,
        hidden: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let layers = self.require("block_count")?;
        let scalar = gemma_attention_scalar(arch, layers, hidden, heads, head_dim);
        obj.insert("query_pre_attn_scalar".into(), json!(scalar));
        obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        let period = default_window_period(arch);
        let sliding: Vec<bool> = match self.meta(&self.arch_key("attention.sliding_window_pattern"))
        {
            None => (0..layers).map(|i| i % period < period - 1).collect(),
            Some(Value::Array(items)) if items.len() == layers => items
                .iter()
                .map(|v| {
                    v.to_bool().map_err(|_| {
                        config_error(&self.path, "sliding_window_pattern must list booleans")
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => match v.to_u32() {
                Ok(p) if p > 0 => (0..layers)
                    .map(|i| i % p as usize + 1 < p as usize)
                    .collect(),
                _ => {
                    return Err(config_error(
                        &self.path,
                        format!(
                            "{} must be a positive period or one boolean per layer",
                            self.arch_key("attention.sliding_window_pattern")
                        ),
                    ))
                }
            },
        };
        let window = match (arch, self.count("attention.sliding_window")?) {
            (Architecture::Gemma2, None) => Some(4096),
            (_, Some(0)) | (Architecture::Gemma3, None) => None,
            (_, w) => w,
        };
        let types: Vec<&str> = sliding
            .iter()
            .map(|&s| {
                if s && window.is_some() {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        obj.insert("layer_types".into(), json!(types));
        if let Some(w) = window {
            obj.insert("sliding_window".into(), json!(w));
        }
        let theta = self.number("rope.freq_base")?.unwrap_or(10_000.0);
        let local = self.number("rope.freq_base_swa")?;
        let attn_cap = self.number("attn_logit_softcapping")?.filter(|c| *c != 0.0);
        let final_cap = self
            .number("final_logit_softcapping")?
            .filter(|c| *c != 0.0);
        let mut global = Map::new();
        global.insert("rope_theta".into(), json!(theta));
        match obj.remove("rope_scaling") {
            Some(Json::Object(scaling)) => {
                for (k, v) in scaling {
                    global.insert(k, v);
                }
            }
            _ => {
                global.insert("rope_type".into(), json!("default"));
            }
        }
        obj.remove("rope_theta");
        match arch {
            Architecture::Gemma2 => {
                obj.insert(
                    "attn_logit_softcapping".into(),
                    json!(attn_cap.unwrap_or(50.0)),
                );
                obj.insert(
                    "final_logit_softcapping".into(),
                    json!(final_cap.unwrap_or(30.0)),
                );
                let local = json!({"rope_type": "default", "rope_theta": local.unwrap_or(theta)});
                if global.get("rope_type") != Some(&json!("default")) {
                    return Err(config_error(
                        &self.path,
                        "rope scaling on a Gemma 2 GGUF is not supported",
                    ));
                }
                obj.insert(
                    "rope_parameters".into(),
                    json!({"full_attention": Json::Object(global), "sliding_attention": local}),
                );
            }
            _ => {
                if attn_cap.is_some() {
                    return Err(config_error(&self.path, "Gemma 3 has no attention soft-cap; gemma3.attn_logit_softcapping is refused"));
                }
                if let Some(c) = final_cap {
                    obj.insert("final_logit_softcapping".into(), json!(c));
                }
                let local =
                    json!({"rope_type": "default", "rope_theta": local.unwrap_or(10_000.0)});
                obj.insert(
                    "rope_parameters".into(),
                    json!({"full_attention": Json::Object(global), "sliding_attention": local}),
                );
            }
        }
        Ok(())
    }

    /// Phi-3 as llama.cpp computes it: no sliding window (llama.cpp turns
    /// Phi-3's off), LongRoPE from the `rope_factors_long/short` tensors.
    fn phi3_config(&self, obj: &mut Map<String, Json>) -> Result<()> {
        let factors = |name: &str| -> Result<Option<Vec<f32>>> {
            if !self.content.tensor_infos.contains_key(name) {
                return Ok(None);
            }
            Ok(Some(
                self.tensor_in_file_order(name)?
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ))
        };
        match (
            factors("rope_factors_long.weight")?,
            factors("rope_factors_short.weight")?,
        ) {
            (None, None) => {}
            (Some(long), Some(short)) => {
                let original = self
                    .count("rope.scaling.original_context_length")?
                    .ok_or_else(|| {
                        config_error(
                            &self.path,
                            "Phi-3 rope factors without phi3.rope.scaling.original_context_length",
                        )
                    })?;
                let mut scaling =
                    json!({"rope_type": "longrope", "long_factor": long, "short_factor": short});
                if let Some(a) = self.number("rope.scaling.attn_factor")? {
                    scaling["attention_factor"] = json!(a);
                }
                obj.remove("rope_scaling");
                obj.insert("rope_scaling".into(), scaling);
                obj.insert("original_max_position_embeddings".into(), json!(original));
            }
            _ => {
                return Err(config_error(
                    &self.path,
                    "Phi-3 GGUF has one of rope_factors_long/short without the other",
                ))
            }
        }
        Ok(())
    }

    /// The model's configuration, checked as a config.json would be.
    pub fn config(&self) -> Result<ModelConfig> {
        let config = ModelConfig::from_json(&self.config_json()?, &self.path)?;
        self.check_tensors(&config)?;
        Ok(config)
    }

    /// Every tensor in the file is one this program uses (none ignored).
    fn check_tensors(&self, config: &ModelConfig) -> Result<()> {
        let mut expected: Vec<String> = vec![
            crate::model::formats::names::EMBED_TOKENS.into(),
            crate::model::formats::names::FINAL_NORM.into(),
        ];
        if !config.tie_word_embeddings {
            expected.push(crate::model::formats::names::LM_HEAD.into());
        }
        for i in 0..config.num_hidden_layers {
            expected.extend(config.layer_norms(i).into_iter().map(|(n, _)| n));
            for (p, _) in config.projections() {
                let module = crate::model::formats::names::projection(i, p);
                expected.push(crate::model::formats::names::weight(&module));
                if config.projection_has_bias(p) {
                    expected.push(crate::model::formats::names::bias(&module));
                }
            }
        }
        let placement = self.placement();
        let mut known: std::collections::HashSet<String> = expected
            .iter()
            .filter_map(|n| gguf_name(n, placement))
            .collect();
        if config.architecture == Architecture::Phi3 {
            known.extend([
                "rope_factors_long.weight".into(),
                "rope_factors_short.weight".into(),
            ]);
        }
        if config.architecture == Architecture::Llama {
            known.insert(ROPE_FREQS.into());
        }
        if let Some(extra) = self
            .content
            .tensor_infos
            .keys()
            .find(|n| !known.contains(*n))
        {
            return Err(config_error(
                &self.path,
                format!("GGUF tensor {extra} is not one this program uses for {}; it may change what the model computes", self.arch),
            ));
        }
        Ok(())
    }

    fn token_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(config_error(&self.path, format!("{key} must list strings"))),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(config_error(&self.path, format!("{key} must be a list"))),
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.meta(key).and_then(|v| v.to_bool().ok())
    }

    /// The tensor a Hugging Face weight name stands for, on `device`:
    /// quantized blocks as stored (q/k rows of the llama architecture put
    /// back in Hugging Face order), float tensors as stored.
    pub fn tensor(&self, hf_name: &str, shape: &[usize], device: &Device) -> Result<QTensor> {
        let name =
            gguf_name(hf_name, self.placement()).ok_or_else(|| ModelError::MissingTensor {
                tensor: hf_name.to_string(),
                file: self.path.clone(),
            })?;
        let info =
            self.content
                .tensor_infos
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    tensor: format!("{name} ({hf_name})"),
                    file: self.path.clone(),
                })?;
        if info.shape.dims() != shape {
            return Err(ModelError::MisshapenTensor {
                tensor: name,
                file: self.path.clone(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let mut raw = self.raw(&name, info)?;
        let (_, permuted) = self.family()?;
        if permuted {
            let heads = if name.contains(".attn_q.") {
                self.count("attention.head_count")?
            } else if name.contains(".attn_k.") {
                self.count("attention.head_count_kv")?
                    .or(self.count("attention.head_count")?)
            } else {
                None
            };
            if let Some(heads) = heads {
                raw = unpermute_rows(&raw, shape[0], heads);
            }
        }
        let q = qtensor_from_ggml(info.ggml_dtype, &raw, shape.to_vec(), device)
            .map_err(|e| ModelError::config(&self.path, format!("tensor {name}: {e}")))?;
        // llama.cpp's converter folds Gemma's 1 + w into its norm weights.
        if name.ends_with("norm.weight") && self.family()?.0.family().norm_plus_one {
            let w = (q.dequantize(device)? - 1.0)?;
            return Ok(QTensor::quantize(&w, GgmlDType::F32)?);
        }
        Ok(q)
    }

    /// A tensor by its llama.cpp name as stored (rows in the file's order).
    pub fn tensor_in_file_order(&self, name: &str) -> Result<QTensor> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    tensor: name.to_string(),
                    file: self.path.clone(),
                })?;
        let raw = self.raw(name, info)?;
        qtensor_from_ggml(
            info.ggml_dtype,
            &raw,
            info.shape.dims().to_vec(),
            &Device::Cpu,
        )
        .map_err(|e| ModelError::config(&self.path, format!("tensor {name}: {e}")))
    }

    /// The stored bytes of one tensor.
    fn raw(&self, name: &str, info: &TensorInfo) -> Result<Vec<u8>> {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(config_error(
                &self.path,
                format!("tensor {name}: {elems} values are not whole blocks of {block}"),
            ));
        }
        let bytes = elems / block * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let mut file =
            std::fs::File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| ModelError::io(&self.path, e))?;
        if start.saturating_add(bytes as u64) > size {
            return Err(config_error(
                &self.path,
                format!("tensor {name} runs past the end of the file (truncated?)"),
            ));
        }
        let mut raw = vec![0u8; bytes];
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| ModelError::io(&self.path, e))?;
        Ok(raw)
    }

    /// Every `tokenizer.*` key, as stored (what a GGUF of a model fine-tuned
    /// from this one carries over unchanged).
    pub fn tokenizer_metadata(&self) -> Vec<(String, Value)> {
        let mut keys: Vec<(String, Value)> = self
            .content
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys
    }

    /// Mean bits a decoder projection weight takes in this file (f32 for
    /// one stored as floats, which loading holds in the compute dtype).
    pub fn projection_bits(&self, config: &ModelConfig) -> f64 {
        let (mut bits, mut weights) = (0.0, 0.0);
        for i in 0..config.num_hidden_layers {
            for (p, _) in config.projections() {
                let module = crate::model::formats::names::projection(i, p);
                let Some(info) = gguf_name(
                    &crate::model::formats::names::weight(&module),
                    self.placement(),
                )
                .and_then(|n| self.content.tensor_infos.get(&n)) else {
                    continue;
                };
                let n = info.shape.elem_count() as f64;
                bits += n * 8.0 * info.ggml_dtype.type_size() as f64
                    / info.ggml_dtype.block_size() as f64;
                weights += n;
            }
        }
        if weights == 0.0 {
            32.0
        } else {
            bits / weights
        }
    }

    /// Whether a weight is stored in a block format (not f32/f16/bf16).
    pub fn is_quantized(&self, hf_name: &str) -> bool {
        gguf_name(hf_name, self.placement())
            .and_then(|n| self.content.tensor_infos.get(&n))
            .is_some_and(|i| {
                !matches!(
                    i.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                )
            })
    }

    /// tokenizer.json for the tokenizer the metadata describes (llama.cpp's
    /// "gpt2" byte-level BPE, with the pre-tokenizer `tokenizer.ggml.pre`
    /// names).
    pub fn tokenizer_json(&self) -> Result<Json> {
        let model = self.string("tokenizer.ggml.model").unwrap_or("");
        match model {
            "gpt2" => self.byte_level_tokenizer_json(),
            "llama" => self.sentencepiece_tokenizer_json(),
            _ => Err(config_error(&self.path, format!("tokenizer.ggml.model {model:?} is not supported yet (\"gpt2\", byte-level BPE, and \"llama\", SentencePiece BPE, are)"))),
        }
    }

    fn token_types(&self, n: usize) -> Vec<i64> {
        match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_i32().map(i64::from).unwrap_or(1))
                .collect(),
            _ => vec![1; n],
        }
    }

    /// The BOS template when the metadata asks for one, else `otherwise`.
    fn bos_post_processor(&self, tokens: &[String], otherwise: Json) -> Json {
        let bos = self
            .meta("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.to_u32().ok());
        match (
            self.flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            bos,
        ) {
            (true, Some(id)) => {
                let text = tokens.get(id as usize).cloned().unwrap_or_default();
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {text.clone(): {"id": text, "ids": [id], "tokens": [text]}}})
            }
            _ => otherwise,
        }
    }

    /// Control (3) tokens as special added tokens, user-defined (4) ones as
    /// plain added tokens (llama.cpp matches both whole in the text).
    fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<Json> {
        tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[i] == 3})
            })
            .collect()
    }

    /// llama.cpp's "llama" tokenizer: SentencePiece BPE with byte fallback.
    /// llama.cpp merges, at each step, the adjacent pair whose joined piece
    /// is in the vocabulary with the highest score; that is BPE with every
    /// such pair as a merge, ranked by the joined piece's score (then the
    /// longer left piece, then the longer right). A space is prefixed to
    /// the text and after each special token (`add_space_prefix`), spaces
    /// become "▁", and characters outside the vocabulary fall back to
    /// their bytes (<0xXX>).
    fn sentencepiece_tokenizer_json(&self) -> Result<Json> {
        let tokens = self.token_list("tokenizer.ggml.tokens")?.ok_or_else(|| {
            config_error(&self.path, "GGUF metadata has no tokenizer.ggml.tokens")
        })?;
        let scores: Vec<f64> = match self.meta("tokenizer.ggml.scores") {
            Some(Value::Array(items)) if items.len() == tokens.len() => items
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x as f64),
                    Value::F64(x) => Ok(*x),
                    _ => Err(config_error(
                        &self.path,
                        "tokenizer.ggml.scores must list numbers",
                    )),
                })
                .collect::<Result<_>>()?,
            _ => {
                return Err(config_error(
                    &self.path,
                    "a SentencePiece tokenizer needs tokenizer.ggml.scores, one per token",
                ))
            }
        };
        let types = self.token_types(tokens.len());
        let ids: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .rev()
            .collect();
        // Every split of a piece into two pieces of the vocabulary.
        let mut merges: Vec<(usize, usize, f64)> = Vec::new();
        for (piece, score) in tokens.iter().zip(&scores) {
            let mut local: Vec<(usize, usize, f64)> = piece
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (l, r) = piece.split_at(at);
                    Some((*ids.get(l)?, *ids.get(r)?, *score))
                })
                .collect();
            local.sort_by_key(|&(l, r, _)| (l, r));
            merges.extend(local);
        }
        let len = |id: usize| tokens[id].chars().count();
        merges.sort_by(|a, b| {
            b.2.total_cmp(&a.2)
                .then(len(b.0).cmp(&len(a.0)))
                .then(len(b.1).cmp(&len(a.1)))
        });
        let merges: Vec<Json> = merges
            .iter()
            .map(|&(l, r, _)| json!([tokens[l], tokens[r]]))
            .collect();
        let vocab: Map<String, Json> = tokens
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let unk = self
            .meta("tokenizer.ggml.unknown_token_id")
            .and_then(|v| v.to_u32().ok())
            .and_then(|id| tokens.get(id as usize).cloned());
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = match self.flag("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
            true => {
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
            }
            false => replace,
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": Self::added_tokens(&tokens, &types),
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": self.bos_post_processor(&tokens, Json::Null),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        }))
    }

    /// llama.cpp's "gpt2" tokenizer: byte-level BPE.
    fn byte_level_tokenizer_json(&self) -> Result<Json> {
        let tokens = self.token_list("tokenizer.ggml.tokens")?.ok_or_else(|| {
            config_error(&self.path, "GGUF metadata has no tokenizer.ggml.tokens")
        })?;
        let merges = self
            .token_list("tokenizer.ggml.merges")?
            .unwrap_or_default();
        let types = self.token_types(tokens.len());
        let pre = self.string("tokenizer.ggml.pre").ok_or_else(|| {
            config_error(&self.path, "GGUF metadata names no tokenizer.ggml.pre; llama.cpp falls back to a default split it warns degrades generation, so it is refused")
        })?;
        let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
            config_error(&self.path, format!("tokenizer.ggml.pre {pre:?} is not one this program knows; llama.cpp warns that generation degrades with the wrong one, so it is refused (known: {})", KNOWN_PRE.join(", ")))
        })?;
        // llama.cpp skips merges for whole-vocabulary words under llama3's split.
        let ignore_merges = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
        let vocab: Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let added = Self::added_tokens(&tokens, &types);
        let post_processor = self.bos_post_processor(
            &tokens,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
        );
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        }))
    }

    /// tokenizer_config.json: the special tokens' texts and the chat template.
    pub fn tokenizer_config_json(&self) -> Result<Json> {
        let tokens = self
            .token_list("tokenizer.ggml.tokens")?
            .unwrap_or_default();
        let text = |key: &str| {
            self.meta(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        let mut config = json!({
            "bos_token": text("tokenizer.ggml.bos_token_id"),
            "eos_token": text("tokenizer.ggml.eos_token_id"),
            "pad_token": text("tokenizer.ggml.padding_token_id"),
            "unk_token": text("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": self.flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
            "model_max_length": self.count("context_length")?.unwrap_or(4096),
        });
        if let Some(template) = self.string("tokenizer.chat_template") {
            config["chat_template"] = json!(template);
        }
        Ok(config)
    }
}

/// llama.cpp's pre-tokenizer names this program translates.
const KNOWN_PRE: [&str; 11] = [
    "gpt2",
    "gpt-2",
    "olmo",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
];

/// GPT-2's split, which byte-level BPE applies itself.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp applies for `pre` (llama-vocab.cpp's
/// regex lists), as a tokenizers-library pre-tokenizer.
pub(crate) fn pre_tokenizer(pre: &str) -> Option<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "gpt2" | "gpt-2" | "olmo" => byte_level(true),
        // Each digit alone, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), byte_level(true)]})
        }
        "llama-bpe" | "llama3" | "llama-v3" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        _ => return None,
    })
}

/// llama.cpp's name of a Hugging Face tensor name, for a family whose
/// layers place their norms as `norms` says (HF's `post_attention_layernorm`
/// is the norm before the MLP in pre-norm families, after attention in
/// Gemma's and OLMo 2's).
pub fn gguf_name(hf: &str, norms: NormPlacement) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let name = match (module, norms) {
        ("input_layernorm", NormPlacement::Pre | NormPlacement::Sandwich) => "attn_norm",
        ("post_attention_layernorm", NormPlacement::Pre) => "ffn_norm",
        ("post_attention_layernorm", _) => "post_attention_norm",
        ("pre_feedforward_layernorm", NormPlacement::Sandwich) => "ffn_norm",
        ("post_feedforward_layernorm", NormPlacement::Sandwich | NormPlacement::Post) => {
            "post_ffw_norm"
        }
        ("self_attn.q_proj", _) => "attn_q",
        ("self_attn.k_proj", _) => "attn_k",
        ("self_attn.v_proj", _) => "attn_v",
        ("self_attn.qkv_proj", _) => "attn_qkv",
        ("self_attn.o_proj", _) => "attn_output",
        ("self_attn.q_norm", _) => "attn_q_norm",
        ("self_attn.k_norm", _) => "attn_k_norm",
        ("mlp.gate_proj", _) => "ffn_gate",
        ("mlp.up_proj", _) => "ffn_up",
        ("mlp.gate_up_proj", _) => "ffn_up",
        ("mlp.down_proj", _) => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// Undoes llama.cpp's permutation of q/k rows (its converter interleaves
/// the two halves of each head's rotary pairs): row `h·d + 2i + j` of the
/// file is Hugging Face's row `h·d + j·d/2 + i`. Rows are whole blocks, so
/// this works on quantized bytes as on floats.
fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = raw.len() / rows.max(1);
    let d = rows / heads.max(1);
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let from = h * d + 2 * i + j;
                let to = h * d + j * (d / 2) + i;
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&raw[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

/// The tensors of a GGUF by name, for tests and tools.
pub fn tensor_names(model: &GgufModel) -> HashMap<String, Vec<usize>> {
    model
        .content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.shape.dims().to_vec()))
        .collect()
}

/// Each tensor's block format, by llama.cpp name.
pub fn tensor_formats(model: &GgufModel) -> HashMap<String, GgmlDType> {
    model
        .content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.ggml_dtype))
        .collect()
}
