//! Just enough of a Hugging Face config.json to type-check a recipe: the
//! architecture family and the number of layers, which name every linear
//! module a LoRA target may match.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Decoder families the program supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// The linear projections of one decoder layer, as PEFT names them.
pub const LAYER_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Full module names (`model.layers.N.self_attn.q_proj`, ...) of every linear layer.
pub fn linear_module_names(_arch: Arch, layers: usize) -> Vec<String> {
    (0..layers)
        .flat_map(|i| {
            LAYER_PROJECTIONS
                .iter()
                .map(move |p| format!("model.layers.{i}.{p}"))
        })
        .chain(std::iter::once("lm_head".to_string()))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: unsupported architecture `{model_type}` (supported: llama, mistral, qwen2)")]
    Unsupported { path: String, model_type: String },
    #[error("{path}: missing `{key}`")]
    Missing { path: String, key: &'static str },
}

/// Architecture and layer count from a config.json.
pub fn read_shape(path: &Path) -> Result<(Arch, usize), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: shown.clone(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: shown.clone(),
            source,
        })?;
    let model_type = json["model_type"].as_str().ok_or(ConfigError::Missing {
        path: shown.clone(),
        key: "model_type",
    })?;
    let arch = match model_type {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(ConfigError::Unsupported {
                path: shown,
                model_type: other.to_string(),
            })
        }
    };
    let layers = json["num_hidden_layers"]
        .as_u64()
        .ok_or(ConfigError::Missing {
            path: shown,
            key: "num_hidden_layers",
        })?;
    Ok((arch, layers as usize))
}
