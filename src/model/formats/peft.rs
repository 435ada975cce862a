//! The PEFT adapter format, both ways: `adapter_config.json` +
//! `adapter_model.safetensors` with tensors named
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([r, in])
//! and `...lora_B.weight` ([out, r]); a DoRA adapter (`use_dora = true`)
//! adds `...lora_magnitude_vector` ([out]).

use crate::model::decoder::Decoder;
use crate::model::error::{ModelError, Result};
use crate::model::formats::io::{read_json, write_json_atomic, write_safetensors_atomic};
use crate::model::formats::names::{self, Group};
use crate::model::layers::lora::{
    peft_tensor_name, LoraAdapter, LoraConfig, PatternMap, TargetModules,
};
use candle_core::{DType, Tensor, Var};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What adapter_config.json says, once checked.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapterConfig {
    pub lora: LoraConfig,
    pub base_model_name_or_path: Option<String>,
}

fn unsupported(file: &Path, message: String) -> ModelError {
    ModelError::UnsupportedAdapter {
        file: file.to_path_buf(),
        message,
    }
}

fn is_set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

/// Parses and checks adapter_config.json. Settings this program cannot
/// honour are refused with a message that names them.
pub fn parse_adapter_config(v: &Value, file: &Path) -> Result<PeftAdapterConfig> {
    let peft_type = v.get("peft_type").and_then(|x| x.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(unsupported(
            file,
            format!("peft_type {peft_type:?}: only \"LORA\" adapters are supported"),
        ));
    }
    if let Some(task) = v.get("task_type").and_then(|x| x.as_str()) {
        if task != "CAUSAL_LM" {
            return Err(unsupported(
                file,
                format!("task_type {task:?}: only \"CAUSAL_LM\" is supported"),
            ));
        }
    }
    let bias = v.get("bias").and_then(|x| x.as_str()).unwrap_or("none");
    if bias != "none" {
        return Err(unsupported(
            file,
            format!("bias = {bias:?}: only \"none\" is supported"),
        ));
    }
    for (key, what) in [
        ("modules_to_save", "modules_to_save"),
        ("fan_in_fan_out", "fan_in_fan_out"),
        ("layers_to_transform", "layers_to_transform"),
        ("layer_replication", "layer_replication"),
        ("lora_bias", "lora_bias"),
        ("exclude_modules", "exclude_modules"),
        ("target_parameters", "target_parameters"),
        ("trainable_token_indices", "trainable_token_indices"),
        ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ] {
        if is_set(v.get(key)) {
            return Err(unsupported(
                file,
                format!("{what} is not supported (found {key} = {})", v[key]),
            ));
        }
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| ModelError::config(file, "\"r\" must be a positive integer"))?
        as usize;
    let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
    let dropout = v
        .get("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0);
    let use_rslora = v
        .get("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let use_dora = v.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false);
    let target_modules = match v.get("target_modules") {
        // PEFT's default for llama / mistral / qwen2 when none is given.
        None | Some(Value::Null) => TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
        Some(t) => serde_json::from_value(t.clone())
            .map_err(|e| ModelError::config(file, format!("target_modules: {e}")))?,
    };
    let rank_pattern: PatternMap<usize> = match v.get("rank_pattern") {
        None | Some(Value::Null) => PatternMap::default(),
        Some(p) => serde_json::from_value(p.clone())
            .map_err(|e| ModelError::config(file, format!("rank_pattern: {e}")))?,
    };
    let alpha_pattern: PatternMap<f64> = match v.get("alpha_pattern") {
        None | Some(Value::Null) => PatternMap::default(),
        Some(p) => serde_json::from_value(p.clone())
            .map_err(|e| ModelError::config(file, format!("alpha_pattern: {e}")))?,
    };
    Ok(PeftAdapterConfig {
        lora: LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            use_dora,
            target_modules,
            rank_pattern,
            alpha_pattern,
        },
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(|x| x.as_str())
            .map(String::from),
    })
}

/// Reads and checks `path` (an adapter_config.json).
pub fn read_adapter_config(path: &Path) -> Result<PeftAdapterConfig> {
    parse_adapter_config(&read_json(path)?, path)
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The adapter_config.json PEFT needs to load this adapter. `all-linear` is
/// written as the explicit list of projection names, as PEFT itself does.
pub fn adapter_config_json(
    lora: &LoraConfig,
    projections: &[(&str, Group)],
    base_model_name_or_path: &str,
) -> Value {
    let targets = match &lora.target_modules {
        TargetModules::AllLinear => {
            let mut all: Vec<&str> = projections.iter().map(|(p, _)| *p).collect();
            all.sort();
            json!(all)
        }
        TargetModules::List(list) => {
            let mut list = list.clone();
            list.sort();
            list.dedup();
            json!(list)
        }
        TargetModules::Regex(r) => json!(r),
    };
    let rank_pattern: serde_json::Map<String, Value> = lora
        .rank_pattern
        .0
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let alpha_pattern: serde_json::Map<String, Value> = lora
        .alpha_pattern
        .0
        .iter()
        .map(|(k, v)| (k.clone(), number(*v)))
        .collect();
    json!({
        "alpha_pattern": alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": number(lora.alpha),
        "lora_dropout": lora.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": rank_pattern,
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora
    })
}

/// The adapter's tensors by PEFT name, in f32.
pub fn adapter_tensors(decoder: &Decoder) -> Result<Vec<(String, Tensor)>> {
    let params = decoder.lora_parameters();
    if params.is_empty() {
        return Err(ModelError::LoraConfig(
            "the model has no LoRA adapter to save".into(),
        ));
    }
    params
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?.detach())))
        .collect()
}

