//! Stages that cannot fit this machine, found before anything runs: each
//! stage's estimate (`plan`'s `memory:` lines) against the memory the
//! machine offers (`crate::machine`). Over it, the stage is refused at its
//! line with the estimate's terms and what would make it fit; over 90% of
//! it, a warning.

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

/// Checks the stages of `plan` that will run (those of `only`, when given)
/// against `available`. Stages computed on a GPU are not checked here: their
/// estimate is of the device's memory.
pub fn check(
    recipe: &Recipe,
    plan: &Plan,
    only: Option<&[usize]>,
    available: &Available,
) -> MemoryCheck {
    let mut out = MemoryCheck::default();
    let b = |n: u64| human_bytes(n, ByteDigits::ThreeSignificant);
    for p in &plan.stages {
        if matches!(p.status, Status::Cached { .. }) || only.is_some_and(|o| !o.contains(&p.index))
        {
            continue;
        }
        if p.key_inputs.device.as_deref() == Some("cuda") {
            continue;
        }
        let Some(estimate) = super::render::memory(recipe, p) else {
            continue;
        };
        let need = estimate.estimate_bytes;
        let view = crate::stage::StageView::new(&recipe.stages, p.index);
        if need > available.bytes {
            out.refused.push(
                Problem::new(format!(
                    "stage `{}` needs {} and this machine has {} ({})",
                    p.name,
                    estimate.describe(),
                    b(available.bytes),
                    available.what
                ))
                .at(view.stage_start(), "this stage")
                .help(fit_help(&p.kind)),
            );
        } else if need as f64 > 0.9 * available.bytes as f64 {
            out.warnings.push(format!(
                "stage `{}` needs {} of this machine's {} ({}): it may not fit beside other processes",
                p.name,
                b(need),
                b(available.bytes),
                available.what
            ));
        }
    }
    out
}

/// What would make a stage of `kind` fit.
fn fit_help(kind: &str) -> String {
    let what = match kind {
        "sft" | "dpo" => "turn on `train.checkpointing`, hold the base quantized (`quantize = \"q4_k\"` or `\"q8_0\"` on the base stage), or lower `train.batch` or `train.seq_len`",
        "base" => "check the `init` shape (a zero too many?), or a smaller `dtype`",
        "merge" => "merge in a smaller `dtype` (bf16), or on a machine with more memory",
        _ => "a smaller model or batch",
    };
    format!(
        "{what}; `--ignore-memory-check` runs it anyway; {} sets the memory to plan for",
        crate::machine::MEMORY_ENV
    )
}
