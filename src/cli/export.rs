//! `runner export`: a cached artifact copied out in the layout other tools
//! read, and with `--gguf` in llama.cpp's.

use std::path::PathBuf;

use super::{Context, Error};
use crate::cache::payload_dir;
use crate::kinds::export::{write_gguf, GgufExportError, GgufWanted};
use crate::model::formats::gguf_out::GgufType;

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
    /// Write a model GGUF even when its estimated peak memory exceeds what
    /// this machine has (RUNNER_MACHINE_MEMORY sets the figure to check).
    #[arg(long)]
    ignore_memory_check: bool,
}

fn parse_gguf_type(s: &str) -> Result<GgufType, String> {
    GgufType::parse(s).ok_or_else(|| format!("one of {}", GgufType::NAMES.join(", ")))
}

pub fn export(ctx: &Context, args: &ExportArgs) -> Result<(), Error> {
    let (stage, dir) = (&args.stage, &args.dir);
    let (checked, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    let artifact = super::context::cached_in(&plan, &args.recipe, stage)?;
    let from = payload_dir(&cache.artifact_dir(&artifact))
        .map_err(Error::io(format!("artifact of `{stage}`")))?;
    // What GGUF is wanted is settled, and checked against the memory,
    // before anything is written.
    let wanted = match (args.gguf, args.gguf_type, from.join("adapter_config.json").is_file()) {
        (false, _, _) => None,
        (true, Some(_), true) => {
            return Err(Error::Usage(format!(
                "`{stage}` is an adapter: --gguf-type sets the number format of a model GGUF (export the merge stage for one)"
            )))
        }
        (true, _, true) => Some(GgufWanted::Adapter),
        (true, ty, false) => Some(GgufWanted::Model(ty.unwrap_or(GgufType::F16))),
    };
    if let Some(GgufWanted::Model(ty)) = wanted {
        let index = plan.by_name(stage).expect("cached_in found it").index;
        let view = crate::stage::StageView::new(&checked.recipe.stages, index);
        if let Some(estimate) = crate::kinds::export::gguf_memory(view, ty) {
            check_memory(stage, &estimate, args.ignore_memory_check)?;
        }
    }
    let files = crate::kinds::export::export_folder(&from, dir).map_err(Error::environment(
        format!("exporting `{stage}` to {}", dir.display()),
    ))?;
    eprintln!(
        "exported `{stage}` ({} files) to {}",
        files.len(),
        dir.display()
    );
    let Some(wanted) = wanted else {
        return Ok(());
    };
    let written = write_gguf(&cache, &artifact, stage, dir, wanted).map_err(|e| match e {
        GgufExportError::Usage(m) => Error::Usage(m),
        GgufExportError::Io { context, source } => Error::Environment { context, source },
    })?;
    for warning in &written.warnings {
        eprintln!("warning: {warning}");
    }
    eprintln!(
        "wrote {} ({}) and an ollama Modelfile",
        written.file.display(),
        written.what
    );
    Ok(())
}

/// Writing `stage` as a model GGUF against this machine's memory: refused
/// (exit 2) when it cannot fit, unless `ignore`; warned of near the limit.
fn check_memory(
    stage: &str,
    estimate: &crate::units::MemoryEstimate,
    ignore: bool,
) -> Result<(), Error> {
    use crate::plan::memory_check::{fit, fit_help, Fit};
    use crate::units::{human_bytes, ByteDigits};
    let Some(available) = crate::machine::memory().map_err(Error::Usage)? else {
        return Ok(());
    };
    let b = |n: u64| human_bytes(n, ByteDigits::ThreeSignificant);
    let say = format!(
        "writing `{stage}` as GGUF needs {} and this machine has {} ({})",
        estimate.describe(),
        b(available.bytes),
        available.what
    );
    match fit(estimate.estimate_bytes, &available) {
        Fit::Over if !ignore => Err(Error::Usage(format!("{say}\nhelp: {}", fit_help("export")))),
        Fit::Over => {
            eprintln!("warning (--ignore-memory-check): {say}");
            Ok(())
        }
        Fit::Near => {
            eprintln!("warning: {say}: it may not fit beside other processes");
            Ok(())
        }
        Fit::Fits => Ok(()),
    }
}
