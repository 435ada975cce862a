//! Running a plan's stages in this process, in order, skipping cached ones,
//! each under its lock, promoting each result atomically into the cache.
//! (A stage that another executor starts runs here too, in its own process.)

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::cache::{self, Cache, InputFile, Manifest, Parent};
use crate::plan::{Plan, PlannedStage, Reason, Status};
use crate::progress::Reporter;
use crate::recipe::Recipe;
use crate::stage::{InputArtifact, Interrupted, RunContext};

use super::{ExecError, Outcome, Report};

/// Run the selected stages of a plan.
pub fn execute(
    recipe: &Recipe,
    cache: &Cache,
    plan: &Plan,
    selected: &[usize],
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<Report, ExecError> {
    let _shared = cache.lock_shared()?;
    let mut report = Report::default();
    // Artifact of each stage available so far (cached or just made).
    let mut artifacts: BTreeMap<usize, String> = BTreeMap::new();
    for p in &plan.stages {
        if let Status::Cached { artifact } = &p.status {
            artifacts.insert(p.index, artifact.clone());
        }
    }
    reporter.start_pipeline(selected.len());
    let mut not_available: BTreeMap<usize, String> = BTreeMap::new();

    for p in plan.stages.iter().filter(|p| selected.contains(&p.index)) {
        if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        if let Some((_, d)) = p.deps.iter().find(|(_, d)| !artifacts.contains_key(d)) {
            let why = not_available
                .get(d)
                .cloned()
                .unwrap_or_else(|| format!("input `{}` was not run", recipe.stages[*d].name.value));
            reporter.stage_done(&format!("{}: skipped ({why})", p.name));
            not_available.insert(p.index, format!("input `{}` failed", p.name));
            report.stages.push((p.name.clone(), Outcome::Blocked(why)));
            continue;
        }
        if let Status::Cached { artifact } = &p.status {
            cache.write_stage_record(&recipe.canonical, &p.name, &p.record())?;
            reporter.stage_done(&format!("{}: cached ({})", p.name, cache::short(artifact)));
            report.stages.push((p.name.clone(), Outcome::Cached));
            continue;
        }
        let outcome = run_one(recipe, cache, plan, p, &artifacts, reporter, interrupt)?;
        match &outcome {
            Outcome::Ran { artifact, seconds } => {
                artifacts.insert(p.index, artifact.clone());
                reporter.stage_done(&format!(
                    "{}: done in {seconds:.1}s ({})",
                    p.name,
                    cache::short(artifact)
                ));
                let stage = &recipe.stages[p.index];
                if stage.kind.shared(stage.params.as_ref()) {
                    if let Err(why) =
                        super::share::push_one(cache, &p.name, artifact, reporter, interrupt)
                    {
                        report.unpushed.push(why);
                    }
                }
            }
            Outcome::Cached => {
                let record = cache.key_record(&p.key).expect("just found");
                artifacts.insert(p.index, record.artifact);
                reporter.stage_done(&format!("{}: cached (computed by another process)", p.name));
            }
            Outcome::Failed(e) => {
                not_available.insert(p.index, format!("input `{}` failed", p.name));
                reporter.stage_done(&format!("{}: FAILED: {e}", p.name));
            }
            Outcome::Unwritable(e) => {
                not_available.insert(p.index, format!("input `{}` failed", p.name));
                reporter.stage_done(&format!(
                    "{}: FAILED writing (the disk, not the stage): {e}",
                    p.name
                ));
            }
            Outcome::Interrupted => reporter.stage_done(&format!("{}: interrupted", p.name)),
            Outcome::Blocked(_) => {}
        }
        let stop = outcome == Outcome::Interrupted;
        report.stages.push((p.name.clone(), outcome));
        if stop {
            break;
        }
    }
    reporter.finish();
    Ok(report)
}

fn run_one(
    recipe: &Recipe,
    cache: &Cache,
    plan: &Plan,
    p: &PlannedStage,
    artifacts: &BTreeMap<usize, String>,
    reporter: &dyn Reporter,
    interrupt: &AtomicBool,
) -> Result<Outcome, ExecError> {
    let stage = &recipe.stages[p.index];
    let _lock = cache.lock_stage(&p.key, |pid| {
        let holder = pid.map_or("another process".to_string(), |pid| {
            format!("process {pid}")
        });
        reporter.stage_line(&format!(
            "{}: waiting for {holder}, which is running this stage",
            p.name
        ));
    })?;
    if finished_meanwhile(recipe, cache, p) {
        cache.write_stage_record(&recipe.canonical, &p.name, &p.record())?;
        return Ok(Outcome::Cached);
    }
    let (inputs, parents) = upstream(recipe, cache, p, artifacts);
    let files: BTreeMap<String, std::path::PathBuf> = stage
        .files()
        .into_iter()
        .map(|f| (f.field, f.path))
        .collect();

    let staging = cache.staging_dir(&p.key)?;
    let work_dir = cache.work_dir(&p.key);
    std::fs::create_dir_all(&work_dir)?;
    let started = cache::now_rfc3339();
    peak_memory::reset();
    let clock = Instant::now();
    let progress = reporter.start_stage(&p.name, &p.kind, &p.reason());
    let mut ctx = RunContext {
        stage: p.name.clone(),
        key: p.key.clone(),
        out_dir: staging.clone(),
        work_dir: work_dir.clone(),
        inputs,
        files: files.clone(),
        seed: recipe.header.seed.value,
        progress: progress.as_ref(),
        metrics: serde_json::Map::new(),
        interrupt,
        device: plan.device.clone(),
        cache,
        derived: Vec::new(),
        tracking: tracking(recipe, stage, p, &work_dir),
    };
    crate::alloc_guard::set_stage(&p.name);
    let result = stage.kind.run(stage.params.as_ref(), &mut ctx);
    crate::alloc_guard::clear_stage();
    let mut metrics = std::mem::take(&mut ctx.metrics);
    // Every stage's estimate beside its measured peak; training stages
    // record their own, from the model as loaded.
    if !metrics.contains_key(crate::units::ESTIMATE_METRIC) {
        if let Some(m) = crate::plan::render::memory(recipe, p) {
            metrics.insert(
                crate::units::ESTIMATE_METRIC.into(),
                crate::units::gib_metric(m.estimate_bytes).into(),
            );
        }
    }
    let derived = std::mem::take(&mut ctx.derived);
    drop(ctx);
    drop(progress);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        if e.is::<Interrupted>() {
            return Ok(Outcome::Interrupted);
        }
        if super::is_unwritable(&e) {
            return Ok(Outcome::Unwritable(super::describe(&e)));
        }
        return Ok(Outcome::Failed(super::describe(&e)));
    }
    let manifest = Manifest {
        parents,
        metrics,
        derived,
        started,
        finished: cache::now_rfc3339(),
        wall_seconds: clock.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_memory::read(),
        ..manifest_of(recipe, p)
    };
    let (artifact, _) = cache.promote(&staging, manifest)?;
    // Checkpoints are only for resuming this key; the result is safe now.
    let _ = std::fs::remove_dir_all(&work_dir);
    cache.write_stage_record(&recipe.canonical, &p.name, &p.record())?;
    Ok(Outcome::Ran {
        artifact,
        seconds: clock.elapsed().as_secs_f64(),
    })
}

