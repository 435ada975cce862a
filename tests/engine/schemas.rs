//! Committed schemas match the Rust types; shipped recipes are valid.

use std::path::Path;

fn committed(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

const REGENERATE: &str = "stale: regenerate with `cargo run -- schema > schemas/recipe.schema.json && cargo run -- schema --plan > schemas/plan.schema.json && cargo run -- schema --compare > schemas/compare.schema.json`";

#[test]
fn the_committed_recipe_schema_is_current() {
    let generated = lora_runner::schema::recipe_schema(&lora_runner::kinds::builtin());
    assert!(
        committed("recipe.schema.json") == generated,
        "schemas/recipe.schema.json is {REGENERATE}"
    );
    // Every stage kind is described, with its `kind` constant.
    let text = generated.to_string();
    for kind in ["base", "adapter", "sft", "dpo", "merge", "eval", "export"] {
        assert!(
            text.contains(&format!(r#""const":"{kind}""#)),
            "{kind} missing"
        );
    }
}

#[test]
fn the_committed_plan_schema_is_current() {
    assert!(
        committed("plan.schema.json") == lora_runner::schema::plan_schema(),
        "schemas/plan.schema.json is {REGENERATE}"
    );
}

#[test]
fn shipped_recipes_declare_their_schema_and_plan_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let registry = lora_runner::kinds::builtin();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = lora_runner::cache::Cache::open(cache_dir.path()).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("#:schema ../schemas/recipe.schema.json\n"),
            "{} lacks the #:schema line",
            path.display()
        );
        if path.ends_with("qwen-local.toml") {
            // Needs a checkpoint nobody has in CI: its only problem must be that folder.
            let err = lora_runner::recipe::load(&path, &registry)
                .unwrap_err()
                .to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains("no model folder at") && err.contains("Qwen1.5-0.5B-Chat"),
                "{err}"
            );
            continue;
        }
        let recipe = lora_runner::recipe::load(&path, &registry).unwrap_or_else(|e| panic!("{e}"));
        let dag = lora_runner::graph::build(&recipe).unwrap_or_else(|e| panic!("{e}"));
        lora_runner::plan::plan(&recipe, &dag, &cache, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(seen >= 4);
}

#[test]
fn the_committed_compare_schema_is_current() {
    let generated = lora_runner::compare::compare_schema();
    assert!(
        committed("compare.schema.json") == generated,
        "schemas/compare.schema.json is stale: regenerate with `cargo run -- schema --compare > schemas/compare.schema.json`"
    );
    // It describes the verdicts and the per-stage evaluation the tables show.
    let text = generated.to_string();
    for key in [
        "verdicts",
        "bootstrap",
        "evaluated",
        "deltas",
        "display",
        "better",
    ] {
        assert!(text.contains(&format!("\"{key}\"")), "{key} missing");
    }
}
