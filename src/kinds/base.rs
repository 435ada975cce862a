//! `base`: the model everything starts from. Either a Hugging Face folder
//! (referenced by content hash, not copied) or `init`, a seeded random model
//! the program makes itself.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lineage::{HeldAs, ModelShape, StoredBits};
use super::params::{no_quantize, Quantize};
use super::{key_with_path, resolved_input};
use crate::diag::checks::{at_least, positive};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::fsutil;
use crate::stage::{
    ArtifactKind, Ask, Dtype, FileInput, Kind, ParseContext, Role, RunContext, StageView,
};

pub struct Base;

/// Shape of a model made by `init`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// Architecture family: "llama", "mistral", "qwen2", "qwen3", "gemma2",
    /// "gemma3", "olmo2", "smollm3" or "phi3".
    #[serde(default = "default_arch")]
    pub arch: Sp<Arch>,
    pub hidden: Sp<u32>,
    pub layers: Sp<u32>,
    pub heads: Sp<u32>,
    pub kv_heads: Sp<u32>,
    pub ffn: Sp<u32>,
    /// Vocabulary size; at least the tokenizer's own tokens.
    pub vocab: Sp<u32>,
    /// Per-head size; hidden / heads when left out.
    #[serde(default)]
    pub head_dim: Option<Sp<u32>>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: Sp<f64>,
    /// Standard deviation of the random embeddings; 1/sqrt(hidden) when left
    /// out, so that LoRA alone can make confident predictions (HF's 0.02 caps
    /// logits near ±0.02·hidden after the final norm).
    #[serde(default)]
    pub embedding_std: Option<Sp<f64>>,
    /// Share the input embedding with the output head.
    #[serde(default = "yes")]
    pub tie_embeddings: Sp<bool>,
}

fn default_arch() -> Sp<Arch> {
    Sp::implicit(Arch::Qwen2)
}

/// Decoder families `init` can make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Olmo2,
    #[serde(rename = "smollm3")]
    SmolLM3,
    Phi3,
}

impl InitSpec {
    /// The model code's description of this shape.
    pub fn model_spec(&self, dtype: Dtype, seed: u64) -> crate::model::init::RandomModel {
        use crate::model::config::Architecture;
        crate::model::init::RandomModel {
            architecture: match self.arch.value {
                Arch::Llama => Architecture::Llama,
                Arch::Mistral => Architecture::Mistral,
                Arch::Qwen2 => Architecture::Qwen2,
                Arch::Qwen3 => Architecture::Qwen3,
                Arch::Gemma2 => Architecture::Gemma2,
                Arch::Gemma3 => Architecture::Gemma3,
                Arch::Olmo2 => Architecture::Olmo2,
                Arch::SmolLM3 => Architecture::SmolLM3,
                Arch::Phi3 => Architecture::Phi3,
            },
            hidden_size: self.hidden.value as usize,
            num_hidden_layers: self.layers.value as usize,
            num_attention_heads: self.heads.value as usize,
            num_key_value_heads: self.kv_heads.value as usize,
            intermediate_size: self.ffn.value as usize,
            vocab_size: self.vocab.value as usize,
            head_dim: self.head_dim.as_ref().map(|h| h.value as usize),
            rope_theta: self.rope_theta.value,
            tie_word_embeddings: self.tie_embeddings.value,
            dtype: super::inputs::dtype(dtype),
            seed,
            embedding_std: self
                .embedding_std
                .as_ref()
                .map_or(1.0 / (self.hidden.value as f64).sqrt(), |s| s.value),
        }
    }
}
fn default_rope_theta() -> Sp<f64> {
    Sp::implicit(10000.0)
}
fn yes() -> Sp<bool> {
    Sp::implicit(true)
}

/// `[stages.<name>]` with `kind = "base"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BaseParams {
    /// A Hugging Face model folder (config.json, *.safetensors,
    /// tokenizer.json) or a GGUF file (`….gguf`: architecture, tokenizer and
    /// chat template from its metadata; quantized projections kept in its
    /// own blocks), relative to the recipe.
    #[serde(default)]
    pub path: Option<Sp<String>>,
    /// Make a seeded random model of this shape instead of loading one.
    #[serde(default)]
    pub init: Option<InitSpec>,
    /// dtype of the weights `init` writes (a loaded folder keeps its own).
    #[serde(default)]
    pub dtype: Sp<Dtype>,
    /// Hold the decoder layers' projections quantized in every stage that
    /// loads this model ("q8_0" or "q4_k"; embeddings, norms and the output
    /// head stay dense). The folder itself stays as it is: stages quantize
    /// when they load it. On a GGUF, left out keeps the file's own blocks,
    /// and "none" dequantises them once, to f32, when this stage runs.
    #[serde(default, skip_serializing_if = "super::params::no_quantize")]
    pub quantize: Option<Sp<Quantize>>,
    #[serde(skip)]
    #[schemars(skip)]
    resolved: Option<PathBuf>,
    /// The folder's or GGUF's configuration, read once when the stage is
    /// checked (what `ModelShape` answers).
    #[serde(skip)]
    #[schemars(skip)]
    loaded: Option<crate::model::ModelConfig>,
    /// A GGUF's mean bits per projection weight as stored.
    #[serde(skip)]
    #[schemars(skip)]
    stored_bits: Option<f64>,
}

