//! `dpo`: direct preference optimisation of a LoRA adapter, either
//! continuing the SFT adapter (scheme one) or a fresh adapter on a merged
//! model (scheme two).

use serde::{Deserialize, Serialize};

use super::sft::{data_files, lora_use};
use super::{key_json, parse_table, stage_ref, ADAPTER, MODEL, MODEL_OR_ADAPTER};
use crate::recipe::diag::Problem;
use crate::recipe::params::{DataSpec, DpoSpec, Dtype, LoraSpec, TrainSpec};
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{
    ArtifactKind, FileInput, LoraUse, RunContext, StageKind, StageParams, StageRef,
};

pub struct Dpo;

/// `[stages.<name>]` with `kind = "dpo"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoParams {
    /// The model stage to train on.
    pub model: Sp<String>,
    /// Continue this adapter (scheme one). The reference is then model + this adapter, frozen.
    #[serde(default)]
    pub adapter: Option<Sp<String>>,
    /// A new adapter's configuration (scheme two: on a merged model).
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// The reference policy: a model stage, or an adapter stage (its model + adapter).
    /// Defaults to the policy's starting point.
    #[serde(default)]
    pub reference: Option<Sp<String>>,
    /// JSONL files of {"prompt","chosen","rejected"} rows.
    #[serde(default)]
    pub data: Option<DataSpec>,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub dpo: DpoSpec,
    #[serde(default)]
    pub dtype: Option<Sp<Dtype>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) recipe_dir: std::path::PathBuf,
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) span: std::ops::Range<usize>,
}

impl StageParams for DpoParams {
    fn uses_device(&self) -> bool {
        true
    }
    fn key_params(&self) -> serde_json::Value {
        key_json(self)
    }
    fn refs(&self) -> Vec<StageRef> {
        let mut refs = vec![stage_ref("model", &self.model, MODEL)];
        if let Some(a) = &self.adapter {
            refs.push(stage_ref("adapter", a, ADAPTER));
        }
        if let Some(r) = &self.reference {
            refs.push(stage_ref("reference", r, MODEL_OR_ADAPTER));
        }
        refs
    }
    fn files(&self) -> Vec<FileInput> {
        data_files(&self.data, &self.recipe_dir)
    }
    fn lora(&self) -> LoraUse<'_> {
        lora_use(&self.adapter, &self.lora)
    }
    fn missing_data(&self) -> Option<std::ops::Range<usize>> {
        self.data.is_none().then(|| self.span.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl StageKind for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> crate::stage::Role {
        crate::stage::Role::Train(crate::stage::Objective::Dpo)
    }
    fn summary(&self) -> &'static str {
        "preference optimisation: continue an adapter (`adapter`) or train a new one (`lora`)"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let span = table.span();
        let mut p: DpoParams = parse_table(table, ctx, |p: &DpoParams, problems| {
            if let Some(l) = &p.lora {
                l.check(problems);
            }
            p.train.check(problems);
            if let Some(d) = &p.data {
                d.check(problems);
            }
            p.dpo.check(problems);
        })?;
        p.recipe_dir = ctx.recipe_dir.to_path_buf();
        p.span = span.start..span.start;
        if p.adapter.is_none() && p.lora.is_none() {
            p.lora = Some(toml::from_str("").expect("LoRA defaults"));
        }
        if p.dtype.is_none() {
            p.dtype = Some(Sp::implicit(ctx.header.dtype.value));
        }
        Ok(Box::new(p))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<DpoParams>()
    }

    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let p = params
            .as_any()
            .downcast_ref::<DpoParams>()
            .expect("dpo stage params");
        crate::train::with_big_stack(|| run_dpo(p, ctx))
    }
}

/// Folders of the reference policy: a model, and an adapter applied to it (or none).
#[derive(Debug)]
pub struct ReferenceSpec {
    pub model: std::path::PathBuf,
    /// Artifact hash of the model, for the derived cache key.
    pub model_artifact: String,
    pub adapter: Option<(std::path::PathBuf, String)>,
    pub description: String,
}

