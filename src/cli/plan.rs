//! `runner plan`: the dry run.

use std::path::PathBuf;

use super::{Context, Error};
use crate::plan::render;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    /// Machine-readable output (schemas/plan.schema.json).
    #[arg(long)]
    json: bool,
    /// Do not refuse a stage whose memory estimate exceeds this machine's
    /// memory (the smaller of physical memory and the cgroup limit, or
    /// RUNNER_MACHINE_MEMORY), or, for a stage on a GPU, the GPU's
    /// (nvidia-smi's, or RUNNER_DEVICE_MEMORY); warn instead.
    #[arg(long)]
    ignore_memory_check: bool,
}

pub fn plan(ctx: &Context, args: &PlanArgs) -> Result<(), Error> {
    let (checked, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&render::plan_json(&checked.recipe, &plan))
                .expect("plan serializes")
        );
    } else {
        print!("{}", render::plan_text(&checked.recipe, &plan, &cache));
    }
    ctx.check_memory(&checked, &plan, None, args.ignore_memory_check)
}
