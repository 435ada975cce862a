//! `runner compare`: gather finished training stages of a recipe (by
//! default its leaf training stages: in the demo, scheme one and scheme two)
//! into summaries for the report. Which stages train, and with what objective,
//! comes from their kinds' `Role`, never from kind names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::cache::{Cache, Manifest, Parent};
use crate::compare::evaluation::{evaluate, Bootstrap};
use crate::compare::summary::StageSummary;
use crate::compare::CompareError;
use crate::graph::Dag;
use crate::plan::{Plan, Status};
use crate::recipe::Recipe;
use crate::stage::{Objective, Role, Stage};

/// What `stage` trains for; None for stages that do not train.
fn objective(stage: &Stage) -> Option<Objective> {
    match stage.kind.role() {
        Role::Train(objective) => Some(objective),
        _ => None,
    }
}

/// The role of the stage that made `parent`: its kind in the recipe, or, for a
/// stage the recipe does not have (an artifact another recipe made first and
/// named differently), the built-in kind its manifest names.
fn parent_role(recipe: &Recipe, cache: &Cache, parent: &Parent) -> Option<Role> {
    match recipe.stage(&parent.stage) {
        Some(stage) => Some(stage.kind.role()),
        None => {
            let manifest = cache.manifest(&parent.artifact)?;
            crate::kinds::builtin()
                .get(&manifest.kind)
                .map(|kind| kind.role())
        }
    }
}

/// Every training stage, in execution order.
pub fn training_stages(recipe: &Recipe, dag: &Dag) -> Vec<String> {
    dag.order
        .iter()
        .filter(|&&i| objective(&recipe.stages[i]).is_some())
        .map(|&i| recipe.stages[i].name.value.clone())
        .collect()
}

/// Training stages no other training stage builds on, in execution order.
pub fn leaf_training_stages(recipe: &Recipe, dag: &Dag) -> Vec<String> {
    let trains: BTreeSet<usize> = (0..recipe.stages.len())
        .filter(|&i| objective(&recipe.stages[i]).is_some())
        .collect();
    let mut feeds = BTreeSet::new();
    for &i in &trains {
        for a in dag.ancestors_and_self(i) {
            if a != i {
                feeds.insert(a);
            }
        }
    }
    dag.order
        .iter()
        .filter(|i| trains.contains(i) && !feeds.contains(i))
        .map(|&i| recipe.stages[i].name.value.clone())
        .collect()
}

/// Artifacts reachable from `artifact` through lineage (itself included).
fn lineage(cache: &Cache, artifact: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![artifact.to_string()];
    while let Some(a) = stack.pop() {
        if seen.insert(a.clone()) {
            if let Some(m) = cache.manifest(&a) {
                stack.extend(m.parents.into_iter().map(|p| p.artifact));
            }
        }
    }
    seen
}

/// What the adapter of a stage looks like, from its adapter_config.json.
fn lora_description(dir: &Path) -> String {
    match crate::kinds::adapter::read_peft_shape(dir) {
        Some(spec) => {
            let targets = match &spec.targets.value {
                crate::kinds::params::Targets::List(l) => l.join(","),
                crate::kinds::params::Targets::Pattern(p) => p.clone(),
            };
            format!(
                "r={} alpha={} targets={targets}{}{}",
                spec.r.value,
                spec.alpha.value,
                if spec.rslora.value { " rslora" } else { "" },
                if spec.dora.value { " dora" } else { "" }
            )
        }
        None => "-".into(),
    }
}

