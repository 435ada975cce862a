//! The PEFT adapter format: round trip, a hand-written config whose effect
//! is computed independently, and refusals of unsupported settings.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::formats::peft::{load_adapter, save_adapter};
use lora_runner::model::layers::lora::{LoraConfig, PatternMap, TargetModules};
use std::collections::HashMap;
use std::path::Path;

fn load(dir: &Path) -> Decoder {
    Decoder::load(dir, &LoadOptions::default()).unwrap()
}

fn logits(model: &Decoder, ids: &Tensor) -> Tensor {
    model
        .logits(
            &model
                .forward(Input::padded(ids, None), Rows::All, Mode::Eval)
                .unwrap(),
        )
        .unwrap()
}

fn det_tensor(shape: (usize, usize), salt: usize) -> Tensor {
    let n = shape.0 * shape.1;
    let vals: Vec<f32> = (0..n)
        .map(|j| (((j * 31 + salt * 7) % 23) as f32 - 11.0) * 0.01)
        .collect();
    Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
}

#[test]
fn adapter_round_trip_gives_identical_tensors() {
    let base = init_dir("peft-rt", &spec(Architecture::Llama, false, 41));
    let mut model = load(&base);
    let mut lora = LoraConfig::new(
        4,
        16.0,
        TargetModules::List(vec!["q_proj".into(), "down_proj".into()]),
    );
    lora.dropout = 0.1;
    lora.rank_pattern = PatternMap(vec![("down_proj".into(), 2)]);
    model.apply_lora(&lora, 9).unwrap();
    for (i, (name, var)) in model.lora_parameters().into_iter().enumerate() {
        if name.contains("lora_B") {
            var.set(&det_tensor((var.dims()[0], var.dims()[1]), i))
                .unwrap();
        }
    }
    let out = scratch_dir("peft-rt-out");
    save_adapter(&model, &out, "some/base").unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["base_model_name_or_path"], "some/base");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );
    assert_eq!(cfg["rank_pattern"], serde_json::json!({"down_proj": 2}));

    let mut fresh = load(&base);
    load_adapter(&mut fresh, &out).unwrap();
    let a: HashMap<String, Vec<f32>> = model
        .lora_parameters()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let b: HashMap<String, Vec<f32>> = fresh
        .lora_parameters()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    assert_eq!(a.len(), 8); // 2 layers x 2 modules x (A, B)
    assert_eq!(a, b);
    let ids = ids_tensor(&random_ids(1, 6, 128, 1));
    assert_eq!(
        max_abs_diff(&logits(&model, &ids), &logits(&fresh, &ids)),
        0.0
    );
    // The file's tensors are exactly what lora_parameters exposes.
    let file = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut names: Vec<&String> = file.keys().collect();
    names.sort();
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    assert_eq!(
        file["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].dims(),
        &[2, 64]
    );
    assert_eq!(
        file["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].dims(),
        &[32, 4]
    );
}

/// A hand-written config with a regex target, rsLoRA and rank/alpha patterns.
/// Expected effect, worked out by hand from PEFT's rules:
///   layers.1.q_proj:    r 4 (default), alpha 8, scale 8/sqrt(4) = 4
///   layers.1.v_proj:    r 6 (exact key),  alpha 8, scale 8/sqrt(6)
///   layers.0.down_proj: r 2 ("down_proj"), alpha 8, scale 8/sqrt(2)
///   layers.1.down_proj: r 2, alpha 3 ("layers.1.mlp.down_proj" suffix), scale 3/sqrt(2)
///   nothing else (layers.0 q/v do not match the regex).
#[test]
fn hand_written_config_is_honoured() {
    let base = init_dir_amplified("peft-hand", &spec(Architecture::Qwen2, true, 42));
    let adapter = scratch_dir("peft-hand-adapter");
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": true,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false, "use_dora": false, "modules_to_save": null,
            "target_modules": ".*layers\\.1\\.self_attn\\.(q|v)_proj|.*\\.mlp\\.down_proj",
            "rank_pattern": {"down_proj": 2, "model.layers.1.self_attn.v_proj": 6},
            "alpha_pattern": {"layers.1.mlp.down_proj": 3}}"#,
    )
    .unwrap();
    let expected: Vec<(&str, usize, f64, (usize, usize))> = vec![
        ("model.layers.1.self_attn.q_proj", 4, 4.0, (32, 32)),
        (
            "model.layers.1.self_attn.v_proj",
            6,
            8.0 / 6f64.sqrt(),
            (16, 32),
        ),
        (
            "model.layers.0.mlp.down_proj",
            2,
            8.0 / 2f64.sqrt(),
            (32, 64),
        ),
        (
            "model.layers.1.mlp.down_proj",
            2,
            3.0 / 2f64.sqrt(),
            (32, 64),
        ),
    ];
    let mut tensors = HashMap::new();
    for (i, (module, r, _, (out_f, in_f))) in expected.iter().enumerate() {
        tensors.insert(
            format!("base_model.model.{module}.lora_A.weight"),
            det_tensor((*r, *in_f), 2 * i),
        );
        tensors.insert(
            format!("base_model.model.{module}.lora_B.weight"),
            det_tensor((*out_f, *r), 2 * i + 1),
        );
    }
    candle_core::safetensors::save(&tensors, adapter.join("adapter_model.safetensors")).unwrap();

    let mut model = load(&base);
    load_adapter(&mut model, &adapter).unwrap();
    let with_lora: Vec<(String, usize, f64)> = model
        .linears()
        .filter_map(|l| l.lora.as_ref().map(|a| (l.name.clone(), a.r, a.scale)))
        .collect();
    assert_eq!(with_lora.len(), 4, "{with_lora:?}");
    for (module, r, scale, _) in &expected {
        let got = with_lora
            .iter()
            .find(|(n, _, _)| n == module)
            .unwrap_or_else(|| panic!("{module} has no LoRA"));
        assert_eq!(got.1, *r, "{module} rank");
        assert!(
            (got.2 - scale).abs() < 1e-12,
            "{module} scale {} vs {scale}",
            got.2
        );
    }

    // Effect on the output, independently: add scale * B A to the base
    // weights by hand, save as a plain model, and compare logits.
    let mut weights =
        candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu).unwrap();
    for (module, _, scale, _) in &expected {
        let a = tensors[&format!("base_model.model.{module}.lora_A.weight")]
            .to_dtype(DType::F64)
            .unwrap();
        let b = tensors[&format!("base_model.model.{module}.lora_B.weight")]
            .to_dtype(DType::F64)
            .unwrap();
        let key = format!("{module}.weight");
        let w = weights[&key].to_dtype(DType::F64).unwrap();
        let merged = (w + (b.matmul(&a).unwrap() * *scale).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        weights.insert(key, merged);
    }
    let manual = scratch_dir("peft-hand-manual");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), manual.join(f)).unwrap();
    }
    candle_core::safetensors::save(&weights, manual.join("model.safetensors")).unwrap();
    let ids = ids_tensor(&random_ids(2, 8, 128, 2));
    let d = max_abs_diff(&logits(&model, &ids), &logits(&load(&manual), &ids));
    assert!(d < 1e-4, "adapter vs hand-merged: {d}");
    assert!(max_abs_diff(&logits(&load(&base), &ids), &logits(&model, &ids)) > 1e-2);
}

