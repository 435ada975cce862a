//! A stage kind that exists only here: one file and one registration line
//! (in `main.rs`'s `child_entry`). It must appear everywhere the built-in
//! kinds do — `plan`, `schema`, `--help` — and, as a training kind, in
//! `compare`, without the engine or the comparison knowing its name.

use lora_runner::cli::exit;
use std::io::Write;

use lora_runner::diag::checks::at_least;
use lora_runner::diag::span::Sp;
use lora_runner::diag::Problem;
use lora_runner::stage::{ArtifactKind, Kind, Objective, ParseContext, Role, RunContext};
use serde::{Deserialize, Serialize};

use crate::support::Workspace;

/// `kind = "probe"`: "trains" by writing a falling loss, one line a step.
pub struct Probe;

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeParams {
    /// Steps to log.
    pub steps: Sp<u64>,
}

impl Kind for Probe {
    type Params = ProbeParams;

    fn name(&self) -> &'static str {
        "probe"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Adapter
    }
    fn role(&self) -> Role {
        Role::Train(Objective::Sft)
    }
    fn summary(&self) -> &'static str {
        "a one-file test kind"
    }
    fn prepare(&self, p: &mut ProbeParams, _ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        at_least(&mut problems, "steps", &p.steps, 1);
        problems
    }
    fn run(&self, p: &ProbeParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let mut out = std::fs::File::create(ctx.out_dir.join("metrics.jsonl"))?;
        for step in 1..=p.steps.value {
            let loss = 1.0 / step as f64;
            writeln!(out, "{}", serde_json::json!({ "step": step, "loss": loss }))?;
        }
        ctx.metrics
            .insert("loss".into(), (1.0 / p.steps.value as f64).into());
        ctx.metrics.insert("steps".into(), p.steps.value.into());
        Ok(())
    }
}

const RECIPE: &str = r#"
[recipe]
name = "probes"

[stages.short]
kind = "probe"
steps = 2

[stages.long]
kind = "probe"
steps = 4
"#;

#[test]
fn a_kind_in_one_file_shows_up_in_plan_schema_help_and_compare() {
    let ws = Workspace::new();
    ws.write("recipe.toml", RECIPE);

    let plan = ws.child(&["plan", "recipe.toml", "--json"]).ok().json();
    let kinds: Vec<&str> = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["probe", "probe"], "{plan}");

    let schema = ws.child(&["schema"]).ok();
    assert!(
        schema.stdout.contains(r#""const": "probe""#),
        "{}",
        schema.stdout
    );

    let help = ws.child(&["--help"]).ok();
    let line = help
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("probe "));
    assert_eq!(
        line.map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")),
        Some("probe a one-file test kind".to_string()),
        "{}",
        help.stdout
    );

    // A bad value is reported at its position, through the kind's own check.
    ws.write("bad.toml", &RECIPE.replace("steps = 2", "steps = 0"));
    let bad = ws.child(&["plan", "bad.toml"]);
    assert_eq!(bad.code, exit::USAGE, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("`steps` must be >= 1, got 0") && bad.stderr.contains("[bad.toml:7:9]"),
        "{}",
        bad.stderr
    );

    ws.child(&["run", "recipe.toml"]).ok();
    let compare = ws.child(&["compare", "recipe.toml", "--json"]).ok().json();
    let compared: Vec<(&str, &str)> = compare["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("{compare}"))
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(compared, [("short", "sft"), ("long", "sft")], "{compare}");
}
