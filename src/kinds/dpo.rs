//! `dpo`: direct preference optimisation of a LoRA adapter, either
//! continuing the SFT adapter (scheme one) or a fresh adapter on a merged
//! model (scheme two).

use serde::{Deserialize, Serialize};

use super::lora::{check_written_adapter_or_lora, lora_use};
use super::params::{DataSpec, DpoSpec, LoraSpec, TrainSpec};
use super::{inputs, model_refs, training};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::stage::{
    ArtifactKind, Dtype, FileInput, Kind, Objective, ParseContext, Role, RunContext, StageRef,
    StageView,
};

pub struct Dpo;

/// What `reference` says in metrics, `plan` and `compare` for a reference-free loss.
pub const NO_REFERENCE: &str = "no reference";

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

impl Kind for Dpo {
    type Params = DpoParams;

    fn name(&self) -> &'static str {
        "dpo"
    }
    // 2: common token prefix; exact loss gradients; the loss family.
    fn version(&self) -> u32 {
        2
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> Role {
        Role::Train(Objective::Dpo)
    }
    fn summary(&self) -> &'static str {
        "preference optimisation: continue an adapter (`adapter`) or train a new one (`lora`)"
    }
    fn uses_device(&self) -> bool {
        true
    }

    fn check_written(&self, table: &toml::de::DeTable<'_>, ctx: &ParseContext) -> Vec<Problem> {
        check_written_adapter_or_lora(table, ctx.stage)
    }

    fn prepare(&self, p: &mut DpoParams, ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        training::check_tables(&p.lora, &p.train, &p.data, &mut problems);
        p.dpo.check(&mut problems);
        let loss = p.dpo.loss();
        if let Some(r) = p.reference.as_ref().filter(|_| !loss.needs_reference()) {
            problems.push(
                Problem::new(format!(
                    "stage `{}`: loss {} uses no reference model, but `reference` is set",
                    ctx.stage,
                    loss_label(&loss)
                ))
                .at(r.span.clone(), "not used by this loss")
                .help("remove `reference`, or add a loss that compares with it"),
            );
        }
        p.recipe_dir = ctx.recipe_dir.to_path_buf();
        p.span = ctx.stage_start();
        training::fill_defaults(&p.adapter, &mut p.lora, &mut p.dtype, ctx);
        problems
    }

    fn plan_memory(
        &self,
        stage: StageView<'_>,
        on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        super::memory::estimate(stage, on_gpu)
    }

    fn plan_note(&self, p: &DpoParams) -> Option<String> {
        let loss = p.dpo.loss();
        (!loss.needs_reference()).then(|| format!("loss {}: {NO_REFERENCE}", loss_label(&loss)))
    }

    fn refs(&self, p: &DpoParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, Some(&p.reference))
    }

    fn files(&self, p: &DpoParams) -> Vec<FileInput> {
        training::data_files(&p.data, &p.recipe_dir)
    }

    fn check(&self, p: &DpoParams, stage: StageView<'_>) -> Vec<Problem> {
        training::check(
            stage,
            &p.data,
            lora_use(&p.adapter, &p.lora),
            p.span.clone(),
        )
    }

    fn run(&self, p: &DpoParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        crate::train::with_big_stack(|| run_dpo(p, ctx))
    }
}

/// "sigmoid", or "sigmoid + 0.2·sft" for a weighted sum.
pub fn loss_label(loss: &crate::train::preference_loss::PreferenceLoss) -> String {
    let terms: Vec<String> = loss
        .terms
        .iter()
        .map(|(t, w)| {
            if *w == 1.0 {
                t.name().to_string()
            } else {
                format!("{w}·{}", t.name())
            }
        })
        .collect();
    terms.join(" + ")
}

/// Folders of the reference policy: a model, and an adapter applied to it (or none).
#[derive(Debug)]
pub struct ReferenceSpec {
    pub model: inputs::ModelSource,
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
    let (model, adapter) = match ctx.inputs.get("reference") {
        Some(r) if r.output == ArtifactKind::Model => (r.clone(), None),
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
                output: ArtifactKind::Model,
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
        model: inputs::model_source(&model)?,
        model_artifact: artifact_name(&model.dir),
        description: match &adapter {
            Some(a) => format!("{} + adapter `{}` (frozen)", model.stage, a.stage),
            None => model.stage.clone(),
        },
        adapter: adapter.map(|a| (a.dir.clone(), artifact_name(&a.dir))),
    })
}