fn adapter_error(config: &str) -> String {
    let base = init_dir("peft-refuse", &spec(Architecture::Llama, true, 43));
    let dir = scratch_dir("peft-refuse-adapter");
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    candle_core::safetensors::save(
        &HashMap::<String, Tensor>::new(),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut model = load(&base);
    match load_adapter(&mut model, &dir) {
        Ok(_) => panic!("accepted: {config}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let base = r#""peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]"#;
    for (extra, needle) in [
        (r#""layers_to_transform": [0]"#, "layers_to_transform"),
        (r#""modules_to_save": ["lm_head"]"#, "modules_to_save"),
        (r#""fan_in_fan_out": true"#, "fan_in_fan_out"),
        (r#""bias": "all""#, "bias"),
        (r#""bias": "lora_only""#, "bias"),
    ] {
        let msg = adapter_error(&format!("{{{base}, {extra}}}"));
        assert!(
            msg.contains(needle) && msg.contains("not supported") || msg.contains("only \"none\""),
            "{extra}: {msg}"
        );
        assert!(msg.contains("adapter_config.json"), "{msg}");
    }
}

#[test]
fn missing_and_extra_adapter_tensors_are_named() {
    let msg = adapter_error(
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    );
    assert!(
        msg.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{msg}"
    );
    assert!(msg.contains("adapter_model.safetensors"), "{msg}");
}

/// PEFT's get_pattern_key takes the first key (in file order) whose
/// `(.*\.)?(key)$` matches, even when a later key names the module exactly.
#[test]
fn pattern_keys_follow_peft_order() {
    use lora_runner::model::layers::lora::pattern_key_for;
    let cfg: LoraConfig = serde_json::from_str(
        r#"{"r": 8, "alpha": 16, "target_modules": "all-linear",
            "rank_pattern": {"layers\\.0\\..*": 3, "model.layers.0.self_attn.q_proj": 5, "q_proj": 7}}"#,
    )
    .unwrap();
    let get = |m: &str| pattern_key_for(&cfg.rank_pattern, m).unwrap().copied();
    assert_eq!(get("model.layers.0.self_attn.q_proj"), Some(3));
    assert_eq!(get("model.layers.1.self_attn.q_proj"), Some(7));
    assert_eq!(get("model.layers.1.self_attn.k_proj"), None);
    // "proj" alone must match a whole dotted segment, not a suffix of one.
    let cfg2: LoraConfig = serde_json::from_str(
        r#"{"r": 8, "alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"proj": 2}}"#,
    )
    .unwrap();
    assert_eq!(
        pattern_key_for(&cfg2.rank_pattern, "model.layers.0.self_attn.q_proj").unwrap(),
        None
    );
    // Target list: exact name or ".name" suffix; regex string: full match.
    assert!(cfg2.targets("model.layers.0.self_attn.q_proj").unwrap());
    assert!(!cfg2.targets("model.layers.0.self_attn.qq_proj").unwrap());
    let re = LoraConfig::new(4, 8.0, TargetModules::Regex("q_proj".into()));
    assert!(!re.targets("model.layers.0.self_attn.q_proj").unwrap());
}
