//! Model GGUFs written by this program (`runner export --gguf` on a model
//! stage) read back by two other readers: candle-transformers' quantized
//! Llama/Qwen2/Qwen3 models (written independently, for llama.cpp's files)
//! give this program's logits, and this program's own GGUF reader gives
//! back the config, the tokenizer's ids and the weights. On SmolLM2 (when
//! fetched) a re-export in the base's own block formats is the model
//! llama.cpp ran before.

use crate::support::model::{
    amplify_weights, init_dir, max_abs_diff, scratch_dir, smollm2, spec, with_big_stack,
};
use candle_core::quantized::gguf_file;
use candle_core::{Device, IndexOp, Tensor, D};
use lora_runner::model::config::{Architecture, ModelConfig};
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::formats::gguf::{tensor_formats, GgufModel, GGUF_FILE};
use lora_runner::model::formats::gguf_out::{write_model_gguf, GgufType};
use lora_runner::model::init::RandomModel;
use std::path::Path;

/// Prompts of 1 to 9 tokens (the causal edge, and past a q/k head's rows).
const PROMPTS: [&[u32]; 4] = [
    &[7],
    &[12, 40, 5],
    &[3, 17, 40, 5, 9, 77, 12],
    &[90, 2, 2, 61, 33, 8, 14, 50, 6],
];

/// This program's next-token logits after `ids`.
fn our_last_logits(model: &Decoder, ids: &[u32]) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = model
        .forward(Input::padded(&t, None), Rows::All, Mode::Inference)
        .unwrap();
    model.logits(&h).unwrap().i((0, ids.len() - 1)).unwrap()
}

/// candle-transformers' quantized model of `arch` reading `file`: its
/// next-token logits after `ids` (a fresh model per prompt, so no cache).
fn candle_last_logits(arch: Architecture, file: &Path, ids: &[u32]) -> Tensor {
    use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
    let mut reader = std::fs::File::open(file).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let dev = Device::Cpu;
    let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
    let logits = match arch {
        Architecture::Llama | Architecture::Mistral => {
            quantized_llama::ModelWeights::from_gguf(content, &mut reader, &dev)
                .unwrap()
                .forward(&input, 0)
        }
        Architecture::Qwen2 => quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &dev)
            .unwrap()
            .forward(&input, 0),
        Architecture::Qwen3 => quantized_qwen3::ModelWeights::from_gguf(content, &mut reader, &dev)
            .unwrap()
            .forward(&input, 0),
        Architecture::Phi3 => candle_transformers::models::quantized_phi3::ModelWeights::from_gguf(
            false,
            content,
            &mut reader,
            &dev,
        )
        .unwrap()
        .forward(&input, 0),
        other => panic!("no candle-transformers reader for {other:?}"),
    };
    logits.unwrap().squeeze(0).unwrap()
}

/// This program's model read from a GGUF (block formats kept as stored).
fn as_read(file: &Path) -> Decoder {
    let gguf = GgufModel::open(file).unwrap();
    Decoder::load(
        crate::gguf::folder(&gguf, file).path(),
        &LoadOptions::default(),
    )
    .unwrap()
}

