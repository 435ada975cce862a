//! Loading errors name the tensor and the file; unknown architectures name model_type.

use crate::support::model::*;
use candle_core::{Device, Tensor};
use lora_runner::model::config::{linear_module_names, Architecture, ModelConfig};
use lora_runner::model::decoder::{Decoder, LoadOptions};
use lora_runner::model::error::ModelError;
use std::collections::HashMap;

fn load_err(dir: &std::path::Path) -> ModelError {
    match Decoder::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loaded a broken checkpoint"),
        Err(e) => e,
    }
}

fn rewrite(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = init_dir("missing", &spec(Architecture::Llama, false, 51));
    rewrite(&dir, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshapen_tensor_names_tensor_file_and_shapes() {
    let dir = init_dir("misshapen", &spec(Architecture::Qwen2, true, 52));
    rewrite(&dir, |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.bias".into(),
            Tensor::zeros(17, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.bias") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("[17]") && msg.contains("[16]"), "{msg}");
}

#[test]
fn sharded_missing_tensor_names_the_index() {
    let dir = init_dir("sharded-missing", &spec(Architecture::Mistral, false, 53));
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in t.into_iter().enumerate() {
        if k == "model.norm.weight" {
            continue; // dropped from both the shard and the index
        }
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(k.clone(), v);
        map.insert(k, serde_json::json!(file));
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains("model.safetensors.index.json"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_names_model_type_and_file() {
    let dir = init_dir("unknown-arch", &spec(Architecture::Llama, false, 54));
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("gpt_neox");
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = load_err(&dir);
    let msg = e.to_string();
    assert!(matches!(e, ModelError::UnknownArchitecture { .. }), "{msg}");
    assert!(
        msg.contains("gpt_neox") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn config_parsing_per_family() {
    let p = std::path::Path::new("config.json");
    let llama = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "head_dim": 16, "attention_bias": true});
    let c = ModelConfig::from_json(&llama, p).unwrap();
    assert_eq!(
        (
            c.head_dim,
            c.num_key_value_heads,
            c.attention_bias,
            c.tie_word_embeddings
        ),
        (16, 2, true, false)
    );
    assert!(c.projection_has_bias("o_proj"));
    assert_eq!(c.projection_shape("q_proj"), Some((128, 64)));
    let qwen = serde_json::json!({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "tie_word_embeddings": true});
    let c = ModelConfig::from_json(&qwen, p).unwrap();
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.attention_bias),
        (16, 4, true)
    );
    assert!(c.projection_has_bias("k_proj") && !c.projection_has_bias("o_proj"));
    let names = linear_module_names(&c);
    assert_eq!(names.len(), 14);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(names[13], "model.layers.1.mlp.down_proj");
    let mistral = serde_json::json!({"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "sliding_window": 4096});
    let c = ModelConfig::from_json(&mistral, p).unwrap();
    assert_eq!(
        (c.architecture, c.attention_bias, c.layers[1].window),
        (Architecture::Mistral, false, Some(4096))
    );
    let yarn = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "rope_scaling": {"rope_type": "mrope", "factor": 4.0}});
    let msg = ModelConfig::from_json(&yarn, p).unwrap_err().to_string();
    assert!(
        msg.contains("rope_scaling.rope_type") && msg.contains("mrope"),
        "{msg}"
    );
}