/// Whether `path` names a GGUF file rather than a folder.
fn is_gguf(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".gguf")
}

/// What `plan` checks of a GGUF: it opens, its architecture and metadata are
/// ones this program computes, and its tokenizer can be built.
fn check_gguf(
    path: &std::path::Path,
) -> Result<(crate::model::ModelConfig, f64), crate::model::ModelError> {
    if !path.is_file() {
        return Err(crate::model::ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no GGUF file here"),
        ));
    }
    let model = crate::model::formats::gguf::GgufModel::open(path)?;
    let config = model.config()?;
    model.tokenizer_json()?;
    let bits = model.projection_bits(&config);
    Ok((config, bits))
}

/// A GGUF base's artifact: the config.json and tokenizer files its metadata
/// describes, beside the file itself (hard-linked where the cache shares its
/// filesystem, copied otherwise), so that loading stages read a folder as
/// for any other model.
fn gguf_artifact(file: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    use crate::model::formats::gguf::{GgufModel, GGUF_FILE};
    let model = GgufModel::open(file)?;
    model.config()?;
    for (name, value) in [
        ("config.json", model.config_json()?),
        ("tokenizer.json", model.tokenizer_json()?),
        ("tokenizer_config.json", model.tokenizer_config_json()?),
    ] {
        fsutil::write_atomic(
            &out.join(name),
            serde_json::to_string_pretty(&value)?.as_bytes(),
        )?;
    }
    let target = out.join(GGUF_FILE);
    if std::fs::hard_link(file, &target).is_err() {
        let partial = out.join(format!("{GGUF_FILE}.partial"));
        std::fs::copy(file, &partial)
            .map_err(|e| anyhow::anyhow!("copying {} into the cache: {e}", file.display()))?;
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &target)?;
    }
    Ok(())
}

impl BaseParams {
    /// The model folder when the stage loads one.
    pub fn folder(&self) -> Option<&PathBuf> {
        self.resolved.as_ref()
    }

    /// Whether `path` is a GGUF file.
    fn gguf(&self) -> bool {
        self.path.as_ref().is_some_and(|p| is_gguf(&p.value))
    }

    /// A GGUF base with `quantize = "none"`: its blocks dequantised once,
    /// when the stage runs, rather than per product in every stage.
    fn dequantizes_gguf(&self) -> bool {
        self.gguf()
            && self
                .quantize
                .as_ref()
                .is_some_and(|q| q.value == Quantize::None)
    }
}

/// Dequantises the GGUF in a base artifact once: model.safetensors in f32
/// (every block value is exact in f32) beside it, which loading stages then
/// read instead; the GGUF stays for `export --gguf-type base`.
fn dequantize_gguf(out: &std::path::Path) -> anyhow::Result<()> {
    use crate::model::decoder::{Decoder, LoadOptions};
    let options = LoadOptions {
        dtype: Some(candle_core::DType::F32),
        device: candle_core::Device::Cpu,
    };
    let model = Decoder::load(out, &options)?;
    crate::model::merge::save_model_folder(&model, out, None, 5_000_000_000)?;
    Ok(())
}

