//! `sft`: supervised fine-tuning of a LoRA adapter on prompt/completion data.

use serde::{Deserialize, Serialize};

use std::path::Path;

use super::lineage::AdapterMade;
use super::lora::{check_written_adapter_or_lora, lora_use};
use super::memory::MicroBatch;
use super::params::{DataSpec, LoraSpec, TrainSpec};
use super::{inputs, model_refs, training};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::stage::{
    ArtifactKind, Ask, Dtype, FileInput, Kind, Objective, ParseContext, Role, RunContext, StageRef,
    StageView,
};

pub struct Sft;

/// `[stages.<name>]` with `kind = "sft"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SftParams {
    /// The model stage to train on.
    pub model: Sp<String>,
    /// Continue this adapter stage's adapter instead of making a new one.
    #[serde(default)]
    pub adapter: Option<Sp<String>>,
    /// A new adapter's configuration.
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// JSONL files: {"prompt","completion"} or {"messages"} rows.
    #[serde(default)]
    pub data: Option<DataSpec>,
    #[serde(default)]
    pub train: TrainSpec,
    /// Compute dtype; the recipe's default when left out.
    #[serde(default)]
    pub dtype: Option<Sp<Dtype>>,
}

impl SftParams {
    /// A micro-batch: its rows, and no reference model.
    fn micro_batch(&self) -> MicroBatch {
        MicroBatch {
            rows: self.train.batch.value as usize,
            reference: false,
        }
    }
}

impl Kind for Sft {
    type Params = SftParams;

    fn name(&self) -> &'static str {
        "sft"
    }
    // 2: the completion starts at the common token prefix (TRL 1.16).
    fn version(&self) -> u32 {
        2
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> Role {
        Role::Train(Objective::Sft)
    }
    fn summary(&self) -> &'static str {
        "supervised fine-tuning of a LoRA adapter (new, or continued with `adapter`)"
    }
    fn uses_device(&self) -> bool {
        true
    }

    fn check_written(&self, table: &toml::de::DeTable<'_>, ctx: &ParseContext) -> Vec<Problem> {
        check_written_adapter_or_lora(table, ctx.stage)
    }

    fn prepare(&self, p: &mut SftParams, ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        training::check_tables(&p.lora, &p.train, &p.data, &mut problems);
        training::fill_defaults(&p.adapter, &mut p.lora, &mut p.dtype, ctx);
        problems
    }

    fn plan_memory(
        &self,
        p: &SftParams,
        stage: StageView<'_>,
        on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        let batch = p.micro_batch();
        super::memory::estimate(stage, &p.train, &p.dtype, batch, on_gpu)
    }

    fn answer(&self, p: &SftParams, ask: &mut Ask<'_>) {
        if let Some(made) = lora_use(&p.adapter, &p.lora).made() {
            ask.give::<AdapterMade>(|| made);
        }
    }

    fn refs(&self, p: &SftParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, None)
    }

    fn files(&self, p: &SftParams, recipe_dir: &Path) -> Vec<FileInput> {
        training::data_files(&p.data, recipe_dir)
    }

    fn check(&self, p: &SftParams, stage: StageView<'_>) -> Vec<Problem> {
        training::check(
            stage,
            &p.data,
            lora_use(&p.adapter, &p.lora),
            stage.stage_start(),
        )
    }

    fn run(&self, p: &SftParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        crate::train::with_big_stack(|| run_sft(p, ctx))
    }
}

fn run_sft(p: &SftParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::sft::SftObjective;
    let s = training::start(ctx, &p.lora, &p.train, &p.data, &p.dtype, p.micro_batch())?;
    let tokens = |ctx: &mut RunContext, file: &Path| {
        inputs::sft_tokens(ctx, file, &s.tokenizer, &s.model_dir, &s.settings)
    };
    let train = tokens(ctx, &s.train_file)?;
    let eval = match &s.eval_file {
        Some(f) => Some(tokens(ctx, f)?),
        None => None,
    };
    let objective = SftObjective {
        train,
        eval,
        pad_id: s.tokenizer.pad_id(),
        device: s.device.clone(),
    };
    // Each adapter applies its own dropout rate (none at 0) in training mode.
    let settings = p.train.loop_settings(ctx.seed, true);
    training::train_and_save(ctx, &s, &objective, &settings)
}
