//! What a training or evaluation stage loads from its inputs: the model
//! folder, its tokenizer, and tokenized data (a derived artifact shared by
//! every stage and recipe that reads the same file with the same tokenizer
//! and settings).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::params::{DataSpec, TrainSpec};
use crate::data::{self, DatasetKind, DpoDataset, ModelTokenizer, SftDataset, TokenizeSettings};
use crate::model::decoder::{Decoder, LoadOptions};
use crate::model::kernels::quantized::Quantization;
use crate::stage::{Dtype, InputArtifact, RunContext};

/// The Hugging Face folder behind a model artifact (a `base` stage refers to its folder).
pub fn model_dir(input: &InputArtifact) -> anyhow::Result<PathBuf> {
    Ok(crate::cache::payload_dir(&input.dir)?)
}

/// A model artifact as the stages that load it see it: its folder and how
/// its projections are held.
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub dir: PathBuf,
    pub quantize: Option<Quantization>,
}

impl ModelSource {
    /// The same folder held dense: what quantization is measured against.
    pub fn dense(&self) -> ModelSource {
        ModelSource {
            dir: self.dir.clone(),
            quantize: None,
        }
    }
}

/// The file in a model artifact that says how loading stages hold it
/// (absent: dense). Artifacts made before it existed have none.
pub const QUANTIZATION_FILE: &str = "quantization.json";

