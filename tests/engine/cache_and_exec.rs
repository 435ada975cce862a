//! The cache and the executor: hits and skips, reasons, atomic promotion
//! under SIGKILL, concurrent runs, failures, interrupts, --only/--until/--force, gc.

use crate::support;
use lora_runner::cli::exit;
use std::time::{Duration, Instant};

use crate::support::{plan_entry, Workspace};

const CHAIN: &str = r#"#:schema ../schemas/recipe.schema.json
[recipe]
name = "chain"
seed = 1

[stages.a]
kind = "emit"
message = "A"
data = "data.txt"

[stages.b]
kind = "emit"
message = "B"
input = "a"

[stages.c]
kind = "emit"
message = "C"
"#;

fn chain() -> Workspace {
    let ws = Workspace::new();
    ws.write("recipe.toml", CHAIN);
    ws.write("data.txt", "data;");
    ws
}

fn plan(ws: &Workspace) -> serde_json::Value {
    ws.child(&["plan", "recipe.toml", "--json"]).ok().json()
}

#[test]
fn a_second_run_is_all_cached_and_runs_nothing() {
    let ws = chain();
    let first = ws.child(&["run", "recipe.toml"]).ok();
    assert!(
        first.stderr.contains("3 stage(s) ran, 0 cached"),
        "{}",
        first.stderr
    );
    assert_eq!(
        (ws.executions("a"), ws.executions("b"), ws.executions("c")),
        (1, 1, 1)
    );

    let second = ws.child(&["run", "recipe.toml"]).ok();
    assert!(
        second.stderr.contains("0 stage(s) ran, 3 cached"),
        "{}",
        second.stderr
    );
    assert_eq!(
        (ws.executions("a"), ws.executions("b"), ws.executions("c")),
        (1, 1, 1)
    );

    // The artifact holds what the stage wrote, its manifest the lineage.
    let p = plan(&ws);
    let b = p["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "b")
        .unwrap();
    assert_eq!(b["status"], "cached");
    let dir = ws
        .cache()
        .join("artifacts")
        .join(b["artifact"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("out.txt")).unwrap(),
        "data;AB"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["stage"], "b");
    assert_eq!(manifest["parents"][0]["stage"], "a");
    assert_eq!(manifest["metrics"]["length"], 7);
    assert_eq!(manifest["params"]["message"], "B");
}

#[test]
fn plan_explains_each_rerun() {
    let ws = chain();
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "a").1, "new stage");
    ws.child(&["run", "recipe.toml"]).ok();

    // A parameter change names the key with old and new value; dependents say why.
    ws.write(
        "recipe.toml",
        &CHAIN.replace("message = \"A\"", "message = \"A2\""),
    );
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "a").0, "run");
    assert_eq!(
        plan_entry(&p, "a").1,
        r#"parameter changed: message "A" → "A2""#
    );
    assert_eq!(plan_entry(&p, "b").1, "upstream stage `a` will rerun");
    assert_eq!(
        plan_entry(&p, "c").0,
        "cached",
        "an independent stage stays cached"
    );

    // A data byte changed names the file.
    ws.write("recipe.toml", CHAIN);
    ws.write("data.txt", "data!");
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "a").1, "data file changed: data.txt");

    // The seed.
    ws.write("data.txt", "data;");
    ws.write("recipe.toml", &CHAIN.replace("seed = 1", "seed = 2"));
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "c").1, "seed changed: 1 → 2");

    // The kind's implementation version.
    ws.write("recipe.toml", CHAIN);
    let p = ws
        .child_with(
            &["plan", "recipe.toml", "--json"],
            &[("LR_EMIT_VERSION", "2")],
        )
        .ok()
        .json();
    assert_eq!(
        plan_entry(&p, "c").1,
        "implementation of `emit` changed (version 1 → 2)"
    );

    // Back to what ran: all cached again.
    let p = plan(&ws);
    for s in ["a", "b", "c"] {
        assert_eq!(plan_entry(&p, s).0, "cached", "{s}");
    }
}