/// KL(p ‖ q) of the softmaxes of two logit vectors, in nats.
fn kl(p_logits: &Tensor, q_logits: &Tensor) -> f64 {
    let lp = candle_nn::ops::log_softmax(
        &p_logits.to_dtype(candle_core::DType::F64).unwrap(),
        D::Minus1,
    )
    .unwrap();
    let lq = candle_nn::ops::log_softmax(
        &q_logits.to_dtype(candle_core::DType::F64).unwrap(),
        D::Minus1,
    )
    .unwrap();
    let p = lp.exp().unwrap();
    (p * (lp - lq).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A random `init` model of `arch`, weights amplified (×4) so attention is
/// peaked and every layer changes the answer, yet not so far that the
/// model turns chaotic; rows of 256 so q4_k is q4_k.
fn model(arch: Architecture, tag: &str) -> std::path::PathBuf {
    let spec = RandomModel {
        hidden_size: 256,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 512,
        ..spec(
            arch,
            !matches!(
                arch,
                Architecture::Llama | Architecture::Phi3 | Architecture::Olmo2
            ),
            11,
        )
    };
    let dir = init_dir(tag, &spec);
    amplify_weights(&dir, 4.0);
    dir
}

#[test]
fn candle_transformers_quantized_models_give_this_programs_logits_on_exported_ggufs() {
    with_big_stack(|| {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Qwen3,
            // Not Gemma 3: candle-transformers 0.11's quantized_gemma3 runs
            // its MLP with SiLU where Gemma uses GELU (tanh), so it is no
            // reference; llama.cpp checks the Gemma exports instead
            // (scripts/llamacpp_families_check.py).
            Architecture::Phi3,
        ] {
            let dir = model(arch, "gguf-out");
            let ours = Decoder::load(&dir, &LoadOptions::default()).unwrap();
            let want: Vec<Tensor> = PROMPTS.iter().map(|p| our_last_logits(&ours, p)).collect();
            // f32: the same model (candle's Qwen3 runs its own CPU flash
            // attention: up to 1.2e-3 measured, 4e-6 for the others). f16 rounding
            // only: logits (up to ±5 here) within 1e-2. Block formats: by
            // KL from this program on the same blocks (≤ 5e-3: candle
            // rounds activations to 8 bits in its block products, 2e-3
            // measured), and from the f32 model (q8_0 2.5e-3, q4_k 0.12
            // measured on this random model, whose weights are noise).
            let f32_bound = if arch == Architecture::Qwen3 {
                3e-3
            } else {
                1e-4
            };
            for (ty, bound) in [
                (GgufType::F32, f32_bound),
                (GgufType::F16, 1e-2),
                (GgufType::Q8_0, 1e-2),
                (GgufType::Q4K, 0.25),
            ] {
                let file = dir.join(format!("{}.gguf", ty.name()));
                let written = write_model_gguf(&dir, &file, ty, None, "test").unwrap();
                assert_eq!(
                    written.tokenizer, "pre-tokenizer gpt2",
                    "the built-in tokenizer has no merges"
                );
                for (prompt, want) in PROMPTS.iter().zip(&want) {
                    let got = candle_last_logits(arch, &file, prompt);
                    let scale = want
                        .abs()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(scale > 1.0, "{arch:?}: logits too flat to test ({scale})");
                    match ty {
                        GgufType::F32 | GgufType::F16 => {
                            let d = max_abs_diff(want, &got);
                            assert!(
                                d < bound as f32,
                                "{arch:?} {}: {prompt:?} logits differ by {d}",
                                ty.name()
                            );
                        }
                        _ => {
                            let same = our_last_logits(&as_read(&file), prompt);
                            let k = kl(&same, &got);
                            assert!(k < 5e-3, "{arch:?} {}: {prompt:?} KL {k} from this program on the same blocks", ty.name());
                            let k = kl(want, &got);
                            assert!(k < bound, "{arch:?} {}: {prompt:?} KL {k}", ty.name());
                            assert!(k > 0.0);
                        }
                    }
                }
            }
            // q4_k writes q4_k where a row is a multiple of 256 (all here).
            let g = GgufModel::open(&dir.join("q4_k.gguf")).unwrap();
            let formats = tensor_formats(&g);
            assert_eq!(format!("{:?}", formats["blk.0.attn_output.weight"]), "Q4K");
            assert_eq!(format!("{:?}", formats["blk.0.attn_norm.weight"]), "F32");
        }
    });
}

#[test]
fn an_exported_gguf_reads_back_as_the_folder_it_was_written_from() {
    with_big_stack(|| {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Qwen3,
            Architecture::Gemma2,
            Architecture::Gemma3,
            Architecture::Phi3,
            Architecture::Olmo2,
        ] {
            let dir = model(arch, "gguf-back");
            let file = dir.join("f32.gguf");
            write_model_gguf(&dir, &file, GgufType::F32, None, "back").unwrap();
            // The built-in vocabulary has no merges, yet llama.cpp wants
            // `tokenizer.ggml.merges` as an array of strings: element type 8.
            let bytes = std::fs::read(&file).unwrap();
            let key = b"tokenizer.ggml.merges";
            let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
            let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
            assert_eq!((u32_at(at), u32_at(at + 4)), (9, 8), "an array of strings");
            let gguf = GgufModel::open(&file).unwrap();
            let original = ModelConfig::from_dir(&dir).unwrap();
            let read = gguf.config().unwrap();
            assert_eq!(
                (
                    read.architecture,
                    read.hidden_size,
                    read.num_hidden_layers,
                    read.num_key_value_heads,
                    read.vocab_size,
                    read.tie_word_embeddings
                ),
                (
                    original.architecture,
                    original.hidden_size,
                    original.num_hidden_layers,
                    original.num_key_value_heads,
                    original.vocab_size,
                    original.tie_word_embeddings
                ),
            );
            assert_eq!(read.layers, original.layers, "{arch:?}: rope and windows");
            // The tokenizer from the metadata gives the built-in tokenizer's ids.
            let back = scratch_dir("gguf-back-folder");
            std::fs::write(
                back.join("config.json"),
                gguf.config_json().unwrap().to_string(),
            )
            .unwrap();
            std::fs::write(
                back.join("tokenizer.json"),
                gguf.tokenizer_json().unwrap().to_string(),
            )
            .unwrap();
            std::fs::write(
                back.join("tokenizer_config.json"),
                gguf.tokenizer_config_json().unwrap().to_string(),
            )
            .unwrap();
            std::fs::hard_link(&file, back.join(GGUF_FILE)).unwrap();
            let a = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
            let b = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
            for text in [
                "sort cba: abc\n",
                "  two  spaces, <|im_start|>user\nhi<|im_end|>\n",
                "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
            ] {
                assert_eq!(
                    a.encode(text, true).unwrap().get_ids(),
                    b.encode(text, true).unwrap().get_ids(),
                    "{arch:?}: {text:?}"
                );
            }
            // The same logits: f32 weights, q/k rows permuted and back.
            let ours = Decoder::load(&dir, &LoadOptions::default()).unwrap();
            let again = Decoder::load(&back, &LoadOptions::default()).unwrap();
            for p in PROMPTS {
                let d = max_abs_diff(&our_last_logits(&ours, p), &our_last_logits(&again, p));
                assert!(d < 1e-4, "{arch:?}: {d}");
            }
        }
    });
}

