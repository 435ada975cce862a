//! What the `eval` stages of a recipe measured for each compared training
//! stage and for the model it was trained from, paired by example: the
//! change training made (with its interval) and, between compared stages,
//! which is better on each metric.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::compare::bootstrap::{paired_difference, Interval};
use crate::kinds::eval::EXAMPLES_FILE;
use crate::plan::{Plan, Status};
use crate::recipe::Recipe;
use crate::stage::{Role, Stage};

/// Per-example metrics the comparison reads, with whether higher is better.
pub const METRICS: &[(&str, bool)] = &[
    ("sft/exact_match", true),
    ("sft/prefix_match", true),
    ("sft/token_accuracy", true),
    ("sft/loss", false),
    ("preference/accuracy", true),
    ("preference/logp_margin", true),
    ("preference/chosen_exact_match", true),
];

/// (data kind, file name, 1-based line): what pairs examples across stages.
pub type ExampleKey = (String, String, usize);
pub type Examples = BTreeMap<ExampleKey, BTreeMap<String, f64>>;

/// One finished eval stage's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Evaluation {
    /// The eval stage.
    pub stage: String,
    /// Its aggregate metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Greedy completions of its prompts: (prompt, completion).
    pub samples: Vec<(String, String)>,
    #[serde(skip)]
    #[schemars(skip)]
    pub examples: Examples,
}

/// The change from the model a stage was trained from to the stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Change {
    /// The stage trained from (an adapter or model stage).
    pub from: String,
    pub evaluation: Evaluation,
    /// Examples found in both evaluations, and in only one of them.
    pub paired: usize,
    pub unpaired: usize,
    /// mean(stage − parent) per metric with its 95% interval.
    pub deltas: BTreeMap<String, Interval>,
}

/// A compared stage's evaluation and what training changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Evaluated {
    pub evaluation: Option<Evaluation>,
    pub change: Option<Change>,
    /// What to add to the recipe to see more (no eval of the stage, or of its parent).
    pub hints: Vec<String>,
}

/// Bootstrap settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
}

/// The stage `s` names under `field` (`model`, `adapter`), if any.
fn named(s: &Stage, field: &str) -> Option<String> {
    s.refs()
        .into_iter()
        .find(|r| r.field == field)
        .map(|r| r.target.value)
}

/// Evals of (model, adapter) in the recipe, in recipe order.
fn evals_of(recipe: &Recipe, model: &str, adapter: Option<&str>) -> Vec<String> {
    recipe
        .stages
        .iter()
        .filter(|s| s.kind.role() == Role::Evaluate)
        .filter(|s| {
            named(s, "model").as_deref() == Some(model) && named(s, "adapter").as_deref() == adapter
        })
        .map(|s| s.name.value.clone())
        .collect()
}

