//! Artifacts to and from the remote cache, as the executors and `runner
//! push` / `pull` move them, reported stage by stage.
//!
//! Before stages run: the artifacts the plan found on the remote cache are
//! downloaded, those selected and those a stage to run reads, so every
//! executor finds its inputs in the local cache. What fails its check is
//! reported and computed here instead.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;

use crate::cache::{self, Cache};
use crate::plan::{Plan, PlannedStage, Reason, Status};
use crate::progress::Reporter;
use crate::recipe::Recipe;
use crate::remote::Remote;
use crate::sharing::{self, Pulled, Pushed};

use super::ExecError;

/// Download what `selected` needs from the remote; each stage's status
/// becomes `Cached`, or `Run` when the remote's copy is unusable.
pub fn pull_needed(
    recipe: &Recipe,
    cache: &Cache,
    plan: &mut Plan,
    selected: &[usize],
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<(), ExecError> {
    let Some(remote) = cache.remote.clone() else {
        return Ok(());
    };
    // As a run does: `gc --delete` waits for the downloads to be in place.
    let _shared = cache.lock_shared()?;
    // Rounds: a remote copy that fails its check makes its stage run, and
    // then its own inputs are needed too.
    loop {
        let wanted = to_pull(plan, selected);
        if wanted.is_empty() {
            return Ok(());
        }
        for i in wanted {
            pull_one(
                recipe,
                cache,
                &remote,
                &mut plan.stages[i],
                reporter,
                interrupt,
            )?;
            if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
                // The executor sees the flag and stops; the run exits 130.
                return Ok(());
            }
        }
    }
}

/// Download one stage the plan found on the remote: its status becomes
/// `Cached`, or `Run` (`Resume`) when the remote's copy is unusable.
pub fn pull_one(
    recipe: &Recipe,
    cache: &Cache,
    remote: &Remote,
    p: &mut PlannedStage,
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<(), ExecError> {
    let Status::Remote { artifact } = &p.status else {
        return Ok(());
    };
    let progress = reporter.start_stage(
        &p.name,
        "download",
        &format!("artifact {} from {}", cache::short(artifact), remote.url()),
    );
    let pulled = sharing::pull(cache, remote, &p.key, progress.as_ref(), interrupt);
    drop(progress);
    if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    let rerun = match cache.resume_step(&p.key) {
        Some(step) => Status::Resume { step },
        None => Status::Run,
    };
    match pulled.map_err(|e| ExecError::Remote(format!("pulling `{}`: {e}", p.name)))? {
        Pulled::Whole { artifact, bytes } => {
            reporter.stage_done(&format!(
                "{}: downloaded from the remote ({}, {})",
                p.name,
                cache::short(&artifact),
                crate::units::human_bytes(bytes, crate::units::ByteDigits::OneDecimal)
            ));
            cache.write_stage_record(&recipe.canonical, &p.name, &p.record())?;
            p.status = Status::Cached { artifact };
        }
        Pulled::Missing => {
            reporter.stage_done(&format!("{}: no longer on the remote; it will run", p.name));
            p.status = rerun;
            p.reasons = vec![Reason::RemoteUnusable("its key record is gone".into())];
        }
        Pulled::Corrupt(why) => {
            reporter.stage_done(&format!(
                "{}: the remote's copy failed its check ({why}); it will run here and be uploaded in its place",
                p.name
            ));
            p.status = rerun;
            p.reasons = vec![Reason::RemoteUnusable(why)];
        }
    }
    Ok(())
}

/// Stages on the remote that `selected` needs (selected themselves, or read
/// by a stage that will run), in plan order.
fn to_pull(plan: &Plan, selected: &[usize]) -> Vec<usize> {
    let mut needed: BTreeSet<usize> = selected.iter().copied().collect();
    let mut out = Vec::new();
    for (i, p) in plan.stages.iter().enumerate().rev() {
        if !needed.contains(&p.index) {
            continue;
        }
        if matches!(p.status, Status::Remote { .. }) {
            out.push(i);
        } else if p.status.will_run() {
            needed.extend(p.deps.iter().map(|(_, d)| *d));
        }
    }
    out.reverse();
    out
}

/// Upload a stage's artifact to the remote cache, if there is one; Err:
/// the line that reported the failure.
pub fn push_one(
    cache: &Cache,
    name: &str,
    artifact: &str,
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<(), String> {
    let Some(remote) = &cache.remote else {
        return Ok(());
    };
    let progress = reporter.start_stage(name, "upload", &format!("to {}", remote.url()));
    let pushed = crate::sharing::push(cache, remote, artifact, progress.as_ref(), interrupt);
    drop(progress);
    let line = match &pushed {
        Ok(Pushed::Uploaded { files, bytes }) => format!(
            "{name}: uploaded to the remote ({files} files, {})",
            crate::units::human_bytes(*bytes, crate::units::ByteDigits::OneDecimal)
        ),
        Ok(Pushed::AlreadyThere { artifact: theirs }) if theirs == artifact => {
            format!("{name}: already on the remote")
        }
        Ok(Pushed::AlreadyThere { artifact: theirs }) => format!(
            "{name}: the remote already has another result for this key (artifact {}, \
             finished first); it stays the shared one",
            cache::short(theirs)
        ),
        Ok(Pushed::NotShared(why)) => format!("{name}: not uploaded ({why})"),
        Err(e) => format!("{name}: upload to the remote FAILED: {e}"),
    };
    reporter.stage_done(&line);
    pushed.map(|_| ()).map_err(|_| line)
}