pub fn write_quantization(artifact: &Path, quantize: Option<Quantization>) -> anyhow::Result<()> {
    if let Some(q) = quantize {
        let json = serde_json::json!({ "quantize": q });
        crate::fsutil::write_atomic(
            &artifact.join(QUANTIZATION_FILE),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// How the stages that load the model artifact at `artifact` hold it.
pub fn quantization(artifact: &Path) -> anyhow::Result<Option<Quantization>> {
    let path = artifact.join(QUANTIZATION_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(
        serde_json::from_value(json["quantize"].clone())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    ))
}

/// How an adapter names the model it was trained on, the same on every
/// machine (artifacts must not hold a machine's paths): a loaded model by
/// its folder's or file's name, one the recipe made (`init`, a merge) as
/// `<recipe>/<stage>`. The exact model is the manifest's parent artifact.
pub fn model_name(input: &InputArtifact) -> String {
    let loaded = input.manifest["params"]["path"]
        .as_str()
        .and_then(|p| std::path::Path::new(p).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    loaded.unwrap_or_else(|| {
        let recipe = input.manifest["recipe_name"].as_str().unwrap_or("recipe");
        format!("{recipe}/{}", input.stage)
    })
}

pub fn model_source(input: &InputArtifact) -> anyhow::Result<ModelSource> {
    Ok(ModelSource {
        dir: model_dir(input)?,
        quantize: quantization(&input.dir)?,
    })
}

/// The dtype a stage will load its model in, known before running: the
/// stage's own `dtype`, else the model's config.json `torch_dtype`, else f32.
pub fn planned_dtype(written: Option<Dtype>, config: &crate::model::ModelConfig) -> DType {
    written.map(dtype).unwrap_or_else(|| {
        config
            .torch_dtype
            .as_deref()
            .and_then(crate::model::formats::weights::parse_torch_dtype)
            .unwrap_or(DType::F32)
    })
}

pub fn dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
    }
}

pub fn load_model(source: &ModelSource, dtype: DType, device: &Device) -> anyhow::Result<Decoder> {
    let options = LoadOptions {
        dtype: Some(dtype),
        device: device.clone(),
    };
    load_with(source, &options)
}

/// `source` loaded with `options` (a `dtype` of None keeps the folder's).
pub fn load_with(source: &ModelSource, options: &LoadOptions) -> anyhow::Result<Decoder> {
    Decoder::load_quantized(&source.dir, options, source.quantize)
        .map_err(|e| anyhow::anyhow!("loading model {}: {e}", source.dir.display()))
}

/// Load an adapter stage's artifact into `model` (trainable).
pub fn load_adapter(model: &mut Decoder, adapter: &InputArtifact) -> anyhow::Result<()> {
    crate::model::formats::peft::load_adapter(model, &adapter.dir)
        .map_err(|e| anyhow::anyhow!("loading adapter of stage `{}`: {e}", adapter.stage))?;
    Ok(())
}

pub fn load_tokenizer(model_dir: &Path) -> anyhow::Result<ModelTokenizer> {
    ModelTokenizer::load(&model_dir.join("tokenizer.json")).map_err(anyhow::Error::new)
}

/// Tokenization settings from a stage's `train` and `data` tables.
pub fn settings(train: &TrainSpec, data: &DataSpec) -> TokenizeSettings {
    let mut s = TokenizeSettings::new(train.seq_len.value as usize);
    s.overlong = train.overlong.value;
    s.bad_rows = train.bad_rows.value;
    s.chat_format = data.format.as_ref().map(|f| f.value.clone());
    s
}

/// Key of a tokenized dataset: the data file's hash, the tokenizer files'
/// hashes and the tokenization identity (template, settings, version).
fn tokens_key(
    ctx: &RunContext,
    kind: DatasetKind,
    file: &Path,
    tokenizer: &ModelTokenizer,
    model_dir: &Path,
    settings: &TokenizeSettings,
) -> anyhow::Result<String> {
    let identity =
        data::tokenization_identity(kind, settings, tokenizer).map_err(anyhow::Error::new)?;
    let hash = |p: &Path| -> anyhow::Result<String> {
        Ok(if p.exists() {
            ctx.cache.hasher.file(p)?
        } else {
            String::new()
        })
    };
    let key = serde_json::json!({
        // A new on-disk layout must never read an old one.
        "format": data::stored::FORMAT_VERSION,
        "identity": identity,
        "data": hash(file)?,
        "tokenizer": hash(&model_dir.join("tokenizer.json"))?,
        "tokenizer_config": hash(&model_dir.join("tokenizer_config.json"))?,
    });
    Ok(crate::hashing::derived_key(&key))
}

/// Tokenized SFT rows of `file`, from the cache or made now.
pub fn sft_tokens(
    ctx: &mut RunContext,
    file: &Path,
    tokenizer: &ModelTokenizer,
    model_dir: &Path,
    settings: &TokenizeSettings,
) -> anyhow::Result<SftDataset> {
    let key = tokens_key(ctx, DatasetKind::Sft, file, tokenizer, model_dir, settings)?;
    let dir = ctx.derived("tokens-sft", &key, |out| {
        let ds = data::load_sft(file, tokenizer, settings).map_err(anyhow::Error::new)?;
        ds.write(out).map_err(anyhow::Error::new)
    })?;
    let ds = SftDataset::read(&dir).map_err(anyhow::Error::new)?;
    report(ctx, file, &ds.report);
    Ok(ds)
}

/// Tokenized preference pairs of `file`, from the cache or made now, with
/// their key (what reference log-probs computed on them are keyed by).
pub fn dpo_tokens(
    ctx: &mut RunContext,
    file: &Path,
    tokenizer: &ModelTokenizer,
    model_dir: &Path,
    settings: &TokenizeSettings,
) -> anyhow::Result<(DpoDataset, String)> {
    let key = tokens_key(ctx, DatasetKind::Dpo, file, tokenizer, model_dir, settings)?;
    let dir = ctx.derived("tokens-dpo", &key, |out| {
        let ds = data::load_dpo(file, tokenizer, settings).map_err(anyhow::Error::new)?;
        ds.write(out).map_err(anyhow::Error::new)
    })?;
    let ds = DpoDataset::read(&dir).map_err(anyhow::Error::new)?;
    report(ctx, file, &ds.report);
    Ok((ds, key))
}

fn report(ctx: &mut RunContext, file: &Path, r: &data::DataReport) {
    let name = crate::fsutil::file_name(file);
    ctx.progress.log(&format!(
        "{name}: {} rows read, {} kept, {} truncated, {} dropped, {} skipped",
        r.read, r.kept, r.truncated, r.dropped, r.skipped
    ));
    if r.prompt_boundary_mismatches > 0 {
        ctx.progress.log(&format!(
            "{name}: in {} rows the prompt's tokens are not a prefix of prompt + completion \
             (a token merges across the boundary, or the template renders the prompt differently); \
             the completion starts where they diverge, as in TRL",
            r.prompt_boundary_mismatches
        ));
    }
    ctx.metrics.insert(
        format!("data/{name}"),
        serde_json::json!({
            "read": r.read,
            "kept": r.kept,
            "truncated": r.truncated,
            "dropped": r.dropped,
            "skipped": r.skipped,
            "prompt_boundary_mismatches": r.prompt_boundary_mismatches,
        }),
    );
}
