//! `adapter`: import a LoRA adapter trained elsewhere (a PEFT folder) so it
//! can be continued, merged or evaluated like one trained here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lineage::{AdapterMade, Made};
use super::params::{LoraSpec, Targets};
use super::{key_with_path, resolved_input, stage_ref, MODEL};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::fsutil;
use crate::stage::{ArtifactKind, Ask, FileInput, Kind, ParseContext, Role, RunContext, StageRef};

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

/// r, alpha, targets, rslora and dora of a PEFT folder, read by the model code's
/// adapter_config.json parser; None when it cannot be read (the stage reports that when it runs).
pub fn read_peft_shape(folder: &std::path::Path) -> Option<LoraSpec> {
    use crate::model::layers::lora::TargetModules;
    let lora =
        crate::model::formats::peft::read_adapter_config(&folder.join("adapter_config.json"))
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
        dora: Sp::implicit(lora.use_dora),
    })
}

impl AdapterParams {
    /// The PEFT folder, resolved.
    pub fn folder(&self) -> &std::path::Path {
        &self.folder
    }
}

impl Kind for Adapter {
    type Params = AdapterParams;

    fn name(&self) -> &'static str {
        "adapter"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> Role {
        Role::Source
    }
    fn summary(&self) -> &'static str {
        "import an existing PEFT adapter folder trained on `model`"
    }

    fn prepare(&self, p: &mut AdapterParams, ctx: &ParseContext) -> Vec<Problem> {
        let folder = ctx.resolve(&p.path);
        if !folder.join("adapter_config.json").is_file() {
            return vec![Problem::new(format!(
                "no PEFT adapter at {} (expected adapter_config.json there)",
                folder.display()
            ))
            .at(p.path.span.clone(), "adapter folder")];
        }
        p.folder = folder.canonicalize().unwrap_or(folder);
        Vec::new()
    }

    fn key_params(&self, p: &AdapterParams) -> serde_json::Value {
        key_with_path(p, &p.folder)
    }

    fn refs(&self, p: &AdapterParams) -> Vec<StageRef> {
        vec![stage_ref("model", &p.model, MODEL)]
    }

    fn files(&self, p: &AdapterParams, _recipe_dir: &std::path::Path) -> Vec<FileInput> {
        vec![resolved_input("path", &p.path, p.folder.clone())]
    }

    fn answer(&self, p: &AdapterParams, ask: &mut Ask<'_>) {
        ask.give::<AdapterMade>(|| Made::Own(read_peft_shape(p.folder())));
    }

    fn run(&self, params: &AdapterParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let model_dir = super::inputs::model_dir(ctx.input("model")?)?;
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
    use crate::model::layers::lora::peft_tensor_name;
    let config = ModelConfig::from_dir(model_dir)?;
    let peft =
        crate::model::formats::peft::read_adapter_config(&adapter.join("adapter_config.json"))?;
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
