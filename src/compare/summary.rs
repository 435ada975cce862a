//! The input data model: one finished training stage and the metric rows it logged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stage::Objective;

/// Everything the comparison needs about one finished stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Short identifier, used as the column header and legend key (e.g. "dpo-one").
    pub name: String,
    /// What the stage trained for; "kind" in JSON, as `runner compare --json` writes it.
    #[serde(rename = "kind")]
    pub objective: Objective,
    /// Human description (e.g. "scheme one: continue the SFT adapter").
    pub label: String,
    /// The stage's metrics.jsonl, one JSON object per line, in file order.
    pub rows: Vec<Value>,
    /// What the trainer returned at the end ("loss", "eval/loss", "eval/rewards/accuracies", ...).
    pub final_metrics: BTreeMap<String, f64>,
    pub trainable_parameters: u64,
    /// Size of the stage's artifacts; for scheme two this includes the merged base model.
    pub bytes_on_disk: u64,
    /// None where the platform could not measure it.
    pub peak_memory_bytes: Option<u64>,
    pub wall_seconds: f64,
    pub steps: u64,
    /// e.g. "r=8 alpha=16 targets=all-linear".
    pub lora: String,
    /// What the DPO reference model was (or what SFT started from).
    pub reference: String,
    /// Scheme two: the `merge/...` metrics of the merge it trained on (the
    /// error of the saved and of the loaded merged model against an f32 merge).
    #[serde(default)]
    pub merge_precision: BTreeMap<String, f64>,
    /// What the recipe's eval stages measured for it and its parent.
    #[serde(default)]
    pub evaluated: crate::compare::evaluation::Evaluated,
}

/// One (step, value) sample; both are finite.
pub type Point = (f64, f64);

/// A training row carries "loss"; anything else (e.g. only "eval/loss") is an eval row.
pub fn is_eval_row(row: &Value) -> bool {
    row.as_object().is_some_and(|o| !o.contains_key("loss"))
}

fn finite_number(row: &Value, key: &str) -> Option<f64> {
    row.get(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
}

fn points_where(rows: &[Value], key: &str, want_eval: bool) -> Vec<Point> {
    let mut points: Vec<Point> = rows
        .iter()
        .filter(|row| row.is_object() && is_eval_row(row) == want_eval)
        .filter_map(|row| Some((finite_number(row, "step")?, finite_number(row, key)?)))
        .collect();
    // Stable sort: rows are usually already ordered, but a resumed run may not be.
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

impl StageSummary {
    /// `key` per optimizer step from the training rows, sorted by step; missing or
    /// non-finite values are skipped rather than failing the whole report.
    pub fn training_points(&self, key: &str) -> Vec<Point> {
        points_where(&self.rows, key, false)
    }

    /// `key` (e.g. "eval/loss") from the held-out evaluation rows, sorted by step.
    pub fn eval_points(&self, key: &str) -> Vec<Point> {
        points_where(&self.rows, key, true)
    }

    /// The final value of a metric: `final_metrics` first, else the last logged row
    /// that has it (eval rows for "eval/..." keys, training rows otherwise).
    pub fn final_metric(&self, key: &str) -> Option<f64> {
        if let Some(v) = self
            .final_metrics
            .get(key)
            .copied()
            .filter(|v| v.is_finite())
        {
            return Some(v);
        }
        let from_eval = key.starts_with("eval/");
        points_where(&self.rows, key, from_eval)
            .last()
            .map(|&(_, v)| v)
    }

    /// "name — label", or just the name when there is no label.
    pub fn display_name(&self) -> String {
        if self.label.trim().is_empty() {
            self.name.clone()
        } else {
            format!("{} — {}", self.name, self.label)
        }
    }
}
