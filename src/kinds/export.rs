//! `export`: copy an artifact out of the cache into a folder other tools
//! read (a PEFT adapter folder, a Hugging Face model folder).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{key_with_path, stage_ref};
use crate::cache::{self, payload_dir};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::fsutil;
use crate::model::error::ModelError;
use crate::model::formats::gguf::GGUF_FILE;
use crate::model::formats::gguf_out::{
    modelfile, write_lora_adapter, write_model_gguf, GgufType, ModelfileFrom,
};
use crate::stage::{ArtifactKind, Kind, ParseContext, Role, RunContext, StageRef, StageView};

pub struct Export;

const EXPORTABLE: &[ArtifactKind] = &[
    ArtifactKind::Model,
    ArtifactKind::Adapter,
    ArtifactKind::Evaluation,
];

/// `[stages.<name>]` with `kind = "export"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// The stage whose artifact to export.
    pub from: Sp<String>,
    /// Destination folder, relative to the recipe; replaced as a whole.
    pub path: Sp<String>,
    /// Also write GGUF there, for llama.cpp, ollama and LM Studio, with an
    /// ollama Modelfile: "lora" for an adapter stage (a llama.cpp LoRA
    /// adapter on the model it was trained on), or a model stage's number
    /// format: "f16", "bf16", "f32", "q8_0", "q4_k" or "base" (the blocks
    /// of the GGUF it descends from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<Sp<String>>,
    #[serde(skip)]
    #[schemars(skip)]
    destination: PathBuf,
}

/// Copy `from` (a folder) to `to`, replacing `to` whole: the copy is made
/// beside it and renamed into place, so `to` is never half-written.
pub fn export_folder(from: &Path, to: &Path) -> anyhow::Result<Vec<String>> {
    let parent = fsutil::parent_dir(to);
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".runner-export-")
        .tempdir_in(parent)?;
    let mut copied = Vec::new();
    for file in cache::payload_files(from)? {
        let rel = file.strip_prefix(from)?;
        let dest = staging.path().join(rel);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(&file, &dest)?;
        fsutil::fsync_file(&dest)?;
        copied.push(rel.display().to_string());
    }
    let staged = staging.keep();
    fsutil::replace_dir(&staged, to)?;
    Ok(copied)
}

impl Kind for Export {
    type Params = ExportParams;

