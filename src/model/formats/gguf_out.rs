//! GGUF out, for llama.cpp, ollama and LM Studio: a model folder as a model
//! GGUF (scheme two's merged model, or any model stage) in f32, f16, bf16,
//! q8_0, q4_k or its GGUF base's own block formats; a PEFT adapter as a
//! llama.cpp LoRA adapter (scheme one); an ollama Modelfile beside them.
//! Tensors go under llama.cpp's names, with its q/k row order for the llama
//! architecture. The tokenizer becomes `tokenizer.ggml.*` metadata whose
//! pre-tokenizer is one llama.cpp knows and that splits a probe text exactly
//! as the model's own tokenizer does; a tokenizer that cannot be written
//! faithfully is refused by name, not approximated.

use super::gguf::{gguf_name, pre_tokenizer, GgufModel, GGUF_FILE};
use super::io::read_json;
use crate::model::config::ModelConfig;
use crate::model::decoder::{Decoder, LoadOptions};
use crate::model::error::{ModelError, Result};
use crate::model::family::Architecture;
use crate::model::kernels::quantized::{format_name, Quantization};
use crate::model::rope::RopeScaling;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The number format of an exported model's matrices (vectors, norms and
/// biases are always f32, as llama.cpp's converter writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit super-blocks of 256; q5_0 where a row is not a multiple of 256.
    Q4K,
    /// Each tensor in the block format the GGUF base stored it in (the
    /// model the user started from, fine-tuned, in the same size).
    Base,
}

impl GgufType {
    pub const NAMES: [&'static str; 6] = ["f32", "f16", "bf16", "q8_0", "q4_k", "base"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "f32" => GgufType::F32,
            "f16" => GgufType::F16,
            "bf16" => GgufType::Bf16,
            "q8_0" => GgufType::Q8_0,
            "q4_k" => GgufType::Q4K,
            "base" => GgufType::Base,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Bf16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4K => "q4_k",
            GgufType::Base => "base",
        }
    }

    /// Bits a matrix weight takes written in this format; `base` takes the
    /// base GGUF's `stored` bits (f16 when unknown).
    pub fn bits_per_weight(self, stored: Option<f64>) -> f64 {
        match self {
            GgufType::F32 => 32.0,
            GgufType::F16 | GgufType::Bf16 => 16.0,
            // 32 weights and an f16 scale a block.
            GgufType::Q8_0 => 8.5,
            // 256 weights, 8 sub-block scales and mins, two f16 a block.
            GgufType::Q4K => 4.5,
            GgufType::Base => stored.unwrap_or(16.0),
        }
    }

    /// llama.cpp's `general.file_type` (llama_ftype) where one fits.
    fn file_type(self) -> Option<u32> {
        match self {
            GgufType::F32 => Some(0),
            GgufType::F16 => Some(1),
            GgufType::Q8_0 => Some(7),
            GgufType::Bf16 => Some(32),
            GgufType::Q4K | GgufType::Base => None,
        }
    }
}

/// What `write_model_gguf` wrote.
#[derive(Debug)]
pub struct WrittenGguf {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensor count per block format.
    pub formats: BTreeMap<&'static str, usize>,
    /// What llama.cpp will compute differently that is not refused.
    pub warnings: Vec<String>,
    /// Where the tokenizer metadata came from: the GGUF base's, carried
    /// over, or "pre-tokenizer <name>" for one written from tokenizer.json.
    pub tokenizer: String,
    /// RMS of what the number format changed in the matrices, relative to
    /// their RMS.
    pub rel_rms_err: f64,
    /// For a model that descends from a GGUF: how much of the fine-tune's
    /// change to the base's matrices the written ones keep, ⟨Q(W) − B,
    /// W − B⟩ / ‖W − B‖² (1: all of it; near 0: the blocks snapped back to
    /// the base's, as re-quantizing onto the base's own grid does to a
    /// change smaller than its step). Rounding noise unrelated to the
    /// change leaves it near 1, however large.
    pub change_kept: Option<f64>,
}

/// llama.cpp's architecture name for a family whose adapters and models it
/// runs, and whether its converter permutes q/k rows (Mistral is llama's).
fn llama_cpp_arch(config: &ModelConfig) -> Option<(&'static str, bool)> {
    let family = match config.architecture {
        Architecture::Mistral => Architecture::Llama,
        a => a,
    };
    super::gguf::ARCHITECTURES
        .iter()
        .find(|(_, a, _)| *a == family)
        .map(|&(name, _, permuted)| (name, permuted))
}

