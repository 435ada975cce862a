//! The comparison for `--json`: raw numbers for programs, formatted cells for people.

use serde_json::{json, Map, Value};

use crate::compare::evaluation::{verdicts_of, Bootstrap};
use crate::compare::stage::StageSummary;
use crate::compare::table::ComparisonTable;

/// `{"stages": [{name, kind, label, final_metrics, ..., "display": {row key: cell}}]}`.
/// Per-step rows are left out (they are in each stage's metrics.jsonl); `rows` gives
/// their count. Non-finite metrics become null, as JSON has no NaN.
pub fn json(stages: &[StageSummary], bootstrap: Bootstrap) -> Value {
    let table = ComparisonTable::build(stages);
    let entries: Vec<Value> = stages
        .iter()
        .enumerate()
        .map(|(column, stage)| {
            let display: Map<String, Value> = table
                .rows
                .iter()
                .map(|row| (row.key.to_string(), Value::from(row.cells[column].clone())))
                .collect();
            let final_metrics: Map<String, Value> = stage
                .final_metrics
                .iter()
                .map(|(k, &v)| (k.clone(), finite_or_null(v)))
                .collect();
            json!({
                "name": stage.name,
                "kind": stage.objective.as_str(),
                "label": stage.label,
                "final_metrics": final_metrics,
                "final_loss": stage.final_metric("loss"),
                "eval_loss": stage.final_metric("eval/loss"),
                "eval_rewards_accuracies": stage.final_metric("eval/rewards/accuracies"),
                "eval_rewards_margins": stage.final_metric("eval/rewards/margins"),
                "trainable_parameters": stage.trainable_parameters,
                "bytes_on_disk": stage.bytes_on_disk,
                "peak_memory_bytes": stage.peak_memory_bytes,
                "wall_seconds": finite_or_null(stage.wall_seconds),
                "steps": stage.steps,
                "lora": stage.lora,
                "reference": stage.reference,
                "rows": stage.rows.len(),
                "evaluated": serde_json::to_value(&stage.evaluated).expect("serializes"),
                "display": display,
            })
        })
        .collect();
    json!({
        "stages": entries,
        "bootstrap": bootstrap,
        "verdicts": verdicts_of(stages, bootstrap),
    })
}

fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        Value::from(v)
    } else {
        Value::Null
    }
}
