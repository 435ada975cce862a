//! The stage DAG: edges from the references inside stages, checked like
//! types before anything runs (each reference names a stage that makes the
//! artifact kind it accepts; no cycles). What a reference means beyond that
//! is the kinds' to check, through `StageKind::check`.

use std::collections::HashMap;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{did_you_mean, Problem, RecipeError};
use crate::recipe::Recipe;
use crate::stage::{ArtifactKind, StageRef, StageView};

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
    let refs: Vec<Vec<StageRef>> = recipe.stages.iter().map(|s| s.refs()).collect();

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
    check_semantics(recipe, &dag, &mut problems);
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

/// Each kind's own checks against the stages it refers to, in execution order.
fn check_semantics(recipe: &Recipe, dag: &Dag, problems: &mut Vec<Problem>) {
    for &i in &dag.order {
        let stage = &recipe.stages[i];
        problems.extend(stage.kind.check(StageView::new(&recipe.stages, i)));
    }
}
