//! `merge`: fold an adapter into its model (W' = W + s·B·A in f32, cast once)
//! and save the result as a new model.

use serde::{Deserialize, Serialize};

use super::lineage::{HeldAs, StoredBits};
use super::lora::{check_adapter_model, check_written_adapter_or_lora};
use super::params::Quantize;
use super::{inputs, model_refs};
use crate::diag::checks::at_least;
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::model::decoder::{Decoder, LoadOptions};
use crate::model::merge::{merge_lora, save_model_folder};
use crate::stage::{
    ArtifactKind, Ask, Dtype, FileInput, Kind, ParseContext, Role, RunContext, StageRef, StageView,
};
use candle_core::{DType, Device};

pub struct Merge;

/// `[stages.<name>]` with `kind = "merge"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeParams {
    /// The model stage the adapter was trained on.
    pub model: Sp<String>,
    /// The adapter stage to fold in.
    #[serde(default)]
    pub adapter: Option<Sp<String>>,
    /// dtype of the saved model; the base model's when left out.
    #[serde(default)]
    pub dtype: Option<Sp<Dtype>>,
    /// Split the safetensors file above this many bytes.
    #[serde(default = "default_shard")]
    pub shard_bytes: Sp<u64>,
    /// How the stages that load the merged model hold its projections
    /// ("none", "q8_0", "q4_k", "fp8"); the `model` stage's way when left
    /// out. A quantized `model` is dequantised for the merge and the merged
    /// model saved dense in `dtype`; with "fp8" it is saved as an FP8
    /// checkpoint in transformers' fine-grained layout (128 × 128 blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Sp<Quantize>>,
    /// Held-out rows (SFT format, relative to the recipe) on which the
    /// merge's precision is measured: the KL of the merged model's
    /// next-token distributions from an f32 merge into the unquantized
    /// model (metrics `merge/kl...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Sp<String>>,
}

/// Rows of `eval` are cut (from the left of the prompt) to this many tokens.
const EVAL_SEQ_LEN: usize = 2048;

fn default_shard() -> Sp<u64> {
    Sp::implicit(5_000_000_000)
}

impl Kind for Merge {
    type Params = MergeParams;

