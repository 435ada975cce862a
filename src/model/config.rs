//! HF `config.json` parsing into one `ModelConfig` for every family (what
//! differs between families is declared in `family`), read as transformers
//! reads it: both rope layouts, `layer_types`, and every key that changes
//! the computation either implemented or refused by name.

use crate::model::error::{ModelError, Result};
pub use crate::model::family::Architecture;
use crate::model::family::{DefaultWindows, Family, NormPlacement, QkNorm};
use crate::model::formats::io::read_json;
use crate::model::formats::names::{self, Group};
use crate::model::kernels::fp8::{Fp8Format, Fp8Scheme};
pub use crate::model::rope::Rope;
use crate::model::rope::RopeScaling;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

/// How one decoder layer attends: its sliding window (None: every earlier
/// token) and its rope (None: no rotary embedding, SmolLM3's NoPE layers).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerAttention {
    pub window: Option<usize>,
    pub rope: Option<Rope>,
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
    /// One entry per layer (`layer_types`, windows and rope per layer).
    pub layers: Vec<LayerAttention>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    /// As written in config.json ("float32", "bfloat16", ...), if present.
    pub torch_dtype: Option<String>,
    /// Whether q/k/v/o projections carry a bias (q/k/v only for Qwen2).
    pub attention_bias: bool,
    /// Gemma: attention scores are scaled by this^-½ instead of head_dim^-½.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma: cap·tanh(x / cap) on attention scores and on final logits.
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// An FP8 checkpoint (`quantization_config.quant_method = "fp8"`): its
    /// codes' format and the block of its `weight_scale_inv` scales.
    pub fp8: Option<Fp8Scheme>,
}

/// The scheme of transformers' fine-grained FP8 `quantization_config`
/// (`quant_method = "fp8"`, `fmt = "e4m3"` or `"e5m2"` (e4m3 when absent,
/// as transformers assumes), dynamic activations, f32 scales); anything
/// else in it is refused by name.
fn fp8_scheme(q: &Value) -> std::result::Result<Fp8Scheme, String> {
    let text = |key: &str| q.get(key).and_then(Value::as_str);
    let method = text("quant_method").unwrap_or("?");
    if method != "fp8" {
        return Err(format!(
            "quantization_config (quant_method {method:?}) is not supported: give an unquantized or a fine-grained FP8 (quant_method \"fp8\") checkpoint and set `quantize` in the recipe"
        ));
    }
    let unsupported = |what: String| Err(format!("quantization_config: {what} is not supported"));
    let format = match text("fmt") {
        None => Fp8Format::E4M3,
        Some(fmt) => match Fp8Format::parse(fmt) {
            Some(f) => f,
            None => {
                return unsupported(format!(
                    "fmt {fmt:?} (only \"e4m3\", float8_e4m3fn, and \"e5m2\", float8_e5m2)"
                ))
            }
        },
    };
    if let Some(a) = text("activation_scheme").filter(|a| *a != "dynamic") {
        return unsupported(format!(
            "activation_scheme {a:?} (its static activation scales would be ignored; only \"dynamic\")"
        ));
    }
    // transformers writes "float" (its default) for f32 scales.
    if let Some(f) = text("scale_fmt").filter(|f| !matches!(*f, "float" | "float32")) {
        return unsupported(format!("scale_fmt {f:?} (only f32 scales)"));
    }
    let known = [
        "quant_method",
        "fmt",
        "activation_scheme",
        "weight_block_size",
        "scale_fmt",
        "modules_to_not_convert",
        "dequantize",
    ];
    if let Some(key) = q
        .as_object()
        .and_then(|o| o.keys().find(|k| !known.contains(&k.as_str())))
    {
        return unsupported(format!("key {key:?} (= {})", q[key]));
    }
    match q.get("weight_block_size").and_then(Value::as_array).map(|b| {
        b.iter()
            .map(|v| v.as_u64().filter(|&n| n > 0).map(|n| n as usize))
            .collect::<Option<Vec<usize>>>()
    }) {
        Some(Some(b)) if b.len() == 2 => Ok(Fp8Scheme {
            format,
            block: [b[0], b[1]],
        }),
        _ => unsupported(format!(
            "weight_block_size {} (two positive integers are needed; per-tensor scales are not read)",
            q.get("weight_block_size").unwrap_or(&Value::Null)
        )),
    }
}

