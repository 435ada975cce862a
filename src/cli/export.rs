//! `runner export`: a cached artifact copied out in the layout other tools read.

use std::path::PathBuf;

use super::{Context, Error};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    stage: String,
    dir: PathBuf,
    /// Also write an adapter stage's adapter as a llama.cpp LoRA GGUF
    /// (DIR/adapter.gguf: `llama-cli -m base.gguf --lora adapter.gguf`) and
    /// an ollama Modelfile (FROM the base, ADAPTER, a ChatML TEMPLATE), for
    /// llama, mistral, qwen2 and qwen3 models.
    #[arg(long)]
    gguf: bool,
}

pub fn export(ctx: &Context, args: &ExportArgs) -> Result<(), Error> {
    let (stage, dir) = (&args.stage, &args.dir);
    let (_, cache, artifact) = ctx.cached_artifact(&args.recipe, stage)?;
    let from = crate::cache::payload_dir(&cache.artifact_dir(&artifact))
        .map_err(Error::io(format!("artifact of `{stage}`")))?;
    let files = crate::kinds::export::export_folder(&from, dir).map_err(Error::environment(
        format!("exporting `{stage}` to {}", dir.display()),
    ))?;
    eprintln!(
        "exported `{stage}` ({} files) to {}",
        files.len(),
        dir.display()
    );
    if args.gguf {
        let model = model_of(&cache, &artifact)
            .map_err(Error::io(format!("the manifest of `{stage}`")))?
            .ok_or_else(|| {
                Error::Usage(format!(
                    "`{stage}` has no `model` input: --gguf exports an adapter stage's adapter"
                ))
            })?;
        let out = dir.join("adapter.gguf");
        crate::model::formats::gguf::write_lora_adapter(&model, &from, &out)
            .map_err(|e| Error::Usage(format!("`{stage}` as a llama.cpp adapter: {e}")))?;
        let modelfile = crate::model::formats::gguf::modelfile(&model, "adapter.gguf")
            .map_err(|e| Error::Usage(format!("an ollama Modelfile for `{stage}`: {e}")))?;
        crate::fsutil::write_atomic(&dir.join("Modelfile"), modelfile.as_bytes())
            .map_err(Error::io(format!("{}", dir.join("Modelfile").display())))?;
        eprintln!(
            "wrote {} (llama.cpp LoRA adapter) and an ollama Modelfile",
            out.display()
        );
    }
    Ok(())
}

/// The model folder an adapter artifact was trained on (its manifest's
/// `model` parent); None for a stage without one.
fn model_of(cache: &crate::cache::Cache, artifact: &str) -> std::io::Result<Option<PathBuf>> {
    let manifest = cache.artifact_dir(artifact).join(crate::cache::MANIFEST);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let parent = json["parents"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["field"] == "model"))
        .and_then(|p| p["artifact"].as_str());
    parent
        .map(|p| crate::cache::payload_dir(&cache.artifact_dir(p)))
        .transpose()
}
