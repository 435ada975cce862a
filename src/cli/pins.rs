//! `runner pin`, `unpin` and `gc`: what the cache keeps.

use std::path::PathBuf;

use super::{Context, Error};
use crate::gc;

#[derive(clap::Args, Debug)]
pub struct PinArgs {
    recipe: PathBuf,
    stage: String,
}

#[derive(clap::Args, Debug)]
pub struct UnpinArgs {
    name: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Recipes whose stages (and their lineage) are kept.
    recipes: Vec<PathBuf>,
    /// Actually delete.
    #[arg(long)]
    delete: bool,
}

pub fn pin(ctx: &Context, args: &PinArgs) -> Result<(), Error> {
    let (checked, cache, artifact) = ctx.cached_artifact(&args.recipe, &args.stage)?;
    let name = format!("{}.{}", checked.recipe.header.name.value, args.stage);
    gc::pin(&cache, &name, &artifact).map_err(Error::io("writing the pin"))?;
    println!("pinned {name} = {}", crate::cache::short(&artifact));
    Ok(())
}

pub fn unpin(ctx: &Context, args: &UnpinArgs) -> Result<(), Error> {
    let cache = ctx.open_cache()?;
    match &args.name {
        Some(name) => {
            if !gc::unpin(&cache, name).map_err(Error::io("removing the pin"))? {
                return Err(Error::Usage(format!("no pin `{name}`")));
            }
            println!("unpinned {name}");
        }
        None => {
            for (name, artifact) in gc::pins(&cache).map_err(Error::io("reading pins"))? {
                println!("{name} = {artifact}");
            }
        }
    }
    Ok(())
}

pub fn gc(ctx: &Context, args: &GcArgs) -> Result<(), Error> {
    let cache = ctx.open_cache()?;
    let mut keep = Vec::new();
    for r in &args.recipes {
        let checked = ctx.check(r)?;
        let plan = ctx.plan(&checked, &cache, &[])?;
        keep.extend(plan.stages.iter().map(|s| s.key.clone()));
    }
    let summary = gc::collect(&cache, &keep, args.delete)
        .map_err(Error::io(format!("gc in {}", cache.root.display())))?;
    print!("{summary}");
    Ok(())
}
