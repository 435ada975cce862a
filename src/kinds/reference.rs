//! The reference policy a preference loss compares with, shared by `dpo`
//! (training) and `eval` (preference metrics): which model and adapter it
//! is, and its log-probs of the pairs, computed once and kept in the cache.

use super::inputs;
use crate::fsutil::file_name;
use crate::stage::{ArtifactKind, InputArtifact, RunContext};

/// Folders of the reference policy: a model, and an adapter applied to it (or none).
#[derive(Debug)]
pub struct ReferenceSpec {
    pub model: inputs::ModelSource,
    /// Artifact hash of the model, for the derived cache key.
    pub model_artifact: String,
    pub adapter: Option<(std::path::PathBuf, String)>,
    pub description: String,
}

impl ReferenceSpec {
    /// `model` with `adapter` (frozen) applied, or alone.
    pub fn of(model: &InputArtifact, adapter: Option<&InputArtifact>) -> anyhow::Result<Self> {
        Ok(ReferenceSpec {
            model: inputs::model_source(model)?,
            model_artifact: file_name(&model.dir),
            description: match adapter {
                Some(a) => format!("{} + adapter `{}` (frozen)", model.stage, a.stage),
                None => model.stage.clone(),
            },
            adapter: adapter.map(|a| (a.dir.clone(), file_name(&a.dir))),
        })
    }
}

/// The reference policy of a DPO stage: `reference` when given; otherwise
/// the policy's starting point: model + the continued adapter (scheme one),
/// or the model alone when a fresh adapter is trained (scheme two).
pub fn reference_spec(ctx: &RunContext) -> anyhow::Result<ReferenceSpec> {
    let (model, adapter) = match ctx.inputs.get("reference") {
        Some(r) if r.output == ArtifactKind::Model => (r.clone(), None),
        Some(r) => {
            // An adapter stage: its own model, from its manifest's lineage.
            let parent = r.manifest["parents"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["field"] == "model"))
                .ok_or_else(|| anyhow::anyhow!("reference `{}` records no model", r.stage))?;
            let artifact = parent["artifact"].as_str().unwrap_or_default();
            let model_artifact = InputArtifact {
                stage: parent["stage"].as_str().unwrap_or("model").to_string(),
                kind: "model".into(),
                output: ArtifactKind::Model,
                key: String::new(),
                dir: ctx.cache.artifact_dir(artifact),
                manifest: serde_json::Value::Null,
            };
            (model_artifact, Some(r.clone()))
        }
        None => (
            ctx.input("model")?.clone(),
            ctx.inputs.get("adapter").cloned(),
        ),
    };
    ReferenceSpec::of(&model, adapter.as_ref())
}

/// Reference log-probs of the pairs `wanted` of `data` (no graph), kept in
/// a grow-only derived folder keyed by the reference's artifacts and the
/// tokenized data's key (and LD-DPO's α, which weighs its tokens): a resumed or longer run computes only the pairs it
/// has not seen, and Ctrl-C keeps the batches already done.
#[allow(clippy::too_many_arguments)]
pub fn reference_scores(
    ctx: &mut RunContext,
    reference: &ReferenceSpec,
    data: &crate::data::DpoDataset,
    data_id: &str,
    wanted: &[usize],
    dtype: candle_core::DType,
    device: &candle_core::Device,
    pad_id: u32,
    ld_alpha: Option<f64>,
) -> anyhow::Result<crate::train::dpo::PairScores> {
    use crate::train::dpo;
    let mut key = serde_json::json!({
        // 2: grown pair by pair (files of pair indices and scores).
        "version": 2,
        "model": reference.model_artifact,
        "adapter": reference.adapter.as_ref().map(|a| &a.1),
        "data": data_id,
        "dtype": format!("{dtype:?}"),
        "device": format!("{:?}", device.location()),
    });
    // LD-DPO weighs the reference's tokens as the policy's; without it the
    // key is the one earlier versions wrote.
    if let Some(alpha) = ld_alpha {
        key["ld_alpha"] = alpha.into();
    }
    let key = crate::hashing::derived_key(&key);
    let dir = ctx.derived_growing("reference-logps", &key)?;
    let _lock = ctx.cache.lock_derived(&format!("reference-logps-{key}"))?;
    let load = || -> anyhow::Result<crate::model::decoder::Decoder> {
        let mut model = inputs::load_model(&reference.model, dtype, device)?;
        if let Some((adapter, _)) = &reference.adapter {
            crate::model::formats::peft::load_adapter(&mut model, adapter)?;
        }
        Ok(model)
    };
    let (scores, count) = dpo::score_pairs_into(
        load,
        data,
        wanted,
        &dir,
        pad_id,
        ld_alpha,
        device,
        ctx.progress,
        ctx.interrupt,
    )?;
    ctx.progress.log(&format!(
        "reference log-probs ({}): {} pairs computed, {} reused, of {} in the file",
        reference.description,
        count.computed,
        count.reused,
        data.examples.len()
    ));
    for (what, n) in [("computed", count.computed), ("reused", count.reused)] {
        let name = format!("reference/pairs_{what}");
        let total = ctx.metrics.get(&name).and_then(|v| v.as_u64()).unwrap_or(0);
        ctx.metrics.insert(name, (total + n as u64).into());
    }
    Ok(scores)
}
