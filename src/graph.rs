//! The stage DAG: edges from the references inside stages, checked like
//! types before anything runs.

use std::collections::HashMap;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::recipe::diag::{did_you_mean, Problem, RecipeError};
use crate::recipe::params::LoraSpec;
use crate::recipe::Recipe;
use crate::stage::{ArtifactKind, LoraUse, StageRef};

/// The checked DAG of a recipe.
#[derive(Debug)]
pub struct Dag {
    /// Node weights are indices into `recipe.stages`; edges go from the
    /// referenced stage to the one that references it, weighted by field.
    pub graph: DiGraph<usize, &'static str>,
    /// Stage indices in execution order (dependencies first; ties in written order).
    pub order: Vec<usize>,
    nodes: Vec<NodeIndex>,
}

impl Dag {
    /// Indices of the stages `stage` reads from, with the field that names each.
    pub fn deps(&self, stage: usize) -> Vec<(&'static str, usize)> {
        let mut deps: Vec<_> = self
            .graph
            .edges_directed(self.nodes[stage], petgraph::Direction::Incoming)
            .map(|e| {
                use petgraph::visit::EdgeRef;
                (*e.weight(), self.graph[e.source()])
            })
            .collect();
        deps.sort();
        deps
    }

    /// `stage` and everything it depends on, transitively.
    pub fn ancestors_and_self(&self, stage: usize) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![stage];
        while let Some(s) = stack.pop() {
            if !std::mem::replace(&mut seen[s], true) {
                stack.extend(self.deps(s).into_iter().map(|(_, d)| d));
            }
        }
        (0..seen.len()).filter(|&i| seen[i]).collect()
    }
}

/// Build the DAG and run every check; all problems are reported together.
pub fn build(recipe: &Recipe) -> Result<Dag, RecipeError> {
    let names: HashMap<&str, usize> = recipe
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.value.as_str(), i))
        .collect();
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..recipe.stages.len())
        .map(|i| graph.add_node(i))
        .collect();
    let mut problems = Vec::new();
    let refs: Vec<Vec<StageRef>> = recipe.stages.iter().map(|s| s.params.refs()).collect();

    for (i, stage) in recipe.stages.iter().enumerate() {
        for r in &refs[i] {
            let target = r.target.value.as_str();
            if target == stage.name.value {
                problems.push(
                    Problem::new(format!(
                        "stage `{target}` refers to itself in `{}`",
                        r.field
                    ))
                    .at(
                        r.target.span.clone(),
                        "a stage cannot consume its own output",
                    ),
                );
                continue;
            }
            let Some(&j) = names.get(target) else {
                let mut p = Problem::new(format!(
                    "unknown stage `{target}` in `{}` of stage `{}`",
                    r.field, stage.name.value
                ))
                .at(r.target.span.clone(), "no stage of this name");
                if let Some(s) = did_you_mean(target, names.keys().copied()) {
                    p = p.help(format!("did you mean `{s}`?"));
                }
                problems.push(p);
                continue;
            };
            let produced = recipe.stages[j].kind.output();
            if !r.accepts.contains(&produced) {
                let wanted: Vec<&str> = r.accepts.iter().map(|k| k.noun()).collect();
                let mut p = Problem::new(format!(
                    "`{}` of stage `{}` expects {}, but stage `{target}` ({}) makes {}",
                    r.field,
                    stage.name.value,
                    wanted.join(" or "),
                    recipe.stages[j].kind.name(),
                    produced.noun()
                ))
                .at(
                    r.target.span.clone(),
                    format!("this is {}", produced.noun()),
                );
                if r.field == "model" && produced == ArtifactKind::Adapter {
                    p = p.help(format!(
                        "an adapter is applied to a model: write `model = \"<its model>\"` and `adapter = \"{target}\"`"
                    ));
                }
                problems.push(p);
                continue;
            }
            graph.add_edge(nodes[j], nodes[i], r.field);
        }
    }

    // Cycles: report each strongly connected component as a path.
    for scc in tarjan_scc(&graph) {
        if scc.len() > 1 {
            problems.push(cycle_problem(recipe, &graph, &scc, &refs));
        }
    }
    if !problems.is_empty() {
        return Err(recipe.error(problems));
    }

    let order = topo_in_written_order(&graph, &nodes);
    let dag = Dag {
        graph,
        order,
        nodes,
    };
    let mut problems = Vec::new();
    check_semantics(recipe, &dag, &refs, &mut problems);
    if problems.is_empty() {
        Ok(dag)
    } else {
        Err(recipe.error(problems))
    }
}

