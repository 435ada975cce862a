//! Sweeps (`matrix`) and stages side by side (`--jobs`): how a matrix
//! expands and fans out, what its variants' keys are, and that stages run
//! in parallel end with the same bytes as one at a time.

use lora_runner::cli::exit;
use std::path::{Path, PathBuf};

use crate::support::{plan_entry, Workspace};

pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recipes/data")
        .join(name)
}

/// A tiny recipe: SFT, then scheme one and scheme two swept over β (four
/// DPO variants), and an eval that fans out with scheme two. `extra` is
/// appended as written.
pub fn sweep_recipe(dpo_steps: u32, extra: &str) -> String {
    format!(
        r#"[recipe]
name = "sweep"
seed = 3

[stages.base]
kind = "base"
init = {{ hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}

[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft_train}" }}
lora = {{ r = 8, alpha = 16, targets = "all-linear" }}
train = {{ steps = 10, batch = 8, lr = 5e-3, seq_len = 32 }}

[stages.continued]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo_train}" }}
train = {{ steps = {dpo_steps}, batch = 4, lr = 5e-3, seq_len = 32, checkpoint_every = 2 }}
matrix = {{ "dpo.beta" = [0.1, 0.5] }}

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.fresh]
kind = "dpo"
model = "merged"
lora = {{ r = 4, alpha = 8, targets = ["q_proj", "v_proj"] }}
data = {{ train = "{dpo_train}" }}
train = {{ steps = {dpo_steps}, batch = 4, lr = 5e-3, seq_len = 32, checkpoint_every = 2 }}
matrix = {{ "dpo.beta" = [0.1, 0.5] }}

[stages.eval_fresh]
kind = "eval"
model = "merged"
adapter = "fresh"
data = {{ dpo = "{dpo_eval}" }}
seq_len = 32
{extra}"#,
        sft_train = data("sft_train.jsonl").display(),
        dpo_train = data("dpo_train.jsonl").display(),
        dpo_eval = data("dpo_eval.jsonl").display(),
    )
}

pub const DPO_VARIANTS: [&str; 4] = [
    "continued@beta=0.1",
    "continued@beta=0.5",
    "fresh@beta=0.1",
    "fresh@beta=0.5",
];

/// The bytes of a stage's adapter in `ws`'s cache.
pub fn adapter_bytes(ws: &Workspace, recipe: &str, stage: &str) -> Vec<u8> {
    let v = ws.runner(&["show", recipe, stage, "--json"]).ok().json();
    std::fs::read(Path::new(v["path"].as_str().unwrap()).join("adapter_model.safetensors")).unwrap()
}

