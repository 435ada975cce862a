//! A training stage's memory estimate from the recipe alone: the model's
//! shape (following merges to the base), how the stages hold it, the
//! adapter it trains and one micro-batch.

use super::lineage;
use super::lora::lora_config;
use super::params::TrainSpec;
use crate::diag::span::Sp;
use crate::model::memory::{estimate as estimate_step, MemoryEstimate, StepShape};
use crate::stage::{Dtype, StageView};

/// One micro-batch of a training stage: its rows, and whether a reference
/// model sits beside the policy.
#[derive(Clone, Copy, Debug)]
pub struct MicroBatch {
    pub rows: usize,
    pub reference: bool,
}

/// The estimate for a training stage (`train`, `dtype`, one micro-batch)
/// whose model and adapter are the stages `view` refers to; None when the
/// model's shape is not known before running.
/// `on_gpu`: where the stage computes (plan resolves the device).
pub fn estimate(
    view: StageView<'_>,
    train: &TrainSpec,
    dtype: &Option<Sp<Dtype>>,
    batch: MicroBatch,
    on_gpu: bool,
) -> Option<MemoryEstimate> {
    let dtype = dtype.as_ref().map_or(Dtype::F32, |d| d.value);
    let model = view.target("model")?;
    let config = lineage::model_config(model)?.ok()?;
    let spec = lineage::adapter_config(view)?;
    let lora = lora_config(&spec);
    let targets = lora.resolve(&config).ok()?;
    let dtype = super::inputs::dtype(dtype);
    Some(estimate_step(&StepShape {
        config: &config,
        dtype,
        quantization: lineage::quantization(model),
        stored_bits: lineage::stored_bits(model),
        targets: &targets,
        dropout: lora.dropout > 0.0,
        rows: batch.rows,
        seq_len: train.seq_len.value as usize,
        checkpointing: train.checkpointing.value,
        reference_model: batch.reference,
        fused: crate::model::memory::fused_path(on_gpu, dtype),
    }))
}