impl InitSpec {
    fn check(&self, problems: &mut Vec<Problem>) {
        for (key, v) in [
            ("init.hidden", &self.hidden),
            ("init.layers", &self.layers),
            ("init.heads", &self.heads),
            ("init.kv_heads", &self.kv_heads),
            ("init.ffn", &self.ffn),
            ("init.vocab", &self.vocab),
        ] {
            at_least(problems, key, v, 1);
        }
        positive(problems, "init.rope_theta", &self.rope_theta);
        if let Some(std) = &self.embedding_std {
            positive(problems, "init.embedding_std", std);
        }
        let tokens = crate::model::formats::tokenizer::builtin_vocab_size();
        if (self.vocab.value as usize) < tokens {
            problems.push(
                Problem::new(format!(
                    "`init.vocab` must be at least {tokens} (the built-in tokenizer's size), got {}",
                    self.vocab.value
                ))
                .at(self.vocab.span.clone(), "too small"),
            );
        }
        let (heads, kv_heads, hidden) = (self.heads.value, self.kv_heads.value, self.hidden.value);
        if kv_heads > 0 && !heads.is_multiple_of(kv_heads) {
            problems.push(
                Problem::new(format!(
                    "`init.heads` ({heads}) must be a multiple of `init.kv_heads` ({kv_heads})"
                ))
                .at(self.kv_heads.span.clone(), "does not divide heads"),
            );
        }
        let head_dim = match &self.head_dim {
            Some(h) => h.value,
            None if heads > 0 && !hidden.is_multiple_of(heads) => {
                problems.push(
                    Problem::new(format!(
                        "`init.hidden` ({hidden}) is not a multiple of `init.heads` ({heads}); set `init.head_dim`"
                    ))
                    .at(self.hidden.span.clone(), "not divisible"),
                );
                return;
            }
            None => hidden / heads.max(1),
        };
        if !head_dim.is_multiple_of(2) {
            let span = self
                .head_dim
                .as_ref()
                .map_or(self.hidden.span.clone(), |h| h.span.clone());
            problems.push(
                Problem::new(format!(
                    "the head size ({head_dim}) must be even for rotary embeddings"
                ))
                .at(span, "odd head size"),
            );
        }
    }
}

impl BaseParams {
    /// The model's config.json, when its shape is known without running:
    /// from `init` or the folder.
    pub fn model_config(&self) -> Option<Result<crate::model::ModelConfig, Problem>> {
        if let Some(init) = &self.init {
            // The seed does not change the shape.
            let spec = init.model_spec(self.dtype.value, 0);
            return Some(spec.model_config().map_err(|e| {
                Problem::new(e.to_string()).at(init.hidden.span.clone(), "this shape")
            }));
        }
        // A model that could not be read was reported when checked.
        self.loaded.clone().map(Ok)
    }
}

impl Kind for Base {
    type Params = BaseParams;

