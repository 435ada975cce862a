//! A training stage's memory estimate from the recipe alone: the model's
//! shape (following merges to the base), how the stages hold it, the
//! adapter it trains and one micro-batch.

use super::base::BaseParams;
use super::dpo::DpoParams;
use super::lora::{adapter_config, lora_config};
use super::merge::MergeParams;
use super::params::TrainSpec;
use super::sft::SftParams;
use crate::diag::span::Sp;
use crate::model::kernels::quantized::Quantization;
use crate::model::memory::{estimate as estimate_step, MemoryEstimate, StepShape};
use crate::model::ModelConfig;
use crate::stage::{Dtype, StageView};

/// The estimate for an `sft` or `dpo` stage; None for other kinds or when
/// the model's shape is not known before running.
/// `on_gpu`: where the stage computes (plan resolves the device).
pub fn estimate(view: StageView<'_>, on_gpu: bool) -> Option<MemoryEstimate> {
    let (train, dtype, (rows, reference)): (&TrainSpec, &Option<Sp<Dtype>>, _) =
        if let Some(p) = view.params::<SftParams>() {
            (&p.train, &p.dtype, sft_step(p))
        } else if let Some(p) = view.params::<DpoParams>() {
            (&p.train, &p.dtype, dpo_step(p))
        } else {
            return None;
        };
    let dtype = dtype.as_ref().map_or(Dtype::F32, |d| d.value);
    let model = view.target("model")?;
    let config = model_config(model, 0)?;
    let spec = adapter_config(view, 0)?;
    let lora = lora_config(&spec);
    let targets = lora.resolve(&config).ok()?;
    let dtype = super::inputs::dtype(dtype);
    Some(estimate_step(&StepShape {
        config: &config,
        dtype,
        quantization: quantization(model, 0),
        targets: &targets,
        dropout: lora.dropout > 0.0,
        rows,
        seq_len: train.seq_len.value as usize,
        checkpointing: train.checkpointing.value,
        reference_model: reference,
        fused: crate::model::memory::fused_path(on_gpu, dtype),
        on_gpu,
    }))
}

/// An SFT micro-batch: its rows, and no reference model.
pub(crate) fn sft_step(p: &SftParams) -> (usize, bool) {
    (p.train.batch.value as usize, false)
}

/// A DPO micro-batch: chosen and rejected rows of each pair, and a
/// reference model beside the policy when the loss needs one.
pub(crate) fn dpo_step(p: &DpoParams) -> (usize, bool) {
    (
        2 * p.train.batch.value as usize,
        p.dpo.loss().needs_reference(),
    )
}

/// The shape of the model a model stage makes (a merge keeps its model's).
fn model_config(view: StageView<'_>, depth: usize) -> Option<ModelConfig> {
    if depth > view.stage_count() {
        return None;
    }
    match view.params::<BaseParams>() {
        Some(base) => base.model_config()?.ok(),
        None => model_config(view.target("model")?, depth + 1),
    }
}

/// How the stages that load a model stage hold it.
fn quantization(view: StageView<'_>, depth: usize) -> Option<Quantization> {
    if depth > view.stage_count() {
        return None;
    }
    if let Some(base) = view.params::<BaseParams>() {
        return base.quantize.as_ref()?.value.quantization();
    }
    match view
        .params::<MergeParams>()
        .and_then(|m| m.quantize.as_ref())
    {
        Some(q) => q.value.quantization(),
        None => quantization(view.target("model")?, depth + 1),
    }
}
