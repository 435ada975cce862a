//! Recipes: TOML files declaring stages. Parsing keeps every span so that
//! each problem points at what the user wrote.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::span::Sp;
use crate::diag::{did_you_mean, toml_problem, unknown_key, Problem, RecipeError};
use crate::stage::{DeviceSpec, Dtype, ParseContext, Registry, Stage};

pub mod executor;
pub mod matrix;
mod sweep;

/// The `[recipe]` table.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeHeader {
    /// A name for humans and reports.
    pub name: Sp<String>,
    /// Seed for every random choice (initialisation, data order, dropout).
    #[serde(default)]
    pub seed: Sp<u64>,
    /// Default dtype of stages that compute: "f32", "bf16" or "f16".
    #[serde(default)]
    pub dtype: Sp<Dtype>,
    /// Default device: "auto", "cpu" or "cuda:N".
    #[serde(default)]
    pub device: Sp<DeviceSpec>,
}

/// The `[cache]` table: where results are shared beyond this machine's cache folder.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// A shared cache on S3-compatible storage, "s3://bucket/prefix": stages
    /// not in the local cache are looked up there and downloaded, and every
    /// stage that finishes is uploaded. Endpoint, region and credentials come
    /// from the AWS environment variables and files (README, "Sharing
    /// results"). `--remote` / RUNNER_REMOTE override it, `--no-remote` ignores it.
    pub remote: Option<Sp<String>>,
}

/// A whole recipe, parsed and checked stage by stage (the DAG is checked in `graph`).
#[derive(Debug)]
pub struct Recipe {
    /// The recipe file as given (used in messages).
    pub path: PathBuf,
    /// The recipe file, canonicalized (identifies it in the cache's records).
    pub canonical: PathBuf,
    pub source: Arc<String>,
    pub header: RecipeHeader,
    /// Stages in the order they were written.
    pub stages: Vec<Stage>,
    /// `[executor]`: how stages are submitted to a cluster.
    pub executor: executor::ExecutorSection,
    /// `[tracking]` resolved: TensorBoard's log folder, absolute (or set
    /// by `--tensorboard`).
    pub tensorboard: Option<PathBuf>,
    /// `[tracking] mlflow` (or `--mlflow`, `MLFLOW_TRACKING_URI`).
    pub mlflow: Option<String>,
    /// `[cache] remote`, checked to be an S3 URL.
    pub remote: Option<String>,
}

impl Recipe {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.value == name)
    }

    /// The stages `name` stands for on the command line: the stage of that
    /// name, else every variant of the swept stage written as `name`
    /// (`dpo` → `dpo@beta=0.1`, `dpo@beta=0.5`); empty if neither.
    pub fn stages_named(&self, name: &str) -> Vec<&str> {
        if let Some(stage) = self.stage(name) {
            return vec![stage.name.value.as_str()];
        }
        self.stages
            .iter()
            .filter(|s| s.variant.as_ref().is_some_and(|v| v.of == name))
            .map(|s| s.name.value.as_str())
            .collect()
    }

    pub fn error(&self, problems: Vec<Problem>) -> RecipeError {
        RecipeError::new(&self.path, self.source.clone(), problems)
    }

    pub fn dir(&self) -> &Path {
        self.canonical.parent().unwrap_or(Path::new("."))
    }
}

/// Errors loading a recipe: the file cannot be read, or it has problems.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read recipe {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(#[from] RecipeError),
}

const TOP_LEVEL: [&str; 6] = [
    "recipe", "defaults", "stages", "executor", "tracking", "cache",
];

/// Read and parse a recipe file.
pub fn load(path: &Path, registry: &Registry) -> Result<Recipe, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let shown = path.to_path_buf();
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
            // In the lossy text the bad byte became U+FFFD at the same offset.
            let problem = Problem::new("the recipe is not valid UTF-8")
                .at(valid..valid + 1, "invalid byte here")
                .help("save the file as UTF-8");
            return Err(RecipeError::new(&shown, Arc::new(lossy), vec![problem]).into());
        }
    };
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    parse(&shown, &canonical, Arc::new(text), registry).map_err(LoadError::from)
}

