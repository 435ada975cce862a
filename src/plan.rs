//! Planning: the cache key of every stage, whether it is cached, and when
//! not, why it must run (Snakemake-style rerun reasons).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::{Cache, Integrity};
use crate::graph::Dag;
use crate::hashing::Digest;
use crate::recipe::diag::{Problem, RecipeError};
use crate::recipe::Recipe;

/// Everything a stage's result depends on. Its canonical JSON, hashed with
/// blake3, is the stage key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub kind: String,
    pub kind_version: u32,
    /// Resolved parameters, every default filled in.
    pub params: serde_json::Value,
    /// Field -> key of the upstream stage.
    pub inputs: BTreeMap<String, String>,
    /// Field -> content hash of the file or folder.
    pub files: BTreeMap<String, Digest>,
    pub seed: u64,
    /// "cpu" or "cuda" for stages that compute on a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

impl KeyInputs {
    pub fn key(&self) -> String {
        let value = serde_json::to_value(self).expect("key inputs serialize");
        blake3::hash(canonical_json(&value).as_bytes())
            .to_hex()
            .to_string()
    }
}

/// JSON with object keys sorted at every level and no whitespace, so the
/// encoding depends only on the values (not on key order or formatting).
pub fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let body: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical_json(v)))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(items) => {
            let body: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", body.join(","))
        }
        other => other.to_string(),
    }
}

/// Per-file detail of an input, kept so a reason can name the file that changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileDetail {
    pub path: String,
    /// Relative path -> hash (one entry for a plain file).
    pub files: BTreeMap<String, Digest>,
}

/// What a stage of a recipe looked like when it last ran: the basis of reasons.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    pub inputs: KeyInputs,
    pub files: BTreeMap<String, FileDetail>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    /// A whole artifact exists for the key.
    Cached { artifact: String },
    /// Must run from the start.
    Run,
    /// Must run, continuing from a checkpoint.
    Resume { step: u64 },
}

impl Status {
    pub fn label(&self) -> String {
        match self {
            Status::Cached { .. } => "cached".into(),
            Status::Run => "run".into(),
            Status::Resume { step } => format!("resume from step {step}"),
        }
    }

    pub fn will_run(&self) -> bool {
        !matches!(self, Status::Cached { .. })
    }
}

#[derive(Clone, Debug)]
pub struct PlannedStage {
    pub index: usize,
    pub name: String,
    pub kind: String,
    pub key: String,
    pub status: Status,
    /// Why it runs (empty when cached).
    pub reasons: Vec<String>,
    /// (field, upstream stage index).
    pub deps: Vec<(&'static str, usize)>,
    pub key_inputs: KeyInputs,
    pub files: BTreeMap<String, FileDetail>,
}

impl PlannedStage {
    pub fn reason(&self) -> String {
        if self.reasons.is_empty() {
            match &self.status {
                Status::Cached { artifact } => {
                    format!("cached artifact {}", crate::cache::short(artifact))
                }
                _ => String::new(),
            }
        } else {
            self.reasons.join("; ")
        }
    }

    pub fn record(&self) -> StageRecord {
        StageRecord {
            key: self.key.clone(),
            inputs: self.key_inputs.clone(),
            files: self.files.clone(),
        }
    }
}

/// A plan: stages in execution order.
#[derive(Debug)]
pub struct Plan {
    pub stages: Vec<PlannedStage>,
    /// The resolved device (`auto` decided).
    pub device: crate::recipe::params::DeviceSpec,
}

impl Plan {
    pub fn by_index(&self, index: usize) -> &PlannedStage {
        self.stages
            .iter()
            .find(|s| s.index == index)
            .expect("planned")
    }

    pub fn by_name(&self, name: &str) -> Option<&PlannedStage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// What the command line says besides the recipe.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Stages to run regardless of the cache.
    pub force: Vec<String>,
    /// `--device`, overriding the recipe's `device`.
    pub device: Option<crate::recipe::params::DeviceSpec>,
}

/// File in the work folder of an unfinished stage that says where it would resume.
pub const RESUME_FILE: &str = "resume.json";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Recipe(#[from] RecipeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Compute keys, statuses and reasons for every stage, in execution order.
pub fn plan(
    recipe: &Recipe,
    dag: &Dag,
    cache: &Cache,
    overrides: &Overrides,
) -> Result<Plan, PlanError> {
    let wanted = overrides
        .device
        .as_ref()
        .unwrap_or(&recipe.header.device.value);
    let device = crate::device::resolve(wanted).map_err(|message| {
        let span = if overrides.device.is_some() {
            0..0
        } else {
            recipe.header.device.span.clone()
        };
        recipe.error(vec![Problem::new(message).at(span, "device")])
    })?;
    let mut planned: Vec<PlannedStage> = Vec::new();
    let mut problems = Vec::new();
    for &i in &dag.order {
        let stage = &recipe.stages[i];
        let deps = dag.deps(i);

        let mut files = BTreeMap::new();
        let mut details = BTreeMap::new();
        for input in stage.params.files() {
            if !input.path.exists() {
                problems.push(
                    Problem::new(format!(
                        "stage `{}`: `{}` not found: {}",
                        stage.name.value,
                        input.field,
                        input.path.display()
                    ))
                    .at(input.written.span.clone(), "no such file or folder"),
                );
                continue;
            }
            let digest = cache.hasher.path(&input.path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("hashing {}: {e}", input.path.display()))
            })?;
            files.insert(input.field.clone(), digest.hash.clone());
            details.insert(
                input.field.clone(),
                FileDetail {
                    path: input.written.value.clone(),
                    files: digest.files,
                },
            );
        }

        let inputs: BTreeMap<String, String> = deps
            .iter()
            .map(|(field, d)| {
                let up = planned
                    .iter()
                    .find(|p| p.index == *d)
                    .expect("dependencies come first");
                (field.to_string(), up.key.clone())
            })
            .collect();
        let key_inputs = KeyInputs {
            kind: stage.kind.name().to_string(),
            kind_version: stage.kind.version(),
            params: stage.params.key_params(),
            inputs,
            files,
            seed: recipe.header.seed.value,
            device: stage
                .params
                .uses_device()
                .then(|| crate::device::kind(&device).to_string()),
        };
        let key = key_inputs.key();
        let mut p = PlannedStage {
            index: i,
            name: stage.name.value.clone(),
            kind: stage.kind.name().to_string(),
            key,
            status: Status::Run,
            reasons: Vec::new(),
            deps,
            key_inputs,
            files: details,
        };
        decide(&mut p, recipe, cache, overrides, &planned);
        planned.push(p);
    }
    if !problems.is_empty() {
        return Err(recipe.error(problems).into());
    }
    Ok(Plan {
        stages: planned,
        device,
    })
}

