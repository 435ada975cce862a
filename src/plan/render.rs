//! Plans, statuses and a stage's manifest rendered for people (`plan`,
//! `status`, `show`) and programs (`plan --json`).

use serde::Serialize;

use crate::cache::{self, Cache, Manifest};
use crate::plan::{Plan, PlannedStage, Status};
use crate::recipe::Recipe;

/// `runner plan --json` output (schemas/plan.schema.json).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PlanJson {
    /// The recipe file as given.
    pub recipe: String,
    /// Stages in execution order.
    pub stages: Vec<PlanStageJson>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PlanStageJson {
    pub name: String,
    pub kind: String,
    /// "cached", "remote" (cached on the remote cache), "run" or "resume".
    pub status: String,
    /// For "resume": the checkpoint's step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_step: Option<u64>,
    /// Why the stage runs, or which artifact it is cached as.
    pub reason: String,
    /// Every reason, when there are several.
    pub reasons: Vec<String>,
    /// The full stage key (blake3, hex).
    pub key: String,
    /// The cached artifact (here or on the remote), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// Names of the stages it reads from.
    pub deps: Vec<String>,
    /// What the stage's kind says about it (e.g. "loss simpo: no reference").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The stage's estimated peak memory (`run` records it as the
    /// metric `memory/estimate_gib`, beside the measured peak in the manifest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::units::MemoryEstimate>,
    /// For a stage a sweep made: the stage as written in the recipe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant_of: Option<String>,
    /// For a stage a sweep made: parameter path -> value as written, inherited axes first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<(String, String)>,
}

fn note(recipe: &Recipe, p: &PlannedStage) -> Option<String> {
    let stage = &recipe.stages[p.index];
    stage.kind.plan_note(stage.params.as_ref())
}

pub(crate) fn memory(recipe: &Recipe, p: &PlannedStage) -> Option<crate::units::MemoryEstimate> {
    let on_gpu = p.key_inputs.device.as_deref() == Some("cuda");
    let view = crate::stage::StageView::new(&recipe.stages, p.index);
    view.kind().plan_memory(view, on_gpu)
}

fn dep_names(recipe: &Recipe, p: &PlannedStage) -> Vec<String> {
    p.deps
        .iter()
        .map(|(_, d)| recipe.stages[*d].name.value.clone())
        .collect()
}