    fn name(&self) -> &'static str {
        "export"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Export
    }
    fn role(&self) -> Role {
        Role::Export
    }
    fn summary(&self) -> &'static str {
        "copy a stage's artifact to a folder outside the cache (PEFT or Hugging Face layout)"
    }

    fn prepare(&self, p: &mut ExportParams, ctx: &ParseContext) -> Vec<Problem> {
        p.destination = ctx.resolve(&p.path);
        match &p.gguf {
            Some(g) if wanted(&g.value).is_none() => vec![Problem::new(format!(
                "`gguf = {:?}` is not a GGUF export: \"lora\" (an adapter stage) or one of {}",
                g.value,
                GgufType::NAMES.join(", ")
            ))
            .at(g.span.clone(), "here")],
            _ => Vec::new(),
        }
    }

    fn check(&self, p: &ExportParams, stage: StageView<'_>) -> Vec<Problem> {
        let (Some(g), Some(from)) = (&p.gguf, stage.target("from")) else {
            return Vec::new();
        };
        let fits = matches!(
            (wanted(&g.value), from.kind().output()),
            (Some(GgufWanted::Adapter), ArtifactKind::Adapter)
                | (Some(GgufWanted::Model(_)), ArtifactKind::Model)
        );
        let dora = matches!(wanted(&g.value), Some(GgufWanted::Adapter))
            && crate::kinds::lineage::adapter_config(from).is_some_and(|spec| spec.dora.value);
        if dora {
            return vec![Problem::new(format!(
                "stage `{}` trains a DoRA adapter, which llama.cpp cannot load: its adapters add a low-rank product, and DoRA rescales the base weight's rows",
                p.from.value
            ))
            .at(g.span.clone(), "a llama.cpp LoRA adapter")
            .help("export a merge of it instead (`merge` stage, then `gguf = \"f16\"`); the PEFT export (no `gguf`) keeps DoRA")];
        }
        match fits {
            true => Vec::new(),
            false => vec![Problem::new(format!(
                "`gguf = {:?}` does not fit stage `{}`, which makes {}",
                g.value,
                p.from.value,
                match from.kind().output() {
                    ArtifactKind::Adapter => "an adapter: use \"lora\"",
                    ArtifactKind::Model => "a model: use a number format (f16, q8_0, q4_k, …)",
                    _ => "no model: GGUF is for models and adapters",
                }
            ))
            .at(g.span.clone(), "here")],
        }
    }

    fn plan_memory(
        &self,
        p: &ExportParams,
        stage: StageView<'_>,
        _on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        // Copying files streams them; only writing a model GGUF holds it.
        match wanted(&p.gguf.as_ref()?.value)? {
            GgufWanted::Model(ty) => gguf_memory(stage.target("from")?, ty),
            GgufWanted::Adapter => None,
        }
    }

    fn key_params(&self, p: &ExportParams) -> serde_json::Value {
        key_with_path(p, &p.destination)
    }

    fn refs(&self, p: &ExportParams) -> Vec<StageRef> {
        vec![stage_ref("from", &p.from, EXPORTABLE)]
    }

    /// The result is the folder written at `path`, on this machine.
    fn shared(&self, _p: &ExportParams) -> bool {
        false
    }

    fn outside_changed(&self, p: &ExportParams, artifact: &Path) -> Option<String> {
        let record: serde_json::Value = std::fs::read(artifact.join("export.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let missing = record["files"]
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str())
            .find(|f| !p.destination.join(f).is_file())?;
        Some(format!(
            "exported file missing: {}",
            p.destination.join(missing).display()
        ))
    }
    fn run(&self, params: &ExportParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let input = ctx.input("from")?;
        let from = payload_dir(&input.dir)?;
        let mut files = export_folder(&from, &params.destination)?;
        if let Some(g) = &params.gguf {
            let wanted = wanted(&g.value).expect("checked when parsing");
            let artifact = crate::fsutil::file_name(&input.dir);
            let written = write_gguf(
                ctx.cache,
                &artifact,
                &input.stage,
                &params.destination,
                wanted,
            )
            .map_err(|e| match e {
                GgufExportError::Usage(m) => anyhow::anyhow!(m),
                GgufExportError::Io { context, source } => source.context(context),
            })?;
            for warning in &written.warnings {
                ctx.progress.log(&format!("warning: {warning}"));
            }
            ctx.progress.log(&format!(
                "wrote {} ({})",
                written.file.display(),
                written.what
            ));
            files.extend(written.files);
        }
        ctx.progress.log(&format!(
            "exported `{}` to {}",
            input.stage,
            params.destination.display()
        ));
        let record = serde_json::json!({
            "path": params.destination.display().to_string(),
            "from": input.stage,
            "files": files,
        });
        fsutil::write_atomic(
            &ctx.out_dir.join("export.json"),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// The GGUF an export stage's `gguf` asks for.
fn wanted(value: &str) -> Option<GgufWanted> {
    match value {
        "lora" => Some(GgufWanted::Adapter),
        other => GgufType::parse(other).map(GgufWanted::Model),
    }
}

/// What GGUF an export writes beside the files: a llama.cpp LoRA adapter
/// (an adapter stage), or a model GGUF in a number format (a model stage).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GgufWanted {
    Adapter,
    Model(GgufType),
}

/// What `write_gguf` wrote.
pub struct GgufExport {
    pub file: PathBuf,
    /// One line saying what it is (format, tensors, size, what the blocks kept).
    pub what: String,
    /// What llama.cpp will compute differently, or a fine-tune the format lost.
    pub warnings: Vec<String>,
    /// The files written into the folder.
    pub files: Vec<String>,
}

/// Why it was not written: the model or the request (a usage error), or a
/// file that could not be read or written (the machine's).
#[derive(Debug)]
pub enum GgufExportError {
    Usage(String),
    Io {
        context: String,
        source: anyhow::Error,
    },
}

/// Peak memory of writing model stage `model` as a GGUF of `ty`: the model
/// as `write_model_gguf` loads it (dense in its stored dtype, a GGUF base's
/// projections in their blocks) and what it writes.
pub fn gguf_memory(model: StageView<'_>, ty: GgufType) -> Option<crate::units::MemoryEstimate> {
    let config = super::lineage::model_config(model)?.ok()?;
    let stored = super::lineage::stored_bits(model);
    let dtype = super::inputs::planned_dtype(None, &config);
    let weights = crate::model::memory::weights_bytes(&config, dtype, None, stored);
    Some(crate::model::memory::gguf_export_estimate(
        &config,
        weights,
        ty.bits_per_weight(stored),
    ))
}

/// The GGUF file a model artifact descends from through its `model`
/// inputs (a merge's base, the base itself), if any.
fn gguf_ancestor(cache: &cache::Cache, artifact: &str) -> std::io::Result<Option<PathBuf>> {
    let mut current = artifact.to_string();
    // A lineage is short; the bound only guards against a cyclic manifest.
    for _ in 0..64 {
        let file = payload_dir(&cache.artifact_dir(&current))?.join(GGUF_FILE);
        if file.is_file() {
            return Ok(Some(file));
        }
        match cache.parent(&current, "model") {
            Some(p) => current = p.artifact,
            None => return Ok(None),
        }
    }
    Ok(None)
}

/// Writes `stage`'s cached `artifact` as GGUF into `dir`: adapter.gguf (a
/// llama.cpp LoRA adapter on the model it was trained on) or model.gguf,
/// and an ollama Modelfile beside it.
pub fn write_gguf(
    cache: &cache::Cache,
    artifact: &str,
    stage: &str,
    dir: &Path,
    wanted: GgufWanted,
) -> Result<GgufExport, GgufExportError> {
    let io = |what: String| {
        move |e: std::io::Error| GgufExportError::Io {
            context: what,
            source: e.into(),
        }
    };
    // What the model cannot be written as is the request's fault; a file
    // that cannot be read or written is not.
    let bad = |what: &str| {
        let what = what.to_string();
        move |e: ModelError| match e {
            ModelError::Io { .. } => GgufExportError::Io {
                context: format!("writing `{stage}` as {what}"),
                source: e.into(),
            },
            e => GgufExportError::Usage(format!("`{stage}` as {what}: {e}")),
        }
    };
    let from = payload_dir(&cache.artifact_dir(artifact))
        .map_err(io(format!("the artifact of `{stage}`")))?;
    let is_adapter = from.join("adapter_config.json").is_file();
    let (file, what, text, warnings) = match wanted {
        GgufWanted::Adapter if is_adapter => {
            let parent = cache
                .parent(artifact, "model")
                .ok_or_else(|| GgufExportError::Usage(format!("`{stage}` has no `model` input")))?;
            let model = payload_dir(&cache.artifact_dir(&parent.artifact))
                .map_err(io(format!("the model `{stage}` was trained on", )))?;
            let out = dir.join("adapter.gguf");
            write_lora_adapter(&model, &from, &out).map_err(bad("a llama.cpp adapter"))?;
            let text = modelfile(ModelfileFrom::BaseWithAdapter {
                model_dir: &model,
                adapter: "adapter.gguf",
            })
            .map_err(bad("an ollama Modelfile"))?;
            (out, "llama.cpp LoRA adapter".to_string(), text, Vec::new())
        }
        GgufWanted::Model(ty) if !is_adapter && from.join("config.json").is_file() => {
            let base = gguf_ancestor(cache, artifact)
                .map_err(io(format!("the manifests above `{stage}`")))?;
            let out = dir.join("model.gguf");
            let report = write_model_gguf(&from, &out, ty, base.as_deref(), stage)
                .map_err(bad("a GGUF model"))?;
            let formats: Vec<String> = report
                .formats
                .iter()
                .map(|(f, n)| format!("{n} {f}"))
                .collect();
            let mut warnings = report.warnings.clone();
            let mut what = format!(
                "{} model, {} tensors: {}; {:.1} MB; tokenizer: {}; rounding {:.2e} of the weights' RMS",
                ty.name(),
                report.tensors,
                formats.join(", "),
                report.bytes as f64 / 1e6,
                report.tokenizer,
                report.rel_rms_err,
            );
            if let Some(kept) = report.change_kept {
                what.push_str(&format!(
                    ", {:.0}% of the fine-tune's change to the base kept",
                    100.0 * kept
                ));
                if kept < 0.5 {
                    warnings.push(format!(
                        "{} keeps {:.0}% of what fine-tuning changed in the base's weights: the rest is rounded back to the base in {}; export f16 or q8_0, or scheme one's adapter on the base GGUF",
                        ty.name(),
                        100.0 * kept,
                        out.display()
                    ));
                }
            }
            let text = modelfile(ModelfileFrom::Gguf {
                model_dir: &from,
                file: "model.gguf",
            })
            .map_err(bad("an ollama Modelfile"))?;
            (out, what, text, warnings)
        }
        GgufWanted::Adapter if from.join("config.json").is_file() => {
            return Err(GgufExportError::Usage(format!(
                "`{stage}` is a model: its GGUF takes a number format (f16, q8_0, …), not \"lora\""
            )))
        }
        GgufWanted::Model(_) if is_adapter => {
            return Err(GgufExportError::Usage(format!(
                "`{stage}` is an adapter: its GGUF is a llama.cpp LoRA adapter (\"lora\"); a number format is for a model (export the merge stage for one)"
            )))
        }
        _ => {
            return Err(GgufExportError::Usage(format!(
                "`{stage}` is neither a model nor an adapter: no GGUF to write"
            )))
        }
    };
    let modelfile_path = dir.join("Modelfile");
    fsutil::write_atomic(&modelfile_path, text.as_bytes())
        .map_err(io(modelfile_path.display().to_string()))?;
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Ok(GgufExport {
        files: vec![name(&file), "Modelfile".into()],
        file,
        what,
        warnings,
    })
}