/// Writes adapter_config.json and adapter_model.safetensors into `dir` (created if needed).
pub fn save_adapter(decoder: &Decoder, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    let lora = decoder
        .lora_config
        .as_ref()
        .ok_or_else(|| ModelError::LoraConfig("the model has no LoRA adapter to save".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS_FILE), &adapter_tensors(decoder)?)?;
    write_json_atomic(
        &dir.join(ADAPTER_CONFIG_FILE),
        &adapter_config_json(lora, decoder.config.projections(), base_model_name_or_path),
    )
}

/// Loads a PEFT adapter folder onto `decoder` (replacing any adapter), with
/// the targets, ranks and scales its config resolves to. Every expected
/// tensor must be present with the right shape, and no other tensor may be.
pub fn load_adapter(decoder: &mut Decoder, dir: &Path) -> Result<PeftAdapterConfig> {
    let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
    let cfg = read_adapter_config(&cfg_path)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(unsupported(
            &dir.join("adapter_model.bin"),
            "only adapter_model.safetensors is supported, not pickled .bin weights".into(),
        ));
    }
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights_path, &candle_core::Device::Cpu).map_err(|e| {
            match e {
                candle_core::Error::Io(io) => ModelError::io(&weights_path, io),
                other => ModelError::Safetensors {
                    path: weights_path.clone(),
                    message: other.to_string(),
                },
            }
        })?;
    let targets = cfg
        .lora
        .resolve(&decoder.config)
        .map_err(|e| ModelError::config(&cfg_path, e.to_string()))?;
    let mut adapters = Vec::with_capacity(targets.len());
    for target in &targets {
        let linear = decoder.linear(&target.module).ok_or_else(|| {
            ModelError::config(&cfg_path, format!("no module named {}", target.module))
        })?;
        let (out_f, in_f) = (linear.out_features(), linear.in_features());
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    tensor: name.clone(),
                    file: weights_path.clone(),
                })?;
            if t.dims() != shape {
                return Err(ModelError::MisshapenTensor {
                    tensor: name,
                    file: weights_path.clone(),
                    expected: shape.to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&decoder.device)?)
        };
        let a = take(peft_tensor_name(&target.module, 'A'), &[target.r, in_f])?;
        let b = take(peft_tensor_name(&target.module, 'B'), &[out_f, target.r])?;
        let magnitude = cfg
            .lora
            .use_dora
            .then(|| take(names::peft_magnitude(&target.module), &[out_f]))
            .transpose()?;
        adapters.push((
            target.module.clone(),
            LoraAdapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                r: target.r,
                alpha: target.alpha,
                scale: target.scale,
                dropout: cfg.lora.dropout,
                dora: None,
            },
            magnitude,
        ));
    }
    if !tensors.is_empty() {
        let mut extra: Vec<&String> = tensors.keys().collect();
        extra.sort();
        return Err(unsupported(
            &weights_path,
            format!("tensors that adapter_config.json does not account for: {extra:?}"),
        ));
    }
    decoder.remove_lora();
    for (module, adapter, magnitude) in adapters {
        if let Some(l) = decoder.linear_mut(&module) {
            l.lora = Some(adapter);
            if magnitude.is_some() {
                l.attach_dora(magnitude)?;
            }
        }
    }
    decoder.lora_config = Some(cfg.lora.clone());
    Ok(cfg)
}
