//! Planning: the cache key of every stage, whether it is cached, and when
//! not, why it must run (Snakemake-style rerun reasons).

pub mod memory_check;
pub mod render;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::{Cache, Integrity};
use crate::diag::{Problem, RecipeError};
use crate::graph::Dag;
use crate::hashing::Digest;
use crate::recipe::Recipe;
use crate::stage::DeviceSpec;

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
        blake3::hash(crate::hashing::canonical_json(&value).as_bytes())
            .to_hex()
            .to_string()
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

/// Why a stage must run (Snakemake's rerun reasons). `plan` shows them as text.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// `--force STAGE`.
    Forced,
    /// The kind's own word that what it wrote outside the cache is gone.
    OutsideChanged(String),
    /// The key has a record but its artifact folder is gone.
    ArtifactMissing,
    /// The artifact's files no longer hash to its name.
    ArtifactCorrupt(String),
    /// The remote records the key, but what it holds failed its check.
    RemoteUnusable(String),
    /// This recipe never ran a stage of this name.
    NewStage,
    KindChanged {
        old: String,
        new: String,
    },
    VersionChanged {
        kind: String,
        old: u32,
        new: u32,
    },
    /// A parameter at this dotted path, old and new values as JSON.
    ParamChanged {
        path: String,
        old: String,
        new: String,
    },
    NewInput {
        field: String,
        path: String,
    },
    /// An input's content changed; `shown` names the file(s).
    InputChanged {
        field: String,
        shown: String,
    },
    /// Same content under another path.
    InputMoved {
        field: String,
        path: String,
        was: String,
    },
    InputRemoved {
        field: String,
    },
    UpstreamRerun {
        stage: String,
    },
    UpstreamChanged {
        stage: String,
    },
    SeedChanged {
        old: u64,
        new: u64,
    },
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Forced => write!(f, "forced with --force"),
            Reason::OutsideChanged(why) => f.write_str(why),
            Reason::ArtifactMissing => write!(f, "cached artifact missing"),
            Reason::ArtifactCorrupt(why) => write!(f, "cached artifact corrupt ({why})"),
            Reason::RemoteUnusable(why) => write!(f, "the remote's copy is unusable ({why})"),
            Reason::NewStage => write!(f, "new stage"),
            Reason::KindChanged { old, new } => write!(f, "kind changed: {old} → {new}"),
            Reason::VersionChanged { kind, old, new } => write!(
                f,
                "implementation of `{kind}` changed (version {old} → {new})"
            ),
            Reason::ParamChanged { path, old, new } => {
                write!(f, "parameter changed: {path} {old} → {new}")
            }
            Reason::NewInput { field, path } => write!(f, "new input `{field}`: {path}"),
            Reason::InputChanged { field, shown } => {
                write!(f, "{} changed: {shown}", input_noun(field))
            }
            Reason::InputMoved { field, path, was } => {
                write!(f, "`{field}` now reads {path} (was {was}; same content)")
            }
            Reason::InputRemoved { field } => write!(f, "input `{field}` removed"),
            Reason::UpstreamRerun { stage } => write!(f, "upstream stage `{stage}` will rerun"),
            Reason::UpstreamChanged { stage } => write!(f, "upstream stage `{stage}` changed"),
            Reason::SeedChanged { old, new } => write!(f, "seed changed: {old} → {new}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Status {
    /// A whole artifact exists for the key.
    Cached { artifact: String },
    /// Not here, but the remote cache has the key's artifact: `run` downloads it.
    Remote { artifact: String },
    /// Must run from the start.
    Run,
    /// Must run, continuing from a checkpoint.
    Resume { step: u64 },
}

impl Status {
    pub fn label(&self) -> String {
        match self {
            Status::Cached { .. } => "cached".into(),
            Status::Remote { .. } => "cached (remote)".into(),
            Status::Run => "run".into(),
            Status::Resume { step } => format!("resume from step {step}"),
        }
    }