/// Parse recipe text. `shown` is the path used in messages; `canonical` locates relative paths.
pub fn parse(
    shown: &Path,
    canonical: &Path,
    source: Arc<String>,
    registry: &Registry,
) -> Result<Recipe, RecipeError> {
    let fail = |problems: Vec<Problem>| RecipeError::new(shown, source.clone(), problems);
    let root = DeTable::parse(&source).map_err(|e| fail(vec![toml_problem(&e, "invalid TOML")]))?;
    let root_span = root.span();
    let root = root.into_inner();
    let mut problems = Vec::new();

    for (key, _) in root.iter() {
        if !TOP_LEVEL.contains(&key.get_ref().as_ref()) {
            problems.push(unknown_key(key, &TOP_LEVEL, "top-level table"));
        }
    }

    let header: Option<RecipeHeader> = match root.get("recipe") {
        Some(v) => match RecipeHeader::deserialize(toml::de::ValueDeserializer::from(v.clone())) {
            Ok(h) => Some(h),
            Err(e) => {
                problems.push(toml_problem(&e, "in [recipe]"));
                None
            }
        },
        None => {
            problems.push(
                Problem::new("the recipe has no [recipe] table")
                    .at(
                        root_span.start..root_span.start,
                        "expected [recipe] with at least `name`",
                    )
                    .help("add:\n[recipe]\nname = \"my-recipe\"\nseed = 0"),
            );
            None
        }
    };

    let defaults = parse_defaults(root.get("defaults"), registry, &mut problems);
    let recipe_dir = canonical.parent().unwrap_or(Path::new(".")).to_path_buf();

    let mut stages = Vec::new();
    match root.get("stages") {
        None => problems.push(Problem::new("the recipe declares no stages").at(
            root_span.start..root_span.start,
            "expected [stages.<name>] tables",
        )),
        Some(v) => match v.get_ref() {
            DeValue::Table(table) => {
                if let Some(header) = &header {
                    let context = Context {
                        defaults: &defaults,
                        registry,
                        recipe_dir: &recipe_dir,
                        dtype: header.dtype.value,
                    };
                    stages = sweep::expand_stages(table, &context, &mut problems);
                }
            }
            other => problems.push(
                Problem::new(format!(
                    "`stages` must be a table, found {}",
                    other.type_str()
                ))
                .at(v.span(), "expected [stages.<name>] tables"),
            ),
        },
    }

    let executor = match root.get("executor") {
        Some(value) => {
            let kinds: Vec<&str> = registry.names().collect();
            let mut names: Vec<String> = stages.iter().map(|s| s.name.value.clone()).collect();
            names.extend(
                stages
                    .iter()
                    .filter_map(|s| s.variant.as_ref().map(|v| v.of.clone())),
            );
            names.sort();
            names.dedup();
            executor::parse(value, &kinds, &names, &mut problems)
        }
        None => executor::ExecutorSection::default(),
    };

    let tracking = match root.get("tracking") {
        Some(value) => {
            match crate::tracking::TrackingSection::deserialize(toml::de::ValueDeserializer::from(
                value.clone(),
            )) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(crate::diag::toml_problem(&e, "in [tracking]"));
                    Default::default()
                }
            }
        }
        None => Default::default(),
    };
    let cache = match root.get("cache") {
        Some(value) => {
            match CacheSection::deserialize(toml::de::ValueDeserializer::from(value.clone())) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(toml_problem(&e, "in [cache]"));
                    Default::default()
                }
            }
        }
        None => Default::default(),
    };
    if let Some(remote) = &cache.remote {
        if let Err(why) = crate::remote::parse_url(&remote.value) {
            problems.push(
                Problem::new(format!("[cache] remote: {why}"))
                    .at(remote.span.clone(), "expected s3://bucket/prefix"),
            );
        }
    }
    let recipe_dir = canonical.parent().unwrap_or(Path::new("."));
    match header {
        Some(header) if problems.is_empty() => Ok(Recipe {
            path: shown.to_path_buf(),
            canonical: canonical.to_path_buf(),
            source: source.clone(),
            header,
            stages,
            executor,
            tensorboard: tracking.tensorboard.map(|d| recipe_dir.join(d)),
            mlflow: tracking.mlflow,
            remote: cache.remote.map(|r| r.value),
        }),
        _ => Err(fail(problems)),
    }
}

type Defaults<'a> = BTreeMap<String, &'a Spanned<DeValue<'a>>>;