fn load(plan: &Plan, cache: &Cache, eval: &str) -> Option<Evaluation> {
    let Status::Cached { artifact } = &plan.by_name(eval)?.status else {
        return None;
    };
    let manifest = cache.manifest(artifact)?;
    let metrics = manifest
        .metrics
        .iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
        .collect();
    let samples = manifest
        .metrics
        .get("samples")
        .and_then(|s| s.as_array())
        .map(|all| {
            all.iter()
                .filter(|s| s["mode"] == "greedy")
                .filter_map(|s| {
                    Some((
                        s["prompt"].as_str()?.to_string(),
                        s["completion"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let text = std::fs::read_to_string(cache.artifact_dir(artifact).join(EXAMPLES_FILE))
        .unwrap_or_default();
    let mut examples = Examples::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(data), Some(file), Some(row)) =
            (v["data"].as_str(), v["file"].as_str(), v["line"].as_u64())
        else {
            continue;
        };
        let values = v
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.contains('/'))
            .filter_map(|(k, x)| x.as_f64().map(|x| (k.clone(), x)))
            .collect();
        examples.insert((data.into(), file.into(), row as usize), values);
    }
    Some(Evaluation {
        stage: eval.to_string(),
        metrics,
        samples,
        examples,
    })
}

/// Paired values of `metric` for the examples both have.
/// The values of `metric` on the examples both evaluations have, paired.
pub fn paired(a: &Examples, b: &Examples, metric: &str) -> (Vec<f64>, Vec<f64>) {
    a.iter()
        .filter_map(|(k, m)| Some((*m.get(metric)?, *b.get(k)?.get(metric)?)))
        .unzip()
}

/// Examples in both, and in exactly one of the two.
fn overlap(a: &Examples, b: &Examples) -> (usize, usize) {
    let both = a.keys().filter(|k| b.contains_key(*k)).count();
    (both, a.len() + b.len() - 2 * both)
}

/// mean(a − b) with its interval for every metric both have on shared examples.
pub fn deltas(a: &Examples, b: &Examples, bootstrap: Bootstrap) -> BTreeMap<String, Interval> {
    METRICS
        .iter()
        .filter_map(|&(metric, _)| {
            let (x, y) = paired(a, b, metric);
            let ci = paired_difference(&x, &y, bootstrap.resamples, bootstrap.seed)?;
            Some((metric.to_string(), ci))
        })
        .collect()
}

/// A model stage and the adapter applied to it, as an eval stage names them.
type ModelAndAdapter = (String, Option<String>);

/// The model a training stage trains on and the adapter it continues.
fn training_inputs(recipe: &Recipe, stage: &str) -> Option<ModelAndAdapter> {
    let s = recipe.stage(stage)?;
    if !matches!(s.kind.role(), Role::Train(_)) {
        return None;
    }
    Some((named(s, "model")?, named(s, "adapter")))
}

/// The stage a training stage started from, and the (model, adapter)
/// pairs whose evaluation measures it.
fn parent_of(recipe: &Recipe, stage: &str) -> Option<(String, Vec<ModelAndAdapter>)> {
    let (model, adapter) = training_inputs(recipe, stage)?;
    Some(match adapter {
        Some(a) => (a.clone(), vec![(model, Some(a))]),
        None => {
            let mut same = vec![(model.clone(), None)];
            // A merged model is its model + adapter: an eval of those measures it too.
            if let Some(m) = recipe
                .stage(&model)
                .filter(|m| m.kind.role() == Role::Merge)
            {
                if let (Some(base), Some(a)) = (named(m, "model"), named(m, "adapter")) {
                    same.push((base, Some(a)));
                }
            }
            (model, same)
        }
    })
}

fn describe(model: &str, adapter: Option<&str>) -> String {
    match adapter {
        Some(a) => format!("model = \"{model}\", adapter = \"{a}\""),
        None => format!("model = \"{model}\" and no adapter"),
    }
}

/// The evaluation of `stage` and what training changed, from the recipe's eval stages.
pub fn evaluate(
    recipe: &Recipe,
    plan: &Plan,
    cache: &Cache,
    stage: &str,
    bootstrap: Bootstrap,
) -> Evaluated {
    let mut out = Evaluated::default();
    let Some((model, _)) = training_inputs(recipe, stage) else {
        return out;
    };
    let own = evals_of(recipe, &model, Some(stage));
    let Some(evaluation) = own.iter().find_map(|e| load(plan, cache, e)) else {
        out.hints.push(match own.first() {
            Some(e) => format!("eval stage `{e}` of `{stage}` has not run"),
            None => format!(
                "add an eval stage with {} to measure `{stage}`",
                describe(&model, Some(stage))
            ),
        });
        return out;
    };
    if let Some((from, candidates)) = parent_of(recipe, stage) {
        let found = candidates.iter().find_map(|(m, a)| {
            evals_of(recipe, m, a.as_deref())
                .iter()
                .find_map(|e| load(plan, cache, e))
        });
        match found {
            Some(parent) => {
                let (paired, unpaired) = overlap(&evaluation.examples, &parent.examples);
                if paired == 0 {
                    out.hints.push(format!(
                        "`{}` and `{}` evaluated no example in common: use the same data files",
                        evaluation.stage, parent.stage
                    ));
                }
                out.change = Some(Change {
                    from,
                    deltas: deltas(&evaluation.examples, &parent.examples, bootstrap),
                    evaluation: parent,
                    paired,
                    unpaired,
                });
            }
            None => {
                let (m, a) = &candidates[0];
                out.hints.push(format!(
                    "add an eval stage with {} and the same data to see what `{stage}` changed",
                    describe(m, a.as_deref())
                ));
            }
        }
    }
    out.evaluation = Some(evaluation);
    out
}

/// Which of two stages is better on one metric.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Verdict {
    pub a: String,
    pub b: String,
    pub metric: String,
    /// mean(a − b) over paired examples, with its 95% interval.
    pub difference: Interval,
    pub paired: usize,
    /// The better stage, or None for no significant difference.
    pub better: Option<String>,
    /// One line for people.
    pub text: String,
}

/// Every pair of evaluated stages on every metric they share.
pub fn verdicts(stages: &[(String, &Evaluation)], bootstrap: Bootstrap) -> Vec<Verdict> {
    let mut out = Vec::new();
    for (i, (a, ea)) in stages.iter().enumerate() {
        for (b, eb) in &stages[i + 1..] {
            for &(metric, higher_is_better) in METRICS {
                let (x, y) = paired(&ea.examples, &eb.examples, metric);
                let paired = x.len();
                let Some(d) = paired_difference(&x, &y, bootstrap.resamples, bootstrap.seed) else {
                    continue;
                };
                let better = d.significant().then(|| {
                    if (d.mean > 0.0) == higher_is_better {
                        a.clone()
                    } else {
                        b.clone()
                    }
                });
                let range = format!("{:+.3} [{:+.3}, {:+.3}]", d.mean, d.low, d.high);
                let text = match &better {
                    Some(w) => format!(
                        "{metric}: `{w}` is better by {:.3} ({a} − {b} = {range}, {paired} paired examples)",
                        d.mean.abs()
                    ),
                    None => format!(
                        "{metric}: no significant difference between `{a}` and `{b}` ({a} − {b} = {range}, {paired} paired examples)"
                    ),
                };
                out.push(Verdict {
                    a: a.clone(),
                    b: b.clone(),
                    metric: metric.to_string(),
                    difference: d,
                    paired,
                    better,
                    text,
                });
            }
        }
    }
    out
}

/// Verdicts between the evaluated stages of a comparison.
pub fn verdicts_of(stages: &[crate::compare::StageSummary], bootstrap: Bootstrap) -> Vec<Verdict> {
    let evaluated: Vec<(String, &Evaluation)> = stages
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.evaluated.evaluation.as_ref()?)))
        .collect();
    verdicts(&evaluated, bootstrap)
}

/// The verdict section: how it was computed, one line per stage pair and
/// metric, then what the recipe lacks for a fuller answer.
pub fn verdict_text(
    stages: &[crate::compare::StageSummary],
    verdicts: &[Verdict],
    bootstrap: Bootstrap,
) -> String {
    let mut out = String::new();
    if !verdicts.is_empty() {
        out.push_str(&format!(
            "verdict (paired bootstrap over examples, 95% intervals, {} resamples, seed {}):\n",
            bootstrap.resamples, bootstrap.seed
        ));
        for v in verdicts {
            out.push_str(&format!("  {}\n", v.text));
        }
    }
    for s in stages {
        for h in &s.evaluated.hints {
            out.push_str(&format!("note: {}: {h}\n", s.name));
        }
    }
    out
}