pub fn plan_json(recipe: &Recipe, plan: &Plan) -> PlanJson {
    PlanJson {
        recipe: recipe.path.display().to_string(),
        stages: plan
            .stages
            .iter()
            .map(|p| PlanStageJson {
                name: p.name.clone(),
                kind: p.kind.clone(),
                status: match p.status {
                    Status::Cached { .. } => "cached",
                    Status::Remote { .. } => "remote",
                    Status::Run => "run",
                    Status::Resume { .. } => "resume",
                }
                .into(),
                resume_step: match p.status {
                    Status::Resume { step } => Some(step),
                    _ => None,
                },
                reason: p.reason(),
                reasons: p.reasons.iter().map(ToString::to_string).collect(),
                key: p.key.clone(),
                artifact: match &p.status {
                    Status::Cached { artifact } | Status::Remote { artifact } => {
                        Some(artifact.clone())
                    }
                    _ => None,
                },
                deps: dep_names(recipe, p),
                note: note(recipe, p),
                memory: memory(recipe, p),
                variant_of: recipe.stages[p.index]
                    .variant
                    .as_ref()
                    .map(|v| v.of.clone()),
                values: recipe.stages[p.index]
                    .variant
                    .as_ref()
                    .map(|v| v.values.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `sweep: dpo_fresh: 4 variants (dpo.beta × lora.r)`, one line per swept stage.
fn sweep_lines(recipe: &Recipe) -> String {
    let mut out = String::new();
    let mut seen: Vec<&str> = Vec::new();
    for stage in &recipe.stages {
        let Some(v) = &stage.variant else { continue };
        if seen.contains(&v.of.as_str()) {
            continue;
        }
        seen.push(&v.of);
        let count = recipe
            .stages
            .iter()
            .filter(|s| s.variant.as_ref().is_some_and(|w| w.of == v.of))
            .count();
        let axes: Vec<&str> = v.values.iter().map(|(path, _)| path.as_str()).collect();
        out.push_str(&format!(
            "sweep: {}: {count} variant(s) over {}\n",
            v.of,
            axes.join(" × ")
        ));
    }
    out
}

pub fn plan_text(recipe: &Recipe, plan: &Plan, cache: &Cache) -> String {
    let to_run = plan.stages.iter().filter(|s| s.status.will_run()).count();
    let mut rows = vec![vec![
        "STAGE".into(),
        "KIND".into(),
        "STATUS".into(),
        "KEY".into(),
        "REASON".into(),
    ]];
    for p in &plan.stages {
        rows.push(vec![
            p.name.clone(),
            p.kind.clone(),
            p.status.label(),
            cache::short(&p.key).to_string(),
            p.reason(),
        ]);
    }
    let notes: String = plan
        .stages
        .iter()
        .filter_map(|p| note(recipe, p).map(|n| format!("note: {}: {n}\n", p.name)))
        .chain(plan.stages.iter().filter_map(|p| {
            memory(recipe, p).map(|m| format!("memory: {}: {}\n", p.name, m.describe()))
        }))
        .collect();
    let notes = format!("{}{notes}", sweep_lines(recipe));
    let remote = plan
        .stages
        .iter()
        .filter(|s| matches!(s.status, Status::Remote { .. }))
        .count();
    let (remote, place) = match &cache.remote {
        Some(r) => (
            format!(", {remote} to download from the remote"),
            format!(", remote {}", r.url()),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "plan for {} (recipe `{}`, cache {}{place})\n{}{notes}{} of {} stage(s) to run{remote}\n",
        recipe.path.display(),
        recipe.header.name.value,
        cache.root.display(),
        table(rows),
        to_run,
        plan.stages.len()
    )
}

/// Each stage's state; `jobs` (stage -> its Slurm job, when it has one) adds a line under it.
pub fn status_text(
    recipe: &Recipe,
    plan: &Plan,
    cache: &Cache,
    jobs: &std::collections::BTreeMap<String, String>,
) -> String {
    let mut rows = vec![vec![
        "STAGE".into(),
        "KIND".into(),
        "STATUS".into(),
        "ARTIFACT".into(),
        "FINISHED".into(),
        "METRICS".into(),
    ]];
    for p in &plan.stages {
        let (artifact, finished, metrics) = match &p.status {
            Status::Cached { artifact } => {
                let m = cache.manifest(artifact);
                (
                    cache::short(artifact).to_string(),
                    m.as_ref().map(|m| m.finished.clone()).unwrap_or_default(),
                    m.map(|m| headline(&m)).unwrap_or_default(),
                )
            }
            _ => ("-".into(), "-".into(), p.reason()),
        };
        rows.push(vec![
            p.name.clone(),
            p.kind.clone(),
            p.status.label(),
            artifact,
            finished,
            metrics,
        ]);
    }
    let jobs: String = plan
        .stages
        .iter()
        .filter_map(|p| jobs.get(&p.name).map(|j| format!("{}: {j}\n", p.name)))
        .collect();
    format!(
        "{} (recipe `{}`)\n{}{jobs}",
        recipe.path.display(),
        recipe.header.name.value,
        table(rows)
    )
}

/// A few scalar metrics, for one line.
fn headline(m: &Manifest) -> String {
    m.metrics
        .iter()
        .filter_map(|(k, v)| {
            v.as_f64()
                .map(|x| format!("{k}={x:.4}"))
                .or_else(|| v.as_u64().map(|x| format!("{k}={x}")))
        })
        .take(4)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why `runner show` has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ShowError {
    /// The stage has not run (or its inputs changed since).
    #[error("stage `{stage}` has no cached artifact ({reason})")]
    NotCached { stage: String, reason: String },
    /// The cache holds the artifact but not its manifest: a damaged cache.
    #[error("artifact {0} has no readable manifest")]
    NoManifest(String),
}

/// `runner show`: the manifest, its lineage as a tree and the artifact path.
pub fn show(cache: &Cache, p: &PlannedStage, json: bool) -> Result<String, ShowError> {
    let Status::Cached { artifact } = &p.status else {
        return Err(ShowError::NotCached {
            stage: p.name.clone(),
            reason: p.reason(),
        });
    };
    let manifest = cache
        .manifest(artifact)
        .ok_or_else(|| ShowError::NoManifest(artifact.clone()))?;
    let path = cache.artifact_dir(artifact);
    if json {
        let value = serde_json::json!({
            "path": path.display().to_string(),
            "manifest": manifest,
            "lineage": lineage_json(cache, artifact, 0),
        });
        return Ok(serde_json::to_string_pretty(&value).expect("serializes"));
    }
    let mut out = format!(
        "stage     {} ({} v{})\nkey       {}\nartifact  {}\npath      {}\nrecipe    {} (`{}`)\nran       {} → {} ({:.1}s)\nprogram   {}\n",
        manifest.stage,
        manifest.kind,
        manifest.kind_version,
        manifest.key,
        manifest.artifact,
        path.display(),
        manifest.recipe,
        manifest.recipe_name,
        manifest.started,
        manifest.finished,
        manifest.wall_seconds,
        manifest.program
    );
    out.push_str(&format!(
        "params    {}\n",
        serde_json::to_string(&manifest.params).expect("serializes")
    ));
    for input in &manifest.inputs {
        out.push_str(&format!(
            "input     {} = {} ({})\n",
            input.field,
            input.path,
            cache::short(&input.hash)
        ));
    }
    if !manifest.metrics.is_empty() {
        out.push_str("metrics\n");
        for (k, v) in &manifest.metrics {
            out.push_str(&format!("  {k}: {v}\n"));
        }
    }
    out.push_str("lineage\n");
    lineage_text(cache, artifact, "", &mut out, 0);
    Ok(out)
}

fn lineage_text(cache: &Cache, artifact: &str, indent: &str, out: &mut String, depth: usize) {
    let Some(m) = cache.manifest(artifact) else {
        out.push_str(&format!(
            "{indent}? {} (manifest missing)\n",
            cache::short(artifact)
        ));
        return;
    };
    out.push_str(&format!(
        "{indent}{} ({}) {}\n",
        m.stage,
        m.kind,
        cache::short(artifact)
    ));
    if depth > 64 {
        return;
    }
    for parent in &m.parents {
        out.push_str(&format!("{indent}  └─ via `{}`:\n", parent.field));
        lineage_text(
            cache,
            &parent.artifact,
            &format!("{indent}     "),
            out,
            depth + 1,
        );
    }
}

fn lineage_json(cache: &Cache, artifact: &str, depth: usize) -> serde_json::Value {
    let Some(m) = cache.manifest(artifact) else {
        return serde_json::json!({ "artifact": artifact, "missing": true });
    };
    let parents: Vec<serde_json::Value> = if depth > 64 {
        Vec::new()
    } else {
        m.parents
            .iter()
            .map(|p| serde_json::json!({ "field": p.field, "node": lineage_json(cache, &p.artifact, depth + 1) }))
            .collect()
    };
    serde_json::json!({ "artifact": artifact, "stage": m.stage, "kind": m.kind, "parents": parents })
}
