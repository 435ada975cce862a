//! `merge`: fold an adapter into its model (W' = W + s·B·A in f32, cast once)
//! and save the result as a new model.

use serde::{Deserialize, Serialize};

use super::lora::{check_adapter_model, check_written_adapter_or_lora};
use super::{inputs, model_refs};
use crate::diag::checks::at_least;
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::stage::{
    ArtifactKind, Dtype, Kind, ParseContext, Role, RunContext, StageRef, StageView,
};

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
}

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

    fn refs(&self, p: &MergeParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, None)
    }

    fn check(&self, _p: &MergeParams, stage: StageView<'_>) -> Vec<Problem> {
        let mut problems = Vec::new();
        check_adapter_model(stage, &mut problems);
        problems
    }

    fn run(&self, p: &MergeParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let model_dir = inputs::model_dir(ctx.input("model")?)?;
        let adapter = ctx.input("adapter")?;
        // W' = W + s·B·A in f32, cast once to the saved dtype (the base's unless `dtype` says).
        let options = crate::model::decoder::LoadOptions {
            dtype: p.dtype.as_ref().map(|d| inputs::dtype(d.value)),
            device: candle_core::Device::Cpu,
        };
        let mut model = crate::model::decoder::Decoder::load(&model_dir, &options)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", model_dir.display()))?;
        inputs::load_adapter(&mut model, adapter)?;
        let merged = crate::model::merge::merge_lora(&model)?;
        crate::model::merge::save_model_folder(
            &merged,
            &ctx.out_dir,
            Some(&model_dir),
            p.shard_bytes.value,
        )?;
        Ok(())
    }
}
