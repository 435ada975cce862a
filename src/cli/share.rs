//! `runner push` and `runner pull`: a recipe's stages to and from the
//! remote cache, explicitly (`run` pulls what it needs and pushes what it
//! makes on its own).

use std::path::PathBuf;

use super::context::{exec_error, Checked};
use super::{process, Context, Error};
use crate::cache::Cache;
use crate::executor::share;
use crate::plan::Status;

#[derive(clap::Args, Debug)]
pub struct ShareArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    /// Stages to move (a swept stage's own name stands for all its
    /// variants); default: every stage of the recipe.
    stages: Vec<String>,
}

/// The recipe checked, the cache with its remote (which must be set), the
/// plan, and the indices of the stages named.
fn prepare(
    ctx: &Context,
    args: &ShareArgs,
) -> Result<(Checked, Cache, crate::plan::Plan, Vec<usize>), Error> {
    let (checked, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    if cache.remote.is_none() {
        return Err(Error::Usage(format!(
            "no remote cache: set `[cache] remote = \"s3://bucket/prefix\"` in {}, or --remote / RUNNER_REMOTE{}",
            args.recipe.display(),
            if ctx.no_remote { " (and drop --no-remote)" } else { "" }
        )));
    }
    let chosen = super::context::named_stages(&checked, &args.recipe, &args.stages)?;
    let indices = plan
        .stages
        .iter()
        .filter(|p| chosen.is_empty() || chosen.contains(&p.name))
        .map(|p| p.index)
        .collect();
    Ok((checked, cache, plan, indices))
}

pub fn push(ctx: &Context, args: &ShareArgs) -> Result<(), Error> {
    let (checked, cache, plan, indices) = prepare(ctx, args)?;
    let interrupt = process::install_interrupt();
    let reporter = crate::progress::reporter();
    let (mut pushed, mut failed) = (0, 0);
    for p in plan.stages.iter().filter(|p| indices.contains(&p.index)) {
        let stage = &checked.recipe.stages[p.index];
        match &p.status {
            Status::Cached { artifact } if stage.kind.shared(stage.params.as_ref()) => {
                match share::push_one(&cache, &p.name, artifact, reporter.as_ref(), &interrupt) {
                    Ok(()) => pushed += 1,
                    Err(_) => failed += 1,
                }
            }
            Status::Cached { .. } => reporter.stage_done(&format!(
                "{}: not shared ({} stages stay on each machine)",
                p.name, p.kind
            )),
            Status::Remote { .. } => {
                reporter.stage_done(&format!("{}: already on the remote", p.name))
            }
            _ => reporter.stage_done(&format!("{}: not cached here; nothing to push", p.name)),
        }
        if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
    }
    reporter.finish();
    eprintln!("{pushed} stage(s) pushed or already there, {failed} failed");
    match failed {
        0 => Ok(()),
        n => Err(Error::Unpushed(n)),
    }
}

pub fn pull(ctx: &Context, args: &ShareArgs) -> Result<(), Error> {
    let (checked, cache, mut plan, indices) = prepare(ctx, args)?;
    let remote = cache.remote.clone().expect("checked in prepare");
    let _shared = cache.lock_shared().map_err(Error::io(format!(
        "locking the cache {}",
        cache.root.display()
    )))?;
    let interrupt = process::install_interrupt();
    let reporter = crate::progress::reporter();
    let (mut pulled, mut missing, mut failed) = (0, 0, 0);
    for p in plan
        .stages
        .iter_mut()
        .filter(|p| indices.contains(&p.index))
    {
        match &p.status {
            Status::Remote { .. } => {
                share::pull_one(
                    &checked.recipe,
                    &cache,
                    &remote,
                    p,
                    reporter.as_ref(),
                    &interrupt,
                )
                .map_err(exec_error)?;
                match p.status {
                    Status::Cached { .. } => pulled += 1,
                    // Reported as it failed its check; computed by the next run.
                    _ => failed += 1,
                }
            }
            Status::Cached { .. } => reporter.stage_done(&format!("{}: already here", p.name)),
            _ => {
                missing += 1;
                reporter.stage_done(&format!("{}: not on the remote ({})", p.name, p.reason()))
            }
        }
        if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
    }
    reporter.finish();
    eprintln!("{pulled} stage(s) pulled, {missing} not on the remote, {failed} failed their check");
    // Named stages that are not here now: a script should not go on to use them.
    if failed > 0 || (missing > 0 && !args.stages.is_empty()) {
        return Err(Error::Environment {
            context: format!("pulling from {}", remote.url()),
            source: anyhow::anyhow!(
                "{} of the stages asked for are not in the local cache",
                failed + if args.stages.is_empty() { 0 } else { missing }
            ),
        });
    }
    Ok(())
}
