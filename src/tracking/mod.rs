//! Live views of training runs: each training stage's metrics lines, as the
//! loop writes them to metrics.jsonl, streamed to TensorBoard event files
//! (and MLflow), one run per stage named `recipe/stage`, with the stage's
//! resolved parameters and key as hyperparameters. Nothing here enters a
//! stage key or can fail a stage: a tracker that fails is warned of once
//! and dropped.

pub mod mlflow;
pub mod tensorboard;
pub mod tfrecord;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::sink::Tracker;
pub use tfrecord::HParam;

/// `[tracking]` in the recipe.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackingSection {
    /// A folder (relative to the recipe) for TensorBoard event files:
    /// `<folder>/<recipe>/<stage>/events.out.tfevents.*`. `--tensorboard`
    /// overrides it.
    pub tensorboard: Option<String>,
    /// An MLflow tracking server (`http://localhost:5000`): one run per
    /// stage in the experiment `MLFLOW_EXPERIMENT_NAME` (else the recipe's
    /// name). `--mlflow` or `MLFLOW_TRACKING_URI` overrides it.
    pub mlflow: Option<String>,
}

/// Where one stage's run is tracked, and what it is.
#[derive(Clone, Debug, Default)]
pub struct Tracking {
    /// TensorBoard's log folder (the run's folder goes under it).
    pub tensorboard: Option<PathBuf>,
    /// An MLflow tracking server.
    pub mlflow: Option<String>,
    /// The recipe's name (MLflow's experiment unless the environment names one).
    pub recipe: String,
    /// `recipe/stage`.
    pub run: String,
    /// The stage's work folder, where a tracker keeps what a resumed run needs.
    pub work_dir: PathBuf,
    /// The stage's resolved parameters and key, flattened (`train.lr`).
    pub params: Vec<(String, HParam)>,
}

impl Tracking {
    /// The trackers this says to write to; those that cannot be opened are
    /// reported in the returned warnings and left out.
    pub fn open(&self) -> (Vec<Box<dyn Tracker>>, Vec<String>) {
        let (mut trackers, mut warnings): (Vec<Box<dyn Tracker>>, Vec<String>) =
            (Vec::new(), Vec::new());
        if let Some(root) = &self.tensorboard {
            match tensorboard::TensorBoardRun::new(root, &self.run, self.params.clone()) {
                Ok(run) => trackers.push(Box::new(run)),
                Err(e) => warnings.push(format!(
                    "TensorBoard: cannot write under {}: {e}; not logging there",
                    root.display()
                )),
            }
        }
        if let Some(uri) = &self.mlflow {
            let experiment =
                std::env::var("MLFLOW_EXPERIMENT_NAME").unwrap_or_else(|_| self.recipe.clone());
            trackers.push(Box::new(mlflow::MlflowRun::new(mlflow::RunSpec {
                uri: uri.clone(),
                experiment,
                run_name: self.run.clone(),
                params: self.params.clone(),
                work_dir: self.work_dir.clone(),
            })));
        }
        (trackers, warnings)
    }
}

/// A stage's parameters as hyperparameters: `json` (its table as the key
/// holds it) flattened to dotted names, lists as their JSON text.
pub fn flatten_params(json: &serde_json::Value) -> Vec<(String, HParam)> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, HParam)>) {
        use serde_json::Value;
        let name = |k: &str| match prefix {
            "" => k.to_string(),
            p => format!("{p}.{k}"),
        };
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(&name(k), v, out);
                }
            }
            Value::Number(n) => out.push((
                prefix.to_string(),
                HParam::Number(n.as_f64().unwrap_or(f64::NAN)),
            )),
            Value::Bool(b) => out.push((prefix.to_string(), HParam::Bool(*b))),
            Value::String(s) => out.push((prefix.to_string(), HParam::Text(s.clone()))),
            Value::Null => {}
            Value::Array(_) => out.push((prefix.to_string(), HParam::Text(v.to_string()))),
        }
    }
    let mut out = Vec::new();
    walk("", json, &mut out);
    out
}

/// A metrics line's step and values under TRL's names (`learning_rate`
/// for `lr`); None for a line without a step. Non-finite values never
/// reach here: metrics.jsonl writes them as null.
pub fn line_values(line: &serde_json::Value) -> Option<(i64, Vec<(String, f64)>)> {
    let step = line.get("step")?.as_i64()?;
    let values = line
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let name = if k == "lr" { "learning_rate" } else { k };
            Some((name.to_string(), v.as_f64()?))
        })
        .collect();
    Some((step, values))
}

/// Every tracker of a run as one.
pub struct Fanout(pub Vec<Box<dyn Tracker>>);

/// Every tracker is told, whatever another answered; the errors are joined.
fn each(
    trackers: &[Box<dyn Tracker>],
    f: impl Fn(&dyn Tracker) -> Result<(), String>,
) -> Result<(), String> {
    let errors: Vec<String> = trackers
        .iter()
        .filter_map(|t| f(t.as_ref()).err())
        .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors.join("; ")),
    }
}

impl Tracker for Fanout {
    fn restart(&self, lines: &[serde_json::Value]) -> Result<(), String> {
        each(&self.0, |t| t.restart(lines))
    }
    fn line(&self, line: &serde_json::Value) -> Result<(), String> {
        each(&self.0, |t| t.line(line))
    }
    fn end(&self, finished: bool) -> Result<(), String> {
        each(&self.0, |t| t.end(finished))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_flatten_to_dotted_names() {
        let p = flatten_params(&serde_json::json!({
            "train": {"lr": 0.001, "steps": 20}, "lora": {"targets": ["q_proj", "v_proj"]},
            "dpo": {"loss": "sigmoid", "disable_dropout": true}, "adapter": null
        }));
        assert!(p.contains(&("train.lr".into(), HParam::Number(0.001))));
        assert!(p.contains(&(
            "lora.targets".into(),
            HParam::Text("[\"q_proj\",\"v_proj\"]".into())
        )));
        assert!(p.contains(&("dpo.disable_dropout".into(), HParam::Bool(true))));
        assert!(!p.iter().any(|(k, _)| k == "adapter"));
    }

    #[test]
    fn lines_take_trl_names() {
        let line =
            serde_json::json!({"step": 3, "loss": 1.5, "lr": 0.01, "eval/loss": 2.0, "note": "x"});
        let (step, mut got) = line_values(&line).unwrap();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(step, 3);
        let want = [("eval/loss", 2.0), ("learning_rate", 0.01), ("loss", 1.5)];
        assert_eq!(got, want.map(|(k, v)| (k.to_string(), v)));
        assert_eq!(line_values(&serde_json::json!({"loss": 1.0})), None);
    }
}