/// Another process may have finished the stage while we waited for its
/// lock (by the same rules as the plan).
fn finished_meanwhile(recipe: &Recipe, cache: &Cache, p: &PlannedStage) -> bool {
    let stage = &recipe.stages[p.index];
    cache.key_record(&p.key).is_some_and(|record| {
        cache.verify(&record.artifact) == cache::Integrity::Whole
            && stage
                .kind
                .outside_changed(stage.params.as_ref(), &cache.artifact_dir(&record.artifact))
                .is_none()
            && !p.reasons.contains(&Reason::Forced)
    })
}

/// The artifacts a stage reads, by field, and their lineage for its manifest.
fn upstream(
    recipe: &Recipe,
    cache: &Cache,
    p: &PlannedStage,
    artifacts: &BTreeMap<usize, String>,
) -> (BTreeMap<String, InputArtifact>, Vec<Parent>) {
    let mut inputs = BTreeMap::new();
    let mut parents = Vec::new();
    for (field, d) in &p.deps {
        let artifact = &artifacts[d];
        let dir = cache.artifact_dir(artifact);
        let manifest = std::fs::read(dir.join(cache::MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let up = &recipe.stages[*d];
        let up_key = p.key_inputs.inputs[*field].clone();
        parents.push(Parent {
            field: field.to_string(),
            stage: up.name.value.clone(),
            key: up_key.clone(),
            artifact: artifact.clone(),
        });
        inputs.insert(
            field.to_string(),
            InputArtifact {
                stage: up.name.value.clone(),
                kind: up.kind.name().to_string(),
                output: up.kind.output(),
                key: up_key,
                dir,
                manifest,
            },
        );
    }
    (inputs, parents)
}

/// The manifest of a stage's artifact, as far as the plan says it (what
/// the run adds is filled in by the caller).
fn manifest_of(recipe: &Recipe, p: &PlannedStage) -> Manifest {
    let stage = &recipe.stages[p.index];
    Manifest {
        artifact: String::new(),
        stage: p.name.clone(),
        kind: p.kind.clone(),
        kind_version: stage.kind.version(),
        key: p.key.clone(),
        recipe: recipe.path.display().to_string(),
        recipe_name: recipe.header.name.value.clone(),
        seed: recipe.header.seed.value,
        params: p.key_inputs.params.clone(),
        parents: Vec::new(),
        inputs: p
            .files
            .iter()
            .map(|(field, d)| InputFile {
                field: field.clone(),
                path: d.path.clone(),
                hash: p.key_inputs.files[field].clone(),
            })
            .collect(),
        metrics: serde_json::Map::new(),
        files: BTreeMap::new(),
        derived: Vec::new(),
        program: format!("runner {}", env!("CARGO_PKG_VERSION")),
        started: String::new(),
        finished: String::new(),
        wall_seconds: 0.0,
        peak_rss_bytes: None,
    }
}

/// Peak resident memory per stage, from Linux's VmHWM (reset between stages
/// through /proc/self/clear_refs). Elsewhere: not recorded.
mod peak_memory {
    pub fn reset() {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    pub fn read() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// Where and as what `stage`'s training run is tracked: `recipe/stage`,
/// its parameters as the key holds them, its sweep axes, and its key.
fn tracking(
    recipe: &Recipe,
    stage: &crate::stage::Stage,
    p: &PlannedStage,
    work_dir: &std::path::Path,
) -> crate::tracking::Tracking {
    if recipe.tensorboard.is_none() && recipe.mlflow.is_none() {
        return Default::default();
    }
    let mut params = crate::tracking::flatten_params(&stage.key_params());
    if let Some(v) = &stage.variant {
        for (axis, value) in &v.values {
            params.push((
                format!("sweep.{axis}"),
                crate::tracking::HParam::Text(value.clone()),
            ));
        }
    }
    params.push(("key".into(), crate::tracking::HParam::Text(p.key.clone())));
    crate::tracking::Tracking {
        tensorboard: recipe.tensorboard.clone(),
        mlflow: recipe.mlflow.clone(),
        recipe: recipe.header.name.value.clone(),
        run: format!("{}/{}", recipe.header.name.value, p.name),
        work_dir: work_dir.to_path_buf(),
        params,
    }
}