fn decide(
    p: &mut PlannedStage,
    recipe: &Recipe,
    cache: &Cache,
    overrides: &Overrides,
    earlier: &[PlannedStage],
) {
    let resume = resume_step(&cache.work_dir(&p.key));
    let not_cached = |reasons: Vec<String>| match resume {
        Some(step) => (Status::Resume { step }, reasons),
        None => (Status::Run, reasons),
    };
    let (status, reasons) = if overrides.force.contains(&p.name) {
        not_cached(vec!["forced with --force".into()])
    } else {
        match cache.key_record(&p.key) {
            Some(record) => match cache.verify(&record.artifact) {
                Integrity::Whole => {
                    let stage = &recipe.stages[p.index];
                    match stage
                        .params
                        .outside_changed(&cache.artifact_dir(&record.artifact))
                    {
                        Some(why) => not_cached(vec![why]),
                        None => (
                            Status::Cached {
                                artifact: record.artifact,
                            },
                            Vec::new(),
                        ),
                    }
                }
                Integrity::Missing => not_cached(vec!["cached artifact missing".into()]),
                Integrity::Corrupt(why) => {
                    not_cached(vec![format!("cached artifact corrupt ({why})")])
                }
            },
            None => not_cached(why_changed(p, &recipe.canonical, cache, earlier)),
        }
    };
    p.status = status;
    p.reasons = reasons;
}

fn resume_step(work: &Path) -> Option<u64> {
    let bytes = std::fs::read(work.join(RESUME_FILE)).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    json["step"].as_u64()
}

/// Compare with the stage's last record in this recipe and say what changed.
fn why_changed(
    p: &PlannedStage,
    recipe: &Path,
    cache: &Cache,
    earlier: &[PlannedStage],
) -> Vec<String> {
    let Some(old) = cache.stage_record::<StageRecord>(recipe, &p.name) else {
        return vec!["new stage".into()];
    };
    let (old, new) = (&old, &p.key_inputs);
    let mut reasons = Vec::new();
    if old.inputs.kind != new.kind {
        reasons.push(format!("kind changed: {} → {}", old.inputs.kind, new.kind));
    } else if old.inputs.kind_version != new.kind_version {
        reasons.push(format!(
            "implementation of `{}` changed (version {} → {})",
            new.kind, old.inputs.kind_version, new.kind_version
        ));
    }
    let mut changes = Vec::new();
    diff_json("", &old.inputs.params, &new.params, &mut changes);
    for (path, before, after) in changes {
        reasons.push(format!("parameter changed: {path} {before} → {after}"));
    }
    for (field, detail) in &p.files {
        match old.files.get(field) {
            None => reasons.push(format!("new input `{field}`: {}", detail.path)),
            Some(prev) if prev.files != detail.files => {
                let changed: Vec<&String> = detail
                    .files
                    .keys()
                    .chain(prev.files.keys())
                    .filter(|f| detail.files.get(*f) != prev.files.get(*f))
                    .collect();
                let single = detail.files.len() == 1 && prev.files.len() == 1;
                let shown = if single {
                    detail.path.clone()
                } else {
                    let mut c: Vec<String> = changed
                        .iter()
                        .map(|f| format!("{}/{f}", detail.path.trim_end_matches('/')))
                        .collect();
                    c.dedup();
                    c.join(", ")
                };
                reasons.push(format!("{} changed: {shown}", input_noun(field)));
            }
            Some(prev) if prev.path != detail.path => reasons.push(format!(
                "`{field}` now reads {} (was {}; same content)",
                detail.path, prev.path
            )),
            _ => {}
        }
    }
    for field in old.files.keys().filter(|f| !p.files.contains_key(*f)) {
        reasons.push(format!("input `{field}` removed"));
    }
    for (field, up) in &p.deps {
        let up = earlier
            .iter()
            .find(|e| e.index == *up)
            .expect("planned before");
        if old.inputs.inputs.get(*field) != Some(&up.key) {
            reasons.push(if up.status.will_run() {
                format!("upstream stage `{}` will rerun", up.name)
            } else {
                format!("upstream stage `{}` changed", up.name)
            });
        }
    }
    if old.inputs.seed != new.seed {
        reasons.push(format!("seed changed: {} → {}", old.inputs.seed, new.seed));
    }
    if reasons.is_empty() {
        reasons.push("cached artifact missing".into());
    }
    reasons
}

fn input_noun(field: &str) -> &'static str {
    if field.starts_with("data") {
        "data file"
    } else {
        "model file"
    }
}

/// Leaf-level differences between two JSON values: (dotted path, old, new).
fn diff_json(
    path: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff_json(
                    &sub,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push((path.to_string(), show(a), show(b))),
        _ => {}
    }
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "(unset)".into(),
        other => other.to_string(),
    }
}
