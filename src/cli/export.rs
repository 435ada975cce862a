//! `runner export`: a cached artifact copied out in the layout other tools read.

use std::path::PathBuf;

use super::{Context, Error};

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    stage: String,
    dir: PathBuf,
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
    Ok(())
}
