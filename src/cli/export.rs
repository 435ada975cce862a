//! `runner export`: a cached artifact copied out in the layout other tools
//! read, and with `--gguf` in llama.cpp's.

use std::path::PathBuf;

use super::{Context, Error};
use crate::cache::{payload_dir, Cache, MANIFEST};
use crate::model::formats::gguf::GGUF_FILE;
use crate::model::formats::gguf_out::{
    modelfile, write_lora_adapter, write_model_gguf, GgufType, ModelfileFrom,
};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    stage: String,
    dir: PathBuf,
    /// Also write GGUF for llama.cpp, ollama and LM Studio, with an ollama
    /// Modelfile (ChatML TEMPLATE and stop token where the chat template is
    /// ChatML). An adapter stage (scheme one) becomes DIR/adapter.gguf, a
    /// llama.cpp LoRA adapter for its base (`llama-cli -m base.gguf --lora
    /// adapter.gguf`); a model stage (a merge, scheme two, or a base)
    /// becomes DIR/model.gguf. Llama, Mistral, Qwen2 and Qwen3 models.
    #[arg(long)]
    gguf: bool,
    /// Number format of model.gguf's matrices: f32, f16 (the default),
    /// bf16, q8_0, q4_k (q5_0 where a row is not a multiple of 256), or
    /// base: each tensor in the block format of the GGUF the model descends
    /// from. 4-bit blocks can round a fine-tune's small change to the
    /// weights away (re-quantized onto SmolLM2's own Q4_1 grid, a merge
    /// lost most of SFT's gain; q8_0 kept it), so the export says how much
    /// of the fine-tune's change the written blocks keep, and warns under
    /// half.
    #[arg(long, requires = "gguf", value_parser = parse_gguf_type)]
    gguf_type: Option<GgufType>,
}

fn parse_gguf_type(s: &str) -> Result<GgufType, String> {
    GgufType::parse(s).ok_or_else(|| format!("one of {}", GgufType::NAMES.join(", ")))
}

pub fn export(ctx: &Context, args: &ExportArgs) -> Result<(), Error> {
    let (stage, dir) = (&args.stage, &args.dir);
    let (_, cache, artifact) = ctx.cached_artifact(&args.recipe, stage)?;
    let from = payload_dir(&cache.artifact_dir(&artifact))
        .map_err(Error::io(format!("artifact of `{stage}`")))?;
    let files = crate::kinds::export::export_folder(&from, dir).map_err(Error::environment(
        format!("exporting `{stage}` to {}", dir.display()),
    ))?;
    eprintln!(
        "exported `{stage}` ({} files) to {}",
        files.len(),
        dir.display()
    );
    if !args.gguf {
        return Ok(());
    }
    // What the model cannot be written as is the command's fault (exit 2);
    // a file that cannot be read or written is not (exit 3).
    let bad = |what: &str| {
        let what = what.to_string();
        move |e: crate::model::error::ModelError| match e {
            crate::model::error::ModelError::Io { .. } => Error::Environment {
                context: format!("writing `{stage}` as {what}"),
                source: e.into(),
            },
            e => Error::Usage(format!("`{stage}` as {what}: {e}")),
        }
    };
    let written = if from.join("adapter_config.json").is_file() {
        if args.gguf_type.is_some() {
            return Err(Error::Usage(format!(
                "`{stage}` is an adapter: --gguf-type sets the number format of a model GGUF (export the merge stage for one)"
            )));
        }
        let model = parent(&cache, &artifact, "model")
            .map_err(Error::io(format!("the manifest of `{stage}`")))?
            .ok_or_else(|| Error::Usage(format!("`{stage}` has no `model` input")))?;
        let out = dir.join("adapter.gguf");
        write_lora_adapter(&model, &from, &out).map_err(bad("a llama.cpp adapter"))?;
        let text = modelfile(ModelfileFrom::BaseWithAdapter {
            model_dir: &model,
            adapter: "adapter.gguf",
        })
        .map_err(bad("an ollama Modelfile"))?;
        (out, "llama.cpp LoRA adapter".to_string(), text)
    } else if from.join("config.json").is_file() {
        let base = gguf_ancestor(&cache, &artifact)
            .map_err(Error::io(format!("the manifests above `{stage}`")))?;
        let ty = args.gguf_type.unwrap_or(GgufType::F16);
        let out = dir.join("model.gguf");
        let report = write_model_gguf(&from, &out, ty, base.as_deref(), stage)
            .map_err(bad("a GGUF model"))?;
        let formats: Vec<String> = report
            .formats
            .iter()
            .map(|(f, n)| format!("{n} {f}"))
            .collect();
        for warning in &report.warnings {
            eprintln!("warning: {warning}");
        }
        let text = modelfile(ModelfileFrom::Gguf {
            model_dir: &from,
            file: "model.gguf",
        })
        .map_err(bad("an ollama Modelfile"))?;
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
                eprintln!(
                    "warning: {} keeps {:.0}% of what fine-tuning changed in the base's weights: the rest is rounded back to the base in {}; export f16 or q8_0, or scheme one's adapter on the base GGUF",
                    ty.name(),
                    100.0 * kept,
                    out.display()
                );
            }
        }
        (out, what, text)
    } else {
        return Err(Error::Usage(format!(
            "`{stage}` is neither a model nor an adapter: --gguf has nothing to write"
        )));
    };
    let (out, what, text) = written;
    crate::fsutil::write_atomic(&dir.join("Modelfile"), text.as_bytes())
        .map_err(Error::io(format!("{}", dir.join("Modelfile").display())))?;
    eprintln!("wrote {} ({what}) and an ollama Modelfile", out.display());
    Ok(())
}

/// The payload folder of an artifact's parent through `field` (its
/// manifest's `parents`); None when it has none.
fn parent(cache: &Cache, artifact: &str, field: &str) -> std::io::Result<Option<PathBuf>> {
    parent_artifact(cache, artifact, field)?
        .map(|p| payload_dir(&cache.artifact_dir(&p)))
        .transpose()
}

fn parent_artifact(cache: &Cache, artifact: &str, field: &str) -> std::io::Result<Option<String>> {
    let manifest = cache.artifact_dir(artifact).join(MANIFEST);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(json["parents"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["field"] == field))
        .and_then(|p| p["artifact"].as_str())
        .map(str::to_string))
}

/// The GGUF file a model artifact descends from through its `model`
/// inputs (a merge's base, the base itself), if any.
fn gguf_ancestor(cache: &Cache, artifact: &str) -> std::io::Result<Option<PathBuf>> {
    let mut current = artifact.to_string();
    // A lineage is short; the bound only guards against a cyclic manifest.
    for _ in 0..64 {
        let file = payload_dir(&cache.artifact_dir(&current))?.join(GGUF_FILE);
        if file.is_file() {
            return Ok(Some(file));
        }
        match parent_artifact(cache, &current, "model")? {
            Some(p) => current = p,
            None => return Ok(None),
        }
    }
    Ok(None)
}