fn unsupported_family(config: &ModelConfig) -> ModelError {
    let known: Vec<&str> = super::gguf::ARCHITECTURES
        .iter()
        .map(|(_, a, _)| a.model_type())
        .collect();
    ModelError::Input(format!(
        "GGUF export of {} models is not supported yet ({}, mistral)",
        config.model_type,
        known.join(", ")
    ))
}

/// Puts the rows of a q/k weight or bias (or of a LoRA B on one) into
/// llama.cpp's order: row `h·d + j·d/2 + i` goes to `h·d + 2i + j`.
fn permute_rows(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let cols = t.elem_count() / rows.max(1);
    let d = rows / heads.max(1);
    t.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The heads whose rows llama.cpp permutes for this tensor, if any.
fn permuted_heads(config: &ModelConfig, gguf: &str) -> Option<usize> {
    if gguf.contains(".attn_q.") {
        Some(config.num_attention_heads)
    } else if gguf.contains(".attn_k.") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Writes `atomically`: to `<out>.partial`, fsynced, renamed over `out`.
fn write_gguf(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    // Empty arrays first: their element type is patched below.
    let mut meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    meta.sort_by_key(|(_, v)| !matches!(v, Value::Array(a) if a.is_empty()));
    let empty = meta
        .iter()
        .take_while(|(_, v)| matches!(v, Value::Array(a) if a.is_empty()))
        .count();
    let list: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let partial = out.with_extension("gguf.partial");
    let written = (|| {
        use std::io::{Seek, SeekFrom, Write};
        let file = std::fs::File::create(&partial).map_err(|e| ModelError::io(&partial, e))?;
        let mut buffered = std::io::BufWriter::new(file);
        candle_core::quantized::gguf_file::write(&mut buffered, &meta, &list).map_err(|e| {
            // candle wraps the writer's io::Error; a full disk is a file failure.
            ModelError::io(&partial, std::io::Error::other(e.to_string()))
        })?;
        buffered.flush().map_err(|e| ModelError::io(&partial, e))?;
        let mut file = buffered
            .into_inner()
            .map_err(|e| ModelError::io(&partial, e.into_error()))?;
        // candle writes an empty array's element type as u32; llama.cpp
        // insists that `tokenizer.ggml.merges` holds strings even when it
        // is empty. The empty arrays lead the metadata (after the 24-byte
        // header): each is key (u64 length + bytes), type 9, element type,
        // u64 count 0; the element type becomes string (8).
        let mut at = 24u64;
        for (key, _) in &meta[..empty] {
            at += 8 + key.len() as u64 + 4;
            file.seek(SeekFrom::Start(at))
                .and_then(|_| file.write_all(&8u32.to_le_bytes()))
                .map_err(|e| ModelError::io(&partial, e))?;
            at += 4 + 8;
        }
        file.sync_all().map_err(|e| ModelError::io(&partial, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(|e| ModelError::io(out, e))
}

/// What `arch_metadata` gives: the `{arch}.*` keys, tensors that carry
/// configuration (Phi-3's rope factors), and what llama.cpp will compute
/// differently that is not refused.
struct ArchMetadata {
    keys: Vec<(String, Value)>,
    tensors: Vec<(String, Tensor)>,
    warnings: Vec<String>,
}

/// The `{arch}.*` metadata of `config`, refusing what llama.cpp's
/// architecture would compute differently (it hardcodes some of what HF
/// configs state: Gemma's attention scale by size, its sliding pattern's
/// default, Phi-3's disabled window).
fn arch_metadata(config: &ModelConfig, arch: &str, config_path: &Path) -> Result<ArchMetadata> {
    use crate::model::rope::Rope;
    let refuse = |m: String| ModelError::config(config_path, m);
    let family = config.architecture;
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |n: usize| Value::U32(n as u32);
    let mut out = ArchMetadata {
        keys: vec![
            (key("context_length"), u32v(config.max_position_embeddings)),
            (key("embedding_length"), u32v(config.hidden_size)),
            (key("block_count"), u32v(config.num_hidden_layers)),
            (key("feed_forward_length"), u32v(config.intermediate_size)),
            (
                key("attention.head_count"),
                u32v(config.num_attention_heads),
            ),
            (
                key("attention.head_count_kv"),
                u32v(config.num_key_value_heads),
            ),
            (key("attention.key_length"), u32v(config.head_dim)),
            (key("attention.value_length"), u32v(config.head_dim)),
            (
                key("attention.layer_norm_rms_epsilon"),
                Value::F32(config.rms_norm_eps as f32),
            ),
            (key("rope.dimension_count"), u32v(config.head_dim)),
            (key("vocab_size"), u32v(config.vocab_size)),
        ],
        tensors: Vec::new(),
        warnings: Vec::new(),
    };
    let ropes: Vec<&Rope> = config
        .layers
        .iter()
        .map(|l| l.rope.as_ref())
        .collect::<Option<_>>()
        .ok_or_else(|| refuse("layers without rope have no GGUF form".into()))?;
    let sliding: Vec<bool> = config.layers.iter().map(|l| l.window.is_some()).collect();
    let mut sizes: Vec<usize> = config.layers.iter().filter_map(|l| l.window).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() > 1 {
        return Err(refuse(format!(
            "sliding windows of different sizes ({sizes:?}) have no GGUF form"
        )));
    }
    let window = sizes.first().copied();
    let uniform = |ropes: &[&Rope]| -> Result<Rope> {
        let first = (*ropes.first().ok_or_else(|| refuse("no layers".into()))?).clone();
        if ropes.iter().any(|r| **r != first) {
            return Err(refuse(
                "layers with different rope settings have no GGUF form in llama.cpp's architecture"
                    .into(),
            ));
        }
        Ok(first)
    };
    let plain_rope = |rope: &Rope, keys: &mut Vec<(String, Value)>| -> Result<()> {
        keys.push((key("rope.freq_base"), Value::F32(rope.theta as f32)));
        match &rope.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => {
                keys.push((key("rope.scaling.type"), Value::String("linear".into())));
                keys.push((key("rope.scaling.factor"), Value::F32(*factor as f32)));
                Ok(())
            }
            other => Err(refuse(format!(
                "rope scaling {other:?} is not written to GGUF for {arch} (none and linear are)"
            ))),
        }
    };
    match family {
        Architecture::Gemma2 | Architecture::Gemma3 => {
            let scalar = super::gguf::gemma_attention_scalar(
                family,
                config.num_hidden_layers,
                config.hidden_size,
                config.num_attention_heads,
                config.head_dim,
            );
            if config.query_pre_attn_scalar != Some(scalar as f64) {
                return Err(refuse(format!(
                    "query_pre_attn_scalar {:?}: llama.cpp does not read it and scales a {}-layer {arch}'s attention by {scalar}^-1/2, so its GGUF would compute another model",
                    config.query_pre_attn_scalar, config.num_hidden_layers
                )));
            }
            match window {
                Some(w) => out.keys.push((key("attention.sliding_window"), u32v(w))),
                None if family == Architecture::Gemma3 => {
                    out.keys.push((key("attention.sliding_window"), u32v(0)))
                }
                None => {}
            }
            let period = super::gguf::default_window_period(family);
            let default: Vec<bool> = (0..sliding.len())
                .map(|i| i % period < period - 1)
                .collect();
            if (window.is_some() && sliding != default)
                || (window.is_none() && family == Architecture::Gemma2)
            {
                out.keys.push((
                    key("attention.sliding_window_pattern"),
                    Value::Array(sliding.iter().map(|&s| Value::Bool(s)).collect()),
                ));
            }
            let split = |want: bool| -> Vec<&Rope> {
                ropes
                    .iter()
                    .zip(&sliding)
                    .filter(|(_, s)| **s == want)
                    .map(|(r, _)| *r)
                    .collect()
            };
            let (global, local) = (split(false), split(true));
            let global = match global.is_empty() {
                true => uniform(&local)?,
                false => uniform(&global)?,
            };
            if family == Architecture::Gemma2 && global.scaling != RopeScaling::None {
                return Err(refuse("llama.cpp's gemma2 has no rope scaling".into()));
            }
            plain_rope(&global, &mut out.keys)?;
            if !local.is_empty() {
                let local = uniform(&local)?;
                if local.scaling != RopeScaling::None {
                    return Err(refuse(
                        "rope scaling on sliding layers: llama.cpp scales global layers only"
                            .into(),
                    ));
                }
                out.keys
                    .push((key("rope.freq_base_swa"), Value::F32(local.theta as f32)));
            }
            match (
                family,
                config.attn_logit_softcapping,
                config.final_logit_softcapping,
            ) {
                (Architecture::Gemma2, Some(a), Some(f)) => {
                    out.keys
                        .push((key("attn_logit_softcapping"), Value::F32(a as f32)));
                    out.keys
                        .push((key("final_logit_softcapping"), Value::F32(f as f32)));
                }
                (Architecture::Gemma2, _, _) => return Err(refuse(
                    "llama.cpp's gemma2 always soft-caps attention and logits (50 and 30 unless stated); a Gemma 2 without both caps has no GGUF form".into(),
                )),
                (_, Some(_), _) => {
                    return Err(refuse("llama.cpp's gemma3 has no attention soft-cap".into()))
                }
                (_, None, cap) => {
                    if let Some(f) = cap {
                        out.keys
                            .push((key("final_logit_softcapping"), Value::F32(f as f32)));
                    }
                }
            }
        }
        Architecture::Phi3 => {
            if let Some(w) = window.filter(|w| *w < config.max_position_embeddings) {
                out.keys.push((key("attention.sliding_window"), u32v(w)));
                out.warnings.push(format!(
                    "llama.cpp turns Phi-3's sliding window off: rows longer than {w} tokens attend further there than here"
                ));
            }
            let rope = uniform(&ropes)?;
            out.keys
                .push((key("rope.freq_base"), Value::F32(rope.theta as f32)));
            match &rope.scaling {
                RopeScaling::None => {}
                RopeScaling::LongRope {
                    short_factor,
                    long_factor,
                    attention_factor,
                    original_max_position_embeddings,
                } => {
                    out.keys.push((
                        key("rope.scaling.original_context_length"),
                        u32v(*original_max_position_embeddings),
                    ));
                    out.keys.push((
                        key("rope.scaling.attn_factor"),
                        Value::F32(*attention_factor as f32),
                    ));
                    for (name, f) in [
                        ("rope_factors_long.weight", long_factor),
                        ("rope_factors_short.weight", short_factor),
                    ] {
                        let v: Vec<f32> = f.iter().map(|x| *x as f32).collect();
                        out.tensors
                            .push((name.into(), Tensor::new(v, &Device::Cpu)?));
                    }
                }
                other => {
                    return Err(refuse(format!(
                    "rope scaling {other:?} is not written to GGUF for phi3 (none and longrope are)"
                )))
                }
            }
        }
        _ => {
            if let Some(w) = window {
                return Err(refuse(format!(
                    "layers attend through a sliding window of {w}; llama.cpp's {arch} architecture has none, so its GGUF would compute another model"
                )));
            }
            let rope = uniform(&ropes)?;
            match (&rope.scaling, arch) {
                // As llama.cpp's converter writes Llama 3.x: the factors.
                (RopeScaling::Llama3 { .. }, "llama") => {
                    out.keys
                        .push((key("rope.freq_base"), Value::F32(rope.theta as f32)));
                    let factors: Vec<f32> =
                        crate::model::rope::llama_cpp_factors(&rope, config.head_dim)
                            .into_iter()
                            .map(|f| f as f32)
                            .collect();
                    out.tensors.push((
                        super::gguf::ROPE_FREQS.into(),
                        Tensor::new(factors, &Device::Cpu)?,
                    ));
                }
                _ => plain_rope(&rope, &mut out.keys)?,
            }
        }
    }
    Ok(out)
}

/// GPT-2's byte-level alphabet: the character byte `b` is written as.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("a valid char")
}

/// Text that tells llama.cpp's pre-tokenizers apart: digit runs of every
/// length, contractions in both cases, runs of spaces, tabs and newlines,
/// punctuation against letters, non-Latin scripts and emoji.
const PRE_PROBE: &str = "Hello world! It's 2026; I'VE got 7 apples, 42 pears & 1234567 grapes.\n\n\
    \t  indented\tline   with  spaces\r\n  She'd've said \"no\"... (maybe) -- don't.\n\
    x=3.14159; y = [1,22,333,4444]; price: $9.99/kg 100% 'QUOTED' words\n\
    Ünïcödé straße, нещо на български, 我想在apple工作1314151天, مرحبا, 🦙🚀 ok?!\n   \n    end";

/// llama.cpp pre-tokenizer names tried when writing, most specific first
/// (names llama.cpp treats alike are left out).
const WRITTEN_PRE: [&str; 4] = ["smollm", "llama-bpe", "qwen2", "gpt2"];

fn tokenizer_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn parse_tokenizer(json: &Json, path: &Path) -> Result<tokenizers::Tokenizer> {
    json.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| tokenizer_error(path, e.to_string()))
}

/// The llama.cpp pre-tokenizer under which `json`'s byte-level BPE splits
/// the probe text into the same ids.
fn detect_pre(json: &Json, path: &Path) -> Result<&'static str> {
    let encode = |t: &tokenizers::Tokenizer| {
        t.encode(PRE_PROBE, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tokenizer_error(path, e.to_string()))
    };
    let want = encode(&parse_tokenizer(json, path)?)?;
    for name in WRITTEN_PRE {
        let mut candidate = json.clone();
        candidate["pre_tokenizer"] = pre_tokenizer(name).expect("a known name");
        // llama.cpp ignores merges for whole-vocabulary words under llama3's.
        candidate["model"]["ignore_merges"] = Json::Bool(name == "llama-bpe");
        let Ok(t) = parse_tokenizer(&candidate, path) else {
            continue;
        };
        if encode(&t)? == want {
            return Ok(name);
        }
    }
    Err(tokenizer_error(
        path,
        format!(
            "no pre-tokenizer llama.cpp knows ({}) splits text as this tokenizer does; llama.cpp would tokenize differently, so no GGUF is written",
            WRITTEN_PRE.join(", ")
        ),
    ))
}

/// The `tokenizer.*` metadata for the tokenizer in `model_dir`: byte-level
/// BPE (vocabulary, merges, pre-tokenizer), or a vocabulary of single
/// ASCII characters (the built-in tokenizer of `init` models) written as
/// byte-level BPE without merges, which tokenizes the same.
fn tokenizer_metadata(
    model_dir: &Path,
    config: &ModelConfig,
) -> Result<(Vec<(String, Value)>, &'static str)> {
    let path = model_dir.join("tokenizer.json");
    let json = read_json(&path)?;
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    // llama.cpp's token types: 1 normal, 3 control, 4 user-defined, 5 unused.
    let mut types = vec![1i32; n];
    let mut put = |id: u64, text: String| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            tokenizer_error(
                &path,
                format!("token id {id} ({text:?}) is past the model's {n} embedding rows"),
            )
        })?;
        *slot = Some(text);
        Ok(())
    };
    let model = &json["model"];
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| tokenizer_error(&path, "model.vocab is not an object"))?;
    let added: HashMap<u64, (String, bool)> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some((
                        t["id"].as_u64()?,
                        (t["content"].as_str()?.to_string(), t["special"] == true),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut merges: Vec<Value> = Vec::new();
    let pre = match model["type"].as_str() {
        Some("BPE") => {
            if model["byte_fallback"] == true || !mentions_byte_level(&json) {
                return Err(tokenizer_error(&path, "only byte-level BPE tokenizers (GPT-2 style, llama.cpp's \"gpt2\") are written to GGUF so far; SentencePiece-style ones are not"));
            }
            for (text, id) in vocab {
                let id = id
                    .as_u64()
                    .ok_or_else(|| tokenizer_error(&path, format!("vocab id of {text:?}")))?;
                put(id, text.clone())?;
            }
            for m in model["merges"].as_array().into_iter().flatten() {
                let pair = match m {
                    Json::String(s) => s.clone(),
                    Json::Array(p) if p.len() == 2 => format!(
                        "{} {}",
                        p[0].as_str().unwrap_or_default(),
                        p[1].as_str().unwrap_or_default()
                    ),
                    _ => return Err(tokenizer_error(&path, format!("merge {m} is not a pair"))),
                };
                merges.push(Value::String(pair));
            }
            detect_pre(&json, &path)?
        }
        Some("WordLevel") => {
            for (text, id) in vocab {
                let id = id
                    .as_u64()
                    .ok_or_else(|| tokenizer_error(&path, format!("vocab id of {text:?}")))?;
                if added.contains_key(&id) {
                    continue;
                }
                let mut chars = text.chars();
                let byte = match (chars.next(), chars.next()) {
                    (Some(c), None) if c.is_ascii() => c as u8,
                    _ => return Err(tokenizer_error(&path, format!("a word-level vocabulary is written to GGUF only when every word is one ASCII character; {text:?} is not"))),
                };
                put(id, byte_level_char(byte).to_string())?;
            }
            "gpt2"
        }
        other => {
            return Err(tokenizer_error(
                &path,
                format!("tokenizer model {other:?} has no GGUF form this program writes (byte-level BPE does)"),
            ))
        }
    };
    for (&id, (text, special)) in &added {
        put(id, text.clone())?;
        types[id as usize] = if *special { 3 } else { 4 };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let id_of = |v: &Json| -> Option<u32> {
        let text = v.as_str().or_else(|| v["content"].as_str())?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let tok_config = match model_dir.join("tokenizer_config.json") {
        p if p.is_file() => read_json(&p)?,
        _ => Json::Null,
    };
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
    ];
    let bos = id_of(&tok_config["bos_token"]).or(config.bos_token_id);
    let eos = id_of(&tok_config["eos_token"]).or(config.eos_token_id);
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        (
            "tokenizer.ggml.padding_token_id",
            id_of(&tok_config["pad_token"]),
        ),
        (
            "tokenizer.ggml.unknown_token_id",
            id_of(&tok_config["unk_token"]),
        ),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), Value::U32(id)));
        }
    }
    // What this program's tokenizer does to plain text: the post-processor
    // puts a special token first, or not.
    let add_bos = json["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .is_some_and(|first| first.get("SpecialToken").is_some());
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    if let Some(template) = tok_config["chat_template"].as_str() {
        meta.push((
            "tokenizer.chat_template".into(),
            Value::String(template.into()),
        ));
    }
    meta.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    ));
    meta.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    ));
    // llama.cpp refuses a "gpt2" vocabulary without the key, even when
    // there are no merges (a vocabulary of single characters).
    meta.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    Ok((meta, pre))
}

