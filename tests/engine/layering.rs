//! The direction of imports in `src/`: the engine never imports a stage
//! kind, the comparison, the device choice or an ML library; the ML
//! libraries never import the engine; nothing imports the CLI; and the
//! top-level modules import each other without a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level modules by layer. A module may import its own layer, the
/// layers it lists, and the leaves.
const LEAVES: &[&str] = &[
    "alloc_guard",
    "diag",
    "fsutil",
    "machine",
    "remote",
    "sink",
    "tracking",
    "units",
];
const ENGINE: &[&str] = &[
    "cache", "executor", "gc", "graph", "hashing", "plan", "progress", "recipe", "schema",
    "sharing", "stage",
];
const ML: &[&str] = &["data", "metrics", "model", "train"];
const STAGE_LAYER: &[&str] = &["compare", "device", "kinds"];

fn layer_of(module: &str) -> &'static str {
    if LEAVES.contains(&module) {
        "leaf"
    } else if ENGINE.contains(&module) {
        "engine"
    } else if ML.contains(&module) {
        "ml"
    } else if STAGE_LAYER.contains(&module) {
        "kinds"
    } else if module == "cli" {
        "cli"
    } else {
        panic!("module `{module}` is in no layer: add it to tests/engine/layering.rs")
    }
}

/// May a module of layer `from` import one of layer `to`?
fn allowed(from: &str, to: &str) -> bool {
    match from {
        "leaf" => to == "leaf",
        "engine" => matches!(to, "leaf" | "engine"),
        "ml" => matches!(to, "leaf" | "ml"),
        "kinds" => to != "cli",
        "cli" => true,
        _ => false,
    }
}

/// `crate::<module>` paths in Rust source, comments left out.
fn imported_modules(source: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let code: String = source
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}}`, over any number of lines: the first
            // name of each top-level item.
            let (mut depth, mut item) = (0, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(&std::mem::take(&mut item)));
                    }
                    c if depth == 0 => item.push(c),
                    _ => {}
                }
            }
            found.insert(ident(&item));
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// Top-level module -> the top-level modules its files import.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            let imports = graph.entry(module.clone()).or_default();
            for m in imported_modules(&source) {
                if m != module {
                    imports.insert(m);
                }
            }
        }
    }
    graph
}

fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (from, imports) in graph {
        for to in imports {
            if !allowed(layer_of(from), layer_of(to)) {
                out.push(format!(
                    "{from} ({}) imports {to} ({})",
                    layer_of(from),
                    layer_of(to)
                ));
            }
        }
    }
    out
}

/// A circle among modules, as a path, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn imports_go_one_way_and_form_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = import_graph(&src);
    assert!(graph.contains_key("kinds") && graph.contains_key("train"));
    assert_eq!(violations(&graph), Vec::<String>::new());
    assert_eq!(circle(&graph), None);
}

#[test]
fn the_checker_catches_a_wrong_import_and_a_circle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("plan", vec!["kinds", "cache"]),
        ("train", vec!["stage"]),
        ("cache", vec!["plan"]),
        ("kinds", vec![]),
        ("stage", vec![]),
    ]
    .into_iter()
    .map(|(m, i)| (m.to_string(), i.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        violations(&graph),
        [
            "plan (engine) imports kinds (kinds)",
            "train (ml) imports stage (engine)"
        ]
    );
    assert_eq!(
        circle(&graph),
        Some(vec!["cache".to_string(), "plan".into(), "cache".into()])
    );
    assert_eq!(
        imported_modules(
            "use crate::{cache::Cache, stage};\n// crate::kinds\nlet x = crate::model::f();"
        ),
        ["cache", "model", "stage"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
