//! LoRA in the recipe: how a stage relates to adapters, and the checks that
//! make edges behave like types — an adapter applies only to the model it
//! was trained on, a new adapter's targets must name modules of its model,
//! and a continued adapter keeps its r, alpha and targets.

use super::lineage::{self, Made};
use super::params::{LoraSpec, Targets};
use crate::diag::span::Sp;
use crate::diag::{did_you_mean, Problem};
use crate::stage::{ArtifactKind, StageView};

/// The LoRA configuration a stage gives its adapter, as far as the recipe says.
#[derive(Clone, Debug, PartialEq)]
pub enum LoraUse<'a> {
    /// The stage makes no adapter.
    None,
    /// A new adapter with this config.
    New(&'a LoraSpec),
    /// Continues the adapter named by the `adapter` field; `constraint` is a
    /// `lora` table merged in from `[defaults.<kind>]`, which must agree with it.
    Continue { constraint: Option<&'a LoraSpec> },
}

impl LoraUse<'_> {
    /// What a training stage tells the stages that refer to it (`lineage::AdapterMade`).
    pub fn made(&self) -> Option<Made> {
        match self {
            LoraUse::None => None,
            LoraUse::New(spec) => Some(Made::Own(Some((*spec).clone()))),
            LoraUse::Continue { .. } => Some(Made::Continued),
        }
    }
}

/// LoRA use of a training stage from its `adapter` and `lora` keys.
pub fn lora_use<'a>(adapter: &Option<Sp<String>>, lora: &'a Option<LoraSpec>) -> LoraUse<'a> {
    match (adapter, lora) {
        (Some(_), constraint) => LoraUse::Continue {
            constraint: constraint.as_ref(),
        },
        (None, Some(spec)) => LoraUse::New(spec),
        (None, None) => LoraUse::None,
    }
}

/// An adapter applies only to the model it was trained on (for every stage
/// with both `model` and `adapter`).
pub fn check_adapter_model(view: StageView<'_>, problems: &mut Vec<Problem>) {
    let (Some(a), Some(m)) = (view.target("adapter"), view.target("model")) else {
        return;
    };
    let Some(trained_on) = a.target("model") else {
        return;
    };
    if trained_on.index() != m.index() {
        problems.push(adapter_model_problem(view, a, m, trained_on));
    }
}

fn adapter_model_problem(
    view: StageView<'_>,
    a: StageView<'_>,
    m: StageView<'_>,
    trained_on: StageView<'_>,
) -> Problem {
    let (stage, adapter, model, origin) = (view.name(), a.name(), m.name(), trained_on.name());
    let span = |field: &str| {
        view.reference(field)
            .map(|r| r.target.span.clone())
            .unwrap_or_default()
    };
    // Is `model` a merge (directly or down its chain) that already contains this adapter?
    let mut cursor = Some(m);
    let mut depth = 0;
    while let Some(c) = cursor {
        if c.kind().output() == ArtifactKind::Model
            && c.target("adapter").map(|t| t.index()) == Some(a.index())
        {
            return Problem::new(format!(
                "stage `{stage}` applies adapter `{adapter}` to `{model}`, which already contains it (merged by stage `{}`): it would be applied twice",
                c.name()
            ))
            .at(span("adapter"), "already merged into the model")
            .also(span("model"), format!("`{model}` includes `{adapter}`"))
            .help(format!(
                "to train further on the merged model, drop `adapter` and declare a new `lora` (scheme two); \
                 to continue `{adapter}` itself, use `model = \"{origin}\"` (scheme one)"
            ));
        }
        depth += 1;
        cursor = if depth > view.stage_count() {
            None
        } else {
            c.target("model")
        };
    }
    Problem::new(format!(
        "stage `{stage}` applies adapter `{adapter}` to `{model}`, but `{adapter}` was trained on `{origin}`"
    ))
    .at(span("adapter"), format!("trained on `{origin}`"))
    .also(span("model"), "a different model")
    .help(format!("use `model = \"{origin}\"`"))
}

/// A training stage's LoRA: a new adapter's targets exist in its model; a
/// continued adapter is not given another shape.
pub fn check_lora(view: StageView<'_>, lora: LoraUse<'_>, problems: &mut Vec<Problem>) {
    match lora {
        LoraUse::New(spec) => {
            if let Some(m) = view.target("model") {
                match lineage::model_modules(m) {
                    Some(Ok(modules)) => check_targets(spec, &modules, m.name(), problems),
                    Some(Err(p)) => problems.push(p),
                    None => {}
                }
            }
        }
        LoraUse::Continue {
            constraint: Some(wanted),
        } => {
            if let Some(a) = view.target("adapter") {
                if let Some(actual) = lineage::adapter_config(a) {
                    check_continuation(view, a.name(), wanted, &actual, problems);
                }
            }
        }
        _ => {}
    }
}