/// Whether a ByteLevel pre-tokenizer or decoder appears anywhere in `json`.
fn mentions_byte_level(json: &Json) -> bool {
    fn walk(v: &Json) -> bool {
        match v {
            Json::Object(m) => {
                m.get("type") == Some(&Json::String("ByteLevel".into())) || m.values().any(walk)
            }
            Json::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    walk(&json["pre_tokenizer"]) || walk(&json["decoder"])
}

/// The block format a tensor of `shape` is written in.
fn tensor_format(ty: GgufType, shape: &[usize], base: Option<GgmlDType>) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = shape[shape.len() - 1];
    match ty {
        GgufType::F32 => GgmlDType::F32,
        GgufType::F16 => GgmlDType::F16,
        GgufType::Bf16 => GgmlDType::BF16,
        GgufType::Q8_0 => Quantization::Q8_0
            .format_for(cols)
            .unwrap_or(GgmlDType::F16),
        GgufType::Q4K => Quantization::Q4K.format_for(cols).unwrap_or(GgmlDType::F16),
        GgufType::Base => base
            .filter(|f| cols.is_multiple_of(f.block_size()))
            .unwrap_or(GgmlDType::F16),
    }
}

/// Writes the model in `model_dir` (a Hugging Face folder, or a `base`
/// artifact holding a GGUF) as a llama.cpp model GGUF at `out`. `base` is
/// the GGUF the model descends from, whose block formats `GgufType::Base`
/// keeps. `name` becomes `general.name`.
pub fn write_model_gguf(
    model_dir: &Path,
    out: &Path,
    ty: GgufType,
    base: Option<&Path>,
    name: &str,
) -> Result<WrittenGguf> {
    let config = ModelConfig::from_dir(model_dir)?;
    let (arch, permuted) = llama_cpp_arch(&config).ok_or_else(|| unsupported_family(&config))?;
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.type".into(), Value::String("model".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    if let Some(ft) = ty.file_type() {
        metadata.push(("general.file_type".into(), Value::U32(ft)));
    }
    let arch_meta = arch_metadata(&config, arch, &model_dir.join("config.json"))?;
    metadata.extend(arch_meta.keys);
    let base_model = base.map(GgufModel::open).transpose()?;
    // A model fine-tuned from a GGUF keeps its tokenizer exactly as the
    // base's file states it (SentencePiece scores included).
    let tokenizer = match &base_model {
        Some(b) => {
            metadata.extend(b.tokenizer_metadata());
            "the GGUF base's".to_string()
        }
        None => {
            let (keys, pre) = tokenizer_metadata(model_dir, &config)?;
            metadata.extend(keys);
            format!("pre-tokenizer {pre}")
        }
    };
    let base_formats: HashMap<String, GgmlDType> = match (ty, &base_model) {
        (GgufType::Base, Some(b)) => super::gguf::tensor_formats(b),
        (GgufType::Base, None) => {
            return Err(ModelError::Input(
                "`base` keeps the block formats of a GGUF base, and this model does not descend from one: choose f16, bf16, q8_0 or q4_k".into(),
            ))
        }
        _ => HashMap::new(),
    };
    let decoder = Decoder::load(model_dir, &LoadOptions::default())?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // Sums: the weights' squares and the conversion's error's; the
    // change from the base's dequantised blocks, squared and as kept.
    let (mut norm, mut err, mut change, mut kept) = (0.0, 0.0, 0.0, 0.0);
    let dot = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((a * b)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let mut formats: BTreeMap<&'static str, usize> = BTreeMap::new();
    let family = config.architecture.family();
    for (gg, t) in &arch_meta.tensors {
        tensors.push((gg.clone(), QTensor::quantize(t, GgmlDType::F32)?));
    }
    for (hf, t) in decoder.base_tensors()? {
        let gg = gguf_name(&hf, family.norms)
            .ok_or_else(|| ModelError::Input(format!("tensor {hf} has no llama.cpp name")))?;
        let mut t = t.to_dtype(DType::F32)?;
        // llama.cpp's converter folds Gemma's 1 + w into its norm weights.
        if family.norm_plus_one && gg.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        if permuted {
            if let Some(heads) = permuted_heads(&config, &gg) {
                t = permute_rows(&t, heads)?;
            }
        }
        let format = tensor_format(ty, t.dims(), base_formats.get(&gg).copied());
        *formats.entry(format_name(format)).or_default() += 1;
        let q = QTensor::quantize(&t, format)?;
        if t.rank() == 2 {
            let written = q.dequantize(&Device::Cpu)?;
            let e = (&written - &t)?;
            norm += dot(&t, &t)?;
            err += dot(&e, &e)?;
            let stored = base_model
                .as_ref()
                .filter(|b| b.is_quantized(&hf))
                .map(|b| b.tensor_in_file_order(&gg));
            if let Some(stored) = stored {
                let stored = stored?.dequantize(&Device::Cpu)?;
                let d = (&t - &stored)?;
                change += dot(&d, &d)?;
                kept += dot(&(&written - &stored)?, &d)?;
            }
        }
        tensors.push((gg, q));
    }
    drop(decoder);
    let bytes = tensors
        .iter()
        .map(|(_, t)| t.storage_size_in_bytes() as u64)
        .sum();
    write_gguf(out, &metadata, &tensors)?;
    Ok(WrittenGguf {
        tensors: tensors.len(),
        bytes,
        formats,
        warnings: arch_meta.warnings,
        tokenizer,
        rel_rms_err: (err / norm.max(f64::MIN_POSITIVE)).sqrt(),
        change_kept: (change > 0.0).then(|| kept / change),
    })
}

/// Writes the PEFT adapter in `adapter_dir` (for the model in `model_dir`)
/// as a llama.cpp LoRA adapter (`general.type = adapter`, tensors
/// `<weight>.lora_a` [r, in] and `.lora_b` [out, r], f32). Each module's own
/// scale (alpha/r, rsLoRA's alpha/√r, rank and alpha patterns) is folded
/// into B and `adapter.lora.alpha` is 0, which llama.cpp reads as "scale
/// 1", so every loader applies exactly what PEFT does; B's rows on q/k are
/// permuted as llama.cpp's converter permuted the base's.
pub fn write_lora_adapter(model_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    use crate::model::formats::peft::read_adapter_config;
    use crate::model::layers::lora::peft_tensor_name;
    let config = ModelConfig::from_dir(model_dir)?;
    let (arch, permuted) = llama_cpp_arch(&config).ok_or_else(|| unsupported_family(&config))?;
    let config_path = adapter_dir.join("adapter_config.json");
    let peft = read_adapter_config(&config_path)?;
    if peft.lora.use_dora {
        // llama.cpp's adapters are x·Aᵀ·Bᵀ added to the base product; DoRA
        // rescales the base product itself, which they cannot express.
        return Err(ModelError::UnsupportedAdapter {
            file: config_path,
            message: "a DoRA adapter (use_dora) cannot be written as a llama.cpp LoRA adapter: \
                      llama.cpp applies adapters as an added low-rank product, and DoRA rescales \
                      the base weight's rows; merge it (scheme two) and export the model instead"
                .into(),
        });
    }
    let targets = peft
        .lora
        .resolve(&config)
        .map_err(|e| ModelError::config(&config_path, e.to_string()))?;
    let weights_path = adapter_dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
        ModelError::Safetensors {
            path: weights_path.clone(),
            message: e.to_string(),
        }
    })?;
    let take = |name: String| {
        tensors
            .get(&name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: name,
                file: weights_path.clone(),
            })
    };
    let mut written: Vec<(String, QTensor)> = Vec::new();
    for target in &targets {
        let module = &target.module;
        let base = gguf_name(
            &format!("{module}.weight"),
            config.architecture.family().norms,
        )
        .ok_or_else(|| ModelError::LoraConfig(format!("no llama.cpp name for {module}")))?;
        let a = take(peft_tensor_name(module, 'A'))?.to_dtype(DType::F32)?;
        let mut b = (take(peft_tensor_name(module, 'B'))?.to_dtype(DType::F32)? * target.scale)?;
        if permuted {
            if let Some(heads) = permuted_heads(&config, &base) {
                b = permute_rows(&b, heads)?;
            }
        }
        written.push((
            format!("{base}.lora_a"),
            QTensor::quantize(&a, GgmlDType::F32)?,
        ));
        written.push((
            format!("{base}.lora_b"),
            QTensor::quantize(&b, GgmlDType::F32)?,
        ));
    }
    let metadata = [
        ("general.architecture", Value::String(arch.into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(0.0)),
    ]
    .map(|(k, v)| (k.to_string(), v));
    write_gguf(out, &metadata, &written)
}