#[test]
fn the_plan_text_lists_stages_in_order_with_status_and_reason() {
    let ws = chain();
    ws.child(&["run", "recipe.toml", "--only", "a"]).ok();
    let out = ws.child(&["plan", "recipe.toml"]).ok().stdout;
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("plan for recipe.toml (recipe `chain`"),
        "{out}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["STAGE", "KIND", "STATUS", "KEY", "REASON"]
    );
    let row = |i: usize| {
        lines[i]
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(row(2), "a emit cached");
    assert_eq!(row(3), "b emit run");
    assert!(lines[3].ends_with("new stage"), "{out}");
    assert_eq!(row(4), "c emit run");
    assert_eq!(lines[5], "2 of 3 stage(s) to run");

    let p = plan(&ws);
    let order: Vec<&str> = p["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["a", "b", "c"]);
    assert_eq!(p["recipe"], "recipe.toml");
    assert_eq!(p["stages"][1]["deps"], serde_json::json!(["a"]));
    assert_eq!(p["stages"][0]["key"].as_str().unwrap().len(), 64);
}

#[test]
fn a_stage_killed_mid_write_leaves_no_artifact_and_reruns() {
    let ws = Workspace::new();
    ws.write("recipe.toml", "[recipe]\nname = \"slow\"\n[stages.slow]\nkind = \"emit\"\nmessage = \"done\"\nsteps = 200\nsleep_ms = 20\n");
    let mut child = ws.child_command(&["run", "recipe.toml"]).spawn().unwrap();
    // Wait until the stage is writing into its staging folder.
    let tmp = ws.cache().join("tmp");
    let start = Instant::now();
    loop {
        let writing = support::list(&tmp)
            .iter()
            .any(|d| tmp.join(d).join("out.txt").exists());
        if writing {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stage never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // And until it has checkpointed a step (a fixed sleep was not always
    // enough on a loaded 2-core machine).
    let work = ws.cache().join("work");
    while !support::list(&work)
        .iter()
        .any(|k| work.join(k).join("resume.json").exists())
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stage never checkpointed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        ws.artifacts().is_empty(),
        "no artifact after a kill: {:?}",
        ws.artifacts()
    );
    assert!(ws.keys().is_empty(), "no key record after a kill");
    let p = plan(&ws);
    assert_eq!(
        plan_entry(&p, "slow").0,
        "resume",
        "the work folder says how far it got"
    );

    // Rerun it quickly: it completes and is whole.
    ws.write("recipe.toml", "[recipe]\nname = \"slow\"\n[stages.slow]\nkind = \"emit\"\nmessage = \"done\"\nsteps = 200\nsleep_ms = 0\n");
    ws.child(&["run", "recipe.toml"]).ok();
    assert_eq!(ws.artifacts().len(), 1);
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "slow").0, "cached");
}

