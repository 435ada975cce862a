//! `eval`: losses, preference accuracy and samples for a model with or
//! without an adapter.

use serde::{Deserialize, Serialize};

use super::{
    file_input, key_json, not_yet, parse_table, stage_ref, ADAPTER, MODEL, MODEL_OR_ADAPTER,
};
use crate::recipe::diag::Problem;
use crate::recipe::params::Dtype;
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{ArtifactKind, FileInput, RunContext, StageKind, StageParams, StageRef};

pub struct Eval;

/// Data an evaluation reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalData {
    /// SFT-shaped rows: completion loss and perplexity.
    #[serde(default)]
    pub sft: Option<Sp<String>>,
    /// Preference rows: accuracy and margin against `reference`.
    #[serde(default)]
    pub dpo: Option<Sp<String>>,
}

/// `[stages.<name>]` with `kind = "eval"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    pub model: Sp<String>,
    #[serde(default)]
    pub adapter: Option<Sp<String>>,
    /// Reference for preference margins (a model or adapter stage).
    #[serde(default)]
    pub reference: Option<Sp<String>>,
    #[serde(default)]
    pub data: EvalData,
    /// Prompts to complete greedily.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: Sp<u32>,
    #[serde(default)]
    pub dtype: Option<Sp<Dtype>>,
    #[serde(skip)]
    #[schemars(skip)]
    recipe_dir: std::path::PathBuf,
}

fn default_new_tokens() -> Sp<u32> {
    Sp::implicit(32)
}

impl StageParams for EvalParams {
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
        let mut files = Vec::new();
        if let Some(f) = &self.data.sft {
            files.push(file_input("data.sft", f, &self.recipe_dir));
        }
        if let Some(f) = &self.data.dpo {
            files.push(file_input("data.dpo", f, &self.recipe_dir));
        }
        files
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl StageKind for Eval {
    fn name(&self) -> &'static str {
        "eval"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Evaluation
    }
    fn summary(&self) -> &'static str {
        "evaluate a model (with an optional adapter): losses, preference accuracy, samples"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let span = table.span();
        let mut p: EvalParams = parse_table(table, ctx, |p: &EvalParams, problems| {
            if p.data.sft.is_none() && p.data.dpo.is_none() && p.prompts.is_empty() {
                problems.push(
                    Problem::new(format!(
                        "eval stage `{}` has nothing to evaluate",
                        ctx.stage
                    ))
                    .at(span.start..span.start, "this stage")
                    .help("set `data.sft`, `data.dpo` or `prompts`"),
                );
            }
        })?;
        p.recipe_dir = ctx.recipe_dir.to_path_buf();
        if p.dtype.is_none() {
            p.dtype = Some(Sp::implicit(ctx.header.dtype.value));
        }
        Ok(Box::new(p))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<EvalParams>()
    }

    fn run(&self, _params: &dyn StageParams, _ctx: &mut RunContext) -> anyhow::Result<()> {
        Err(not_yet("eval"))
    }
}
