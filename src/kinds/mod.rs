//! The built-in stage kinds, one file each, and what several of them share:
//! parameter tables (`params`), what a stage asks of the stages it refers
//! to (`lineage`), LoRA checks (`lora`), memory estimates (`memory`),
//! loading inputs (`inputs`), the reference policy (`reference`) and the
//! training glue (`training`).

pub mod adapter;
pub mod base;
pub mod dpo;
pub mod eval;
pub mod export;
pub mod inputs;
pub mod lineage;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod params;
pub mod reference;
pub mod sft;
mod training;

use std::path::{Path, PathBuf};

use crate::diag::span::Sp;
use crate::stage::{resolve, ArtifactKind, FileInput, Registry, StageRef};

/// Every kind this program ships.
pub fn builtin() -> Registry {
    Registry::empty()
        .with(base::Base)
        .with(adapter::Adapter)
        .with(sft::Sft)
        .with(dpo::Dpo)
        .with(merge::Merge)
        .with(eval::Eval)
        .with(export::Export)
}

/// The names data files enter a stage's key and `RunContext::files` under.
pub mod input {
    /// A training stage's training rows.
    pub const TRAIN: &str = "data.train";
    /// A training stage's held-out rows.
    pub const EVAL: &str = "data.eval";
    /// An eval stage's prompt/completion rows.
    pub const SFT_ROWS: &str = "data.sft";
    /// An eval stage's preference pairs.
    pub const DPO_ROWS: &str = "data.dpo";
    /// A merge's held-out rows for its precision check.
    pub const MERGE_ROWS: &str = "eval";
}

pub const MODEL: &[ArtifactKind] = &[ArtifactKind::Model];
pub const ADAPTER: &[ArtifactKind] = &[ArtifactKind::Adapter];
pub const MODEL_OR_ADAPTER: &[ArtifactKind] = &[ArtifactKind::Model, ArtifactKind::Adapter];

pub fn stage_ref(
    field: &'static str,
    target: &Sp<String>,
    accepts: &'static [ArtifactKind],
) -> StageRef {
    StageRef {
        field,
        target: target.clone(),
        accepts,
    }
}

/// `model`, then `adapter` and `reference` where given: the references of
/// the kinds that use a model with an optional adapter.
pub fn model_refs(
    model: &Sp<String>,
    adapter: &Option<Sp<String>>,
    reference: Option<&Option<Sp<String>>>,
) -> Vec<StageRef> {
    let mut refs = vec![stage_ref("model", model, MODEL)];
    if let Some(a) = adapter {
        refs.push(stage_ref("adapter", a, ADAPTER));
    }
    if let Some(Some(r)) = reference {
        refs.push(stage_ref("reference", r, MODEL_OR_ADAPTER));
    }
    refs
}

/// A file input named `field`, written relative to `recipe_dir`.
pub fn file_input(field: impl Into<String>, written: &Sp<String>, recipe_dir: &Path) -> FileInput {
    resolved_input(field, written, resolve(recipe_dir, &written.value))
}

/// A file input whose path is already resolved (canonicalized when the stage parsed).
pub fn resolved_input(field: impl Into<String>, written: &Sp<String>, path: PathBuf) -> FileInput {
    FileInput {
        field: field.into(),
        path,
        written: written.clone(),
    }
}

/// The parameters' key with `path` replaced by `resolved`: the absolute
/// location, so an artifact always points at a folder that had this content.
pub fn key_with_path(params: &impl serde::Serialize, resolved: &Path) -> serde_json::Value {
    let mut v = serde_json::to_value(params).expect("parameters serialize to JSON");
    v["path"] = serde_json::Value::String(resolved.display().to_string());
    v
}
