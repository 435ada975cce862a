//! The built-in stage kinds.

pub mod adapter;
pub mod base;
pub mod dpo;
pub mod eval;
pub mod export;
pub mod merge;
pub mod sft;

use serde::de::DeserializeOwned;
use toml::de::DeValue;
use toml::Spanned;

use crate::recipe::diag::Problem;
use crate::recipe::span::Sp;
use crate::recipe::{toml_problem, ParseContext};
use crate::stage::{ArtifactKind, FileInput, Registry, StageRef};

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

/// Deserialize a stage table into a kind's parameter struct, then range-check it.
pub fn parse_table<T: DeserializeOwned>(
    table: Spanned<DeValue<'_>>,
    ctx: &ParseContext,
    check: impl FnOnce(&T, &mut Vec<Problem>),
) -> Result<T, Vec<Problem>> {
    let params = T::deserialize(toml::de::ValueDeserializer::from(table))
        .map_err(|e| vec![toml_problem(&e, &format!("in stage `{}`", ctx.stage))])?;
    let mut problems = Vec::new();
    check(&params, &mut problems);
    if problems.is_empty() {
        Ok(params)
    } else {
        Err(problems)
    }
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

pub fn file_input(
    field: impl Into<String>,
    written: &Sp<String>,
    ctx_dir: &std::path::Path,
) -> FileInput {
    let p = std::path::Path::new(&written.value);
    FileInput {
        field: field.into(),
        path: if p.is_absolute() {
            p.to_path_buf()
        } else {
            ctx_dir.join(p)
        },
        written: written.clone(),
    }
}

/// Serialize resolved parameters for the cache key.
pub fn key_json<T: serde::Serialize>(params: &T) -> serde_json::Value {
    serde_json::to_value(params).expect("parameters serialize to JSON")
}