/// Kahn's algorithm taking the earliest-written ready stage first, so that
/// independent stages run in the order the user wrote them.
fn topo_in_written_order(graph: &DiGraph<usize, &'static str>, nodes: &[NodeIndex]) -> Vec<usize> {
    debug_assert!(toposort(graph, None).is_ok());
    let mut indegree: Vec<usize> = nodes
        .iter()
        .map(|&n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: std::collections::BTreeSet<usize> =
        (0..nodes.len()).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for n in graph.neighbors_directed(nodes[i], petgraph::Direction::Outgoing) {
            let j = graph[n];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}

fn cycle_problem(
    recipe: &Recipe,
    graph: &DiGraph<usize, &'static str>,
    scc: &[NodeIndex],
    refs: &[Vec<StageRef>],
) -> Problem {
    // Walk the component from its earliest-written stage following references back.
    let in_scc = |n: NodeIndex| scc.contains(&n);
    let start = *scc.iter().min_by_key(|n| graph[**n]).expect("non-empty");
    let mut path = vec![start];
    let mut current = start;
    loop {
        // `current` references `prev`: follow incoming edges (reference direction).
        let next = graph
            .neighbors_directed(current, petgraph::Direction::Incoming)
            .filter(|n| in_scc(*n))
            .min_by_key(|n| graph[*n])
            .expect("a cycle continues");
        if next == start || path.contains(&next) {
            path.push(next);
            break;
        }
        path.push(next);
        current = next;
    }
    let names: Vec<&str> = path
        .iter()
        .map(|n| recipe.stages[graph[*n]].name.value.as_str())
        .collect();
    let mut problem = Problem::new(format!("the stages form a cycle: {}", names.join(" → ")));
    for w in path.windows(2) {
        let (from, to) = (graph[w[0]], graph[w[1]]);
        let to_name = &recipe.stages[to].name.value;
        if let Some(r) = refs[from].iter().find(|r| &r.target.value == to_name) {
            let label = format!("`{}` needs `{to_name}`", recipe.stages[from].name.value);
            problem = if problem.span.is_none() {
                problem.at(r.target.span.clone(), label)
            } else {
                problem.also(r.target.span.clone(), label)
            };
        }
    }
    problem.help("a stage can only consume stages that do not depend on it")
}

fn field<'a>(refs: &'a [StageRef], name: &str) -> Option<&'a StageRef> {
    refs.iter().find(|r| r.field == name)
}

/// Index of the stage named by `field` of stage `i`, if any.
fn target(recipe: &Recipe, refs: &[Vec<StageRef>], i: usize, name: &str) -> Option<usize> {
    let r = field(&refs[i], name)?;
    recipe
        .stages
        .iter()
        .position(|s| s.name.value == r.target.value)
}

/// The LoRA config an adapter stage's adapter has, following continuations.
fn adapter_config<'a>(
    recipe: &'a Recipe,
    refs: &[Vec<StageRef>],
    i: usize,
) -> Option<std::borrow::Cow<'a, LoraSpec>> {
    match recipe.stages[i].params.lora() {
        LoraUse::New(spec) => Some(std::borrow::Cow::Borrowed(spec)),
        LoraUse::Imported(spec) => spec.map(std::borrow::Cow::Owned),
        LoraUse::Continue { .. } => {
            adapter_config(recipe, refs, target(recipe, refs, i, "adapter")?)
        }
        LoraUse::None => None,
    }
}

/// Linear module names of the model made by stage `i` (following merges to their base).
fn model_modules(
    recipe: &Recipe,
    refs: &[Vec<StageRef>],
    i: usize,
    depth: usize,
) -> Option<Result<Vec<String>, Problem>> {
    if depth > recipe.stages.len() {
        return None;
    }
    match recipe.stages[i].params.model_modules() {
        Some(m) => Some(m),
        None => model_modules(recipe, refs, target(recipe, refs, i, "model")?, depth + 1),
    }
}

fn check_semantics(
    recipe: &Recipe,
    dag: &Dag,
    refs: &[Vec<StageRef>],
    problems: &mut Vec<Problem>,
) {
    for &i in &dag.order {
        let stage = &recipe.stages[i];
        let name = &stage.name.value;

        if let Some(span) = stage.params.missing_data() {
            problems.push(
                Problem::new(format!("training stage `{name}` has no `data`"))
                    .at(span, "this stage")
                    .help("add data = { train = \"data/train.jsonl\" }"),
            );
        }

        // An adapter applies only to the model it was trained on.
        if let (Some(a), Some(m)) = (
            target(recipe, refs, i, "adapter"),
            target(recipe, refs, i, "model"),
        ) {
            if let Some(trained_on) = target(recipe, refs, a, "model") {
                if trained_on != m {
                    problems.push(adapter_model_problem(recipe, refs, i, a, m, trained_on));
                }
            }
        }

        match stage.params.lora() {
            LoraUse::New(spec) => {
                if let Some(m) = target(recipe, refs, i, "model") {
                    match model_modules(recipe, refs, m, 0) {
                        Some(Ok(modules)) => {
                            check_targets(spec, &modules, &recipe.stages[m].name.value, problems)
                        }
                        Some(Err(p)) => problems.push(p),
                        None => {}
                    }
                }
            }
            LoraUse::Continue {
                constraint: Some(wanted),
            } => {
                if let Some(a) = target(recipe, refs, i, "adapter") {
                    if let Some(actual) = adapter_config(recipe, refs, a) {
                        check_continuation(recipe, refs, i, a, wanted, &actual, problems);
                    }
                }
            }
            _ => {}
        }
    }
}