/// A transformers checkpoint (tests/fixtures/families) in a scratch folder
/// with the built-in tokenizer beside it, as a GGUF export needs one.
fn fixture_with_tokenizer(family: &str) -> std::path::PathBuf {
    let dir = scratch_dir("gguf-fixture");
    let from = crate::support::model::fixture_family(family);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
    lora_runner::model::formats::tokenizer::write_builtin_tokenizer(&dir, 64).unwrap();
    dir
}

/// Llama 3.x's rope goes out as llama.cpp's converter writes it (the
/// per-frequency factors, `rope_freqs.weight`) and comes back as the same
/// `llama3` rope (transformers' checkpoint, active at these lengths: an
/// original context of 16, so both the smooth band and the scaled one).
#[test]
fn llama3_rope_goes_out_as_rope_freqs_and_comes_back() {
    with_big_stack(|| {
        let dir = fixture_with_tokenizer("llama3");
        let file = dir.join("out.gguf");
        write_model_gguf(&dir, &file, GgufType::F32, None, "llama3").unwrap();
        let gguf = GgufModel::open(&file).unwrap();
        assert!(tensor_formats(&gguf).contains_key("rope_freqs.weight"));
        let read = gguf.config().unwrap();
        assert_eq!(read.layers, ModelConfig::from_dir(&dir).unwrap().layers);
        let ours = Decoder::load(&dir, &LoadOptions::default()).unwrap();
        let again = as_read(&file);
        let long: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 100).collect();
        let d = max_abs_diff(
            &our_last_logits(&ours, &long),
            &our_last_logits(&again, &long),
        );
        assert!(d < 1e-4, "{d}");
    });
}

#[test]
fn gguf_export_refuses_what_llama_cpp_would_compute_differently() {
    with_big_stack(|| {
        // A family llama.cpp's architectures here do not cover.
        let dir = model(Architecture::SmolLM3, "gguf-refuse");
        let e = write_model_gguf(&dir, &dir.join("x.gguf"), GgufType::F16, None, "x").unwrap_err();
        assert!(e.to_string().contains("smollm3"), "{e}");
        // transformers' Gemma 2 and 3 with query_pre_attn_scalar 24 ≠
        // head_dim 16: llama.cpp decides the scale by model size.
        for family in ["gemma2", "gemma3"] {
            let dir = fixture_with_tokenizer(family);
            let e =
                write_model_gguf(&dir, &dir.join("x.gguf"), GgufType::F16, None, "x").unwrap_err();
            assert!(
                e.to_string().contains("query_pre_attn_scalar Some(24.0)"),
                "{family}: {e}"
            );
        }
        // `base` without a GGUF to take the formats from.
        let dir = model(Architecture::Llama, "gguf-refuse");
        let e = write_model_gguf(&dir, &dir.join("x.gguf"), GgufType::Base, None, "x").unwrap_err();
        assert!(e.to_string().contains("does not descend from one"), "{e}");
        // A sliding window llama.cpp's llama architecture would not apply.
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        config["model_type"] = "mistral".into();
        config["sliding_window"] = 4.into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let e = write_model_gguf(&dir, &dir.join("x.gguf"), GgufType::F16, None, "x").unwrap_err();
        assert!(e.to_string().contains("sliding window of 4"), "{e}");
        assert!(!dir.join("x.gguf").exists() && !dir.join("x.gguf.partial").exists());
        // A tokenizer with no GGUF form: refused, not approximated.
        let dir = model(Architecture::Llama, "gguf-refuse");
        let mut tok: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
        tok["model"]["vocab"]["ab"] = 99.into();
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let e = write_model_gguf(&dir, &dir.join("x.gguf"), GgufType::F16, None, "x").unwrap_err();
        assert!(e.to_string().contains("\"ab\" is not"), "{e}");
    });
}

