//! `runner cancel`, and the job lines `status` and `show` print for stages
//! submitted to Slurm.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Context, Error};
use crate::cache::Cache;
use crate::executor::slurm::{self, Slurm};
use crate::executor::{Executor, JobState};
use crate::plan::Plan;

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
}

pub fn cancel(ctx: &Context, args: &CancelArgs) -> Result<(), Error> {
    let (_, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    let jobs = slurm::jobs_of(&Slurm, &cache, &plan)
        .map_err(Error::environment("reading the Slurm queue"))?;
    let active: Vec<(&String, &String)> = jobs
        .iter()
        .filter(|(_, (_, state))| state.active())
        .map(|(stage, (record, _))| (stage, &record.id))
        .collect();
    let ids: Vec<String> = active.iter().map(|(_, id)| id.to_string()).collect();
    Executor::cancel(&Slurm, &ids).map_err(Error::environment("cancelling Slurm jobs"))?;
    for (stage, id) in &active {
        println!("cancelled job {id} ({stage})");
    }
    if active.is_empty() {
        println!("no queued or running job of {}", args.recipe.display());
    }
    Ok(())
}

/// `job 12 RUNNING, output PATH` for each stage of the plan submitted to
/// Slurm; a stage that will never start says which input's job failed.
pub fn job_lines(cache: &Cache, plan: &Plan) -> BTreeMap<String, String> {
    let jobs = match slurm::jobs_of(&Slurm, cache, plan) {
        Ok(jobs) => jobs,
        Err(e) => {
            return plan
                .stages
                .iter()
                .filter_map(|p| {
                    let r = slurm::job_record(cache, &p.key)?;
                    Some((
                        p.name.clone(),
                        format!("job {} (state unknown: {e:#})", r.id),
                    ))
                })
                .collect()
        }
    };
    let mut lines = BTreeMap::new();
    for p in &plan.stages {
        let Some((record, state)) = jobs.get(&p.name) else {
            continue;
        };
        let mut line = format!("job {} {}", record.id, state.label());
        if let JobState::Never(_) = state {
            for (_, d) in &p.deps {
                let up = plan.by_index(*d);
                if let Some((r, s)) = jobs.get(&up.name) {
                    if matches!(s, JobState::Failed(_) | JobState::Never(_)) {
                        line = format!(
                            "job {} never started: input `{}` failed (job {} {})",
                            record.id,
                            up.name,
                            r.id,
                            s.label()
                        );
                    }
                }
            }
        }
        lines.insert(
            p.name.clone(),
            format!("{line}, output {}", record.output.display()),
        );
    }
    lines
}
