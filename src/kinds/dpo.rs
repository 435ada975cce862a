//! `dpo`: direct preference optimisation of a LoRA adapter, either
//! continuing the SFT adapter (scheme one) or a fresh adapter on a merged
//! model (scheme two).

use serde::{Deserialize, Serialize};

use super::sft::{data_files, lora_use};
use super::{key_json, not_yet, parse_table, stage_ref, ADAPTER, MODEL, MODEL_OR_ADAPTER};
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

    fn run(&self, _params: &dyn StageParams, _ctx: &mut RunContext) -> anyhow::Result<()> {
        Err(not_yet("dpo"))
    }
}