fn adapter_model_problem(
    recipe: &Recipe,
    refs: &[Vec<StageRef>],
    i: usize,
    a: usize,
    m: usize,
    trained_on: usize,
) -> Problem {
    let (stage, adapter, model, origin) = (
        &recipe.stages[i].name.value,
        &recipe.stages[a].name.value,
        &recipe.stages[m].name.value,
        &recipe.stages[trained_on].name.value,
    );
    let adapter_span = field(&refs[i], "adapter")
        .map(|r| r.target.span.clone())
        .unwrap_or_default();
    let model_span = field(&refs[i], "model")
        .map(|r| r.target.span.clone())
        .unwrap_or_default();
    // Is `model` a merge (directly or down its chain) that already contains this adapter?
    let mut cursor = Some(m);
    while let Some(c) = cursor {
        if recipe.stages[c].kind.output() == ArtifactKind::Model
            && target(recipe, refs, c, "adapter") == Some(a)
        {
            return Problem::new(format!(
                "stage `{stage}` applies adapter `{adapter}` to `{model}`, which already contains it (merged by stage `{}`): it would be applied twice",
                recipe.stages[c].name.value
            ))
            .at(adapter_span, "already merged into the model")
            .also(model_span, format!("`{model}` includes `{adapter}`"))
            .help(format!(
                "to train further on the merged model, drop `adapter` and declare a new `lora` (scheme two); \
                 to continue `{adapter}` itself, use `model = \"{origin}\"` (scheme one)"
            ));
        }
        cursor = target(recipe, refs, c, "model");
    }
    Problem::new(format!(
        "stage `{stage}` applies adapter `{adapter}` to `{model}`, but `{adapter}` was trained on `{origin}`"
    ))
    .at(adapter_span, format!("trained on `{origin}`"))
    .also(model_span, "a different model")
    .help(format!("use `model = \"{origin}\"`"))
}

fn check_targets(spec: &LoraSpec, modules: &[String], model: &str, problems: &mut Vec<Problem>) {
    let matches_any = |t: &crate::recipe::params::Targets| modules.iter().any(|m| t.matches(m));
    use crate::recipe::params::Targets;
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
    recipe: &Recipe,
    refs: &[Vec<StageRef>],
    i: usize,
    a: usize,
    wanted: &LoraSpec,
    actual: &LoraSpec,
    problems: &mut Vec<Problem>,
) {
    let adapter = &recipe.stages[a].name.value;
    let adapter_span = field(&refs[i], "adapter")
        .map(|r| r.target.span.clone())
        .unwrap_or_default();
    let mut differ = |key: &str, span: std::ops::Range<usize>, old: String, new: String| {
        problems.push(
            Problem::new(format!(
                "stage `{}` continues adapter `{adapter}` but sets lora.{key} = {new} (the adapter has {old})",
                recipe.stages[i].name.value
            ))
            .at(span, format!("changes {key}"))
            .also(adapter_span.clone(), "continued here")
            .help("a continued adapter keeps its r, alpha and targets; to change them, merge it and train a new adapter (scheme two)"),
        )
    };
    if wanted.r.is_written() && wanted.r.value != actual.r.value {
        differ(
            "r",
            wanted.r.span.clone(),
            actual.r.value.to_string(),
            wanted.r.value.to_string(),
        );
    }
    if wanted.alpha.is_written() && wanted.alpha.value != actual.alpha.value {
        differ(
            "alpha",
            wanted.alpha.span.clone(),
            actual.alpha.value.to_string(),
            wanted.alpha.value.to_string(),
        );
    }
    if wanted.targets.is_written() && wanted.targets.value != actual.targets.value {
        differ(
            "targets",
            wanted.targets.span.clone(),
            format!("{:?}", actual.targets.value),
            format!("{:?}", wanted.targets.value),
        );
    }
    if wanted.rslora.is_written() && wanted.rslora.value != actual.rslora.value {
        differ(
            "rslora",
            wanted.rslora.span.clone(),
            actual.rslora.value.to_string(),
            wanted.rslora.value.to_string(),
        );
    }
}