fn stage_names(plan: &serde_json::Value) -> Vec<String> {
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_matrix_expands_into_named_variants_and_dependants_fan_out_with_them() {
    let ws = Workspace::new();
    ws.write("r.toml", &sweep_recipe(4, ""));
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    assert_eq!(
        stage_names(&plan),
        [
            "base",
            "sft",
            "continued@beta=0.1",
            "continued@beta=0.5",
            "merged",
            "fresh@beta=0.1",
            "fresh@beta=0.5",
            "eval_fresh@beta=0.1",
            "eval_fresh@beta=0.5"
        ]
    );
    let entry = |name: &str| {
        plan["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    // Each eval reads its own variant; each variant says what it is.
    assert_eq!(
        entry("eval_fresh@beta=0.5")["deps"],
        serde_json::json!(["fresh@beta=0.5", "merged"])
    );
    assert_eq!(entry("fresh@beta=0.1")["variant_of"], "fresh");
    assert_eq!(
        entry("fresh@beta=0.1")["values"],
        serde_json::json!([["dpo.beta", "0.1"]])
    );
    // A variant is the stage with that value written in: same key.
    let single = Workspace::new();
    let text = sweep_recipe(4, "").replace(
        "matrix = { \"dpo.beta\" = [0.1, 0.5] }\n\n[stages.merged]",
        "dpo = { beta = 0.5 }\n\n[stages.merged]",
    );
    single.write("r.toml", &text);
    let one = single.runner(&["plan", "r.toml", "--json"]).ok().json();
    assert_eq!(
        plan_entry(&one, "continued").2,
        plan_entry(&plan, "continued@beta=0.5").2
    );
    let text = ws.runner(&["plan", "r.toml"]).ok().stdout;
    assert!(
        text.contains("sweep: fresh: 2 variant(s) over dpo.beta"),
        "{text}"
    );
}

#[test]
fn adding_a_value_adds_variants_and_leaves_the_others_keys_alone() {
    let ws = Workspace::new();
    ws.write("r.toml", &sweep_recipe(4, ""));
    let before = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    ws.write(
        "r.toml",
        &sweep_recipe(4, "").replace(
            "[0.1, 0.5] }\n\n[stages.eval",
            "[0.1, 0.5, 0.9] }\n\n[stages.eval",
        ),
    );
    let after = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    for stage in ["fresh@beta=0.1", "fresh@beta=0.5", "eval_fresh@beta=0.5"] {
        assert_eq!(
            plan_entry(&before, stage).2,
            plan_entry(&after, stage).2,
            "{stage}"
        );
    }
    assert!(stage_names(&after).contains(&"fresh@beta=0.9".to_string()));
    assert!(stage_names(&after).contains(&"eval_fresh@beta=0.9".to_string()));
    assert_eq!(stage_names(&after).len(), stage_names(&before).len() + 2);
}

#[test]
fn swept_stages_join_on_shared_axes_unless_told_to_cross() {
    // An SFT swept over train.lr, and a DPO continuing it swept over
    // train.lr and dpo.beta: lr pairs with lr. `pick` names one variant.
    let recipe = |fan_out: &str, pick: &str| {
        format!(
            r#"[recipe]
name = "join"
[stages.base]
kind = "base"
init = {{ hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}
[stages.sft]
kind = "sft"
model = "base"
data = {{ train = "{sft}" }}
train = {{ steps = 2, batch = 2, seq_len = 32 }}
matrix = {{ "train.lr" = [1e-3, 2e-3] }}
[stages.dpo]
kind = "dpo"
model = "base"
adapter = "sft"
data = {{ train = "{dpo}" }}
train = {{ steps = 2, batch = 2, seq_len = 32 }}
matrix = {{ "train.lr" = [0.001, 0.002], "dpo.beta" = [0.1, 0.2] }}
{fan_out}
[stages.pick]
kind = "eval"
model = "base"
adapter = "{pick}"
data = {{ dpo = "{dpo}" }}
seq_len = 32
"#,
            sft = data("sft_train.jsonl").display(),
            dpo = data("dpo_train.jsonl").display(),
        )
    };
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("", "dpo@lr=1e-3-beta=0.2"));
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    let dpo: Vec<String> = stage_names(&plan)
        .into_iter()
        .filter(|n| n.starts_with("dpo@"))
        .collect();
    // Joined on train.lr (1e-3 and 0.001 are one value), crossed with beta: 2 × 2, not 2 × 2 × 2.
    assert_eq!(
        dpo,
        [
            "dpo@lr=1e-3-beta=0.1",
            "dpo@lr=1e-3-beta=0.2",
            "dpo@lr=2e-3-beta=0.1",
            "dpo@lr=2e-3-beta=0.2"
        ]
    );
    let deps = |name: &str| {
        plan["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["deps"]
            .clone()
    };
    assert_eq!(
        deps("dpo@lr=2e-3-beta=0.1"),
        serde_json::json!(["sft@lr=2e-3", "base"])
    );

    assert_eq!(
        deps("pick"),
        serde_json::json!(["dpo@lr=1e-3-beta=0.2", "base"])
    );

    // An explicit variant name that does not exist is a recipe error with a suggestion.
    ws.write("r.toml", &recipe("", "dpo@lr=0.001-beta=0.2"));
    let bad = ws.runner(&["plan", "r.toml"]);
    assert_eq!(bad.code, exit::USAGE, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("unknown stage `dpo@lr=0.001-beta=0.2`")
            && bad.stderr.contains("did you mean `dpo@lr=1e-3-beta=0.2`?"),
        "{}",
        bad.stderr
    );

    let crossed = Workspace::new();
    crossed.write("r.toml", &recipe("fan_out = \"cross\"", "sft@lr=1e-3"));
    let plan = crossed.runner(&["plan", "r.toml", "--json"]).ok().json();
    let dpo = stage_names(&plan)
        .into_iter()
        .filter(|n| n.starts_with("dpo@"))
        .count();
    assert_eq!(dpo, 8, "crossed: 2 sft variants × 2 lr × 2 beta");
}

#[test]
fn matrix_mistakes_point_at_what_was_written() {
    let cases = [
        (
            r#"matrix = { "dpo.betta" = [0.1] }"#,
            "unknown key `betta`",
            "r.toml:22:12",
        ),
        (
            r#"matrix = { "dpo.beta" = [] }"#,
            "matrix axis `dpo.beta` has no values",
            "r.toml:22:25",
        ),
        (
            r#"matrix = { "dpo.beta" = [0.1, -1.0] }"#,
            "`dpo.beta` must be > 0, got -1",
            "r.toml:22:31",
        ),
        (
            r#"matrix = { "train.steps" = [4, 0] }"#,
            "`train.steps` must be >= 1, got 0",
            "r.toml:22:32",
        ),
        (
            r#"matrix = { "dpo.beta" = 0.1 }"#,
            "matrix axis `dpo.beta` must be a list of values",
            "r.toml:22:25",
        ),
    ];
    for (matrix, message, at) in cases {
        let ws = Workspace::new();
        let text =
            sweep_recipe(4, "").replacen(r#"matrix = { "dpo.beta" = [0.1, 0.5] }"#, matrix, 1);
        ws.write("r.toml", &text);
        let run = ws.runner(&["plan", "r.toml"]);
        assert_eq!(run.code, exit::USAGE, "{matrix}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{matrix}: {}", run.stderr);
        assert!(
            run.stderr.contains(at),
            "{matrix}: want {at} in {}",
            run.stderr
        );
        // Said once, not once per variant.
        assert_eq!(run.stderr.matches(message).count(), 1, "{}", run.stderr);
    }
}

#[test]
fn jobs_2_runs_stages_side_by_side_to_the_same_bytes_as_one_at_a_time() {
    let text = sweep_recipe(4, "");
    let serial = Workspace::new();
    serial.write("r.toml", &text);
    serial.runner(&["--threads", "1", "run", "r.toml"]).ok();
    let parallel = Workspace::new();
    parallel.write("r.toml", &text);
    let run = parallel
        .runner(&["--threads", "1", "run", "r.toml", "--jobs", "2"])
        .ok();
    assert!(
        run.stderr.contains("2 jobs × 1 thread(s)"),
        "{}",
        run.stderr
    );
    // Every stage reported its own progress through the parent.
    for stage in DPO_VARIANTS {
        assert!(
            run.stderr.contains(&format!("{stage} (dpo): running")),
            "{stage}: {}",
            run.stderr
        );
        assert!(
            adapter_bytes(&serial, "r.toml", stage) == adapter_bytes(&parallel, "r.toml", stage),
            "{stage}: --jobs 2 and --jobs 1 give the same adapter"
        );
    }
    let again = parallel
        .runner(&["--threads", "1", "run", "r.toml", "--jobs", "2"])
        .ok();
    assert!(
        again.stderr.contains("0 stage(s) ran, 9 cached"),
        "{}",
        again.stderr
    );
    // `generate --stages` with a swept stage's own name: all its variants.
    let answered: Vec<String> = parallel
        .runner(&[
            "generate",
            "r.toml",
            "--stages",
            "fresh",
            "--json",
            "--max-new-tokens",
            "2",
            "hi",
        ])
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["stage"].to_string())
        .collect();
    assert_eq!(answered, ["\"fresh@beta=0.1\"", "\"fresh@beta=0.5\""]);
    // --force with a swept stage's own name reruns every variant of it
    // (to the same bytes); --only wants one variant and says which exist.
    let forced = parallel
        .runner(&["--threads", "1", "run", "r.toml", "--force", "continued"])
        .ok();
    assert!(
        forced.stderr.contains("2 stage(s) ran, 7 cached"),
        "{}",
        forced.stderr
    );
    for stage in &DPO_VARIANTS[..2] {
        assert!(
            forced.stderr.contains(&format!("{stage} (dpo): running")),
            "{stage}: {}",
            forced.stderr
        );
        assert!(
            adapter_bytes(&serial, "r.toml", stage) == adapter_bytes(&parallel, "r.toml", stage)
        );
    }
    let only = parallel.runner(&["run", "r.toml", "--only", "continued"]);
    assert_eq!(only.code, exit::USAGE, "{}", only.stderr);
    assert!(
        only.stderr.contains(
            "`continued` is swept in r.toml: name one variant \
             (continued@beta=0.1, continued@beta=0.5)"
        ),
        "{}",
        only.stderr
    );
    let unknown = parallel.runner(&["run", "r.toml", "--force", "continuedd"]);
    assert_eq!(unknown.code, exit::USAGE, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("no stage `continuedd` in r.toml"),
        "{}",
        unknown.stderr
    );
}

/// A sweep over data files, one of them broken at line 2.
pub fn failing_recipe(ws: &Workspace) -> String {
    let good = std::fs::read_to_string(data("dpo_train.jsonl")).unwrap();
    let first: Vec<&str> = good.lines().take(40).collect();
    ws.write("good.jsonl", &(first.join("\n") + "\n"));
    ws.write("bad.jsonl", &format!("{}\n{{not json\n", first[0]));
    r#"[recipe]
name = "failing"
seed = 3
[stages.base]
kind = "base"
init = { hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }
[stages.dpo]
kind = "dpo"
model = "base"
lora = { r = 4, alpha = 8, targets = ["q_proj"] }
train = { steps = 2, batch = 2, seq_len = 32 }
matrix = { "data.train" = ["good.jsonl", "bad.jsonl"] }
[stages.eval]
kind = "eval"
model = "base"
adapter = "dpo"
data = { dpo = "good.jsonl" }
seq_len = 32
"#
    .to_string()
}

#[test]
fn with_jobs_a_failed_stage_stops_only_its_dependants() {
    let ws = Workspace::new();
    let text = failing_recipe(&ws);
    ws.write("r.toml", &text);
    let run = ws.runner(&["--threads", "1", "run", "r.toml", "--jobs", "2"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr.contains("dpo@train=bad.jsonl: FAILED") && run.stderr.contains("bad.jsonl:2"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("eval@train=bad.jsonl: skipped (input `dpo@train=bad.jsonl` failed)"),
        "{}",
        run.stderr
    );
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    assert_eq!(plan_entry(&plan, "eval@train=good.jsonl").0, "cached");
    assert_eq!(plan_entry(&plan, "eval@train=bad.jsonl").0, "run");
}