    pub fn will_run(&self) -> bool {
        !matches!(self, Status::Cached { .. } | Status::Remote { .. })
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
    pub reasons: Vec<Reason>,
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
                Status::Remote { artifact } => {
                    format!("artifact {} on the remote", crate::cache::short(artifact))
                }
                _ => String::new(),
            }
        } else {
            let shown: Vec<String> = self.reasons.iter().map(Reason::to_string).collect();
            shown.join("; ")
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
    pub device: DeviceSpec,
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
    /// The device stages compute on, resolved (`auto` decided) by the caller.
    pub device: DeviceSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Recipe(#[from] RecipeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Looking a key up in the remote cache failed.
    #[error("{0}")]
    Remote(#[from] crate::remote::RemoteError),
}

/// Compute keys, statuses and reasons for every stage, in execution order.
pub fn plan(
    recipe: &Recipe,
    dag: &Dag,
    cache: &Cache,
    overrides: &Overrides,
) -> Result<Plan, PlanError> {
    let device = overrides.device.clone();
    let mut planned: Vec<PlannedStage> = Vec::new();
    let mut problems = Vec::new();
    for &i in &dag.order {
        let stage = &recipe.stages[i];
        let deps = dag.deps(i);

        let mut files = BTreeMap::new();
        let mut details = BTreeMap::new();
        for input in stage.files() {
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
            params: stage.key_params(),
            inputs,
            files,
            seed: recipe.header.seed.value,
            device: stage.kind.uses_device().then(|| device.kind().to_string()),
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
        decide(&mut p, recipe, cache, overrides, &planned)?;
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
) -> Result<(), PlanError> {
    let resume = cache.resume_step(&p.key);
    let not_cached = |reasons: Vec<Reason>| match resume {
        Some(step) => (Status::Resume { step }, reasons),
        None => (Status::Run, reasons),
    };
    let (status, reasons) = if overrides.force.contains(&p.name) {
        not_cached(vec![Reason::Forced])
    } else {
        match cache.key_record(&p.key) {
            Some(record) => match cache.verify(&record.artifact) {
                Integrity::Whole => {
                    let stage = &recipe.stages[p.index];
                    match stage.kind.outside_changed(
                        stage.params.as_ref(),
                        &cache.artifact_dir(&record.artifact),
                    ) {
                        Some(why) => not_cached(vec![Reason::OutsideChanged(why)]),
                        None => (
                            Status::Cached {
                                artifact: record.artifact,
                            },
                            Vec::new(),
                        ),
                    }
                }
                Integrity::Missing => not_cached(vec![Reason::ArtifactMissing]),
                Integrity::Corrupt(why) => not_cached(vec![Reason::ArtifactCorrupt(why)]),
            },
            None => not_cached(why_changed(p, &recipe.canonical, cache, earlier)),
        }
    };
    p.status = status;
    p.reasons = reasons;
    // Not here: the shared cache may have it (a forced stage runs anyway).
    let stage = &recipe.stages[p.index];
    if let (Some(remote), true) = (&cache.remote, p.status.will_run()) {
        if !p.reasons.contains(&Reason::Forced) && stage.kind.shared(stage.params.as_ref()) {
            if let Some(record) = crate::sharing::remote_record(remote, &p.key)? {
                p.status = Status::Remote {
                    artifact: record.artifact,
                };
                p.reasons.clear();
            }
        }
    }
    Ok(())
}

/// Compare with the stage's last record in this recipe and say what changed.
fn why_changed(
    p: &PlannedStage,
    recipe: &Path,
    cache: &Cache,
    earlier: &[PlannedStage],
) -> Vec<Reason> {
    let Some(old) = cache.stage_record::<StageRecord>(recipe, &p.name) else {
        return vec![Reason::NewStage];
    };
    let (old, new) = (&old, &p.key_inputs);
    let mut reasons = Vec::new();
    if old.inputs.kind != new.kind {
        reasons.push(Reason::KindChanged {
            old: old.inputs.kind.clone(),
            new: new.kind.clone(),
        });
    } else if old.inputs.kind_version != new.kind_version {
        reasons.push(Reason::VersionChanged {
            kind: new.kind.clone(),
            old: old.inputs.kind_version,
            new: new.kind_version,
        });
    }
    let mut changes = Vec::new();
    diff_json("", &old.inputs.params, &new.params, &mut changes);
    for (path, old, new) in changes {
        reasons.push(Reason::ParamChanged { path, old, new });
    }
    for (field, detail) in &p.files {
        match old.files.get(field) {
            None => reasons.push(Reason::NewInput {
                field: field.clone(),
                path: detail.path.clone(),
            }),
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
                reasons.push(Reason::InputChanged {
                    field: field.clone(),
                    shown,
                });
            }
            Some(prev) if prev.path != detail.path => reasons.push(Reason::InputMoved {
                field: field.clone(),
                path: detail.path.clone(),
                was: prev.path.clone(),
            }),
            _ => {}
        }
    }
    for field in old.files.keys().filter(|f| !p.files.contains_key(*f)) {
        reasons.push(Reason::InputRemoved {
            field: field.clone(),
        });
    }
    for (field, up) in &p.deps {
        let up = earlier
            .iter()
            .find(|e| e.index == *up)
            .expect("planned before");
        if old.inputs.inputs.get(*field) != Some(&up.key) {
            let stage = up.name.clone();
            reasons.push(if up.status.will_run() {
                Reason::UpstreamRerun { stage }
            } else {
                Reason::UpstreamChanged { stage }
            });
        }
    }
    if old.inputs.seed != new.seed {
        reasons.push(Reason::SeedChanged {
            old: old.inputs.seed,
            new: new.seed,
        });
    }
    if reasons.is_empty() {
        reasons.push(Reason::ArtifactMissing);
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
