//! The comparison for `--json` (schemas/compare.schema.json): raw numbers
//! for programs, formatted cells for people, and the verdicts.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::compare::evaluation::{verdicts_of, Bootstrap, Evaluated, Verdict};
use crate::compare::summary::StageSummary;
use crate::compare::table::ComparisonTable;

/// `runner compare --json` output.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CompareJson {
    /// The compared stages, in column (or ranking) order.
    pub stages: Vec<CompareStageJson>,
    /// How the intervals were computed.
    pub bootstrap: Bootstrap,
    /// Every pair of evaluated stages on every per-example metric they share.
    pub verdicts: Vec<Verdict>,
    /// report.md, written beside the charts (set by `runner compare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// report.html, self-contained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_html: Option<String>,
}

/// One compared stage. Non-finite numbers are null, as JSON has no NaN.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CompareStageJson {
    /// The stage (`recipe:stage` when several recipes are compared).
    pub name: String,
    /// "sft" or "dpo".
    pub kind: String,
    /// e.g. "scheme one: continue `sft`".
    pub label: String,
    /// What the trainer reported at the end.
    pub final_metrics: BTreeMap<String, Option<f64>>,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_rewards_accuracies: Option<f64>,
    pub eval_rewards_margins: Option<f64>,
    pub trainable_parameters: u64,
    /// Bytes the stage needed beyond what all compared stages share.
    pub bytes_on_disk: u64,
    pub peak_memory_bytes: Option<u64>,
    pub wall_seconds: Option<f64>,
    pub steps: u64,
    pub lora: String,
    pub reference: String,
    /// Lines in the stage's metrics.jsonl.
    pub rows: usize,
    /// Its eval stage's results and what training changed against the stage it started from.
    pub evaluated: Evaluated,
    /// Every table cell as shown, by row key.
    pub display: BTreeMap<String, String>,
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The typed output; `json` is it as a JSON value.
pub fn compare_json(stages: &[StageSummary], bootstrap: Bootstrap) -> CompareJson {
    let table = ComparisonTable::build(stages);
    CompareJson {
        stages: stages
            .iter()
            .enumerate()
            .map(|(column, stage)| CompareStageJson {
                name: stage.name.clone(),
                kind: stage.objective.as_str().to_string(),
                label: stage.label.clone(),
                final_metrics: stage
                    .final_metrics
                    .iter()
                    .map(|(k, &v)| (k.clone(), finite(v)))
                    .collect(),
                final_loss: stage.final_metric("loss"),
                eval_loss: stage.final_metric("eval/loss"),
                eval_rewards_accuracies: stage.final_metric("eval/rewards/accuracies"),
                eval_rewards_margins: stage.final_metric("eval/rewards/margins"),
                trainable_parameters: stage.trainable_parameters,
                bytes_on_disk: stage.bytes_on_disk,
                peak_memory_bytes: stage.peak_memory_bytes,
                wall_seconds: finite(stage.wall_seconds),
                steps: stage.steps,
                lora: stage.lora.clone(),
                reference: stage.reference.clone(),
                rows: stage.rows.len(),
                evaluated: stage.evaluated.clone(),
                display: table
                    .rows
                    .iter()
                    .map(|row| (row.key.to_string(), row.cells[column].clone()))
                    .collect(),
            })
            .collect(),
        bootstrap,
        verdicts: verdicts_of(stages, bootstrap),
        report: None,
        report_html: None,
    }
}

/// `compare_json` as a JSON value.
pub fn json(stages: &[StageSummary], bootstrap: Bootstrap) -> Value {
    serde_json::to_value(compare_json(stages, bootstrap)).expect("serializes")
}

/// JSON schema of `runner compare --json` (schemas/compare.schema.json).
pub fn compare_schema() -> Value {
    schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<CompareJson>()
        .to_value()
}