/// The most parameters a model may have: 2^40, more than any machine
/// holds, so a shape past it is a typo (a zero too many), refused before
/// anything is allocated.
pub const MAX_PARAMETERS: u128 = 1 << 40;
/// The most layers a model may have (the deepest models have a few hundred).
const MAX_LAYERS: usize = 1 << 20;

/// Keys that do not change what the model computes (ids, bookkeeping,
/// generation defaults). Every other key is either read by `from_json` or
/// refused by name.
const INERT_KEYS: [&str; 42] = [
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "initializer_factor",
    "_name_or_path",
    "name_or_path",
    "pretraining_tp",
    "cache_implementation",
    "transformers.js_config",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
    "tokenizer_class",
    "task_specific_params",
    "is_encoder_decoder",
    "is_decoder",
    "chunk_size_feed_forward",
    "tie_encoder_decoder",
    "keys_to_ignore_at_inference",
    "unsloth_version",
    "unsloth_fixed",
    "max_length",
    "min_length",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "use_bfloat16",
];

/// Dropout rates: they change training in transformers, so only 0 is
/// accepted (this program never drops out of the frozen base).
const DROPOUT_KEYS: [&str; 5] = [
    "attention_dropout",
    "hidden_dropout",
    "embd_pdrop",
    "resid_pdrop",
    "attn_pdrop",
];

const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

/// config.json's object and the keys read so far, so that whatever is left
/// unread at the end (and is not inert) is refused by name.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
    read: RefCell<BTreeSet<&'a str>>,
}

impl<'a> Reader<'a> {
    /// The value of `key`; None when absent or null. Marks it read.
    fn get(&self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.read.borrow_mut().insert(k.as_str());
        match v {
            Value::Null => None,
            v => Some(v),
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::config(self.file, message.to_string())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|x| {
                x.as_u64().map(|n| n as usize).ok_or_else(|| {
                    self.error(format!("{key} must be a non-negative integer, got {x}"))
                })
            })
            .transpose()
    }

    fn require(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.error(format!("missing required key {key:?}")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.error(format!("{key} must be a number, got {x}")))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|x| {
                x.as_bool()
                    .ok_or_else(|| self.error(format!("{key} must be true or false, got {x}")))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| self.error(format!("{key} must be a string, got {x}")))
            })
            .transpose()
    }

    /// Refuses `key` unless it is absent or holds the value that changes
    /// nothing.
    fn absent_or(&self, key: &str, harmless: &Value, why: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if v != harmless => {
                Err(self.error(format!("{key} = {v} is not supported: {why}")))
            }
            _ => Ok(()),
        }
    }

    /// The first key neither read nor inert.
    fn unread(&self) -> Option<(&'a String, &'a Value)> {
        let read = self.read.borrow();
        self.map
            .iter()
            .find(|(k, _)| !read.contains(k.as_str()) && !INERT_KEYS.contains(&k.as_str()))
    }

    /// A rope dict, with errors naming `key` and the setting.
    fn rope(&self, key: &str, dict: &Value, theta: f64, max_positions: usize) -> Result<Rope> {
        Rope::from_json(dict, theta, max_positions).map_err(|e| {
            let at = if e.key.is_empty() {
                key.to_string()
            } else {
                format!("{key}.{}", e.key)
            };
            self.error(format!("{at} {}", e.message))
        })
    }
}