/// Reference log-probs of the pairs `wanted` of `data` (no graph), kept in
/// a grow-only derived folder keyed by the reference's artifacts and the
/// tokenized data's key: a resumed or longer run computes only the pairs it
/// has not seen, and Ctrl-C keeps the batches already done.
#[allow(clippy::too_many_arguments)]
pub fn reference_scores(
    ctx: &mut RunContext,
    reference: &ReferenceSpec,
    data: &crate::data::DpoDataset,
    data_id: &str,
    wanted: &[usize],
    dtype: candle_core::DType,
    device: &candle_core::Device,
    pad_id: u32,
) -> anyhow::Result<crate::train::dpo::PairScores> {
    use crate::train::dpo;
    let key = serde_json::json!({
        // 2: grown pair by pair (files of pair indices and scores).
        "version": 2,
        "model": reference.model_artifact,
        "adapter": reference.adapter.as_ref().map(|a| &a.1),
        "data": data_id,
        "dtype": format!("{dtype:?}"),
        "device": format!("{:?}", device.location()),
    });
    let key = crate::hashing::derived_key(&key);
    let dir = ctx.derived_growing("reference-logps", &key)?;
    let _lock = ctx
        .cache
        .lock_stage(&format!("derived-reference-logps-{key}"), |_| {})?;
    let load = || -> anyhow::Result<crate::model::decoder::Decoder> {
        let mut model = inputs::load_model(&reference.model, dtype, device)?;
        if let Some((adapter, _)) = &reference.adapter {
            crate::model::formats::peft::load_adapter(&mut model, adapter)?;
        }
        Ok(model)
    };
    let (scores, count) = dpo::score_pairs_into(
        load,
        data,
        wanted,
        &dir,
        pad_id,
        device,
        ctx.progress,
        ctx.interrupt,
    )?;
    ctx.progress.log(&format!(
        "reference log-probs ({}): {} pairs computed, {} reused, of {} in the file",
        reference.description,
        count.computed,
        count.reused,
        data.examples.len()
    ));
    for (what, n) in [("computed", count.computed), ("reused", count.reused)] {
        let name = format!("reference/pairs_{what}");
        let total = ctx.metrics.get(&name).and_then(|v| v.as_u64()).unwrap_or(0);
        ctx.metrics.insert(name, (total + n as u64).into());
    }
    Ok(scores)
}

fn run_dpo(p: &DpoParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::dpo::DpoObjective;
    let data = p.data.as_ref().expect("checked when parsing");
    let device = crate::device::candle(&ctx.device)?;
    let dtype = inputs::dtype(p.dtype.as_ref().map_or(Dtype::F32, |d| d.value));
    let (model, model_dir) = training::policy(ctx, &p.lora, &p.train, dtype, &device)?;
    let memory = training::memory_estimate(&model, &p.train, super::memory::dpo_step(p));
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
    let loss = p.dpo.loss();
    let loop_settings = p
        .train
        .loop_settings(ctx.seed, !p.dpo.disable_dropout.value);
    let (train_reference, eval, reference) = if loss.needs_reference() {
        let reference = reference_spec(ctx)?;
        // Only the pairs training will visit, in its seeded order.
        let draws = loop_settings.steps * loop_settings.grad_accum * loop_settings.batch as u64;
        let visited = crate::train::order::visited(ctx.seed, train.examples.len(), draws);
        let train_scores = reference_scores(
            ctx, &reference, &train, &train_key, &visited, dtype, &device, pad_id,
        )?;
        let eval = match eval {
            Some((e, key)) => {
                let all: Vec<usize> = (0..e.examples.len()).collect();
                let scores =
                    reference_scores(ctx, &reference, &e, &key, &all, dtype, &device, pad_id)?;
                Some((e, Some(scores)))
            }
            None => None,
        };
        (Some(train_scores), eval, reference.description)
    } else {
        ctx.progress
            .log("no reference: the loss compares the policy with itself only");
        (None, eval.map(|(e, _)| (e, None)), NO_REFERENCE.to_string())
    };
    let objective = DpoObjective {
        train,
        train_reference,
        eval,
        loss,
        pad_id,
        device: device.clone(),
    };
    ctx.metrics.insert("reference".into(), reference.into());
    training::train_and_save(ctx, &model, &model_dir, &objective, &loop_settings, memory)
}