fn artifact_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The reference policy of a DPO stage: `reference` when given; otherwise
/// the policy's starting point: model + the continued adapter (scheme one),
/// or the model alone when a fresh adapter is trained (scheme two).
pub fn reference_spec(ctx: &RunContext) -> anyhow::Result<ReferenceSpec> {
    use crate::train::inputs::model_dir;
    let (model, adapter) = match ctx.inputs.get("reference") {
        Some(r) if r.kind == "base" || r.kind == "merge" => (r.clone(), None),
        Some(r) => {
            // An adapter stage: its own model, from its manifest's lineage.
            let parent = r.manifest["parents"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["field"] == "model"))
                .ok_or_else(|| anyhow::anyhow!("reference `{}` records no model", r.stage))?;
            let artifact = parent["artifact"].as_str().unwrap_or_default();
            let model_artifact = crate::stage::InputArtifact {
                stage: parent["stage"].as_str().unwrap_or("model").to_string(),
                kind: "model".into(),
                key: String::new(),
                dir: ctx.cache.artifact_dir(artifact),
                manifest: serde_json::Value::Null,
            };
            (model_artifact, Some(r.clone()))
        }
        None => (
            ctx.input("model")?.clone(),
            ctx.inputs.get("adapter").cloned(),
        ),
    };
    Ok(ReferenceSpec {
        model: model_dir(&model)?,
        model_artifact: artifact_name(&model.dir),
        description: match &adapter {
            Some(a) => format!("{} + adapter `{}` (frozen)", model.stage, a.stage),
            None => model.stage.clone(),
        },
        adapter: adapter.map(|a| (a.dir.clone(), artifact_name(&a.dir))),
    })
}

/// Reference log-probs of `data`, computed once (no graph) and cached as a
/// derived artifact keyed by the reference's artifacts and the tokenized data's key.
pub fn reference_scores(
    ctx: &mut RunContext,
    reference: &ReferenceSpec,
    data: &crate::data::DpoDataset,
    data_id: &str,
    dtype: candle_core::DType,
    device: &candle_core::Device,
    pad_id: u32,
) -> anyhow::Result<crate::train::dpo::PairScores> {
    use crate::train::{dpo, inputs};
    let key = serde_json::json!({
        "version": 1,
        "model": reference.model_artifact,
        "adapter": reference.adapter.as_ref().map(|a| &a.1),
        "data": data_id,
        "dtype": format!("{dtype:?}"),
        "device": format!("{:?}", device.location()),
    });
    let key = blake3::hash(crate::plan::canonical_json(&key).as_bytes()).to_hex()[..32].to_string();
    ctx.progress
        .log(&format!("reference log-probs: {}", reference.description));
    let dir = ctx.derived("reference-logps", &key, |out| {
        let mut model = inputs::load_model(&reference.model, dtype, device)?;
        if let Some((adapter, _)) = &reference.adapter {
            crate::model::peft::load_adapter(&mut model, adapter)?;
        }
        dpo::score_pairs(&model, data, pad_id, device)?.save(&out.join("scores.safetensors"))
    })?;
    dpo::PairScores::load(&dir.join("scores.safetensors"))
}

fn run_dpo(p: &DpoParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::{dpo::DpoObjective, inputs, trainer};
    let data = p.data.as_ref().expect("checked when parsing");
    let device = crate::device::candle(&ctx.device)?;
    let dtype = inputs::dtype(p.dtype.as_ref().map_or(Dtype::F32, |d| d.value));
    let (model, model_dir) = super::sft::policy(ctx, &p.lora, dtype, &device)?;
    let tokenizer = inputs::load_tokenizer(&model_dir)?;
    let pad_id = tokenizer.pad_id();
    let settings = inputs::settings(&p.train, data);
    let train_file = ctx.files["data.train"].clone();
    let (train, train_key) =
        inputs::dpo_tokens(ctx, &train_file, &tokenizer, &model_dir, &settings)?;
    let eval = match ctx.files.get("data.eval").cloned() {
        Some(f) => Some(inputs::dpo_tokens(
            ctx, &f, &tokenizer, &model_dir, &settings,
        )?),
        None => None,
    };
    let reference = reference_spec(ctx)?;
    let train_reference =
        reference_scores(ctx, &reference, &train, &train_key, dtype, &device, pad_id)?;
    let eval = match eval {
        Some((e, key)) => {
            let scores = reference_scores(ctx, &reference, &e, &key, dtype, &device, pad_id)?;
            Some((e, scores))
        }
        None => None,
    };
    let objective = DpoObjective {
        train,
        train_reference,
        eval,
        spec: p.dpo.clone(),
        pad_id,
        device: device.clone(),
    };
    let before = trainer::Objective::evaluate(&objective, &model)?;
    let settings = trainer::LoopSettings {
        train: &p.train,
        seed: ctx.seed,
        dropout: !p.dpo.disable_dropout.value,
    };
    let metrics = trainer::train(&model, &objective, &settings, ctx)?;
    crate::model::peft::save_adapter(&model, &ctx.out_dir, &model_dir.display().to_string())?;
    ctx.metrics
        .insert("reference".into(), reference.description.into());
    for (k, v) in before {
        ctx.metrics.insert(format!("before/{k}"), v.into());
    }
    for (k, v) in metrics {
        ctx.metrics.insert(k, v.into());
    }
    Ok(())
}