#[test]
fn two_concurrent_runs_compute_a_shared_stage_once() {
    let ws = Workspace::new();
    let shared = "[stages.shared]\nkind = \"emit\"\nmessage = \"S\"\nsteps = 10\nsleep_ms = 100\n";
    ws.write("one.toml", &format!("[recipe]\nname = \"one\"\n{shared}[stages.x]\nkind = \"emit\"\nmessage = \"X\"\ninput = \"shared\"\n"));
    ws.write("two.toml", &format!("[recipe]\nname = \"two\"\n{shared}[stages.y]\nkind = \"emit\"\nmessage = \"Y\"\ninput = \"shared\"\n"));
    let first = ws
        .child_command(&["run", "one.toml"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first_pid = first.id();
    // Let the first take the stage's lock.
    let start = Instant::now();
    while ws.executions("shared") == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = ws.child(&["run", "two.toml"]).ok();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(exit::OK));
    assert_eq!(ws.executions("shared"), 1, "computed once");
    assert_eq!((ws.executions("x"), ws.executions("y")), (1, 1));
    assert!(
        second.stderr.contains(&format!(
            "shared: waiting for process {first_pid}, which is running this stage"
        )),
        "says who holds it:\n{}",
        second.stderr
    );
    assert!(
        second
            .stderr
            .contains("shared: cached (computed by another process)"),
        "{}",
        second.stderr
    );
}

#[test]
fn a_failed_stage_stops_its_dependents_only_and_exits_1() {
    let ws = chain();
    ws.write(
        "recipe.toml",
        &CHAIN.replace("message = \"A\"", "message = \"fail\""),
    );
    let run = ws.child(&["run", "recipe.toml"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr.contains("a: FAILED: asked to fail"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("b: skipped (input `a` failed)"),
        "{}",
        run.stderr
    );
    assert_eq!(ws.executions("b"), 0);
    assert_eq!(ws.executions("c"), 1, "independent stages still run");
    let p = plan(&ws);
    assert_eq!(
        plan_entry(&p, "c").0,
        "cached",
        "finished stages stay cached"
    );
    assert!(
        support::list(&ws.cache().join("tmp")).is_empty(),
        "the failed stage's staging folder is gone"
    );
}

#[test]
fn ctrl_c_stops_at_a_step_boundary_and_exits_130() {
    let ws = Workspace::new();
    ws.write("recipe.toml", "[recipe]\nname = \"slow\"\n[stages.slow]\nkind = \"emit\"\nmessage = \"m\"\nsteps = 500\nsleep_ms = 10\n");
    let child = ws
        .child_command(&["run", "recipe.toml"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while ws.executions("slow") == 0 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    crate::support::interrupt_and_wait(child);
    assert!(ws.artifacts().is_empty());
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "slow").0, "resume");
}

#[test]
fn only_until_and_force_select_stages() {
    let ws = chain();
    let run = ws.child(&["run", "recipe.toml", "--only", "b"]);
    assert_eq!(run.code, exit::USAGE, "--only needs cached inputs");
    assert!(
        run.stderr.contains("its input `a` is not cached"),
        "{}",
        run.stderr
    );

    ws.child(&["run", "recipe.toml", "--until", "b"]).ok();
    assert_eq!(
        (ws.executions("a"), ws.executions("b"), ws.executions("c")),
        (1, 1, 0)
    );

    // An input no cache shares (a base read from a file) is made here
    // first: a Slurm job with a cache of its own has it from nowhere else.
    let local = Workspace::new();
    local.write(
        "recipe.toml",
        &CHAIN.replace("message = \"A\"", "message = \"A\"\nlocal = true"),
    );
    local.write("data.txt", "data;");
    let run = local.child(&["run", "recipe.toml", "--only", "b"]).ok();
    assert!(run.stderr.contains("2 stage(s) ran"), "{}", run.stderr);
    assert_eq!((local.executions("a"), local.executions("b")), (1, 1));

    ws.child(&["run", "recipe.toml", "--force", "b", "--only", "b"])
        .ok();
    assert_eq!(ws.executions("b"), 2);
    assert_eq!(ws.executions("a"), 1);

    let run = ws.child(&["run", "recipe.toml", "--only", "nope"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(run.stderr.contains("no stage `nope`"));
}

#[test]
fn a_corrupt_artifact_is_reported_and_recomputed() {
    let ws = chain();
    ws.child(&["run", "recipe.toml"]).ok();
    let p = plan(&ws);
    let artifact = p["stages"][0]["artifact"].as_str().unwrap().to_string();
    let file = ws.cache().join("artifacts").join(&artifact).join("out.txt");
    std::fs::write(&file, "tampered").unwrap();
    let p = plan(&ws);
    assert_eq!(plan_entry(&p, "a").0, "run");
    assert_eq!(
        plan_entry(&p, "a").1,
        "cached artifact corrupt (out.txt does not match its recorded hash)"
    );
    ws.child(&["run", "recipe.toml"]).ok();
    assert_eq!(ws.executions("a"), 2);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "data;A",
        "the artifact was restored"
    );
    assert_eq!(plan_entry(&plan(&ws), "a").0, "cached");

    std::fs::remove_dir_all(ws.cache().join("artifacts").join(&artifact)).unwrap();
    assert_eq!(plan_entry(&plan(&ws), "a").1, "cached artifact missing");
}

#[test]
fn two_recipes_share_a_stage_through_its_key() {
    let ws = chain();
    ws.child(&["run", "recipe.toml"]).ok();
    // Another recipe, same stage `a` written differently (order, comments, defaults spelled out).
    ws.write(
        "other.toml",
        "[recipe]\nseed = 1 # same seed\nname = \"other\"\n\n[stages.first]\ndata = \"data.txt\"\nsteps = 1\nkind = \"emit\"\nmessage = \"A\"\n",
    );
    let run = ws.child(&["run", "other.toml"]).ok();
    assert!(
        run.stderr.contains("0 stage(s) ran, 1 cached"),
        "{}",
        run.stderr
    );
    assert_eq!(ws.executions("first"), 0);
}

#[test]
fn status_and_show_describe_artifacts_and_lineage() {
    let ws = chain();
    ws.child(&["run", "recipe.toml"]).ok();
    let status = ws.child(&["status", "recipe.toml"]).ok().stdout;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("b") && l.contains("cached") && l.contains("length=7")),
        "{status}"
    );

    let show = ws.child(&["show", "recipe.toml", "b"]).ok().stdout;
    assert!(show.contains("stage     b (emit v1)"), "{show}");
    assert!(show.contains("lineage\nb (emit)"), "{show}");
    assert!(show.contains("└─ via `input`:\n     a (emit)"), "{show}");
    let json: serde_json::Value = serde_json::from_str(
        &ws.child(&["show", "recipe.toml", "b", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(json["lineage"]["parents"][0]["node"]["stage"], "a");
    assert!(std::path::Path::new(json["path"].as_str().unwrap())
        .join("out.txt")
        .is_file());
}

#[test]
fn gc_removes_only_what_no_recipe_reaches() {
    let ws = chain();
    ws.child(&["run", "recipe.toml"]).ok();
    // Change c: its old artifact becomes unreachable.
    ws.write(
        "recipe.toml",
        &CHAIN.replace("message = \"C\"", "message = \"C2\""),
    );
    ws.child(&["run", "recipe.toml"]).ok();
    assert_eq!(ws.artifacts().len(), 4);
    let dry = ws.child(&["gc", "recipe.toml"]).ok().stdout;
    assert!(
        dry.contains("would remove 2 item(s)"),
        "artifact + key record:\n{dry}"
    );
    assert_eq!(ws.artifacts().len(), 4, "dry run deletes nothing");
    ws.child(&["gc", "recipe.toml", "--delete"]).ok();
    assert_eq!(ws.artifacts().len(), 3);
    let p = plan(&ws);
    for s in ["a", "b", "c"] {
        assert_eq!(plan_entry(&p, s).0, "cached");
    }
    // A pin keeps a stage's artifact and its lineage without any recipe.
    ws.child(&["pin", "recipe.toml", "b"]).ok();
    assert!(ws.child(&["unpin"]).ok().stdout.starts_with("chain.b = "));
    ws.child(&["gc", "--delete"]).ok();
    assert_eq!(ws.artifacts().len(), 2, "b and its parent a");
    ws.child(&["unpin", "chain.b"]).ok();
    assert_eq!(ws.child(&["unpin", "chain.b"]).code, exit::USAGE);
    // With no recipe and no pin, everything goes.
    ws.child(&["gc", "--delete"]).ok();
    assert!(ws.artifacts().is_empty());
}

#[test]
fn export_copies_an_artifact_out_of_the_cache() {
    let ws = chain();
    let run = ws.child(&["export", "recipe.toml", "b", "out"]);
    assert_eq!(run.code, exit::USAGE, "not cached yet");
    ws.child(&["run", "recipe.toml"]).ok();
    ws.child(&["export", "recipe.toml", "b", "out"]).ok();
    assert_eq!(
        std::fs::read_to_string(ws.path("out/out.txt")).unwrap(),
        "data;AB"
    );
    assert!(!ws.path("out/manifest.json").exists());
}

#[test]
fn an_export_stage_reruns_when_its_folder_is_gone() {
    let ws = chain();
    let text =
        format!("{CHAIN}\n[stages.out]\nkind = \"export\"\nfrom = \"b\"\npath = \"exported\"\n");
    ws.write("recipe.toml", &text);
    ws.child(&["run", "recipe.toml"]).ok();
    assert_eq!(
        std::fs::read_to_string(ws.path("exported/out.txt")).unwrap(),
        "data;AB"
    );
    assert_eq!(plan_entry(&plan(&ws), "out").0, "cached");
    std::fs::remove_dir_all(ws.path("exported")).unwrap();
    let (status, reason, _) = plan_entry(&plan(&ws), "out");
    assert_eq!(status, "run");
    assert!(
        reason.starts_with("exported file missing:") && reason.ends_with("exported/out.txt"),
        "{reason}"
    );
    ws.child(&["run", "recipe.toml"]).ok();
    assert!(ws.path("exported/out.txt").is_file());
}

#[test]
fn a_cache_that_cannot_be_opened_exits_3_and_says_which() {
    let ws = chain();
    ws.write("not-a-folder", "a file where the cache should be");
    let run = ws.child(&["--cache", "not-a-folder", "plan", "recipe.toml"]);
    assert_eq!(run.code, exit::ENVIRONMENT, "{}", run.stderr);
    assert!(
        run.stderr.starts_with("error: cache not-a-folder: "),
        "{}",
        run.stderr
    );
    // The recipe's own mistakes stay exit 2, whatever the cache.
    let run = ws.child(&["--cache", "not-a-folder", "plan", "missing.toml"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("error: cannot read recipe missing.toml: "),
        "{}",
        run.stderr
    );
}