    fn name(&self) -> &'static str {
        "merge"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Model
    }
    fn role(&self) -> Role {
        Role::Merge
    }
    fn summary(&self) -> &'static str {
        "merge `adapter` into `model` and save the merged model"
    }

    fn check_written(&self, table: &toml::de::DeTable<'_>, ctx: &ParseContext) -> Vec<Problem> {
        check_written_adapter_or_lora(table, ctx.stage)
    }

    fn prepare(&self, p: &mut MergeParams, ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        if p.adapter.is_none() {
            problems.push(
                Problem::new(format!(
                    "merge stage `{}` has no `adapter` to merge",
                    ctx.stage
                ))
                .at(ctx.stage_start(), "this stage")
                .help("add `adapter = \"<stage that trained it>\"`"),
            );
        }
        at_least(&mut problems, "shard_bytes", &p.shard_bytes, 1 << 20);
        problems
    }

    fn plan_note(&self, p: &MergeParams) -> Option<String> {
        let q = p.quantize.as_ref()?.value;
        Some(match q.quantization() {
            Some(q) => format!("merged model held {} by the stages that load it", q.name()),
            None => "merged model held dense by the stages that load it".into(),
        })
    }

    /// The model in the merge's dtype, the merged copy and the serialized
    /// one being written; when the merge's precision is measured (a
    /// quantized or GGUF model, or `eval` rows), an f32 merge into the
    /// dequantised model and the saved one reloaded in f32 beside them.
    fn plan_memory(
        &self,
        p: &MergeParams,
        stage: StageView<'_>,
        _on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        let config = super::lineage::model_config(stage.target("model")?)?.ok()?;
        let dtype = inputs::planned_dtype(p.dtype.as_ref().map(|d| d.value), &config);
        let model = stage.target("model")?;
        let measured = super::lineage::quantization(model).is_some()
            || super::lineage::stored_bits(model).is_some()
            || p.eval.is_some();
        let mut estimate = crate::model::memory::model_estimate(&config, dtype, 2.0);
        if measured {
            let f32_copies =
                crate::model::memory::model_estimate(&config, DType::F32, 1.0).weights_bytes * 2;
            estimate.copies_bytes += f32_copies;
            estimate.estimate_bytes += f32_copies;
        }
        Some(estimate)
    }

    fn answer(&self, p: &MergeParams, ask: &mut Ask<'_>) {
        ask.give::<StoredBits>(|| None);
        if let Some(q) = &p.quantize {
            ask.give::<HeldAs>(|| q.value.quantization());
        }
    }

    fn files(&self, p: &MergeParams, recipe_dir: &std::path::Path) -> Vec<FileInput> {
        p.eval
            .iter()
            .map(|f| super::file_input(super::input::MERGE_ROWS, f, recipe_dir))
            .collect()
    }

    fn refs(&self, p: &MergeParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, None)
    }

    fn check(&self, _p: &MergeParams, stage: StageView<'_>) -> Vec<Problem> {
        let mut problems = Vec::new();
        check_adapter_model(stage, &mut problems);
        problems
    }

    fn run(&self, p: &MergeParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let source = inputs::model_source(ctx.input("model")?)?;
        let adapter = ctx.input("adapter")?.clone();
        // W' = W + s·B·A in f32, cast once to the saved dtype (the base's
        // unless `dtype` says); a quantized W is dequantised first.
        let options = LoadOptions {
            dtype: p.dtype.as_ref().map(|d| inputs::dtype(d.value)),
            device: Device::Cpu,
        };
        let mut model = inputs::load_with(&source, &options)?;
        inputs::load_adapter(&mut model, &adapter)?;
        // An FP8 checkpoint's codes are a conversion, as a GGUF's blocks are.
        let stored_fp8 = model.config.fp8.is_some();
        let merged = merge_lora(&model)?;
        drop(model);
        let held = match &p.quantize {
            Some(q) => q.value.quantization(),
            None => source.quantize,
        };
        // Held as FP8: written as an FP8 checkpoint (transformers' layout),
        // which loading stages read as it is; otherwise dense.
        match held {
            Some(crate::model::kernels::quantized::Quantization::Fp8) => {
                crate::model::merge::save_fp8_model_folder(
                    &merged,
                    &ctx.out_dir,
                    Some(&source.dir),
                    p.shard_bytes.value,
                    crate::model::kernels::fp8::DEFAULT_BLOCK,
                )?
            }
            _ => save_model_folder(
                &merged,
                &ctx.out_dir,
                Some(&source.dir),
                p.shard_bytes.value,
            )?,
        }
        drop(merged);
        inputs::write_quantization(&ctx.out_dir, held)?;
        // A GGUF's blocks and an FP8 checkpoint's codes are a conversion
        // too: the merge is measured against an f32 merge into the
        // dequantised weights.
        let blocks = stored_fp8
            || source
                .dir
                .join(crate::model::formats::gguf::GGUF_FILE)
                .is_file();
        if source.quantize.is_none() && held.is_none() && p.eval.is_none() && !blocks {
            return Ok(());
        }
        // The precision each conversion costs, against an f32 merge into the
        // unquantized model: the saved weights, then as loading stages hold them.
        ctx.progress
            .log("measuring the merge's precision against an f32 merge");
        let f32_cpu =
            |source: &inputs::ModelSource| inputs::load_model(source, DType::F32, &Device::Cpu);
        let mut exact = f32_cpu(&source.dense())?;
        inputs::load_adapter(&mut exact, &adapter)?;
        let exact = merge_lora(&exact)?;
        let merged = inputs::ModelSource {
            dir: ctx.out_dir.clone(),
            quantize: held,
        };
        let mut compared = vec![("merge", f32_cpu(&merged.dense())?)];
        if held.is_some() {
            compared.push(("merge/loaded", f32_cpu(&merged)?));
        }
        let rows = match ctx.files.get(super::input::MERGE_ROWS).cloned() {
            Some(file) => {
                let tokenizer = inputs::load_tokenizer(&source.dir)?;
                let settings = crate::data::TokenizeSettings::new(EVAL_SEQ_LEN);
                let ds = inputs::sft_tokens(ctx, &file, &tokenizer, &source.dir, &settings)?;
                Some(ds.examples)
            }
            None => None,
        };
        for (prefix, model) in &compared {
            let (max_err, rel_rms) = weight_error(&exact, model)?;
            ctx.metrics
                .insert(format!("{prefix}/weight_max_abs_err"), max_err.into());
            ctx.metrics
                .insert(format!("{prefix}/weight_rel_rms_err"), rel_rms.into());
            if let Some(rows) = &rows {
                let d = crate::metrics::divergence::divergence(&exact, model, rows)?;
                ctx.metrics.insert(format!("{prefix}/kl"), d.mean_kl.into());
                ctx.metrics.insert(
                    format!("{prefix}/logits_max_abs_err"),
                    d.max_logit_error.into(),
                );
            }
        }
        Ok(())
    }
}

/// The largest |Δ| over every projection weight of `model` against
/// `exact`, and the root-mean-square Δ relative to the weights' own.
fn weight_error(exact: &Decoder, model: &Decoder) -> anyhow::Result<(f64, f64)> {
    let (mut max_err, mut sq_err, mut sq) = (0.0f64, 0.0f64, 0.0f64);
    for (e, m) in exact.linears().zip(model.linears()) {
        let e = e.weight.to_dense(DType::F64)?;
        let diff = (m.weight.to_dense(DType::F64)? - &e)?;
        max_err = max_err.max(diff.abs()?.max_all()?.to_scalar::<f64>()?);
        sq_err += diff.sqr()?.sum_all()?.to_scalar::<f64>()?;
        sq += e.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok((max_err, (sq_err / sq.max(f64::MIN_POSITIVE)).sqrt()))
}
