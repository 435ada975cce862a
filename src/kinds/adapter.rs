//! `adapter`: import a LoRA adapter trained elsewhere (a PEFT folder) so it
//! can be continued, merged or evaluated like one trained here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{file_input, key_json, parse_table, stage_ref, MODEL};
use crate::fsutil;
use crate::recipe::diag::Problem;
use crate::recipe::params::{LoraSpec, Targets};
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{
    ArtifactKind, FileInput, LoraUse, RunContext, StageKind, StageParams, StageRef,
};

pub struct Adapter;

/// `[stages.<name>]` with `kind = "adapter"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterParams {
    /// The model stage the adapter was trained on.
    pub model: Sp<String>,
    /// A PEFT folder (adapter_config.json, adapter_model.safetensors), relative to the recipe.
    pub path: Sp<String>,
    #[serde(skip)]
    #[schemars(skip)]
    folder: PathBuf,
}

/// The files of a PEFT adapter folder that make up the adapter.
pub const PEFT_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// r, alpha, targets and rslora of a PEFT folder, read by the model code's
/// adapter_config.json parser; None when it cannot be read (the stage reports that when it runs).
pub fn read_peft_shape(folder: &std::path::Path) -> Option<LoraSpec> {
    use crate::model::lora::TargetModules;
    let lora = crate::model::peft::read_adapter_config(&folder.join("adapter_config.json"))
        .ok()?
        .lora;
    let targets = match lora.target_modules {
        TargetModules::List(l) => Targets::List(l),
        TargetModules::Regex(r) => Targets::Pattern(r),
        TargetModules::AllLinear => Targets::Pattern("all-linear".into()),
    };
    Some(LoraSpec {
        r: Sp::implicit(lora.r as u32),
        alpha: Sp::implicit(lora.alpha),
        dropout: Sp::implicit(lora.dropout),
        targets: Sp::implicit(targets),
        rslora: Sp::implicit(lora.use_rslora),
    })
}

impl StageParams for AdapterParams {
    fn key_params(&self) -> serde_json::Value {
        let mut v = key_json(self);
        v["path"] = serde_json::Value::String(self.folder.display().to_string());
        v
    }
    fn refs(&self) -> Vec<StageRef> {
        vec![stage_ref("model", &self.model, MODEL)]
    }
    fn files(&self) -> Vec<FileInput> {
        let mut f = file_input("path", &self.path, std::path::Path::new("/"));
        f.path = self.folder.clone();
        vec![f]
    }
    fn lora(&self) -> LoraUse<'_> {
        LoraUse::Imported(read_peft_shape(&self.folder))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl StageKind for Adapter {
    fn name(&self) -> &'static str {
        "adapter"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> crate::stage::Role {
        crate::stage::Role::Source
    }
    fn summary(&self) -> &'static str {
        "import an existing PEFT adapter folder trained on `model`"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let mut params: AdapterParams = parse_table(table, ctx, |p: &AdapterParams, problems| {
            let folder = ctx.resolve(&p.path);
            if !folder.join("adapter_config.json").is_file() {
                problems.push(
                    Problem::new(format!(
                        "no PEFT adapter at {} (expected adapter_config.json there)",
                        folder.display()
                    ))
                    .at(p.path.span.clone(), "adapter folder"),
                );
            }
        })?;
        let folder = ctx.resolve(&params.path);
        params.folder = folder.canonicalize().unwrap_or(folder);
        Ok(Box::new(params))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<AdapterParams>()
    }

    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let params = params
            .as_any()
            .downcast_ref::<AdapterParams>()
            .expect("adapter stage params");
        let model_dir = crate::train::inputs::model_dir(ctx.input("model")?)?;
        check_against_model(&params.folder, &model_dir)?;
        // Adapters are small: copy them, so the artifact stands on its own.
        for name in PEFT_FILES {
            let from = params.folder.join(name);
            let bytes = std::fs::read(&from)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", from.display()))?;
            fsutil::write_atomic(&ctx.out_dir.join(name), &bytes)?;
        }
        Ok(())
    }
}

/// Check a PEFT folder against the model it is applied to, from config.json
/// and the safetensors header alone (no weights are read): supported
/// settings, targets that exist, and every tensor present with its shape.
pub fn check_against_model(
    adapter: &std::path::Path,
    model_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::model::config::ModelConfig;
    use crate::model::lora::peft_tensor_name;
    let config = ModelConfig::from_dir(model_dir)?;
    let peft = crate::model::peft::read_adapter_config(&adapter.join("adapter_config.json"))?;
    let targets = peft
        .lora
        .resolve(&config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", adapter.join("adapter_config.json").display()))?;
    anyhow::ensure!(
        !targets.is_empty(),
        "{}: target_modules match no module of the model in {}",
        adapter.join("adapter_config.json").display(),
        model_dir.display()
    );
    let weights = adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", weights.display()))?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", weights.display()))?;
    let shapes: std::collections::HashMap<String, Vec<usize>> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect();
    for t in &targets {
        let projection = t.module.rsplit('.').next().unwrap_or_default();
        let (out_f, in_f) = config
            .projection_shape(projection)
            .ok_or_else(|| anyhow::anyhow!("unknown projection `{projection}`"))?;
        for (which, want) in [('A', vec![t.r, in_f]), ('B', vec![out_f, t.r])] {
            let name = peft_tensor_name(&t.module, which);
            match shapes.get(&name) {
                None => anyhow::bail!("{}: missing tensor `{name}`", weights.display()),
                Some(got) if *got != want => anyhow::bail!(
                    "{}: tensor `{name}` has shape {got:?}, but the model in {} needs {want:?}",
                    weights.display(),
                    model_dir.display()
                ),
                Some(_) => {}
            }
        }
    }
    Ok(())
}
