//! `runner status` and `runner show`: what the cache and the queue know of a recipe.

use std::path::PathBuf;

use super::slurm::job_lines;
use super::{Context, Error};
use crate::plan;
use crate::plan::render;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    /// A stage of the recipe.
    stage: String,
    #[arg(long)]
    json: bool,
}

pub fn status(ctx: &Context, args: &StatusArgs) -> Result<(), Error> {
    let (checked, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    let jobs = job_lines(&cache, &plan);
    print!(
        "{}",
        render::status_text(&checked.recipe, &plan, &cache, &jobs)
    );
    Ok(())
}

pub fn show(ctx: &Context, args: &ShowArgs) -> Result<(), Error> {
    let stage = &args.stage;
    let (_, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    let planned = plan
        .by_name(stage)
        .ok_or_else(|| Error::no_stage(stage, &args.recipe))?;
    let job = job_lines(&cache, &plan).remove(stage);
    // A stage that has not finished but was submitted: where its job is.
    if let (Some(job), false) = (&job, matches!(planned.status, plan::Status::Cached { .. })) {
        println!(
            "stage     {stage} ({})\nstatus    {}\njob       {job}",
            planned.kind,
            planned.reason()
        );
        return Ok(());
    }
    let out = render::show(&cache, planned, args.json).map_err(|e| match e {
        render::ShowError::NotCached { .. } => Error::NotShown(e),
        render::ShowError::NoManifest(_) => {
            Error::environment(format!("cache {}", cache.root.display()))(e.into())
        }
    })?;
    println!("{out}");
    if let (Some(job), false) = (job, args.json) {
        println!("job       {job}");
    }
    Ok(())
}
