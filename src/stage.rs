//! The stage-kind trait: one type per kind (base, sft, dpo, ...) declares
//! what it consumes and produces, its parameters and implementation version,
//! and how it runs. The engine knows nothing else about a kind.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::recipe::diag::Problem;
use crate::recipe::params::LoraSpec;
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;

/// What a stage's artifact is, for type-checking the edges of the DAG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A whole model: an HF folder (config.json, safetensors, tokenizer).
    Model,
    /// A LoRA adapter in PEFT layout, trained on one particular model.
    Adapter,
    /// Evaluation results.
    Evaluation,
    /// A copy written outside the cache.
    Export,
}

impl ArtifactKind {
    pub fn noun(self) -> &'static str {
        match self {
            ArtifactKind::Model => "a model",
            ArtifactKind::Adapter => "an adapter",
            ArtifactKind::Evaluation => "an evaluation",
            ArtifactKind::Export => "an export",
        }
    }
}

/// What a kind does, for commands that treat kinds alike: `compare` takes
/// the training stages, and tells a fresh adapter on a merged model from one
/// on a base by the `Merge` role of its model's stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Brings a model or an adapter in from outside (`base`, `adapter`).
    Source,
    /// Trains an adapter with this objective.
    Train(Objective),
    /// Folds an adapter into its model.
    Merge,
    /// Scores a model or an adapter.
    Evaluate,
    /// Writes an artifact outside the cache.
    Export,
}

/// The objective a training stage optimises.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Supervised fine-tuning on completions.
    Sft,
    /// Preference optimisation on chosen/rejected pairs.
    Dpo,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An objective name other than "sft" or "dpo".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown objective {0:?} (expected \"sft\" or \"dpo\")")]
pub struct UnknownObjective(pub String);

/// Case-insensitive, surrounding whitespace ignored (" DPO " is `Dpo`).
impl std::str::FromStr for Objective {
    type Err = UnknownObjective;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sft" => Ok(Objective::Sft),
            "dpo" => Ok(Objective::Dpo),
            _ => Err(UnknownObjective(s.to_string())),
        }
    }
}

/// A reference from one stage to another: an edge of the DAG.
#[derive(Clone, Debug)]
pub struct StageRef {
    /// The key it was written under (`model`, `adapter`, `reference`, `from`).
    pub field: &'static str,
    pub target: Sp<String>,
    /// Artifact kinds this field accepts.
    pub accepts: &'static [ArtifactKind],
}

/// A file or folder the stage reads; its content hash enters the stage key.
#[derive(Clone, Debug)]
pub struct FileInput {
    /// Where it was written in the stage (`data.train`, `path`).
    pub field: String,
    /// Resolved against the recipe's folder.
    pub path: PathBuf,
    /// The path as the user wrote it, with its span.
    pub written: Sp<String>,
}

/// The LoRA configuration a stage gives its adapter, as far as the recipe says.
#[derive(Clone, Debug, PartialEq)]
pub enum LoraUse<'a> {
    /// The stage makes no adapter.
    None,
    /// A new adapter with this config.
    New(&'a LoraSpec),
    /// Continues the adapter named by the `adapter` field; `constraint` is a
    /// `lora` table merged in from `[defaults.<kind>]`, which must agree with it.
    Continue { constraint: Option<&'a LoraSpec> },
    /// Imported from a PEFT folder; the config is read from it when known.
    Imported(Option<LoraSpec>),
}

/// The resolved parameters of one stage: what a kind parsed from its table.
pub trait StageParams: Debug + Send + Sync + Any {
    /// Parameters as they enter the cache key: every default filled in.
    fn key_params(&self) -> serde_json::Value;

    /// References to other stages.
    fn refs(&self) -> Vec<StageRef>;

    /// Files and folders read (data, model folders).
    fn files(&self) -> Vec<FileInput> {
        Vec::new()
    }

    /// How the stage relates to LoRA adapters (for the DAG's checks).
    fn lora(&self) -> LoraUse<'_> {
        LoraUse::None
    }

    /// Names of the linear modules of the model this stage defines, when it
    /// defines one from scratch (a `base` stage). Merges inherit theirs.
    fn model_modules(&self) -> Option<Result<Vec<String>, Problem>> {
        None
    }

    /// For stages that write outside the cache (`export`): why their cached
    /// artifact no longer stands for what is on disk, if it does not.
    fn outside_changed(&self, _artifact: &std::path::Path) -> Option<String> {
        None
    }

    /// Whether the stage computes on the chosen device (its kind then enters the key).
    fn uses_device(&self) -> bool {
        false
    }

    /// Whether this stage needs training data and has none (reported at `span`).
    fn missing_data(&self) -> Option<std::ops::Range<usize>> {
        None
    }

    fn as_any(&self) -> &dyn Any;
}