#[test]
fn smollm2_re_exported_in_its_own_blocks_is_the_model_it_was() {
    let Some(file) = smollm2() else { return };
    with_big_stack(move || {
        let original = GgufModel::open(&file).unwrap();
        let folder = crate::gguf::folder(&original, &file);
        let dir = folder.path();
        let out = dir.join("out.gguf");
        let written = write_model_gguf(dir, &out, GgufType::Base, Some(&file), "smollm2").unwrap();
        assert_eq!(written.tokenizer, "the GGUF base's");
        // Every tensor in the format it had, every block format kept.
        let again = GgufModel::open(&out).unwrap();
        assert_eq!(tensor_formats(&again), tensor_formats(&original));
        // The metadata llama.cpp reads for the tokenizer, unchanged.
        let (a, b) = (
            original.tokenizer_json().unwrap(),
            again.tokenizer_json().unwrap(),
        );
        assert_eq!(a, b, "tokenizer.json from the two GGUFs");
        assert_eq!(
            original.tokenizer_config_json().unwrap(),
            again.tokenizer_config_json().unwrap()
        );
        // Without the base to carry it over, the tokenizer is written from
        // tokenizer.json, the pre-tokenizer found by the probe: the same.
        let derived = dir.join("derived.gguf");
        let written = write_model_gguf(dir, &derived, GgufType::Q8_0, None, "smollm2").unwrap();
        assert_eq!(written.tokenizer, "pre-tokenizer smollm");
        assert_eq!(
            GgufModel::open(&derived).unwrap().tokenizer_json().unwrap(),
            a
        );
        // candle-transformers on both files: re-quantizing dequantised
        // Q4_1/Q8_0 blocks gives back (nearly) the same blocks.
        for p in [
            &[1u32, 9690, 198, 2683, 314, 253][..],
            &[28, 3458, 282, 4649, 314],
        ] {
            let before = candle_last_logits(Architecture::Llama, &file, p);
            let after = candle_last_logits(Architecture::Llama, &out, p);
            let d = max_abs_diff(&before, &after);
            assert!(d < 2e-2, "{p:?}: logits moved by {d}");
            assert!(kl(&before, &after) < 1e-5);
        }
    });
}

/// The weights in `dir` with `amplitude`·sin(i) added to every projection
/// (a fine-tune's change, deterministic).
fn nudge(dir: &Path, amplitude: f64) {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let nudged: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| {
            if n.contains("_proj") && t.rank() == 2 {
                let i = Tensor::arange(0u32, t.elem_count() as u32, &Device::Cpu)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .reshape(t.shape())
                    .unwrap();
                let t = (t + (i.sin().unwrap() * amplitude).unwrap()).unwrap();
                (n, t)
            } else {
                (n, t)
            }
        })
        .collect();
    candle_core::safetensors::save(&nudged, &path).unwrap();
}

#[test]
fn the_export_says_how_much_of_a_fine_tunes_change_its_blocks_keep() {
    with_big_stack(|| {
        // A GGUF base with q8_0 projections (llama.cpp's q/k row order),
        // and the folder it came from, nudged as a fine-tune would.
        let dir = scratch_dir("gguf-kept");
        let base = crate::gguf::write_gguf_of(&dir, Architecture::Llama, |_, _| {});
        let tuned = dir.join("hf");
        let kept = |amplitude: f64, ty: GgufType| {
            let copy = scratch_dir("gguf-kept-copy");
            for f in std::fs::read_dir(&tuned).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
            }
            nudge(&copy, amplitude);
            write_model_gguf(&copy, &copy.join("out.gguf"), ty, Some(&base), "t")
                .unwrap()
                .change_kept
                .unwrap()
        };
        // q8_0 steps here are about 5e-4: a change of 1e-5 snaps back onto
        // the base's own grid; f16 keeps it; a change of 2e-2 survives.
        let small_in_base = kept(1e-5, GgufType::Base);
        assert!(small_in_base < 0.2, "{small_in_base}");
        let small_in_f16 = kept(1e-5, GgufType::F16);
        assert!((small_in_f16 - 1.0).abs() < 0.1, "{small_in_f16}");
        let large_in_base = kept(2e-2, GgufType::Base);
        assert!((large_in_base - 1.0).abs() < 0.05, "{large_in_base}");
    });
}