    fn name(&self) -> &'static str {
        "base"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Model
    }
    fn role(&self) -> Role {
        Role::Source
    }
    fn summary(&self) -> &'static str {
        "the base model: a Hugging Face folder (`path`) or a seeded random model (`init`)"
    }

    fn prepare(&self, p: &mut BaseParams, ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        match (&p.path, &p.init) {
            (Some(path), Some(_)) => problems.push(
                Problem::new(format!("stage `{}` sets both `path` and `init`", ctx.stage))
                    .at(path.span.clone(), "load this folder")
                    .help("keep `path` to load a model, or `init` to make one"),
            ),
            (None, None) => problems.push(
                Problem::new(format!("stage `{}` needs `path` or `init`", ctx.stage))
                    .at(ctx.stage_start(), "this stage")
                    .help("path = \"models/my-model\" (a Hugging Face folder) or init = { hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 512 }"),
            ),
            _ => {}
        }
        if let Some(init) = &p.init {
            init.check(&mut problems);
            // A shape no machine holds (2^40 parameters and more) is
            // refused here, before `plan` or `run` allocates anything.
            if problems.is_empty() {
                if let Some(Err(problem)) = p.model_config() {
                    problems.push(problem);
                }
            }
        }
        let mut loaded = None;
        if let Some(path) = &p.path {
            let folder = ctx.resolve(path);
            let config = folder.join("config.json");
            let read = match is_gguf(&path.value) {
                true => Some(check_gguf(&folder).map(|(config, bits)| {
                    p.stored_bits = Some(bits);
                    config
                })),
                false if config.is_file() => {
                    Some(crate::model::ModelConfig::from_file(&config).inspect(|c| {
                        // An FP8 checkpoint's projections are held in their own blocks.
                        p.stored_bits = c
                            .fp8
                            .map(|s| crate::model::kernels::fp8::bits_per_weight(s.block));
                    }))
                }
                false => None,
            };
            match read {
                Some(Ok(config)) => loaded = Some(config),
                // A family or setting this program cannot compute is refused
                // before anything runs, at the stage that names the model.
                Some(Err(e)) => problems.push(
                    Problem::new(format!("stage `{}`: {e}", ctx.stage))
                        .at(path.span.clone(), "this model"),
                ),
                None => problems.push(
                    Problem::new(format!(
                        "no model folder at {} (expected config.json there)",
                        folder.display()
                    ))
                    .at(path.span.clone(), "model folder"),
                ),
            }
        }
        p.loaded = loaded;
        if problems.is_empty() {
            p.resolved = p.path.as_ref().map(|path| {
                let folder = ctx.resolve(path);
                folder.canonicalize().unwrap_or(folder)
            });
        }
        problems
    }

    fn key_params(&self, p: &BaseParams) -> serde_json::Value {
        let mut key = match &p.resolved {
            Some(resolved) => key_with_path(p, resolved),
            None => serde_json::to_value(p).expect("parameters serialize to JSON"),
        };
        // "none" is the default for a folder (left out of its key), but on
        // a GGUF it asks for something else than the default: dense weights.
        if p.dequantizes_gguf() {
            key["quantize"] = serde_json::json!("none");
        }
        key
    }

    /// A model made by `init` is shared; one read from a file or folder is
    /// not: every machine needs that file to plan (it is in the key), and
    /// the artifact is a copy of it or a reference to it.
    fn shared(&self, p: &BaseParams) -> bool {
        p.init.is_some()
    }

    fn plan_note(&self, p: &BaseParams) -> Option<String> {
        if p.dequantizes_gguf() {
            return Some("the GGUF's blocks dequantised once, to f32, when this stage runs".into());
        }
        if p.gguf() && no_quantize(&p.quantize) {
            return Some(
                "projections kept in the GGUF's own blocks, dequantised per product".into(),
            );
        }
        let fp8 = p.loaded.as_ref().and_then(|c| c.fp8);
        if let (Some(scheme), true) = (fp8, no_quantize(&p.quantize)) {
            let [rows, cols] = scheme.block;
            return Some(format!(
                "projections kept in the checkpoint's FP8 codes ({}, an f32 scale per {rows} × {cols} block), dequantised per product",
                scheme.format.torch_name()
            ));
        }
        let q = p.quantize.as_ref()?.value.quantization()?;
        Some(format!(
            "projections held {} by the stages that load it ({})",
            q.name(),
            q.describe()
        ))
    }

    /// `init` makes the model and serializes it (one copy more); a GGUF
    /// with `quantize = "none"` is dequantised to f32 and written the same
    /// way. Other bases only reference their files.
    fn plan_memory(
        &self,
        p: &BaseParams,
        _stage: StageView<'_>,
        _on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        let dtype = match (&p.init, p.dequantizes_gguf()) {
            (Some(_), _) => super::inputs::dtype(p.dtype.value),
            (None, true) => candle_core::DType::F32,
            (None, false) => return None,
        };
        let config = p.model_config()?.ok()?;
        Some(crate::model::memory::model_estimate(&config, dtype, 1.0))
    }

    fn answer(&self, p: &BaseParams, ask: &mut Ask<'_>) {
        ask.give::<ModelShape>(|| p.model_config())
            .give::<HeldAs>(|| p.quantize.as_ref().and_then(|q| q.value.quantization()))
            .give::<StoredBits>(|| match no_quantize(&p.quantize) && !p.dequantizes_gguf() {
                true => p.stored_bits,
                false => None,
            });
    }

    fn files(&self, p: &BaseParams, _recipe_dir: &std::path::Path) -> Vec<FileInput> {
        match (&p.path, &p.resolved) {
            (Some(written), Some(resolved)) => {
                vec![resolved_input("path", written, resolved.clone())]
            }
            _ => Vec::new(),
        }
    }

    fn run(&self, params: &BaseParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let quantize = params
            .quantize
            .as_ref()
            .and_then(|q| q.value.quantization());
        super::inputs::write_quantization(&ctx.out_dir, quantize)?;
        match (&params.resolved, &params.init) {
            (Some(file), _) if file.is_file() => {
                gguf_artifact(file, &ctx.out_dir)?;
                if params.dequantizes_gguf() {
                    ctx.progress
                        .log("dequantising the GGUF's blocks once, to f32");
                    dequantize_gguf(&ctx.out_dir)?;
                }
                Ok(())
            }
            (Some(folder), _) => {
                // Referenced, not copied: the artifact records where the model is.
                let source = serde_json::json!({ "path": folder.display().to_string() });
                fsutil::write_atomic(
                    &ctx.out_dir.join(crate::cache::SOURCE_FILE),
                    serde_json::to_string_pretty(&source)?.as_bytes(),
                )?;
                Ok(())
            }
            (None, Some(init)) => {
                crate::model::init::init_model(
                    &init.model_spec(params.dtype.value, ctx.seed),
                    &ctx.out_dir,
                )?;
                Ok(())
            }
            (None, None) => unreachable!("checked when parsing"),
        }
    }
}
