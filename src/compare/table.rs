//! The side-by-side comparison table, independent of how it is rendered.

use crate::compare::format::{
    format_count, format_metric, format_percent, human_bytes, human_bytes_opt, human_duration,
    MISSING,
};
use crate::compare::summary::StageSummary;

/// One labelled row: a cell per stage, already formatted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRow {
    /// Machine-friendly key, used in the JSON output.
    pub key: &'static str,
    /// What the row shows, as a reader sees it.
    pub label: &'static str,
    pub cells: Vec<String>,
}

/// Column headers are the stage names; every row has exactly one cell per stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComparisonTable {
    pub stage_names: Vec<String>,
    pub rows: Vec<TableRow>,
}

/// Header of the first column (the row labels).
pub const METRIC_COLUMN: &str = "metric";

type CellFn = fn(&StageSummary) -> String;

/// Row order and content; markdown, terminal and JSON all read this list.
const ROWS: &[(&str, &str, CellFn)] = &[
    ("kind", "kind", |s| s.objective.to_string()),
    ("label", "scheme", |s| s.label.clone()),
    ("final_loss", "final training loss", |s| {
        format_metric(s.final_metric("loss"))
    }),
    ("eval_loss", "eval loss", |s| {
        format_metric(s.final_metric("eval/loss"))
    }),
    ("eval_rewards_accuracies", "eval rewards/accuracies", |s| {
        format_percent(s.final_metric("eval/rewards/accuracies"))
    }),
    ("eval_rewards_margins", "eval rewards/margins", |s| {
        format_metric(s.final_metric("eval/rewards/margins"))
    }),
    ("evaluated_by", "evaluated by (eval stage)", |s| {
        s.evaluated
            .evaluation
            .as_ref()
            .map_or_else(|| MISSING.to_string(), |e| e.stage.clone())
    }),
    ("change_from", "change measured against", |s| {
        s.evaluated.change.as_ref().map_or_else(
            || MISSING.to_string(),
            |c| {
                format!(
                    "`{}` (eval `{}`, {} paired rows)",
                    c.from, c.evaluation.stage, c.paired
                )
            },
        )
    }),
    ("exact_match", "exact match", |s| {
        eval_cell(s, "sft/exact_match")
    }),
    ("prefix_match", "prefix match", |s| {
        eval_cell(s, "sft/prefix_match")
    }),
    ("token_accuracy", "token accuracy", |s| {
        eval_cell(s, "sft/token_accuracy")
    }),
    ("task_loss", "task loss (eval data.sft)", |s| {
        eval_cell(s, "sft/loss")
    }),
    ("preference_accuracy", "preference accuracy", |s| {
        eval_cell(s, "preference/accuracy")
    }),
    ("chosen_exact_match", "greedy = chosen", |s| {
        eval_cell(s, "preference/chosen_exact_match")
    }),
    ("trainable_parameters", "trainable parameters", |s| {
        format_count(s.trainable_parameters)
    }),
    ("bytes_on_disk", "bytes on disk", |s| {
        human_bytes(s.bytes_on_disk)
    }),
    ("peak_memory", "peak memory", |s| {
        human_bytes_opt(s.peak_memory_bytes)
    }),
    ("memory_estimate", "peak memory, plan's estimate", |s| {
        s.final_metric("memory/estimate_gib").map_or_else(
            || MISSING.to_string(),
            |g| human_bytes((g * (1u64 << 30) as f64) as u64),
        )
    }),
    ("base_bits", "base projections, bits a weight", |s| {
        s.final_metric("base/bits_per_weight")
            .map_or_else(|| MISSING.to_string(), |b| format!("{b:.1}"))
    }),
    (
        "merge_error",
        "merge error: largest ΔW, KL (saved; as loaded)",
        merge_cell,
    ),
    ("wall_time", "wall time", |s| human_duration(s.wall_seconds)),
    ("steps", "steps", |s| format_count(s.steps)),
    ("lora", "LoRA", |s| s.lora.clone()),
    ("reference", "reference", |s| s.reference.clone()),
];

/// Scheme two's merge against an f32 merge into the unquantized model:
/// "1.2e-3, KL 4.0e-5; 3.1e-2, KL 2.2e-3" (the second part when loading
/// stages quantize the merged model again).
fn merge_cell(s: &StageSummary) -> String {
    let m = &s.merge_precision;
    let part = |prefix: &str| {
        let w = m.get(&format!("{prefix}/weight_max_abs_err"))?;
        Some(match m.get(&format!("{prefix}/kl")) {
            Some(kl) => format!("{w:.1e}, KL {kl:.1e}"),
            None => format!("{w:.1e}"),
        })
    };
    match (part("merge"), part("merge/loaded")) {
        (Some(saved), Some(loaded)) => format!("{saved}; {loaded}"),
        (Some(saved), None) => saved,
        _ => MISSING.to_string(),
    }
}

/// The eval stage's value of `metric`, with its change from the parent and
/// that change's 95% interval: "0.380 (−0.100 [−0.130, −0.070])".
fn eval_cell(s: &StageSummary, metric: &str) -> String {
    let Some(value) = s
        .evaluated
        .evaluation
        .as_ref()
        .and_then(|e| e.metrics.get(metric))
    else {
        return MISSING.to_string();
    };
    match s
        .evaluated
        .change
        .as_ref()
        .and_then(|c| c.deltas.get(metric))
    {
        Some(d) => format!(
            "{value:.3} ({:+.3} [{:+.3}, {:+.3}])",
            d.mean, d.low, d.high
        ),
        None => format!("{value:.3}"),
    }
}

impl ComparisonTable {
    pub fn build(stages: &[StageSummary]) -> Self {
        ComparisonTable {
            stage_names: stages.iter().map(|s| s.name.clone()).collect(),
            rows: ROWS
                .iter()
                .map(|&(key, label, cell)| TableRow {
                    key,
                    label,
                    cells: stages.iter().map(cell).collect(),
                })
                .collect(),
        }
    }
}
