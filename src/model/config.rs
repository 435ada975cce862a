//! HF `config.json` parsing into one `ModelConfig` for every family (what
//! differs between families is declared in `family`).

use crate::model::error::{ModelError, Result};
pub use crate::model::family::Architecture;
use crate::model::family::SlidingWindow;
use crate::model::formats::io::read_json;
use crate::model::formats::names::{self, Group};
use serde_json::{json, Value};
use std::path::Path;

/// Llama-3 style rope frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// As written in config.json ("float32", "bfloat16", ...), if present.
    pub torch_dtype: Option<String>,
    /// Whether q/k/v/o projections carry a bias (q/k/v only for Qwen2).
    pub attention_bias: bool,
    /// Sliding-window attention size, when the checkpoint enables it.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

fn get_usize(v: &Value, key: &str, file: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ModelError::config(
                file,
                format!("{key} must be a non-negative integer, got {x}"),
            )
        }),
    }
}

fn require_usize(v: &Value, key: &str, file: &Path) -> Result<usize> {
    get_usize(v, key, file)?
        .ok_or_else(|| ModelError::config(file, format!("missing required key {key:?}")))
}

fn get_f64(v: &Value, key: &str, file: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ModelError::config(file, format!("{key} must be a number, got {x}"))),
    }
}

fn get_bool(v: &Value, key: &str, file: &Path) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| ModelError::config(file, format!("{key} must be a boolean, got {x}"))),
    }
}

fn first_token_id(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads `dir/config.json` (an HF model folder).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads `config.json` from a file path.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value = read_json(path)?;
        Self::from_json(&value, path)
    }

    /// Parses a config.json value; `file` is only used in error messages.
    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string();
        let architectures: Vec<String> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let architecture = Architecture::parse(&model_type)
            .or_else(|| {
                if model_type.is_empty() {
                    architectures.iter().find_map(|a| Architecture::parse(a))
                } else {
                    None
                }
            })
            .ok_or_else(|| ModelError::UnknownArchitecture {
                file: file.to_path_buf(),
                model_type: model_type.clone(),
                architectures: architectures.clone(),
            })?;

        let hidden_size = require_usize(v, "hidden_size", file)?;
        let num_attention_heads = require_usize(v, "num_attention_heads", file)?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(ModelError::config(
                file,
                "hidden_size and num_attention_heads must be positive",
            ));
        }
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads", file)?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::config(
                file,
                format!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"),
            ));
        }
        let head_dim = get_usize(v, "head_dim", file)?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::config(
                file,
                format!("head_dim {head_dim} must be positive and even (rope)"),
            ));
        }
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            get_f64(rs, k, file)?.ok_or_else(|| {
                                ModelError::config(
                                    file,
                                    format!("rope_scaling.{k} is required for llama3 scaling"),
                                )
                            })
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: require_usize(
                                rs,
                                "original_max_position_embeddings",
                                file,
                            )?,
                        })
                    }
                    other => {
                        return Err(ModelError::config(
                            file,
                            format!(
                                "rope_scaling type {other:?} is not supported (only \"llama3\")"
                            ),
                        ))
                    }
                }
            }
        };
        let family = architecture.family();
        let attention_bias =
            family.qkv_bias || get_bool(v, "attention_bias", file)?.unwrap_or(false);
        if !family.qkv_bias && get_bool(v, "mlp_bias", file)?.unwrap_or(false) {
            return Err(ModelError::config(file, "mlp_bias = true is not supported"));
        }
        let sliding_window = match family.sliding_window {
            SlidingWindow::WhenSet => get_usize(v, "sliding_window", file)?,
            SlidingWindow::WhenEnabled
                if get_bool(v, "use_sliding_window", file)?.unwrap_or(false) =>
            {
                get_usize(v, "sliding_window", file)?
            }
            _ => None,
        };
        let hidden_act = v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("silu");
        if hidden_act != "silu" {
            return Err(ModelError::config(
                file,
                format!("hidden_act {hidden_act:?} is not supported (only \"silu\")"),
            ));
        }
        Ok(ModelConfig {
            architecture,
            model_type: architecture.model_type().to_string(),
            hidden_size,
            intermediate_size: require_usize(v, "intermediate_size", file)?,
            num_hidden_layers: require_usize(v, "num_hidden_layers", file)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: get_f64(v, "rope_theta", file)?.unwrap_or(10000.0),
            rope_scaling,
            rms_norm_eps: get_f64(v, "rms_norm_eps", file)?.unwrap_or(1e-6),
            tie_word_embeddings: get_bool(v, "tie_word_embeddings", file)?.unwrap_or(false),
            vocab_size: require_usize(v, "vocab_size", file)?,
            max_position_embeddings: get_usize(v, "max_position_embeddings", file)?.unwrap_or(4096),
            torch_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(|x| x.as_str())
                .map(String::from),
            attention_bias,
            sliding_window,
            bos_token_id: v.get("bos_token_id").and_then(first_token_id),
            eos_token_id: v.get("eos_token_id").and_then(first_token_id),
        })
    }

    /// A config.json value that transformers loads for this configuration.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype.clone().unwrap_or_else(|| "float32".to_string()),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        let obj = v.as_object_mut().expect("json! object");
        match &self.rope_scaling {
            Some(s) => {
                obj.insert(
                    "rope_scaling".into(),
                    json!({
                        "rope_type": "llama3",
                        "factor": s.factor,
                        "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings,
                    }),
                );
            }
            None => {
                obj.insert("rope_scaling".into(), Value::Null);
            }
        }
        let family = self.architecture.family();
        match family.sliding_window {
            SlidingWindow::WhenEnabled => {
                obj.insert(
                    "use_sliding_window".into(),
                    json!(self.sliding_window.is_some()),
                );
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            SlidingWindow::WhenSet => {
                obj.insert("sliding_window".into(), json!(self.sliding_window));
            }
            SlidingWindow::Never => {}
        }
        if family.states_biases {
            obj.insert("attention_bias".into(), json!(self.attention_bias));
            obj.insert("mlp_bias".into(), json!(false));
        }
        v
    }

    /// Whether q/k/v carry a bias. Qwen2 has q/k/v bias but no o_proj bias.
    pub fn projection_has_bias(&self, projection: &str) -> bool {
        if self.architecture.family().qkv_bias {
            matches!(projection, "q_proj" | "k_proj" | "v_proj")
        } else {
            self.attention_bias && names::group_of(projection) == Some(Group::Attention)
        }
    }

    /// (out_features, in_features) of one projection.
    pub fn projection_shape(&self, projection: &str) -> Option<(usize, usize)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let f = self.intermediate_size;
        Some(match projection {
            "q_proj" => (q, h),
            "k_proj" | "v_proj" => (kv, h),
            "o_proj" => (h, q),
            "gate_proj" | "up_proj" => (f, h),
            "down_proj" => (h, f),
            _ => return None,
        })
    }
}

/// Full PEFT-style names of every linear module LoRA may target, e.g.
/// `model.layers.0.self_attn.q_proj` ... `model.layers.N.mlp.down_proj`.
pub fn linear_module_names(config: &ModelConfig) -> Vec<String> {
    names::all_projections(config.num_hidden_layers)
}
