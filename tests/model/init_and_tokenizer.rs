//! init determinism, loading the init folder through the normal loader,
//! the built-in tokenizer, and PEFT's LoRA init / seeded dropout.

use crate::support::model::*;
use candle_core::{DType, Device};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::formats::tokenizer::CHATML_TEMPLATE;
use lora_runner::model::init::init_model;
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};

const FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

#[test]
fn same_seed_gives_identical_bytes() {
    let s = spec(Architecture::Qwen2, true, 61);
    let (a, b) = (init_dir("init-a", &s), init_dir("init-b", &s));
    for f in FILES {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let mut other = s.clone();
    other.seed = 62;
    let c = init_dir("init-c", &other);
    assert_ne!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(c.join("model.safetensors")).unwrap()
    );
}

#[test]
fn init_folder_loads_through_the_normal_loader() {
    let mut s = spec(Architecture::Llama, false, 63);
    s.head_dim = Some(16); // explicit head_dim != hidden / heads
    s.dtype = DType::BF16;
    let dir = scratch_dir("init-load");
    let cfg = init_model(&s, &dir).unwrap();
    let model = Decoder::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(model.config, cfg);
    assert_eq!(model.dtype, DType::BF16);
    assert_eq!(model.layers[0].linears()[0].weight.dims(), (64, 32));
    assert_eq!(model.layers[0].linears()[1].weight.dims(), (32, 32));
    let ids = ids_tensor(&random_ids(1, 5, 128, 1));
    let h = model
        .forward(Input::padded(&ids, None), Rows::All, Mode::Eval)
        .unwrap();
    assert_eq!(h.dims(), &[1, 5, 32]);
    // Loaded again as f32 from the same files.
    let f32_model = Decoder::load(
        &dir,
        &LoadOptions {
            dtype: Some(DType::F32),
            device: Device::Cpu,
        },
    )
    .unwrap();
    assert_eq!(f32_model.dtype, DType::F32);
}

#[test]
fn built_in_tokenizer_round_trips_and_has_chat_template() {
    let dir = init_dir("tok", &spec(Architecture::Qwen2, true, 64));
    let tok = load_tokenizer(&dir).unwrap();
    assert_eq!(tok.chat_template.as_deref(), Some(CHATML_TEMPLATE));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token.as_deref(), Some("<|endoftext|>"));
    let text = "<|im_start|>user\nHi, there!<|im_end|>\n";
    let enc = tok.tokenizer.encode(text, false).unwrap();
    let ids = enc.get_ids();
    assert_eq!(ids[0], 1); // <|im_start|> is one token
    assert_eq!(ids.len(), 1 + "user\nHi, there!".len() + 1 + 1);
    assert!(ids.iter().all(|&i| (i as usize) < 128));
    assert_eq!(tok.tokenizer.decode(ids, false).unwrap(), text);
    assert_eq!(
        tok.tokenizer.decode(ids, true).unwrap(),
        "user\nHi, there!\n"
    );
}

#[test]
fn lora_init_follows_peft_and_is_seeded() {
    let dir = init_dir("lora-init", &spec(Architecture::Llama, false, 65));
    let lora = LoraConfig::new(8, 16.0, TargetModules::AllLinear);
    let mut m1 = Decoder::load(&dir, &LoadOptions::default()).unwrap();
    let mut m2 = m1.clone();
    m1.apply_lora(&lora, 5).unwrap();
    m2.apply_lora(&lora, 5).unwrap();
    let p1 = m1.lora_parameters();
    assert_eq!(p1.len(), 2 * 7 * 2);
    for ((n1, v1), (n2, v2)) in p1.iter().zip(m2.lora_parameters()) {
        assert_eq!(n1, &n2);
        let a: Vec<f32> = v1.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = v2.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{n1} not deterministic");
        if n1.contains("lora_B") {
            assert!(a.iter().all(|&x| x == 0.0));
        } else {
            // kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)).
            let in_f = v1.dims()[1] as f32;
            let bound = 1.0 / in_f.sqrt();
            assert!(a.iter().all(|&x| x.abs() <= bound));
            let max = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max > 0.8 * bound, "{n1}: values do not fill the range");
        }
    }
    let mut m3 = m1.clone();
    m3.apply_lora(&lora, 6).unwrap();
    let a1: Vec<f32> = p1[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let a3: Vec<f32> = m3.lora_parameters()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(a1, a3);
}

