//! What a stage asks of the stages it refers to, answered by their kinds
//! from their own parameters (`Kind::answer`): the shape of the model a
//! model stage makes, how the stages that load it hold it, and the LoRA
//! config of the adapter an adapter stage makes. A stage that does not
//! answer passes the question on to its own `model` or `adapter`, as a
//! merge keeps its model's shape and a continued adapter keeps its config.

use std::borrow::Cow;

use super::params::LoraSpec;
use crate::diag::Problem;
use crate::model::kernels::quantized::Quantization;
use crate::model::ModelConfig;
use crate::stage::{Question, StageView};

/// The shape of the model a stage makes, when known without running
/// (answered by `base`: from `init` or the folder's config.json).
pub struct ModelShape;
impl Question for ModelShape {
    type Answer = Option<Result<ModelConfig, Problem>>;
}

/// How the stages that load a model hold its projections (None: dense).
/// Answered by `base`, and by a `merge` that sets `quantize`.
pub struct HeldAs;
impl Question for HeldAs {
    type Answer = Option<Quantization>;
}

/// Bits a projection weight takes as stored, for a model held in a GGUF's
/// own blocks (None: dense, or as `HeldAs` says). Answered by `base`, and
/// by `merge` (whose output is dense).
pub struct StoredBits;
impl Question for StoredBits {
    type Answer = Option<f64>;
}

/// The LoRA config of the adapter a stage makes.
pub struct AdapterMade;
impl Question for AdapterMade {
    type Answer = Made;
}

pub enum Made {
    /// Its own config; None for an imported folder whose config cannot be read.
    Own(Option<LoraSpec>),
    /// It continues the adapter under its `adapter` field, keeping its config.
    Continued,
}

/// Following references down a chain stops after as many steps as there
/// are stages: a cycle is reported elsewhere, never looped on here.
fn follow<T>(
    view: StageView<'_>,
    depth: usize,
    field: &str,
    next: fn(StageView<'_>, usize) -> Option<T>,
) -> Option<T> {
    if depth >= view.stage_count() {
        return None;
    }
    next(view.target(field)?, depth + 1)
}

/// The shape of the model a model stage makes (a merge keeps its model's).
pub fn model_config(view: StageView<'_>) -> Option<Result<ModelConfig, Problem>> {
    fn at(view: StageView<'_>, depth: usize) -> Option<Result<ModelConfig, Problem>> {
        match view.ask::<ModelShape>() {
            Some(shape) => shape,
            None => follow(view, depth, "model", at),
        }
    }
    at(view, 0)
}

/// How the stages that load a model stage hold it.
pub fn quantization(view: StageView<'_>) -> Option<Quantization> {
    fn at(view: StageView<'_>, depth: usize) -> Option<Quantization> {
        match view.ask::<HeldAs>() {
            Some(held) => held,
            None => follow(view, depth, "model", at),
        }
    }
    at(view, 0)
}

/// Bits a projection weight of a model stage takes as a GGUF's blocks.
pub fn stored_bits(view: StageView<'_>) -> Option<f64> {
    fn at(view: StageView<'_>, depth: usize) -> Option<f64> {
        match view.ask::<StoredBits>() {
            Some(bits) => bits,
            None => follow(view, depth, "model", at),
        }
    }
    at(view, 0)
}

/// The LoRA config of the adapter a stage makes, following continuations.
pub fn adapter_config(view: StageView<'_>) -> Option<Cow<'static, LoraSpec>> {
    fn at(view: StageView<'_>, depth: usize) -> Option<Cow<'static, LoraSpec>> {
        match view.ask::<AdapterMade>()? {
            Made::Own(spec) => spec.map(Cow::Owned),
            Made::Continued => follow(view, depth, "adapter", at),
        }
    }
    at(view, 0)
}

/// Linear module names of the model a stage makes (what LoRA targets match).
pub fn model_modules(view: StageView<'_>) -> Option<Result<Vec<String>, Problem>> {
    Some(model_config(view)?.map(|c| crate::model::config::linear_module_names(&c)))
}