fn check_targets(spec: &LoraSpec, modules: &[String], model: &str, problems: &mut Vec<Problem>) {
    let matches_any = |t: &Targets| modules.iter().any(|m| t.matches(m));
    let short: Vec<String> = {
        let mut s: Vec<String> = modules
            .iter()
            .filter_map(|m| m.rsplit('.').next().map(String::from))
            .collect();
        s.sort();
        s.dedup();
        s
    };
    match &spec.targets.value {
        Targets::List(list) => {
            for t in list {
                if !matches_any(&Targets::List(vec![t.clone()])) {
                    let mut p = Problem::new(format!(
                        "LoRA target `{t}` matches no module of model `{model}`"
                    ))
                    .at(spec.targets.span.clone(), "no module matches");
                    p = match did_you_mean(t, short.iter().map(String::as_str)) {
                        Some(s) => p.help(format!("did you mean `{s}`?")),
                        None => p.help(format!("modules are: {}", short.join(", "))),
                    };
                    problems.push(p);
                }
            }
        }
        pattern => {
            if !matches_any(pattern) {
                problems.push(
                    Problem::new(format!(
                        "LoRA targets pattern matches no module of model `{model}`"
                    ))
                    .at(spec.targets.span.clone(), "matches nothing")
                    .help(format!(
                        "module names look like `{}`",
                        modules.first().map(String::as_str).unwrap_or("")
                    )),
                );
            }
        }
    }
}

fn check_continuation(
    view: StageView<'_>,
    adapter: &str,
    wanted: &LoraSpec,
    actual: &LoraSpec,
    problems: &mut Vec<Problem>,
) {
    let adapter_span = view
        .reference("adapter")
        .map(|r| r.target.span.clone())
        .unwrap_or_default();
    let mut differ = |key: &str, span: std::ops::Range<usize>, old: String, new: String| {
        problems.push(
            Problem::new(format!(
                "stage `{}` continues adapter `{adapter}` but sets lora.{key} = {new} (the adapter has {old})",
                view.name()
            ))
            .at(span, format!("changes {key}"))
            .also(adapter_span.clone(), "continued here")
            .help("a continued adapter keeps its r, alpha, targets, rslora and dora; to change them, merge it and train a new adapter (scheme two)"),
        )
    };
    // (key, set in the stage and different, where, the adapter's value, the stage's)
    let keys = [
        (
            "r",
            wanted.r.is_written() && wanted.r.value != actual.r.value,
            &wanted.r.span,
            actual.r.value.to_string(),
            wanted.r.value.to_string(),
        ),
        (
            "alpha",
            wanted.alpha.is_written() && wanted.alpha.value != actual.alpha.value,
            &wanted.alpha.span,
            actual.alpha.value.to_string(),
            wanted.alpha.value.to_string(),
        ),
        (
            "targets",
            wanted.targets.is_written() && wanted.targets.value != actual.targets.value,
            &wanted.targets.span,
            format!("{:?}", actual.targets.value),
            format!("{:?}", wanted.targets.value),
        ),
        (
            "rslora",
            wanted.rslora.is_written() && wanted.rslora.value != actual.rslora.value,
            &wanted.rslora.span,
            actual.rslora.value.to_string(),
            wanted.rslora.value.to_string(),
        ),
        (
            "dora",
            wanted.dora.is_written() && wanted.dora.value != actual.dora.value,
            &wanted.dora.span,
            actual.dora.value.to_string(),
            wanted.dora.value.to_string(),
        ),
    ];
    for (key, differs, span, old, new) in keys {
        if differs {
            differ(key, span.clone(), old, new);
        }
    }
}

/// The model code's LoRA config from a recipe's `lora` table.
pub fn lora_config(spec: &LoraSpec) -> crate::model::layers::lora::LoraConfig {
    let mut config = crate::model::layers::lora::LoraConfig::new(
        spec.r.value as usize,
        spec.alpha.value,
        spec.targets.to_model(),
    );
    config.dropout = spec.dropout.value;
    config.use_rslora = spec.rslora.value;
    config.use_dora = spec.dora.value;
    config
}

/// `adapter` and `lora` on one stage are exclusive: checked on the table as
/// written, since a `lora` from `[defaults.<kind>]` only constrains a continuation.
pub fn check_written_adapter_or_lora(table: &toml::de::DeTable<'_>, stage: &str) -> Vec<Problem> {
    let (Some(adapter), Some(lora)) = (table.get("adapter"), table.get("lora")) else {
        return Vec::new();
    };
    vec![Problem::new(format!(
        "stage `{stage}` sets both `adapter` (continue an existing adapter) and `lora` (a new one)"
    ))
    .at(lora.span(), "a new adapter")
    .also(adapter.span(), "continues this adapter")
    .help(
        "remove `lora` to keep training the adapter with its own r/alpha/targets (scheme one), \
         or remove `adapter` and merge it first to train a new one (scheme two)",
    )]
}
