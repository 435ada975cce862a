//! The stage-kind contract. A kind (base, sft, dpo, ...) is one type
//! implementing the typed `Kind` trait: its parameter table, what it reads
//! and makes, its checks against the stages it refers to, and how it runs.
//! The engine sees kinds only through the object-safe `StageKind`, which
//! every `Kind` gets from one blanket implementation; it knows nothing else
//! about a kind.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::span::Sp;
use crate::diag::{toml_problem, Problem};
pub use crate::sink::{Interrupted, Progress};
use crate::units::MemoryEstimate;

/// Numeric type of weights and compute.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Where to compute: "auto" (a GPU when the binary has CUDA and one is present), "cpu" or "cuda:N".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(u32),
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        match d {
            DeviceSpec::Auto => "auto".into(),
            DeviceSpec::Cpu => "cpu".into(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}`: expected \"auto\", \"cpu\" or \"cuda:N\"")
                }),
        }
    }
}

impl DeviceSpec {
    /// "cpu" or "cuda": what enters the keys of stages that compute.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Cuda(_) => "cuda",
            _ => "cpu",
        }
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

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

/// A path written in a recipe, resolved against the recipe's folder.
pub fn resolve(recipe_dir: &Path, written: &str) -> PathBuf {
    let p = Path::new(written);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        recipe_dir.join(p)
    }
}

/// What a kind's parser is given besides the table.
pub struct ParseContext<'a> {
    pub stage: &'a str,
    /// The folder relative paths are resolved against.
    pub recipe_dir: &'a Path,
    /// The span of the whole `[stages.<name>]` table.
    pub span: Range<usize>,
    /// The recipe's default dtype for stages that compute.
    pub dtype: Dtype,
}

impl ParseContext<'_> {
    /// Resolve a path written in the recipe against the recipe's folder.
    pub fn resolve(&self, written: &str) -> PathBuf {
        resolve(self.recipe_dir, written)
    }

    /// An empty span at the start of the stage's table: "this stage".
    pub fn stage_start(&self) -> Range<usize> {
        self.span.start..self.span.start
    }
}

/// A kind's parsed parameters, type-erased for the engine. Call `as_any` on
/// `&dyn Params` (`boxed.as_ref()`): a `Box<dyn Params>` is itself `Any`.
pub trait Params: Any + Debug + Send + Sync {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any + Debug + Send + Sync> Params for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One parsed stage of a recipe.
#[derive(Debug)]
pub struct Stage {
    pub name: Sp<String>,
    pub kind: Arc<dyn StageKind>,
    pub params: Box<dyn Params>,
    /// Span of the whole `[stages.<name>]` table.
    pub span: Range<usize>,
    /// The folder the recipe's relative paths are resolved against.
    pub recipe_dir: PathBuf,
    /// Set when a sweep made this stage: which stage, at which values.
    pub variant: Option<Variant>,
}

/// One stage of a sweep (`matrix`), or of a stage fanned out with one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    /// The stage as written (`dpo_fresh` for `dpo_fresh@beta=0.1`).
    pub of: String,
    /// (parameter path, value as written), inherited axes first.
    pub values: Vec<(String, String)>,
}

impl Stage {
    /// References to other stages: the DAG's edges.
    pub fn refs(&self) -> Vec<StageRef> {
        self.kind.refs(self.params.as_ref())
    }

    /// Files and folders read; their content hashes enter the key.
    pub fn files(&self) -> Vec<FileInput> {
        self.kind.files(self.params.as_ref(), &self.recipe_dir)
    }

    /// Parameters as they enter the cache key, every default filled in.
    pub fn key_params(&self) -> serde_json::Value {
        self.kind.key_params(self.params.as_ref())
    }
}

impl std::fmt::Debug for dyn StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A stage seen from a kind's `check`: its parameters, and the stages its
/// references name, followed as far as the check needs.
#[derive(Clone, Copy)]
pub struct StageView<'a> {
    stages: &'a [Stage],
    index: usize,
}

impl<'a> StageView<'a> {
    pub fn new(stages: &'a [Stage], index: usize) -> Self {
        StageView { stages, index }
    }

    pub fn stage(&self) -> &'a Stage {
        &self.stages[self.index]
    }

    pub fn name(&self) -> &'a str {
        &self.stage().name.value
    }

    /// Position in the recipe's list of stages (identity for comparisons).
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn kind(&self) -> &'a dyn StageKind {
        self.stage().kind.as_ref()
    }

    /// An empty span at the start of the stage's table: "this stage".
    pub fn stage_start(&self) -> Range<usize> {
        let start = self.stage().span.start;
        start..start
    }

    /// The stage's answer to `Q`, if its kind gives one (see `Ask`).
    pub fn ask<Q: Question>(&self) -> Option<Q::Answer> {
        let mut slot = Slot::<Q>(None);
        let stage = self.stage();
        stage
            .kind
            .answer(stage.params.as_ref(), &mut Ask(&mut slot));
        slot.0
    }

    /// The reference written under `field`, if any.
    pub fn reference(&self, field: &str) -> Option<StageRef> {
        self.stage().refs().into_iter().find(|r| r.field == field)
    }

    /// The stage named under `field` (references were checked to exist).
    pub fn target(&self, field: &str) -> Option<StageView<'a>> {
        let r = self.reference(field)?;
        let index = self
            .stages
            .iter()
            .position(|s| s.name.value == r.target.value)?;
        Some(StageView {
            stages: self.stages,
            index,
        })
    }

    /// How many stages the recipe has (a bound for walks down chains).
    pub fn stage_count(&self) -> usize {
        self.stages.len()
    }
}

/// A question a stage asks of a stage it refers to (the shape of the model
/// it makes, the adapter it makes). The stage layer defines the questions
/// and each kind answers those it can from its own parameters
/// (`Kind::answer`); the engine only carries them, as std's `Error::provide` does.
pub trait Question: 'static {
    type Answer: 'static;
}

struct Slot<Q: Question>(Option<Q::Answer>);

/// The question being asked of a kind, whatever it is.
pub struct Ask<'a>(&'a mut dyn Any);

impl Ask<'_> {
    /// Answer with `answer()` when the question is `Q` (computed only then).
    pub fn give<Q: Question>(&mut self, answer: impl FnOnce() -> Q::Answer) -> &mut Self {
        if let Some(slot) = self.0.downcast_mut::<Slot<Q>>() {
            slot.0 = Some(answer());
        }
        self
    }
}

/// One kind of stage, as the engine sees it: object-safe, parameters
/// type-erased. Implemented for every `Kind`; implement `Kind` instead.
pub trait StageKind: Send + Sync {
    /// The name written as `kind = "..."`.
    fn name(&self) -> &'static str;
    /// Part of every key: bumped when the output for the same inputs may change.
    fn version(&self) -> u32;
    fn output(&self) -> ArtifactKind;
    fn role(&self) -> Role;
    /// One line for `--help` and the schema.
    fn summary(&self) -> &'static str;
    /// Parse the stage table as written (`table`, `kind` removed) and with
    /// `[defaults.<kind>]` merged in (`merged`).
    fn parse(
        &self,
        written: &DeTable<'_>,
        merged: Spanned<DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn Params>, Vec<Problem>>;
    /// JSON schema of the stage table (without `kind`).
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema;
    fn key_params(&self, params: &dyn Params) -> serde_json::Value;
    fn refs(&self, params: &dyn Params) -> Vec<StageRef>;
    fn files(&self, params: &dyn Params, recipe_dir: &Path) -> Vec<FileInput>;
    fn uses_device(&self) -> bool;
    fn outside_changed(&self, params: &dyn Params, artifact: &Path) -> Option<String>;
    fn shared(&self, params: &dyn Params) -> bool;
    fn plan_note(&self, params: &dyn Params) -> Option<String>;
    fn plan_memory(&self, stage: StageView<'_>, on_gpu: bool) -> Option<MemoryEstimate>;
    fn answer(&self, params: &dyn Params, ask: &mut Ask<'_>);
    fn check(&self, stage: StageView<'_>) -> Vec<Problem>;
    fn run(&self, params: &dyn Params, ctx: &mut RunContext) -> anyhow::Result<()>;
}

/// One kind of stage, typed. A new kind is one file implementing this and
/// one line in `kinds::builtin`.
pub trait Kind: Send + Sync + 'static {
    /// The `[stages.<name>]` table (without `kind`), deserialized with spans.
    type Params: Serialize + DeserializeOwned + schemars::JsonSchema + Debug + Send + Sync + 'static;

    /// The name written as `kind = "..."`.
    fn name(&self) -> &'static str;

    /// Bumped whenever the kind's output for the same inputs may change:
    /// it is part of every key, so old artifacts stop matching.
    fn version(&self) -> u32 {
        1
    }

    fn output(&self) -> ArtifactKind;

    fn role(&self) -> Role;

    /// One line for `--help` and the schema.
    fn summary(&self) -> &'static str;

    /// Problems visible in the table as the user wrote it, before
    /// `[defaults.<kind>]` is merged in.
    fn check_written(&self, _table: &DeTable<'_>, _ctx: &ParseContext) -> Vec<Problem> {
        Vec::new()
    }

    /// Range checks on the parsed table, then defaults and resolved paths
    /// filled in. Problems stop the stage from parsing.
    fn prepare(&self, _params: &mut Self::Params, _ctx: &ParseContext) -> Vec<Problem> {
        Vec::new()
    }

    /// Parameters as they enter the cache key: every default filled in.
    fn key_params(&self, params: &Self::Params) -> serde_json::Value {
        serde_json::to_value(params).expect("parameters serialize to JSON")
    }

    /// References to other stages.
    fn refs(&self, _params: &Self::Params) -> Vec<StageRef> {
        Vec::new()
    }

    /// Files and folders read (data, model folders); relative paths are
    /// resolved against `recipe_dir`.
    fn files(&self, _params: &Self::Params, _recipe_dir: &Path) -> Vec<FileInput> {
        Vec::new()
    }

    /// Whether the stage computes on the chosen device (its kind then enters the key).
    fn uses_device(&self) -> bool {
        false
    }

    /// For stages that write outside the cache (`export`): why their cached
    /// artifact no longer stands for what is on disk, if it does not.
    fn outside_changed(&self, _params: &Self::Params, _artifact: &Path) -> Option<String> {
        None
    }

    /// Whether the stage's artifact goes to and comes from a remote cache.
    /// Not for stages whose result is a file outside the cache, or a copy
    /// of one every machine must have to plan at all.
    fn shared(&self, _params: &Self::Params) -> bool {
        true
    }

    /// Something `plan` should say about the stage beyond its status
    /// (e.g. "no reference" for a reference-free preference loss).
    fn plan_note(&self, _params: &Self::Params) -> Option<String> {
        None
    }

    /// A training stage's peak memory, estimated before running (`stage`
    /// gives the recipe around it; `on_gpu`: where it will compute).
    fn plan_memory(
        &self,
        _params: &Self::Params,
        _stage: StageView<'_>,
        _on_gpu: bool,
    ) -> Option<MemoryEstimate> {
        None
    }

    /// Answers the questions of the stages that refer to this one (`Ask::give`).
    fn answer(&self, _params: &Self::Params, _ask: &mut Ask<'_>) {}

    /// Checks against the stages this one refers to, once the DAG is known
    /// to be whole (every reference exists, of the right artifact kind, no cycle).
    fn check(&self, _params: &Self::Params, _stage: StageView<'_>) -> Vec<Problem> {
        Vec::new()
    }

    /// Execute the stage, writing its artifact into `ctx.out_dir`.
    fn run(&self, params: &Self::Params, ctx: &mut RunContext) -> anyhow::Result<()>;
}

fn typed<K: Kind>(params: &dyn Params) -> &K::Params {
    params
        .as_any()
        .downcast_ref::<K::Params>()
        .expect("a stage's parameters are its kind's type")
}

impl<K: Kind> StageKind for K {
    fn name(&self) -> &'static str {
        Kind::name(self)
    }
    fn version(&self) -> u32 {
        Kind::version(self)
    }
    fn output(&self) -> ArtifactKind {
        Kind::output(self)
    }
    fn role(&self) -> Role {
        Kind::role(self)
    }
    fn summary(&self) -> &'static str {
        Kind::summary(self)
    }
    fn parse(
        &self,
        written: &DeTable<'_>,
        merged: Spanned<DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn Params>, Vec<Problem>> {
        let problems = Kind::check_written(self, written, ctx);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut params = K::Params::deserialize(toml::de::ValueDeserializer::from(merged))
            .map_err(|e| vec![toml_problem(&e, &format!("in stage `{}`", ctx.stage))])?;
        let problems = Kind::prepare(self, &mut params, ctx);
        if problems.is_empty() {
            Ok(Box::new(params))
        } else {
            Err(problems)
        }
    }
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<K::Params>()
    }
    fn key_params(&self, params: &dyn Params) -> serde_json::Value {
        Kind::key_params(self, typed::<K>(params))
    }
    fn refs(&self, params: &dyn Params) -> Vec<StageRef> {
        Kind::refs(self, typed::<K>(params))
    }
    fn files(&self, params: &dyn Params, recipe_dir: &Path) -> Vec<FileInput> {
        Kind::files(self, typed::<K>(params), recipe_dir)
    }
    fn uses_device(&self) -> bool {
        Kind::uses_device(self)
    }
    fn outside_changed(&self, params: &dyn Params, artifact: &Path) -> Option<String> {
        Kind::outside_changed(self, typed::<K>(params), artifact)
    }
    fn shared(&self, params: &dyn Params) -> bool {
        Kind::shared(self, typed::<K>(params))
    }
    fn plan_note(&self, params: &dyn Params) -> Option<String> {
        Kind::plan_note(self, typed::<K>(params))
    }
    fn plan_memory(&self, stage: StageView<'_>, on_gpu: bool) -> Option<MemoryEstimate> {
        Kind::plan_memory(
            self,
            typed::<K>(stage.stage().params.as_ref()),
            stage,
            on_gpu,
        )
    }
    fn answer(&self, params: &dyn Params, ask: &mut Ask<'_>) {
        Kind::answer(self, typed::<K>(params), ask)
    }
    fn check(&self, stage: StageView<'_>) -> Vec<Problem> {
        Kind::check(self, typed::<K>(stage.stage().params.as_ref()), stage)
    }
    fn run(&self, params: &dyn Params, ctx: &mut RunContext) -> anyhow::Result<()> {
        Kind::run(self, typed::<K>(params), ctx)
    }
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
    /// What the upstream stage makes.
    pub output: ArtifactKind,
    pub key: String,
    /// The artifact folder in the cache.
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
}

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
    pub device: DeviceSpec,
    /// The cache, for derived artifacts shared between stages (tokenized data, reference log-probs).
    pub cache: &'a crate::cache::Cache,
    /// Derived artifacts this stage used; recorded in its manifest so `gc` keeps them.
    pub derived: Vec<String>,
    /// Where a training stage's run is tracked live (TensorBoard), if anywhere.
    pub tracking: crate::tracking::Tracking,
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
        self.remember_derived(&dir);
        Ok(dir)
    }

    /// A grow-only derived folder (see `Cache::derived_growing`), remembered for the manifest.
    pub fn derived_growing(&mut self, kind: &str, key: &str) -> anyhow::Result<PathBuf> {
        let dir = self.cache.derived_growing(kind, key)?;
        self.remember_derived(&dir);
        Ok(dir)
    }

    /// Records a derived folder for the manifest, so `gc` keeps it.
    fn remember_derived(&mut self, dir: &std::path::Path) {
        let name = crate::fsutil::file_name(dir);
        if !self.derived.contains(&name) {
            self.derived.push(name);
        }
    }

    /// The upstream artifact under `field`, or an error naming it.
    pub fn input(&self, field: &str) -> anyhow::Result<&InputArtifact> {
        self.inputs
            .get(field)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` has no input `{field}`", self.stage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind that answers `Width` with its parameter, and nothing else.
    struct Answering;
    struct Silent;
    struct Width;
    impl Question for Width {
        type Answer = u32;
    }
    struct Depth;
    impl Question for Depth {
        type Answer = u32;
    }

    #[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
    struct P {
        width: u32,
    }

    impl Kind for Answering {
        type Params = P;
        fn name(&self) -> &'static str {
            "answering"
        }
        fn output(&self) -> ArtifactKind {
            ArtifactKind::Model
        }
        fn role(&self) -> Role {
            Role::Source
        }
        fn summary(&self) -> &'static str {
            ""
        }
        fn answer(&self, p: &P, ask: &mut Ask<'_>) {
            ask.give::<Width>(|| p.width);
        }
        fn run(&self, _: &P, _: &mut RunContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    impl Kind for Silent {
        type Params = P;
        fn name(&self) -> &'static str {
            "silent"
        }
        fn output(&self) -> ArtifactKind {
            ArtifactKind::Model
        }
        fn role(&self) -> Role {
            Role::Source
        }
        fn summary(&self) -> &'static str {
            ""
        }
        fn run(&self, _: &P, _: &mut RunContext) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn stage(kind: Arc<dyn StageKind>, width: u32) -> Stage {
        Stage {
            name: Sp::implicit("s".into()),
            kind,
            params: Box::new(P { width }),
            span: 10..20,
            recipe_dir: PathBuf::new(),
            variant: None,
        }
    }

    #[test]
    fn a_kind_answers_only_the_questions_it_knows_and_only_when_asked() {
        let stages = [stage(Arc::new(Answering), 7), stage(Arc::new(Silent), 9)];
        let answering = StageView::new(&stages, 0);
        assert_eq!(answering.ask::<Width>(), Some(7));
        assert_eq!(answering.ask::<Depth>(), None, "not a question it answers");
        assert_eq!(StageView::new(&stages, 1).ask::<Width>(), None);
        assert_eq!(answering.stage_start(), 10..10);
    }
}