#[test]
fn dropout_only_in_training_and_seeded() {
    let dir = init_dir_amplified("dropout", &spec(Architecture::Qwen2, true, 66));
    let mut model = Decoder::load(&dir, &LoadOptions::default()).unwrap();
    let mut lora = LoraConfig::new(
        4,
        8.0,
        TargetModules::List(vec!["q_proj".into(), "up_proj".into()]),
    );
    lora.dropout = 0.5;
    model.apply_lora(&lora, 1).unwrap();
    for (name, var) in model.lora_parameters() {
        if name.contains("lora_B") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.1).unwrap())
                .unwrap();
        }
    }
    let ids = ids_tensor(&random_ids(1, 6, 128, 2));
    let run = |mode| {
        model
            .forward(Input::padded(&ids, None), Rows::All, mode)
            .unwrap()
    };
    let eval = run(Mode::Eval);
    assert_eq!(max_abs_diff(&eval, &run(Mode::Eval)), 0.0);
    let t1 = run(Mode::Train { dropout_seed: 10 });
    assert_eq!(
        max_abs_diff(&t1, &run(Mode::Train { dropout_seed: 10 })),
        0.0
    );
    assert!(max_abs_diff(&t1, &eval) > 1e-3);
    assert!(max_abs_diff(&t1, &run(Mode::Train { dropout_seed: 11 })) > 1e-3);
}

#[test]
fn half_precision_loads_match_f32_roughly() {
    let dir = init_dir_amplified("half", &spec(Architecture::Llama, false, 67));
    let ids = ids_tensor(&random_ids(2, 8, 128, 3));
    let logits = |dtype| {
        let m = Decoder::load(
            &dir,
            &LoadOptions {
                dtype: Some(dtype),
                device: Device::Cpu,
            },
        )
        .unwrap();
        assert_eq!(
            m.layers[1].mlp.down_proj.weight.as_dense().unwrap().dtype(),
            dtype
        );
        let h = m
            .forward(Input::padded(&ids, None), Rows::All, Mode::Eval)
            .unwrap();
        assert_eq!(h.dtype(), dtype);
        m.logits(&h).unwrap()
    };
    let reference = logits(DType::F32);
    let f16 = max_abs_diff(&reference, &logits(DType::F16));
    let bf16 = max_abs_diff(&reference, &logits(DType::BF16));
    assert!(f16 < 0.05 && bf16 < 0.3, "f16 {f16}, bf16 {bf16}");
    assert!(
        f16 > 0.0 && bf16 > 0.0,
        "half precision was not actually used"
    );
}

#[test]
fn chat_template_forms() {
    use lora_runner::model::formats::tokenizer::chat_template_from_config;
    let single = serde_json::json!({"chat_template": "{{ x }}"});
    assert_eq!(
        chat_template_from_config(&single).unwrap().as_deref(),
        Some("{{ x }}")
    );
    let list = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
    assert_eq!(
        chat_template_from_config(&list).unwrap().as_deref(),
        Some("D")
    );
    assert_eq!(
        chat_template_from_config(&serde_json::json!({})).unwrap(),
        None
    );
    // A separate chat_template.jinja is used when tokenizer_config.json has none.
    let dir = init_dir("tok-jinja", &spec(Architecture::Qwen2, true, 68));
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "JINJA").unwrap();
    assert_eq!(
        load_tokenizer(&dir).unwrap().chat_template.as_deref(),
        Some("JINJA")
    );
}

/// transformers' `get_chat_template` refuses a list of named templates with
/// no "default" (when no name is asked for), rather than taking the first.
#[test]
fn chat_template_list_without_default_is_an_error() {
    use lora_runner::model::formats::tokenizer::chat_template_from_config;
    let list = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]});
    let err = chat_template_from_config(&list).unwrap_err();
    assert!(err.contains("no \"default\""), "{err}");
    // Loading a folder with such a config fails and names the file.
    let dir = init_dir("tok-no-default", &spec(Architecture::Qwen2, true, 70));
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = list["chat_template"].clone();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = load_tokenizer(&dir).err().expect("refused").to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("default"),
        "{msg}"
    );
    // The data side reads the file with the same parser.
    let data_err = lora_runner::data::TokenizerConfig::from_json_file(&cfg_path).unwrap_err();
    assert!(data_err.to_string().contains("default"), "{data_err}");
}

#[test]
fn inference_mode_equals_eval_without_a_graph() {
    let dir = init_dir_amplified("inference", &spec(Architecture::Llama, true, 69));
    let mut model = Decoder::load(&dir, &LoadOptions::default()).unwrap();
    model
        .apply_lora(&LoraConfig::new(2, 4.0, TargetModules::AllLinear), 3)
        .unwrap();
    let ids = ids_tensor(&random_ids(1, 6, 128, 5));
    let eval = model
        .forward(Input::padded(&ids, None), Rows::All, Mode::Eval)
        .unwrap();
    let inference = model
        .forward(Input::padded(&ids, None), Rows::All, Mode::Inference)
        .unwrap();
    assert_eq!(max_abs_diff(&eval, &inference), 0.0);
    assert!(eval.track_op() && !inference.track_op());
}

/// The trainer moves the model onto a big-stack thread.
#[test]
fn decoder_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Decoder>();
    assert_send_sync::<LoadedTokenizer>();
}