fn first_token_id(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

/// Each layer's window and rope, from `layer_types` (or the family's rule
/// when it is absent), `sliding_window`, the rope keys and SmolLM3's
/// `no_rope_layers`.
fn layer_attention(
    r: &Reader,
    family: &Family,
    layers: usize,
    max_positions: usize,
) -> Result<Vec<LayerAttention>> {
    // Which layers have rope (SmolLM3: 1 = rope, 0 = none).
    let mut has_rope = vec![true; layers];
    if family.no_rope_layers {
        let interval = r.usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
        match r.get("no_rope_layers") {
            Some(list) => {
                let marks: Option<Vec<bool>> = list
                    .as_array()
                    .map(|a| a.iter().map(|m| m.as_u64().map(|m| m != 0)).collect())
                    .unwrap_or(None);
                match marks {
                    Some(m) if m.len() == layers => has_rope = m,
                    _ => {
                        return Err(r.error(format!(
                            "no_rope_layers must list 0 or 1 for each of the {layers} layers, got {list}"
                        )))
                    }
                }
            }
            None => {
                has_rope = (0..layers).map(|i| (i + 1) % interval != 0).collect();
            }
        }
    }

    // The window size, when the config turns windows on at all.
    let window = match family.windows {
        DefaultWindows::Never => None,
        DefaultWindows::FromMaxWindowLayers | DefaultWindows::NoRopeLayers => {
            let on = r.bool("use_sliding_window")?.unwrap_or(false);
            let w = r.usize("sliding_window")?;
            r.usize("max_window_layers")?;
            w.filter(|_| on)
        }
        DefaultWindows::WhenSet => r.usize("sliding_window")?,
        DefaultWindows::AllButEvery(_) => Some(r.usize("sliding_window")?.unwrap_or(4096)),
    };
    if window == Some(0) {
        return Err(r.error("sliding_window must be positive"));
    }

    // Which layers slide.
    let listed = match (family.layer_types, r.get("layer_types")) {
        (true, Some(list)) => {
            let types: Option<Vec<&str>> = list
                .as_array()
                .map(|a| a.iter().map(Value::as_str).collect())
                .unwrap_or(None);
            let Some(types) = types.filter(|t| t.len() == layers) else {
                return Err(r.error(format!(
                    "layer_types must name the attention of each of the {layers} layers, got {list}"
                )));
            };
            if let Some(bad) = types.iter().find(|t| **t != SLIDING && **t != FULL) {
                return Err(r.error(format!(
                    "layer_types entry {bad:?} is not supported (only \"{FULL}\" and \"{SLIDING}\")"
                )));
            }
            Some(types.iter().map(|t| *t == SLIDING).collect::<Vec<bool>>())
        }
        (false, Some(list)) => {
            return Err(r.error(format!(
                "layer_types = {list} is not supported for {}",
                family.model_type
            )))
        }
        (_, None) => None,
    };
    let slides: Vec<bool> = match listed {
        Some(s) => s,
        None => match family.windows {
            DefaultWindows::Never => vec![false; layers],
            DefaultWindows::WhenSet => vec![window.is_some(); layers],
            DefaultWindows::FromMaxWindowLayers => {
                let from = r.usize("max_window_layers")?.unwrap_or(28);
                (0..layers).map(|i| window.is_some() && i >= from).collect()
            }
            DefaultWindows::AllButEvery(n) => {
                let n = match family.default_local_theta {
                    Some(_) => gemma3_pattern(r)?.unwrap_or(n),
                    None => n,
                }
                .max(1);
                (0..layers).map(|i| (i + 1) % n != 0).collect()
            }
            DefaultWindows::NoRopeLayers => has_rope.iter().map(|&rope| !rope).collect(),
        },
    };
    if family.default_local_theta.is_some() {
        // Gemma 3's pattern keys say nothing more once layer_types is listed.
        gemma3_pattern(r)?;
    }

    // The rope of each kind of layer.
    let theta = r.f64("rope_theta")?.unwrap_or(family.default_theta);
    let local_theta = match family.default_local_theta {
        Some(default) => Some(r.f64("rope_local_base_freq")?.unwrap_or(default)),
        None => None,
    };
    if let Some(p) = r.f64("partial_rotary_factor")? {
        if p != 1.0 {
            return Err(r.error(format!(
                "partial_rotary_factor = {p} is not supported (rope on the whole head only)"
            )));
        }
    }
    // transformers ≥ 5 (`convert_rope_params_to_dict`): a non-null
    // `rope_scaling` wins over `rope_parameters`, and top-level `rope_theta`
    // fills in a dict without one; a nested (per layer type) dict gets
    // `rope_scaling` merged into its full-attention entry.
    let (parameters, scaling) = (r.get("rope_parameters"), r.get("rope_scaling"));
    // Inert without a scaled rope; `flat_rope_dict` applies it otherwise.
    r.usize("original_max_position_embeddings")?;
    let nested = parameters.filter(|p| p.get(FULL).is_some() || p.get(SLIDING).is_some());
    let (global, local) = match (nested, scaling.or(parameters)) {
        (Some(p), _) => {
            let map = p.as_object().expect("has keys");
            if let Some(bad) = map.keys().find(|k| *k != FULL && *k != SLIDING) {
                return Err(r.error(format!(
                    "rope_parameters.{bad} is not a layer type this program knows"
                )));
            }
            let entry = |kind: &str| p.get(kind).filter(|d| !d.is_null()).cloned();
            let mut full = entry(FULL).unwrap_or(json!({}));
            if let (Some(s), Some(obj)) = (scaling.and_then(Value::as_object), full.as_object_mut())
            {
                obj.extend(s.clone());
            }
            let global = r.rope(
                &format!("rope_parameters.{FULL}"),
                &full,
                theta,
                max_positions,
            )?;
            let local = match entry(SLIDING) {
                Some(d) => r.rope(
                    &format!("rope_parameters.{SLIDING}"),
                    &d,
                    local_theta.unwrap_or(theta),
                    max_positions,
                )?,
                None => local_rope(local_theta, global.clone()),
            };
            (global, local)
        }
        (None, Some(dict)) => {
            let key = if scaling.is_some() {
                "rope_scaling"
            } else {
                "rope_parameters"
            };
            let dict = flat_rope_dict(r, family, dict)?;
            let rope = r.rope(key, &dict, theta, max_positions)?;
            (rope.clone(), local_rope(local_theta, rope))
        }
        (None, None) => {
            let rope = Rope::plain(theta);
            (rope.clone(), local_rope(local_theta, rope))
        }
    };
    Ok((0..layers)
        .map(|i| LayerAttention {
            window: window.filter(|_| slides[i]),
            rope: has_rope[i].then(|| {
                if slides[i] {
                    local.clone()
                } else {
                    global.clone()
                }
            }),
        })
        .collect())
}

/// A one-rope dict as transformers standardizes it: a top-level
/// `original_max_position_embeddings` wins for the scaled types (Phi-3
/// keeps it there), and Phi-3 reads "su" and "yarn" as LongRoPE.
fn flat_rope_dict(r: &Reader, family: &Family, dict: &Value) -> Result<Value> {
    let mut dict = dict.clone();
    let original = r.usize("original_max_position_embeddings")?;
    if let Some(map) = dict.as_object_mut() {
        let kind_key = if map.contains_key("rope_type") {
            "rope_type"
        } else {
            "type"
        };
        let kind = map
            .get(kind_key)
            .and_then(Value::as_str)
            .unwrap_or("default");
        if family.phi3_rope && (kind == "su" || kind == "yarn") {
            map.insert(kind_key.into(), json!("longrope"));
        }
        let kind = map
            .get(kind_key)
            .and_then(Value::as_str)
            .unwrap_or("default");
        if let (Some(o), true) = (original, matches!(kind, "llama3" | "yarn" | "longrope")) {
            map.insert("original_max_position_embeddings".into(), json!(o));
        }
    }
    Ok(dict)
}

/// Gemma 3's local:global pattern: `sliding_window_pattern` in older
/// configs, `_sliding_window_pattern` as transformers 5 saves it.
fn gemma3_pattern(r: &Reader) -> Result<Option<usize>> {
    let saved = r.usize("_sliding_window_pattern")?;
    Ok(r.usize("sliding_window_pattern")?.or(saved))
}

/// The local layers' rope: Gemma 3's own base (no scaling), or the global
/// one for families with one rope.
fn local_rope(local_theta: Option<f64>, global: Rope) -> Rope {
    match local_theta {
        Some(theta) => Rope::plain(theta),
        None => global,
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

    /// Parses a config.json value as transformers does (the older top-level
    /// rope keys and transformers ≥ 5's `rope_parameters`, `layer_types`);
    /// `file` is only used in error messages. A key that would change the
    /// computation and that this program does not implement is an error.
    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let Some(map) = v.as_object() else {
            return Err(ModelError::config(
                file,
                "config.json must be a JSON object",
            ));
        };
        let r = Reader {
            map,
            file,
            read: RefCell::new(BTreeSet::new()),
        };
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
        if let Some(why) = Architecture::refusal(&model_type) {
            return Err(r.error(format!(
                "model_type {model_type:?} is not supported: {why}; supported: {}",
                Architecture::supported()
            )));
        }
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
        let family = architecture.family();
        let fp8 = match r.get("quantization_config") {
            None => None,
            Some(q) => Some(fp8_scheme(q).map_err(|e| r.error(e))?),
        };
        if let Some(m) = r.get("auto_map") {
            return Err(r.error(format!(
                "auto_map = {m} names custom modeling code, which this program cannot follow"
            )));
        }

        let hidden_size = r.require("hidden_size")?;
        let num_attention_heads = r.require("num_attention_heads")?;
        if num_attention_heads == 0 || hidden_size == 0 {
            return Err(r.error("hidden_size and num_attention_heads must be positive"));
        }
        let num_key_value_heads = r
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(r.error(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = r
            .usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(r.error(format!(
                "head_dim {head_dim} must be positive and even (rope)"
            )));
        }
        let num_hidden_layers = r.require("num_hidden_layers")?;
        // Per-layer settings are listed next: bound the count first.
        if num_hidden_layers > MAX_LAYERS {
            return Err(r.error(format!(
                "num_hidden_layers = {num_hidden_layers}: more than 2^20 layers, which no model has"
            )));
        }
        let max_position_embeddings = r.usize("max_position_embeddings")?.unwrap_or(4096);
        let layers = layer_attention(&r, family, num_hidden_layers, max_position_embeddings)?;
        for rope in layers.iter().filter_map(|l| l.rope.as_ref()) {
            rope.check(head_dim)
                .map_err(|e| r.error(format!("rope setting {} {}", e.key, e.message)))?;
        }

        let attention_bias = family.qkv_bias
            || (family.states_attention_bias && r.bool("attention_bias")?.unwrap_or(false));
        if !family.states_attention_bias {
            r.absent_or(
                "attention_bias",
                &json!(false),
                "this family's projections have no such bias",
            )?;
        }
        r.absent_or("mlp_bias", &json!(false), "MLP biases are not implemented")?;
        for key in DROPOUT_KEYS {
            if let Some(p) = r.f64(key)? {
                if p != 0.0 {
                    return Err(r.error(format!(
                        "{key} = {p} is not supported: dropout in the frozen base is not implemented (set it to 0)"
                    )));
                }
            }
        }
        let activation = r
            .str(family.activation_key)?
            .unwrap_or(family.activation.hf_name());
        if activation != family.activation.hf_name() {
            return Err(r.error(format!(
                "{} {activation:?} is not supported for {} (only {:?})",
                family.activation_key,
                family.model_type,
                family.activation.hf_name()
            )));
        }
        let (mut query_pre_attn_scalar, mut attn_cap, mut final_cap) = (None, None, None);
        if family.gemma_attention {
            // Gemma configs carry an inert `hidden_act` beside `hidden_activation`.
            r.get("hidden_act");
            query_pre_attn_scalar = Some(r.f64("query_pre_attn_scalar")?.unwrap_or(256.0));
            attn_cap = r.f64("attn_logit_softcapping")?;
            final_cap = r.f64("final_logit_softcapping")?;
            let values = [query_pre_attn_scalar, attn_cap, final_cap];
            if let Some(c) = values
                .into_iter()
                .flatten()
                .find(|c| c.is_nan() || *c <= 0.0)
            {
                return Err(r.error(format!(
                    "query_pre_attn_scalar and the soft-caps must be positive, got {c}"
                )));
            }
            r.absent_or(
                "use_bidirectional_attention",
                &json!(false),
                "causal attention only",
            )?;
        }
        let rms_norm_eps = r.f64("rms_norm_eps")?.unwrap_or(1e-6);
        let tie_word_embeddings = r.bool("tie_word_embeddings")?.unwrap_or(false);
        let vocab_size = r.require("vocab_size")?;
        let intermediate_size = r.require("intermediate_size")?;
        if let Some((key, value)) = r.unread() {
            return Err(r.error(format!(
                "key {key:?} (= {value}) is not one this program implements for {}; it may change what the model computes, so it is refused rather than ignored",
                family.model_type
            )));
        }
        let config = ModelConfig {
            architecture,
            model_type: architecture.model_type().to_string(),
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            layers,
            rms_norm_eps,
            tie_word_embeddings,
            vocab_size,
            max_position_embeddings,
            torch_dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(|x| x.as_str())
                .map(String::from),
            attention_bias,
            query_pre_attn_scalar,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            bos_token_id: v.get("bos_token_id").and_then(first_token_id),
            eos_token_id: v.get("eos_token_id").and_then(first_token_id),
            fp8,
        };
        // Shapes no machine holds are refused before anything allocates.
        let parameters = config.parameter_count();
        if parameters > MAX_PARAMETERS {
            return Err(r.error(format!(
                "this shape has {} parameters, more than 2^40 (1.1 trillion), which no machine holds: check hidden_size ({hidden_size}), intermediate_size ({intermediate_size}), num_hidden_layers ({num_hidden_layers}) and vocab_size ({vocab_size})",
                if parameters == u128::MAX { "more than 10^38".to_string() } else { parameters.to_string() },
            )));
        }
        Ok(config)
    }

    /// Weights of the model, counted without overflow (u128, saturating):
    /// embeddings, the head when untied, each layer's projections, biases
    /// and norms, the final norm.
    pub fn parameter_count(&self) -> u128 {
        let n = |x: usize| x as u128;
        let mul = |a: u128, b: u128| a.saturating_mul(b);
        let (h, f) = (n(self.hidden_size), n(self.intermediate_size));
        let q = mul(n(self.num_attention_heads), n(self.head_dim));
        let kv = mul(n(self.num_key_value_heads), n(self.head_dim));
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        let attention = mul(h, q)
            .saturating_add(mul(2, mul(h, kv)))
            .saturating_add(mul(q, h))
            .saturating_add(mul(2, q).saturating_add(kv).saturating_add(h));
        let mlp = mul(3, mul(h, f));
        let norms = mul(4, h).saturating_add(mul(2, q));
        let layer = attention.saturating_add(mlp).saturating_add(norms);
        mul(heads, mul(n(self.vocab_size), h))
            .saturating_add(mul(n(self.num_hidden_layers), layer))
            .saturating_add(h)
    }

    /// A config.json value that transformers ≥ 5 loads as this
    /// configuration (`rope_parameters`, `layer_types`).
    pub fn to_json(&self) -> Value {
        let family = self.architecture.family();
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        let obj = v.as_object_mut().expect("json! object");
        let mut put = |k: &str, value: Value| {
            obj.insert(k.to_string(), value);
        };
        put(family.activation_key, json!(family.activation.hf_name()));
        let sliding: Vec<bool> = self.layers.iter().map(|l| l.window.is_some()).collect();
        let window = self.layers.iter().find_map(|l| l.window);
        let rope_where = |slides: bool| {
            self.layers
                .iter()
                .find(|l| l.window.is_some() == slides && l.rope.is_some())
                .and_then(|l| l.rope.clone())
        };
        let any_rope = self.layers.iter().find_map(|l| l.rope.clone());
        // transformers ≥ 5 reads `rope_parameters`; older readers (and
        // vLLM, llama.cpp's converter, candle) the top-level keys, which
        // transformers 5 reads as the same rope.
        match family.default_local_theta {
            Some(local) => {
                let global = rope_where(false).unwrap_or(Rope::plain(family.default_theta));
                let local = rope_where(true).unwrap_or(Rope::plain(local));
                put("rope_theta", json!(global.theta));
                put("rope_local_base_freq", json!(local.theta));
                put(
                    "rope_parameters",
                    json!({FULL: global.to_json(), SLIDING: local.to_json()}),
                );
            }
            None => {
                let rope = any_rope.unwrap_or(Rope::plain(family.default_theta));
                put("rope_theta", json!(rope.theta));
                let scaled = rope.scaling != RopeScaling::None;
                put(
                    "rope_scaling",
                    if scaled { rope.to_json() } else { Value::Null },
                );
                put("rope_parameters", rope.to_json());
            }
        }
        if family.no_rope_layers {
            let marks: Vec<u8> = self
                .layers
                .iter()
                .map(|l| u8::from(l.rope.is_some()))
                .collect();
            put("no_rope_layers", json!(marks));
            put("use_sliding_window", json!(window.is_some()));
        }
        match family.windows {
            DefaultWindows::WhenSet => put("sliding_window", json!(window)),
            DefaultWindows::FromMaxWindowLayers => {
                put("use_sliding_window", json!(window.is_some()));
                let first = sliding.iter().position(|&s| s);
                put(
                    "max_window_layers",
                    json!(first.unwrap_or(self.num_hidden_layers)),
                );
            }
            _ => {}
        }
        if family.layer_types {
            let types: Vec<&str> = sliding
                .iter()
                .map(|&s| if s { SLIDING } else { FULL })
                .collect();
            put("layer_types", json!(types));
            put("sliding_window", json!(window));
        }
        if family.gemma_attention {
            put("query_pre_attn_scalar", json!(self.query_pre_attn_scalar));
            put("attn_logit_softcapping", json!(self.attn_logit_softcapping));
            put(
                "final_logit_softcapping",
                json!(self.final_logit_softcapping),
            );
        }
        if family.states_attention_bias {
            put("attention_bias", json!(self.attention_bias));
        }
        if family.states_mlp_bias {
            put("mlp_bias", json!(false));
        }
        v
    }

    /// The RMSNorm weights of layer `layer` by HF name, with their sizes.
    pub fn layer_norms(&self, layer: usize) -> Vec<(String, usize)> {
        let family = self.architecture.family();
        let h = self.hidden_size;
        let mut out = Vec::new();
        if family.norms != NormPlacement::Post {
            out.push((names::input_layernorm(layer), h));
        }
        out.push((names::post_attention_layernorm(layer), h));
        if family.norms == NormPlacement::Sandwich {
            out.push((names::pre_feedforward_layernorm(layer), h));
        }
        if family.norms != NormPlacement::Pre {
            out.push((names::post_feedforward_layernorm(layer), h));
        }
        let (q, kv) = match family.qk_norm {
            QkNorm::None => return out,
            QkNorm::PerHead => (self.head_dim, self.head_dim),
            QkNorm::Whole => (
                self.num_attention_heads * self.head_dim,
                self.num_key_value_heads * self.head_dim,
            ),
        };
        out.push((names::qk_norm(layer, 'q'), q));
        out.push((names::qk_norm(layer, 'k'), kv));
        out
    }

    /// The scale on q·kᵀ: head_dim^-½, or Gemma's `query_pre_attn_scalar`^-½.
    pub fn attention_scale(&self) -> f64 {
        let scalar = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        1.0 / scalar.sqrt()
    }

    /// Whether q/k/v carry a bias. Qwen2 has q/k/v bias but no o_proj bias.
    pub fn projection_has_bias(&self, projection: &str) -> bool {
        if self.architecture.family().qkv_bias {
            matches!(projection, "q_proj" | "k_proj" | "v_proj")
        } else {
            self.attention_bias && names::group_of(projection) == Some(Group::Attention)
        }
    }

    /// The family's projections in checkpoint order (names and groups).
    pub fn projections(&self) -> &'static [(&'static str, Group)] {
        names::projections(self.architecture.family().fused_projections)
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
            "qkv_proj" => (q + 2 * kv, h),
            "gate_up_proj" => (2 * f, h),
            "down_proj" => (h, f),
            _ => return None,
        })
    }
}

/// Full PEFT-style names of every linear module LoRA may target, e.g.
/// `model.layers.0.self_attn.q_proj` ... `model.layers.N.mlp.down_proj`.
pub fn linear_module_names(config: &ModelConfig) -> Vec<String> {
    names::all_projections(
        config.num_hidden_layers,
        config.architecture.family().fused_projections,
    )
}
