//! `dpo`: direct preference optimisation of a LoRA adapter, either
//! continuing the SFT adapter (scheme one) or a fresh adapter on a merged
//! model (scheme two).

use serde::{Deserialize, Serialize};

use std::path::Path;

use super::lineage::AdapterMade;
use super::lora::{check_written_adapter_or_lora, lora_use};
use super::memory::MicroBatch;
use super::params::{DataSpec, DpoSpec, LoraSpec, TrainSpec};
use super::reference::{reference_scores, reference_spec};
use super::{inputs, model_refs, training};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::stage::{
    ArtifactKind, Ask, Dtype, FileInput, Kind, Objective, ParseContext, Role, RunContext, StageRef,
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
}

impl DpoParams {
    /// A micro-batch: chosen and rejected rows of each pair, and a reference
    /// model beside the policy when the loss needs one.
    fn micro_batch(&self) -> MicroBatch {
        MicroBatch {
            rows: 2 * self.train.batch.value as usize,
            reference: self.dpo.loss().needs_reference(),
        }
    }
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
        training::fill_defaults(&p.adapter, &mut p.lora, &mut p.dtype, ctx);
        problems
    }

    fn plan_memory(
        &self,
        p: &DpoParams,
        stage: StageView<'_>,
        on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        let batch = p.micro_batch();
        super::memory::estimate(stage, &p.train, &p.dtype, batch, on_gpu)
    }

    fn answer(&self, p: &DpoParams, ask: &mut Ask<'_>) {
        if let Some(made) = lora_use(&p.adapter, &p.lora).made() {
            ask.give::<AdapterMade>(|| made);
        }
    }

    fn plan_note(&self, p: &DpoParams) -> Option<String> {
        let loss = p.dpo.loss();
        (!loss.needs_reference()).then(|| format!("loss {}: {NO_REFERENCE}", loss_label(&loss)))
    }

    fn refs(&self, p: &DpoParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, Some(&p.reference))
    }

    fn files(&self, p: &DpoParams, recipe_dir: &Path) -> Vec<FileInput> {
        training::data_files(&p.data, recipe_dir)
    }

    fn check(&self, p: &DpoParams, stage: StageView<'_>) -> Vec<Problem> {
        training::check(
            stage,
            &p.data,
            lora_use(&p.adapter, &p.lora),
            stage.stage_start(),
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

fn run_dpo(p: &DpoParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::dpo::DpoObjective;
    let s = training::start(ctx, &p.lora, &p.train, &p.data, &p.dtype, p.micro_batch())?;
    let (dtype, device, pad_id) = (s.dtype, &s.device, s.tokenizer.pad_id());
    let tokens = |ctx: &mut RunContext, file: &Path| {
        inputs::dpo_tokens(ctx, file, &s.tokenizer, &s.model_dir, &s.settings)
    };
    let (train, train_key) = tokens(ctx, &s.train_file)?;
    let eval = match &s.eval_file {
        Some(f) => Some(tokens(ctx, f)?),
        None => None,
    };
    let loss = p.dpo.loss();
    let ld_alpha = p.dpo.ld_alpha();
    let loop_settings = p
        .train
        .loop_settings(ctx.seed, !p.dpo.disable_dropout.value);
    let (train_reference, eval, reference) = if loss.needs_reference() {
        let reference = reference_spec(ctx)?;
        // Only the pairs training will visit, in its seeded order.
        let draws = loop_settings.steps * loop_settings.grad_accum * loop_settings.batch as u64;
        let visited = crate::train::order::visited(ctx.seed, train.examples.len(), draws);
        let train_scores = reference_scores(
            ctx, &reference, &train, &train_key, &visited, dtype, device, pad_id, ld_alpha,
        )?;
        let eval = match eval {
            Some((e, key)) => {
                let all: Vec<usize> = (0..e.examples.len()).collect();
                let scores = reference_scores(
                    ctx, &reference, &e, &key, &all, dtype, device, pad_id, ld_alpha,
                )?;
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
        weighting: crate::train::dpo::PairWeighting {
            ld_alpha,
            wpo: p.dpo.use_weighting.value,
        },
        pad_id,
        device: device.clone(),
    };
    ctx.metrics.insert("reference".into(), reference.into());
    training::train_and_save(ctx, &s, &objective, &loop_settings)
}
