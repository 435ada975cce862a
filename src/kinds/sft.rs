//! `sft`: supervised fine-tuning of a LoRA adapter on prompt/completion data.

use serde::{Deserialize, Serialize};

use super::{file_input, key_json, parse_table, stage_ref, ADAPTER, MODEL};
use crate::recipe::diag::Problem;
use crate::recipe::params::{DataSpec, Dtype, LoraSpec, TrainSpec};
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{
    ArtifactKind, FileInput, LoraUse, RunContext, StageKind, StageParams, StageRef,
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
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) recipe_dir: std::path::PathBuf,
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) span: std::ops::Range<usize>,
}

/// Shared by the training kinds: data files as stage inputs.
pub(crate) fn data_files(data: &Option<DataSpec>, dir: &std::path::Path) -> Vec<FileInput> {
    let Some(data) = data else { return Vec::new() };
    let mut files = vec![file_input("data.train", &data.train, dir)];
    if let Some(eval) = &data.eval {
        files.push(file_input("data.eval", eval, dir));
    }
    files
}

/// Shared by the training kinds: LoRA use from `adapter`/`lora`.
pub(crate) fn lora_use<'a>(
    adapter: &Option<Sp<String>>,
    lora: &'a Option<LoraSpec>,
) -> LoraUse<'a> {
    match (adapter, lora) {
        (Some(_), constraint) => LoraUse::Continue {
            constraint: constraint.as_ref(),
        },
        (None, Some(spec)) => LoraUse::New(spec),
        (None, None) => LoraUse::None,
    }
}

impl SftParams {
    /// A stage that neither continues an adapter nor declares one gets the default LoRA.
    fn fill_defaults(&mut self, ctx: &ParseContext) {
        if self.adapter.is_none() && self.lora.is_none() {
            self.lora = Some(toml::from_str("").expect("LoRA defaults"));
        }
        if self.dtype.is_none() {
            self.dtype = Some(Sp::implicit(ctx.header.dtype.value));
        }
    }
}

impl StageParams for SftParams {
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

impl StageKind for Sft {
    fn name(&self) -> &'static str {
        "sft"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> crate::stage::Role {
        crate::stage::Role::Train(crate::stage::Objective::Sft)
    }
    fn summary(&self) -> &'static str {
        "supervised fine-tuning of a LoRA adapter (new, or continued with `adapter`)"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let span = table.span();
        let mut p: SftParams = parse_table(table, ctx, |p: &SftParams, problems| {
            if let Some(l) = &p.lora {
                l.check(problems);
            }
            p.train.check(problems);
            if let Some(d) = &p.data {
                d.check(problems);
            }
        })?;
        p.recipe_dir = ctx.recipe_dir.to_path_buf();
        p.span = span.start..span.start;
        p.fill_defaults(ctx);
        Ok(Box::new(p))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<SftParams>()
    }

    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let p = params
            .as_any()
            .downcast_ref::<SftParams>()
            .expect("sft stage params");
        crate::train::with_big_stack(|| run_sft(p, ctx))
    }
}

/// The LoRA config of the model code from a recipe's `lora` table.
pub(crate) fn lora_config(spec: &LoraSpec) -> crate::model::lora::LoraConfig {
    use crate::model::lora::TargetModules;
    use crate::recipe::params::Targets;
    let targets = match &spec.targets.value {
        Targets::List(l) => TargetModules::List(l.clone()),
        Targets::Pattern(p) if p == "all-linear" => TargetModules::AllLinear,
        Targets::Pattern(p) => TargetModules::Regex(p.clone()),
    };
    let mut config =
        crate::model::lora::LoraConfig::new(spec.r.value as usize, spec.alpha.value, targets);
    config.dropout = spec.dropout.value;
    config.use_rslora = spec.rslora.value;
    config
}

/// The policy model: the `model` input with a new adapter, or with the `adapter` input loaded trainable.
pub(crate) fn policy(
    ctx: &RunContext,
    lora: &Option<LoraSpec>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> anyhow::Result<(crate::model::decoder::Decoder, std::path::PathBuf)> {
    use crate::train::inputs;
    let model_dir = inputs::model_dir(ctx.input("model")?)?;
    let mut model = inputs::load_model(&model_dir, dtype, device)?;
    match (ctx.inputs.get("adapter"), lora) {
        (Some(adapter), _) => {
            crate::model::peft::load_adapter(&mut model, &adapter.dir).map_err(|e| {
                anyhow::anyhow!("loading adapter of stage `{}`: {e}", adapter.stage)
            })?;
        }
        (None, Some(spec)) => model.apply_lora(&lora_config(spec), ctx.seed)?,
        (None, None) => anyhow::bail!("stage `{}` has neither `adapter` nor `lora`", ctx.stage),
    }
    Ok((model, model_dir))
}

fn run_sft(p: &SftParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::{inputs, sft::SftObjective, trainer};
    let data = p.data.as_ref().expect("checked when parsing");
    let device = crate::device::candle(&ctx.device)?;
    let dtype = inputs::dtype(p.dtype.as_ref().map_or(Dtype::F32, |d| d.value));
    let (model, model_dir) = policy(ctx, &p.lora, dtype, &device)?;
    let tokenizer = inputs::load_tokenizer(&model_dir)?;
    let settings = inputs::settings(&p.train, data);
    let train_file = ctx.files["data.train"].clone();
    let train = inputs::sft_tokens(ctx, &train_file, &tokenizer, &model_dir, &settings)?;
    let eval = match ctx.files.get("data.eval").cloned() {
        Some(f) => Some(inputs::sft_tokens(
            ctx, &f, &tokenizer, &model_dir, &settings,
        )?),
        None => None,
    };
    let objective = SftObjective {
        train,
        eval,
        pad_id: tokenizer.pad_id(),
        device: device.clone(),
    };
    // Each adapter applies its own dropout rate (none at 0) in training mode.
    let dropout = true;
    let before = trainer::Objective::evaluate(&objective, &model)?;
    let settings = trainer::LoopSettings {
        train: &p.train,
        seed: ctx.seed,
        dropout,
    };
    let metrics = trainer::train(&model, &objective, &settings, ctx)?;
    crate::model::peft::save_adapter(&model, &ctx.out_dir, &model_dir.display().to_string())?;
    for (k, v) in before {
        ctx.metrics.insert(format!("before/{k}"), v.into());
    }
    for (k, v) in metrics {
        ctx.metrics.insert(k, v.into());
    }
    Ok(())
}
