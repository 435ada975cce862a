//! Stages that cannot fit this machine, found before anything runs: each
//! stage's estimate (`plan`'s `memory:` lines) against the memory the
//! machine offers (`crate::machine`): stages on a GPU against the GPU's
//! memory, the others against the machine's. Over it, the stage is refused
//! at its line with the estimate's terms and what would make it fit; over
//! 90% of it, a warning.

use super::{Plan, Status};
use crate::diag::Problem;
use crate::machine::Available;
use crate::recipe::Recipe;
use crate::units::{human_bytes, ByteDigits};

/// What the check found.
#[derive(Debug, Default)]
pub struct MemoryCheck {
    /// Stages that cannot fit, at their lines.
    pub refused: Vec<Problem>,
    /// Stages near the limit.
    pub warnings: Vec<String>,
}

/// Where the stages compute and what each place offers (None: unknown,
/// not checked).
#[derive(Clone, Debug, Default)]
pub struct Offered {
    /// The machine's memory, for stages on the CPU.
    pub host: Option<Available>,
    /// The GPU's memory, for stages computed on it.
    pub gpu: Option<Available>,
}

/// How an estimate compares with what is offered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fit {
    Fits,
    /// Over 90%: it may not fit beside other processes.
    Near,
    Over,
}

pub fn fit(need: u64, available: &Available) -> Fit {
    if need > available.bytes {
        Fit::Over
    } else if need as f64 > 0.9 * available.bytes as f64 {
        Fit::Near
    } else {
        Fit::Fits
    }
}

/// Checks the stages of `plan` that will run (those of `only`, when given)
/// against what `offered` says: a stage on the GPU against its memory, any
/// other against the machine's.
pub fn check(
    recipe: &Recipe,
    plan: &Plan,
    only: Option<&[usize]>,
    offered: &Offered,
) -> MemoryCheck {
    let mut out = MemoryCheck::default();
    let b = |n: u64| human_bytes(n, ByteDigits::ThreeSignificant);
    for p in &plan.stages {
        if matches!(p.status, Status::Cached { .. } | Status::Remote { .. })
            || only.is_some_and(|o| !o.contains(&p.index))
        {
            continue;
        }
        let (available, place) = match p.key_inputs.device.as_deref() {
            Some("cuda") => (&offered.gpu, "the GPU"),
            _ => (&offered.host, "this machine"),
        };
        let Some(available) = available else {
            continue;
        };
        let Some(estimate) = super::render::memory(recipe, p) else {
            continue;
        };
        let need = estimate.estimate_bytes;
        let view = crate::stage::StageView::new(&recipe.stages, p.index);
        match fit(need, available) {
            Fit::Over => out.refused.push(
                Problem::new(format!(
                    "stage `{}` needs {} and {place} has {} ({})",
                    p.name,
                    estimate.describe(),
                    b(available.bytes),
                    available.what
                ))
                .at(view.stage_start(), "this stage")
                .help(fit_help(&p.kind)),
            ),
            Fit::Near => out.warnings.push(format!(
                "stage `{}` needs {} of {place}'s {} ({}): it may not fit beside other processes",
                p.name,
                b(need),
                b(available.bytes),
                available.what
            )),
            Fit::Fits => {}
        }
    }
    out
}

/// What would make a stage of `kind` fit.
pub fn fit_help(kind: &str) -> String {
    let what = match kind {
        "sft" | "dpo" => "turn on `train.checkpointing`, hold the base quantized (`quantize = \"q4_k\"` or `\"q8_0\"` on the base stage), or lower `train.batch` or `train.seq_len`",
        "base" => "check the `init` shape (a zero too many?), or a smaller `dtype`",
        "merge" => "merge in a smaller `dtype` (bf16), or on a machine with more memory",
        "export" => "write a smaller `gguf` format (q8_0 holds half of f16's copy), or export on a machine with more memory",
        _ => "a smaller model or batch",
    };
    format!(
        "{what}; `--ignore-memory-check` runs it anyway; {} (and {} for a GPU) sets the memory to plan for",
        crate::machine::MEMORY_ENV,
        crate::machine::DEVICE_MEMORY_ENV
    )
}