/// Summaries of `names` (or the leaf training stages), which must all be cached.
pub fn collect(
    recipe: &Recipe,
    dag: &Dag,
    plan: &Plan,
    cache: &Cache,
    names: &[String],
    bootstrap: Bootstrap,
) -> Result<Vec<StageSummary>, CompareError> {
    let names = if names.is_empty() {
        leaf_training_stages(recipe, dag)
    } else {
        names.to_vec()
    };
    if names.is_empty() {
        return Err(CompareError::NoTrainingStages {
            recipe: recipe.path.clone(),
        });
    }
    let mut found = Vec::new();
    for name in &names {
        let planned = plan.by_name(name).ok_or_else(|| CompareError::NoStage {
            stage: name.clone(),
            recipe: recipe.path.clone(),
        })?;
        let Some(objective) = recipe.stage(name).and_then(objective) else {
            return Err(CompareError::NotTraining {
                stage: name.clone(),
                kind: planned.kind.clone(),
            });
        };
        let Status::Cached { artifact } = &planned.status else {
            return Err(CompareError::NotRun {
                stage: name.clone(),
                reason: planned.reason(),
                recipe: recipe.path.clone(),
            });
        };
        let manifest = cache
            .manifest(artifact)
            .ok_or_else(|| CompareError::NoManifest {
                stage: name.clone(),
            })?;
        found.push((name.clone(), objective, artifact.clone(), manifest));
    }
    // Bytes each stage needed beyond what all compared stages share (the SFT adapter, the base).
    let lineages: Vec<BTreeSet<String>> =
        found.iter().map(|(_, _, a, _)| lineage(cache, a)).collect();
    let shared: BTreeSet<String> = lineages.iter().skip(1).fold(lineages[0].clone(), |acc, l| {
        acc.intersection(l).cloned().collect()
    });

    let mut out = Vec::new();
    for ((name, objective, artifact, manifest), lineage) in found.into_iter().zip(&lineages) {
        let dir = cache.artifact_dir(&artifact);
        let bytes = lineage
            .difference(&shared)
            .map(|a| crate::fsutil::folder_bytes(&cache.artifact_dir(a)))
            .sum();
        let mut s = summary(name, objective, &dir, &manifest, bytes, recipe, cache);
        s.evaluated = evaluate(recipe, plan, cache, &s.name, bootstrap);
        out.push(s);
    }
    Ok(out)
}

fn summary(
    name: String,
    objective: Objective,
    dir: &Path,
    m: &Manifest,
    bytes_on_disk: u64,
    recipe: &Recipe,
    cache: &Cache,
) -> StageSummary {
    let rows = std::fs::read_to_string(dir.join(crate::train::trainer::METRICS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let final_metrics: BTreeMap<String, f64> = m
        .metrics
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
        .collect();
    let parent = |field: &str| m.parents.iter().find(|p| p.field == field);
    let on_merged =
        parent("model").is_some_and(|p| parent_role(recipe, cache, p) == Some(Role::Merge));
    let label = match (objective, parent("adapter"), on_merged) {
        (Objective::Dpo, Some(a), _) => format!("scheme one: continue `{}`", a.stage),
        (Objective::Dpo, None, true) => format!(
            "scheme two: fresh adapter on `{}`",
            parent("model").map_or("?", |p| p.stage.as_str())
        ),
        (Objective::Dpo, None, false) => "DPO, fresh adapter".into(),
        (Objective::Sft, _, _) => "SFT".into(),
    };
    // Scheme two: what the merge it trained on cost in precision.
    let merge_precision = parent("model")
        .filter(|_| on_merged)
        .and_then(|p| cache.manifest(&p.artifact))
        .map(|merge| {
            merge
                .metrics
                .iter()
                .filter(|(k, _)| k.starts_with("merge/"))
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect()
        })
        .unwrap_or_default();
    let reference = m
        .metrics
        .get("reference")
        .and_then(|v| v.as_str())
        .map(String::from)
        .unwrap_or_else(|| parent("model").map_or("-".into(), |p| p.stage.clone()));
    StageSummary {
        name,
        objective,
        label,
        rows,
        trainable_parameters: final_metrics
            .get("trainable_parameters")
            .copied()
            .unwrap_or(0.0) as u64,
        steps: final_metrics.get("steps").copied().unwrap_or(0.0) as u64,
        final_metrics,
        bytes_on_disk,
        peak_memory_bytes: m.peak_rss_bytes,
        wall_seconds: m.wall_seconds,
        lora: lora_description(dir),
        reference,
        merge_precision,
        evaluated: Default::default(),
    }
}

/// Where a recipe's report goes: next to the artifacts, per recipe name.
pub fn report_dir(cache: &Cache, recipe: &Recipe) -> PathBuf {
    cache.root.join("reports").join(&recipe.header.name.value)
}