/// The literal system message a ChatML template writes when the
/// conversation has none, if it has one.
fn default_system_message(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let text = &template[start..];
    let text = &text[..text.find("<|im_end|>")?];
    (!text.contains("{{") && !text.contains("{%") && !text.contains('\'')).then(|| text.to_string())
}

/// What an ollama Modelfile starts `FROM`.
pub enum ModelfileFrom<'a> {
    /// The model in this folder (its GGUF when it is one, else the folder,
    /// which ollama imports), with this llama.cpp adapter beside the file.
    BaseWithAdapter {
        model_dir: &'a Path,
        adapter: &'a str,
    },
    /// A model GGUF beside the Modelfile; `model_dir` has its tokenizer.
    Gguf { model_dir: &'a Path, file: &'a str },
}

/// An ollama Modelfile: `FROM` and `ADAPTER` lines, and for a ChatML chat
/// template (the only one translated: others are left to ollama's
/// defaults, with a comment saying so) `TEMPLATE` and its stop token.
pub fn modelfile(from: ModelfileFrom<'_>) -> Result<String> {
    let mut out =
        "# Written by `runner export --gguf`: `ollama create NAME -f Modelfile`.\n".to_string();
    let model_dir = match from {
        ModelfileFrom::BaseWithAdapter { model_dir, adapter } => {
            let gguf = model_dir.join(GGUF_FILE);
            let from = if gguf.is_file() {
                gguf
            } else {
                model_dir.to_path_buf()
            };
            out.push_str(&format!("FROM {}\nADAPTER ./{adapter}\n", from.display()));
            model_dir
        }
        ModelfileFrom::Gguf { model_dir, file } => {
            out.push_str(&format!("FROM ./{file}\n"));
            model_dir
        }
    };
    let config = model_dir.join("tokenizer_config.json");
    let template = match std::fs::read(&config) {
        Ok(bytes) => serde_json::from_slice::<Json>(&bytes)
            .map_err(|e| ModelError::config(&config, e.to_string()))?
            .get("chat_template")
            .and_then(Json::as_str)
            .map(str::to_string),
        Err(_) => None,
    };
    match template {
        Some(t) if t.contains("<|im_start|>") && t.contains("<|im_end|>") => {
            out.push_str(
                "TEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
                 {{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\
                 <|im_start|>assistant\n\"\"\"\nPARAMETER stop \"<|im_end|>\"\n",
            );
            // A default system message the template writes as a literal
            // (SmolLM2's "You are a helpful AI assistant named SmolLM…").
            if let Some(system) = default_system_message(&t) {
                out.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
            }
        }
        Some(_) => {
            out.push_str("# The model's chat template is not ChatML: left to ollama's default.\n")
        }
        None => out.push_str("# The model has no chat template.\n"),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_gpt2_s() {
        assert_eq!(byte_level_char(b'a'), 'a');
        assert_eq!(byte_level_char(b' '), 'Ġ');
        assert_eq!(byte_level_char(b'\n'), 'Ċ');
        assert_eq!(byte_level_char(0), 'Ā');
        assert_eq!(byte_level_char(173), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_level_char).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn q_k_rows_go_to_llama_cpp_order_for_weights_and_biases() {
        // One head of 4 rows: HF rows (0,1 | 2,3) are rotary pairs (0,2), (1,3).
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        let p = permute_rows(&w, 1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            p,
            vec![vec![0., 1.], vec![4., 5.], vec![2., 3.], vec![6., 7.]]
        );
        let b = Tensor::new(&[0f32, 1., 2., 3.], &Device::Cpu).unwrap();
        let p = permute_rows(&b, 1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(p, vec![0., 2., 1., 3.]);
    }
}