fn parse_defaults<'a>(
    value: Option<&'a Spanned<DeValue<'a>>>,
    registry: &Registry,
    problems: &mut Vec<Problem>,
) -> Defaults<'a> {
    let mut defaults = BTreeMap::new();
    let Some(value) = value else { return defaults };
    let DeValue::Table(table) = value.get_ref() else {
        problems.push(
            Problem::new("`defaults` must be a table of tables, one per stage kind")
                .at(value.span(), "expected [defaults.<kind>]"),
        );
        return defaults;
    };
    let kinds: Vec<&str> = registry.names().collect();
    for (kind, v) in table.iter() {
        if registry.get(kind.get_ref()).is_none() {
            problems.push(unknown_key(kind, &kinds, "stage kind"));
        } else if !v.get_ref().is_table() {
            problems.push(
                Problem::new(format!("[defaults.{}] must be a table", kind.get_ref()))
                    .at(v.span(), "expected a table"),
            );
        } else {
            defaults.insert(kind.get_ref().to_string(), v);
        }
    }
    defaults
}

/// What parsing any stage needs besides its own table.
struct Context<'a, 'i> {
    defaults: &'a Defaults<'i>,
    registry: &'a Registry,
    recipe_dir: &'a Path,
    dtype: Dtype,
}

fn parse_stage(
    stage_name: &str,
    name_span: Range<usize>,
    span: Range<usize>,
    table: &DeTable<'_>,
    cx: &Context<'_, '_>,
) -> Result<Stage, Vec<Problem>> {
    let registry = cx.registry;
    let kind_name = match table.get("kind") {
        Some(k) => match k.get_ref().as_str() {
            Some(s) => Sp::new(s.to_string(), k.span()),
            None => {
                return Err(vec![Problem::new("`kind` must be a string")
                    .at(k.span(), "expected a stage kind name")])
            }
        },
        None => {
            let kinds: Vec<_> = registry.names().collect();
            return Err(vec![Problem::new(format!(
                "stage `{stage_name}` has no `kind`"
            ))
            .at(name_span, "this stage")
            .help(format!(
                "add `kind = \"...\"`, one of: {}",
                kinds.join(", ")
            ))]);
        }
    };
    let Some(kind) = registry.get(&kind_name) else {
        let kinds: Vec<_> = registry.names().collect();
        let mut p = Problem::new(format!("unknown stage kind `{}`", kind_name.value))
            .at(kind_name.span.clone(), "not a stage kind");
        p = match did_you_mean(&kind_name, kinds.iter().copied()) {
            Some(s) => p.help(format!("did you mean `{s}`?")),
            None => p.help(format!("stage kinds are: {}", kinds.join(", "))),
        };
        return Err(vec![p]);
    };

    let mut written = table.clone();
    written.remove("kind");
    let mut merged = written.clone();
    if let Some(d) = cx.defaults.get(kind.name()) {
        if let DeValue::Table(dt) = d.get_ref() {
            merge_tables(&mut merged, dt);
        }
    }
    let ctx = ParseContext {
        stage: stage_name,
        recipe_dir: cx.recipe_dir,
        span: span.clone(),
        dtype: cx.dtype,
    };
    let spanned = Spanned::new(span.clone(), DeValue::Table(merged));
    let params = kind.parse(&written, spanned, &ctx)?;
    Ok(Stage {
        name: Sp::new(stage_name.to_string(), name_span),
        kind: kind.clone(),
        params,
        span,
        recipe_dir: cx.recipe_dir.to_path_buf(),
        variant: None,
    })
}

/// Stage names become file names and appear in messages: keep them plain.
fn check_stage_name(name: &str, span: Range<usize>) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Problem::new(format!("invalid stage name `{name}`"))
            .at(span, "use letters, digits, `_` and `-` (at most 64)"))
    }
}

/// Deep-merge `defaults` into `table`: keys the stage wrote win; nested tables merge.
fn merge_tables<'i>(table: &mut DeTable<'i>, defaults: &DeTable<'i>) {
    for (key, dvalue) in defaults.iter() {
        match table.get_mut(key.get_ref().as_ref()) {
            None => {
                table.insert(key.clone(), dvalue.clone());
            }
            Some(existing) => {
                if let (DeValue::Table(t), DeValue::Table(d)) =
                    (existing.get_mut(), dvalue.get_ref())
                {
                    merge_tables(t, d);
                }
            }
        }
    }
}
