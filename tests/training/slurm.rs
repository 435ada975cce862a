//! Stages as Slurm jobs, against a real cluster: `.ci/run` starts one with
//! scripts/slurm-local/ and sets RUNNER_TEST_SLURM=1. Without it these tests
//! say they were skipped. Every wait is bounded and names the job it waited for.

use lora_runner::cli::exit;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{plan_entry, Workspace};
use crate::sweeps::{adapter_bytes, failing_recipe, sweep_recipe, DPO_VARIANTS};

fn cluster() -> bool {
    if std::env::var("RUNNER_TEST_SLURM").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "SKIPPED: no Slurm cluster (set RUNNER_TEST_SLURM=1 with one running: scripts/slurm-local/start-slurm.sh)"
    );
    false
}

/// `squeue` state of a job (`%T`), or "" once it is forgotten.
fn job_state(id: &str) -> String {
    let out = std::process::Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%T", "-j", id])
        .output()
        .expect("squeue runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The job id `status` shows for `stage`.
fn job_of(ws: &Workspace, recipe: &str, stage: &str) -> String {
    let status = ws.runner(&["status", recipe]).ok().stdout;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{stage}: job ")))
        .unwrap_or_else(|| panic!("no job line for {stage} in:\n{status}"));
    line[stage.len() + ": job ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "gave up after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_sweep_through_slurm_matches_a_local_run_and_resubmitting_submits_nothing() {
    if !cluster() {
        return;
    }
    let text = sweep_recipe(6, "");
    let local = Workspace::new();
    local.write("r.toml", &text);
    local.runner(&["--threads", "1", "run", "r.toml"]).ok();

    let ws = Workspace::new();
    ws.write("r.toml", &text);
    let run = ws
        .runner(&["run", "r.toml", "--executor", "slurm", "--wait"])
        .ok();
    assert!(run.stderr.contains("9 job(s) submitted"), "{}", run.stderr);
    for stage in DPO_VARIANTS {
        assert!(
            adapter_bytes(&ws, "r.toml", stage) == adapter_bytes(&local, "r.toml", stage),
            "{stage}: the Slurm job's adapter equals the local one"
        );
    }
    let status = ws.runner(&["status", "r.toml"]).ok().stdout;
    assert!(status.contains("fresh@beta=0.5: job "), "{status}");
    assert!(status.contains(" COMPLETED, output "), "{status}");
    // The job's output is kept in the cache, and `show` points at it.
    let show = ws.runner(&["show", "r.toml", "fresh@beta=0.5"]).ok().stdout;
    let output = show
        .lines()
        .find_map(|l| l.strip_prefix("job       ")?.split(", output ").nth(1))
        .unwrap_or_else(|| panic!("no job line in:\n{show}"));
    let log = std::fs::read_to_string(output).unwrap();
    assert!(log.contains("fresh@beta=0.5: done in"), "{log}");

    let again = ws
        .runner(&["run", "r.toml", "--executor", "slurm", "--wait"])
        .ok();
    assert!(
        again
            .stderr
            .contains("0 job(s) submitted, 0 already queued or running, 9 stage(s) cached"),
        "{}",
        again.stderr
    );
}

/// With a remote cache, jobs need no cache folder the submitting host sees:
/// each job (here told so with RUNNER_NODE_CACHE, `%j` its job id) uses a
/// folder of its own, pulls its inputs from the remote and pushes its
/// result, and `afterok` still orders them.
#[test]
fn a_sweep_through_slurm_shares_results_through_the_remote_without_a_shared_cache() {
    if !cluster() {
        return;
    }
    let Some(bucket) = crate::remote::server() else {
        return;
    };
    let url = crate::remote::prefix(&bucket, "slurm");
    let text = sweep_recipe(6, "");
    let local = Workspace::new();
    local.write("r.toml", &text);
    local.runner(&["--threads", "1", "run", "r.toml"]).ok();

    let ws = Workspace::new();
    ws.write("r.toml", &text);
    let node = ws.path("node-%j").display().to_string();
    let run = ws.runner_limited(
        "true",
        &[
            "--remote",
            &url,
            "run",
            "r.toml",
            "--executor",
            "slurm",
            "--wait",
        ],
        &[("RUNNER_NODE_CACHE", &node)],
    );
    assert_eq!(run.code, exit::OK, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("slurm: jobs share results through the remote"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("9 job(s) submitted"), "{}", run.stderr);
    // The jobs computed in caches of their own, each pulling its inputs;
    // the submitting cache has nothing yet.
    assert!(ws.artifacts().is_empty(), "{:?}", ws.artifacts());
    let own: Vec<String> = crate::support::list(&ws.path(""))
        .into_iter()
        .filter(|n| n.starts_with("node-"))
        .collect();
    assert_eq!(own.len(), 9, "{own:?}");
    let mut logs = String::new();
    for job in crate::support::list(&ws.cache().join("jobs")) {
        for file in crate::support::list(&ws.cache().join("jobs").join(&job)) {
            if file.starts_with("slurm-") {
                logs += &std::fs::read_to_string(ws.cache().join("jobs").join(&job).join(file))
                    .unwrap();
            }
        }
    }
    assert_eq!(
        logs.matches(": downloaded from the remote").count(),
        13,
        "{logs}"
    );
    let pulled = ws.runner(&["--remote", &url, "pull", "r.toml"]).ok();
    assert!(
        pulled.stderr.contains("9 stage(s) pulled"),
        "{}",
        pulled.stderr
    );
    for stage in DPO_VARIANTS {
        assert!(
            adapter_bytes(&ws, "r.toml", stage) == adapter_bytes(&local, "r.toml", stage),
            "{stage}: the job's adapter, through the remote, equals the local one"
        );
    }
}

#[test]
fn a_job_cancelled_mid_training_resumes_when_resubmitted_to_the_same_bytes() {
    if !cluster() {
        return;
    }
    let text = sweep_recipe(300, "");
    let only = |ws: &Workspace| -> Vec<u8> { adapter_bytes(ws, "r.toml", "fresh@beta=0.1") };
    let local = Workspace::new();
    local.write("r.toml", &text);
    local
        .runner(&[
            "--threads",
            "1",
            "run",
            "r.toml",
            "--until",
            "fresh@beta=0.1",
        ])
        .ok();

    let ws = Workspace::new();
    ws.write("r.toml", &text);
    ws.runner(&[
        "run",
        "r.toml",
        "--executor",
        "slurm",
        "--until",
        "fresh@beta=0.1",
    ])
    .ok();
    let id = job_of(&ws, "r.toml", "fresh@beta=0.1");
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    let key = plan_entry(&plan, "fresh@beta=0.1").2;
    let resume = ws.cache().join("work").join(&key).join("resume.json");
    wait_for(
        &format!("job {id} to checkpoint ({})", resume.display()),
        Duration::from_secs(240),
        || resume.exists() || job_state(&id) == "COMPLETED",
    );
    assert_ne!(
        job_state(&id),
        "COMPLETED",
        "job {id} finished before it could be cancelled"
    );
    let cancel = ws.runner(&["cancel", "r.toml"]).ok();
    assert!(
        cancel
            .stdout
            .contains(&format!("cancelled job {id} (fresh@beta=0.1)")),
        "{}",
        cancel.stdout
    );
    wait_for(&format!("job {id} to end"), Duration::from_secs(60), || {
        job_state(&id) == "CANCELLED"
    });
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    assert_eq!(plan_entry(&plan, "fresh@beta=0.1").0, "resume", "{plan}");

    let again = ws
        .runner(&[
            "run",
            "r.toml",
            "--executor",
            "slurm",
            "--until",
            "fresh@beta=0.1",
            "--wait",
        ])
        .ok();
    assert!(
        again.stderr.contains("1 job(s) submitted"),
        "{}",
        again.stderr
    );
    let id2 = job_of(&ws, "r.toml", "fresh@beta=0.1");
    let output = ws
        .cache()
        .join("jobs")
        .join(&key)
        .join(format!("slurm-{id2}.out"));
    let log = std::fs::read_to_string(&output).unwrap();
    assert!(log.contains("resuming from step"), "{log}");
    assert!(
        only(&ws) == only(&local),
        "cancelled and resumed equals uninterrupted"
    );
}

#[test]
fn a_failing_job_stops_its_dependants_and_status_says_why() {
    if !cluster() {
        return;
    }
    let ws = Workspace::new();
    let text = failing_recipe(&ws);
    ws.write("r.toml", &text);
    let run = ws.runner(&["run", "r.toml", "--executor", "slurm", "--wait"]);
    assert_eq!(run.code, exit::STAGE_FAILED, "{}", run.stderr);
    assert!(
        run.stderr.contains("dpo@train=bad.jsonl: FAILED: job "),
        "{}",
        run.stderr
    );
    let status = ws.runner(&["status", "r.toml"]).ok().stdout;
    let bad = job_of(&ws, "r.toml", "dpo@train=bad.jsonl");
    assert!(
        status.contains(&format!(
            "never started: input `dpo@train=bad.jsonl` failed (job {bad} FAILED (NonZeroExitCode))"
        )),
        "{status}"
    );
    let eval = job_of(&ws, "r.toml", "eval@train=bad.jsonl");
    let output = Path::new(&ws.cache())
        .join("jobs")
        .join(
            plan_entry(
                &ws.runner(&["plan", "r.toml", "--json"]).ok().json(),
                "eval@train=bad.jsonl",
            )
            .2,
        )
        .join(format!("slurm-{eval}.out"));
    assert!(!output.exists(), "the dependant of a failed job never ran");
    let plan = ws.runner(&["plan", "r.toml", "--json"]).ok().json();
    assert_eq!(plan_entry(&plan, "eval@train=good.jsonl").0, "cached");
}
