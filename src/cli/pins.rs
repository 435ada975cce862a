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
    /// Collect the remote cache (the recipes' `[cache] remote`, or --remote)
    /// instead of the local one: what no given recipe's stage or local pin
    /// reaches goes, except artifacts written within --grace.
    #[arg(long)]
    on_remote: bool,
    /// With --on-remote: keep unreached artifacts written this recently (an
    /// upload from another machine may be under way; its key comes last).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, requires = "on_remote")]
    grace: std::time::Duration,
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
    if args.on_remote {
        return gc_remote(ctx, args);
    }
    // The local cache's own keys: no remote lookups.
    let local = Context {
        registry: ctx.registry,
        cache: ctx.cache.clone(),
        threads: ctx.threads,
        device: ctx.device.clone(),
        remote: None,
        no_remote: true,
    };
    let cache = local.open_cache()?;
    let mut keep = Vec::new();
    for r in &args.recipes {
        let checked = local.check(r)?;
        let plan = local.plan(&checked, &cache, &[])?;
        keep.extend(plan.stages.iter().map(|s| s.key.clone()));
    }
    let summary = gc::collect(&cache, &keep, args.delete)
        .map_err(Error::io(format!("gc in {}", cache.root.display())))?;
    print!("{summary}");
    Ok(())
}

fn gc_remote(ctx: &Context, args: &GcArgs) -> Result<(), Error> {
    if args.recipes.is_empty() {
        return Err(Error::Usage(
            "gc --on-remote needs the recipes whose stages to keep (none given would empty the remote)".into(),
        ));
    }
    let mut keep = Vec::new();
    let mut remote = None;
    let mut cache = ctx.open_cache()?;
    for r in &args.recipes {
        let checked = ctx.check(r)?;
        let with = ctx.open_cache_for(Some(&checked.recipe))?;
        let plan = ctx.plan(&checked, &with, &[])?;
        keep.extend(plan.stages.iter().map(|s| s.key.clone()));
        let url = with.remote.as_ref().map(|r| r.url().to_string());
        match (&remote, url) {
            (None, Some(url)) => {
                remote = Some(url);
                cache = with;
            }
            (Some(a), Some(b)) if *a != b => {
                return Err(Error::Usage(format!(
                    "the recipes name different remotes ({a} and {b}): collect one at a time"
                )))
            }
            _ => {}
        }
    }
    let Some(remote) = cache.remote.clone() else {
        return Err(Error::Usage(
            "no remote cache: the recipes have no `[cache] remote`, and no --remote / RUNNER_REMOTE is set".into(),
        ));
    };
    let pinned: Vec<String> = gc::pins(&cache)
        .map_err(Error::io("reading pins"))?
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let summary = crate::sharing::collect_remote(&remote, &keep, &pinned, args.grace, args.delete)
        .map_err(Error::remote(format!("gc on {}", remote.url())))?;
    print!("{summary}");
    Ok(())
}
