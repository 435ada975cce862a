//! `merge`: fold an adapter into its model (W' = W + s·B·A in f32, cast once)
//! and save the result as a new model.

use serde::{Deserialize, Serialize};

use super::{key_json, parse_table, stage_ref, ADAPTER, MODEL};
use crate::recipe::diag::Problem;
use crate::recipe::params::{at_least, Dtype};
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{ArtifactKind, RunContext, StageKind, StageParams, StageRef};

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

impl StageParams for MergeParams {
    fn key_params(&self) -> serde_json::Value {
        key_json(self)
    }
    fn refs(&self) -> Vec<StageRef> {
        let mut refs = vec![stage_ref("model", &self.model, MODEL)];
        if let Some(a) = &self.adapter {
            refs.push(stage_ref("adapter", a, ADAPTER));
        }
        refs
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl StageKind for Merge {
    fn name(&self) -> &'static str {
        "merge"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Model
    }
    fn role(&self) -> crate::stage::Role {
        crate::stage::Role::Merge
    }
    fn summary(&self) -> &'static str {
        "merge `adapter` into `model` and save the merged model"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let span = table.span();
        let p: MergeParams = parse_table(table, ctx, |p: &MergeParams, problems| {
            if p.adapter.is_none() {
                problems.push(
                    Problem::new(format!(
                        "merge stage `{}` has no `adapter` to merge",
                        ctx.stage
                    ))
                    .at(span.start..span.start, "this stage")
                    .help("add `adapter = \"<stage that trained it>\"`"),
                );
            }
            at_least(problems, "shard_bytes", &p.shard_bytes, 1 << 20);
        })?;
        Ok(Box::new(p))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<MergeParams>()
    }

    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        use crate::train::inputs;
        let p = params
            .as_any()
            .downcast_ref::<MergeParams>()
            .expect("merge stage params");
        let model_dir = inputs::model_dir(ctx.input("model")?)?;
        let adapter = ctx.input("adapter")?;
        // W' = W + s·B·A in f32, cast once to the saved dtype (the base's unless `dtype` says).
        let options = crate::model::decoder::LoadOptions {
            dtype: p.dtype.as_ref().map(|d| inputs::dtype(d.value)),
            device: candle_core::Device::Cpu,
        };
        let mut model = crate::model::decoder::Decoder::load(&model_dir, &options)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", model_dir.display()))?;
        crate::model::peft::load_adapter(&mut model, &adapter.dir)
            .map_err(|e| anyhow::anyhow!("loading adapter of stage `{}`: {e}", adapter.stage))?;
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