/// One kind of stage.
pub trait StageKind: Send + Sync {
    /// The name written as `kind = "..."`.
    fn name(&self) -> &'static str;

    /// Bumped whenever the kind's output for the same inputs may change:
    /// it is part of every key, so old artifacts stop matching.
    fn version(&self) -> u32;

    fn output(&self) -> ArtifactKind;

    /// What the kind does (see `Role`).
    fn role(&self) -> Role;

    /// One line for `--help` and the schema.
    fn summary(&self) -> &'static str;

    /// Parse the stage's table (with `[defaults.<kind>]` merged in, `kind` removed).
    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>>;

    /// JSON schema of the stage table (without `kind`).
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema;

    /// Execute the stage, writing its artifact into `ctx.out_dir`.
    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()>;
}

/// The set of stage kinds a program knows. Tests add their own.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    pub fn empty() -> Self {
        Registry::default()
    }

    pub fn with(mut self, kind: impl StageKind + 'static) -> Self {
        self.kinds.insert(kind.name(), Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }
}

/// An upstream stage's finished artifact, as a running stage sees it.
#[derive(Clone, Debug)]
pub struct InputArtifact {
    pub stage: String,
    pub kind: String,
    pub key: String,
    /// The artifact folder in the cache.
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
}

/// Where a running stage reports progress.
pub trait Progress: Send + Sync {
    /// Set the number of steps of the current stage.
    fn set_total(&self, total: u64);
    /// Report that `done` steps are finished, with a short status message.
    fn set_position(&self, done: u64, message: &str);
    /// A log line (shown above bars on a terminal).
    fn log(&self, line: &str);
}

/// A stage that stopped because the user pressed Ctrl-C. It should have
/// saved whatever lets it resume before returning this.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Everything a running stage may use.
pub struct RunContext<'a> {
    pub stage: String,
    pub key: String,
    /// A fresh temporary folder: the stage writes its artifact here.
    pub out_dir: PathBuf,
    /// A folder that survives crashes, for checkpoints; removed when the stage completes.
    pub work_dir: PathBuf,
    /// Upstream artifacts by the field that referenced them.
    pub inputs: BTreeMap<String, InputArtifact>,
    /// Input files by field, resolved.
    pub files: BTreeMap<String, PathBuf>,
    pub seed: u64,
    pub progress: &'a dyn Progress,
    /// Metrics the stage reports; stored in the manifest.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub interrupt: &'a AtomicBool,
    /// The resolved compute device (`cpu` or `cuda:N`).
    pub device: crate::recipe::params::DeviceSpec,
    /// The cache, for derived artifacts shared between stages (tokenized data, reference log-probs).
    pub cache: &'a crate::cache::Cache,
    /// Derived artifacts this stage used; recorded in its manifest so `gc` keeps them.
    pub derived: Vec<String>,
}

impl RunContext<'_> {
    pub fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// A derived artifact (see `Cache::derived`), remembered for the manifest.
    pub fn derived(
        &mut self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        let dir = self.cache.derived(kind, key, build)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !self.derived.contains(&name) {
            self.derived.push(name);
        }
        Ok(dir)
    }

    /// The upstream artifact under `field`, or an error naming it.
    pub fn input(&self, field: &str) -> anyhow::Result<&InputArtifact> {
        self.inputs
            .get(field)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` has no input `{field}`", self.stage))
    }
}
