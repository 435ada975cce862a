//! A cache shared through S3-compatible storage, against a real local
//! server: `.ci/run` starts one with scripts/s3-local.sh and exports its
//! settings (AWS_ENDPOINT_URL, credentials, RUNNER_TEST_S3 = its bucket).
//! Without one these tests say they were skipped, and fail under CI.
//! Each test works under a prefix of its own.

use std::path::Path;
use std::time::Duration;

use lora_runner::cli::exit;
use lora_runner::remote::Remote;

use crate::portable::recipe;
use crate::support::{plan_entry, Workspace};

/// The bucket's URL, or None (skipped) when no server was started.
pub fn server() -> Option<String> {
    match std::env::var("RUNNER_TEST_S3") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "no S3 server under CI: .ci/run starts one (scripts/s3-local.sh)"
            );
            eprintln!(
                "SKIPPED: no S3 server (eval \"$(scripts/s3-local.sh start)\" sets RUNNER_TEST_S3)"
            );
            None
        }
    }
}

/// A fresh prefix in the test bucket.
pub fn prefix(bucket: &str, test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{bucket}/{test}-{}-{nanos}", std::process::id())
}

const STAGES: [&str; 5] = ["base", "sft", "continued", "merged", "fresh"];

/// Every file of every artifact of a cache: (artifact/relative path, bytes).
fn artifact_files(cache: &Path) -> Vec<(String, Vec<u8>)> {
    let root = cache.join("artifacts");
    lora_runner::hashing::payload_files(&root, &[])
        .unwrap()
        .into_iter()
        .filter(|path| path.file_name().unwrap() != "manifest.json")
        .map(|path| {
            let rel = path.strip_prefix(&root).unwrap().display().to_string();
            (rel, std::fs::read(&path).unwrap())
        })
        .collect()
}

fn cache_arg(ws: &Workspace, name: &str) -> String {
    ws.path(name).display().to_string()
}

#[test]
fn a_second_cache_downloads_every_stage_computes_nothing_and_gets_the_same_bytes() {
    let Some(bucket) = server() else { return };
    let remote = prefix(&bucket, "two-caches");
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("1e-3"));
    let (one, two) = (cache_arg(&ws, "one"), cache_arg(&ws, "two"));

    let first = ws
        .runner(&["--cache", &one, "--remote", &remote, "run", "r.toml"])
        .ok();
    for stage in STAGES {
        assert!(
            first
                .stderr
                .contains(&format!("{stage}: uploaded to the remote")),
            "{stage}: {}",
            first.stderr
        );
    }

    let plan = ws
        .runner(&[
            "--cache", &two, "--remote", &remote, "plan", "r.toml", "--json",
        ])
        .ok()
        .json();
    for stage in STAGES {
        assert_eq!(plan_entry(&plan, stage).0, "remote", "{stage}: {plan}");
    }
    let text = ws
        .runner(&["--cache", &two, "--remote", &remote, "plan", "r.toml"])
        .ok()
        .stdout;
    assert!(text.contains("cached (remote)"), "{text}");
    assert!(
        text.contains("0 of 5 stage(s) to run, 5 to download from the remote"),
        "{text}"
    );
    // Without the remote, the second cache has nothing.
    let alone = ws
        .runner(&[
            "--cache",
            &two,
            "--remote",
            &remote,
            "--no-remote",
            "plan",
            "r.toml",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(plan_entry(&alone, "sft").0, "run");

    let second = ws
        .runner(&["--cache", &two, "--remote", &remote, "run", "r.toml"])
        .ok();
    assert!(
        second.stderr.contains("0 stage(s) ran, 5 cached"),
        "{}",
        second.stderr
    );
    for stage in STAGES {
        assert!(
            second
                .stderr
                .contains(&format!("{stage}: downloaded from the remote")),
            "{stage}: {}",
            second.stderr
        );
    }
    let (a, b) = (
        artifact_files(&ws.path("one")),
        artifact_files(&ws.path("two")),
    );
    assert!(!a.is_empty());
    assert_eq!(
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(a == b, "the downloaded artifacts are not the same bytes");
    // The local cache now answers on its own.
    let local = ws
        .runner(&["--cache", &two, "--no-remote", "plan", "r.toml", "--json"])
        .ok()
        .json();
    for stage in STAGES {
        assert_eq!(plan_entry(&local, stage).0, "cached", "{stage}");
    }
}

#[test]
fn a_corrupted_remote_file_is_detected_recomputed_and_replaced() {
    let Some(bucket) = server() else { return };
    let url = prefix(&bucket, "corrupt");
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("1e-3"));
    let (one, two, three) = (
        cache_arg(&ws, "one"),
        cache_arg(&ws, "two"),
        cache_arg(&ws, "three"),
    );
    ws.runner(&[
        "--cache", &one, "--remote", &url, "run", "r.toml", "--until", "sft",
    ])
    .ok();
    let show = ws
        .runner(&["--cache", &one, "show", "r.toml", "sft", "--json"])
        .ok()
        .json();
    let artifact = show["manifest"]["artifact"]
        .as_str()
        .unwrap_or_else(|| panic!("{show}"))
        .to_string();
    // One byte of the adapter's weights flipped on the remote.
    let remote = Remote::open(&url).unwrap();
    let object = format!("artifacts/{artifact}/adapter_model.safetensors");
    let mut bytes = remote.get(&object).unwrap().expect("uploaded");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    remote.put(&object, &bytes).unwrap();

    let run = ws
        .runner(&[
            "--cache", &two, "--remote", &url, "run", "r.toml", "--until", "sft",
        ])
        .ok();
    assert!(
        run.stderr
            .contains("sft: the remote's copy failed its check")
            && run
                .stderr
                .contains("adapter_model.safetensors does not match its recorded hash"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("sft: done in"), "{}", run.stderr);
    assert!(
        run.stderr.contains("sft: uploaded to the remote"),
        "{}",
        run.stderr
    );
    // Recomputed to the same bytes, and the remote holds them again.
    let two_show = ws
        .runner(&["--cache", &two, "show", "r.toml", "sft", "--json"])
        .ok()
        .json();
    assert_eq!(two_show["manifest"]["artifact"], artifact.as_str());
    let third = ws
        .runner(&["--cache", &three, "--remote", &url, "pull", "r.toml", "sft"])
        .ok();
    assert!(
        third.stderr.contains("sft: downloaded from the remote"),
        "{}",
        third.stderr
    );

    // A missing file is caught the same way.
    remote.delete(&object).unwrap();
    let four = cache_arg(&ws, "four");
    let run = ws
        .runner(&[
            "--cache", &four, "--remote", &url, "run", "r.toml", "--until", "sft",
        ])
        .ok();
    assert!(
        run.stderr.contains("adapter_model.safetensors is missing"),
        "{}",
        run.stderr
    );
}

#[test]
fn racing_pushes_of_one_stage_leave_one_complete_result() {
    let Some(bucket) = server() else { return };
    let url = prefix(&bucket, "race");
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("1e-3"));
    let caches: Vec<String> = (0..3).map(|i| cache_arg(&ws, &format!("c{i}"))).collect();
    for cache in &caches {
        ws.runner(&["--cache", cache, "run", "r.toml", "--until", "sft"])
            .ok();
    }
    let children: Vec<_> = caches
        .iter()
        .map(|cache| {
            std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
                .args(["--cache", cache, "--remote", &url, "push", "r.toml", "sft"])
                .current_dir(ws.path(""))
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut uploaded = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(exit::OK), "{stderr}");
        if stderr.contains("sft: uploaded to the remote") {
            uploaded += 1;
        } else {
            assert!(stderr.contains("sft: already on the remote"), "{stderr}");
        }
    }
    assert_eq!(uploaded, 1, "exactly one push wrote the key");
    let remote = Remote::open(&url).unwrap();
    let keys = remote.list("keys/").unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The server honours create-only puts at all (else the race proves little).
    assert!(remote.put_new("probe", b"first").unwrap());
    assert!(!remote.put_new("probe", b"second").unwrap());
    assert_eq!(remote.get("probe").unwrap().as_deref(), Some(&b"first"[..]));
    let fresh = cache_arg(&ws, "fresh");
    let pull = ws
        .runner(&["--cache", &fresh, "--remote", &url, "pull", "r.toml", "sft"])
        .ok();
    assert!(
        pull.stderr.contains("sft: downloaded from the remote"),
        "{}",
        pull.stderr
    );
}

/// SIGKILL at many points of a push: whenever a key record exists, the
/// artifact it names downloads whole and checks out.
#[test]
fn a_push_killed_at_any_point_leaves_no_key_without_its_whole_artifact() {
    let Some(bucket) = server() else { return };
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("1e-3"));
    let cache = cache_arg(&ws, "c");
    ws.runner(&["--cache", &cache, "run", "r.toml", "--until", "merged"])
        .ok();
    let mut with_key = 0;
    let delays = [0u64, 5, 15, 30, 60, 120, 250, 3000];
    for delay_ms in delays {
        let url = prefix(&bucket, &format!("kill{delay_ms}"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_runner"))
            .args([
                "--cache", &cache, "--remote", &url, "push", "r.toml", "merged",
            ])
            .current_dir(ws.path(""))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let remote = Remote::open(&url).unwrap();
        if remote.list("keys/").unwrap().is_empty() {
            continue;
        }
        with_key += 1;
        let fresh = cache_arg(&ws, &format!("after{delay_ms}"));
        let pull = ws
            .runner(&[
                "--cache", &fresh, "--remote", &url, "pull", "r.toml", "merged",
            ])
            .ok();
        assert!(
            pull.stderr.contains("merged: downloaded from the remote"),
            "killed after {delay_ms} ms: {}",
            pull.stderr
        );
    }
    eprintln!(
        "{with_key} of {} killed pushes had written their key",
        delays.len()
    );
    // 3 s is ample for this push: the check above ran at least once.
    assert!(with_key >= 1);
}

#[test]
fn gc_on_the_remote_keeps_what_the_recipes_reach_and_removes_the_rest() {
    let Some(bucket) = server() else { return };
    let url = prefix(&bucket, "gc");
    let ws = Workspace::new();
    ws.write("old.toml", &recipe("1e-3"));
    ws.write("new.toml", &recipe("2e-3"));
    let cache = cache_arg(&ws, "c");
    for r in ["old.toml", "new.toml"] {
        ws.runner(&[
            "--cache",
            &cache,
            "--remote",
            &url,
            "run",
            r,
            "--until",
            "continued",
        ])
        .ok();
    }
    let remote = Remote::open(&url).unwrap();
    // base is shared by both recipes: 1 + 2 × (sft, continued).
    assert_eq!(remote.list("keys/").unwrap().len(), 5);
    let gc = |extra: &[&str]| {
        let mut args = vec![
            "--cache",
            cache.as_str(),
            "--remote",
            url.as_str(),
            "gc",
            "--on-remote",
            "new.toml",
        ];
        args.extend_from_slice(extra);
        ws.runner(&args).ok().stdout
    };
    // Everything is younger than the default grace: nothing goes.
    let young = gc(&[]);
    assert!(young.contains("kept 2 unreached artifact(s)"), "{young}");
    let dry = gc(&["--grace", "0s"]);
    // The old recipe's sft and continued (keys and artifacts), and the
    // reference log-probs only its continued used (tokenized data is shared).
    assert!(dry.contains("would remove 5 item(s)"), "{dry}");
    assert_eq!(dry.matches("/derived/reference-logps-").count(), 1, "{dry}");
    assert!(!dry.contains("/derived/tokens-"), "{dry}");
    assert_eq!(
        remote.list("keys/").unwrap().len(),
        5,
        "a dry run removes nothing"
    );
    let done = gc(&["--grace", "0s", "--delete"]);
    assert!(done.contains("removed 5 item(s)"), "{done}");
    assert_eq!(remote.list("keys/").unwrap().len(), 3);
    // What the kept recipe needs still downloads whole; the other recipe's stages are gone.
    let fresh = cache_arg(&ws, "fresh");
    let pulled = ws
        .runner(&["--cache", &fresh, "--remote", &url, "pull", "new.toml"])
        .ok();
    assert!(
        pulled.stderr.contains("3 stage(s) pulled"),
        "{}",
        pulled.stderr
    );
    let old = ws
        .runner(&[
            "--cache", &fresh, "--remote", &url, "plan", "old.toml", "--json",
        ])
        .ok()
        .json();
    assert_eq!(plan_entry(&old, "sft").0, "run");
    assert_eq!(plan_entry(&old, "base").0, "cached");
}

#[test]
fn a_remote_that_cannot_be_reached_or_named_fails_plainly() {
    let ws = Workspace::new();
    ws.write("r.toml", &recipe("1e-3"));
    // Nothing listens on port 9 of loopback.
    let run = ws.runner_limited(
        "true",
        &["--remote", "s3://runner-test/x", "plan", "r.toml"],
        &[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ],
    );
    assert_eq!(run.code, exit::ENVIRONMENT, "{}", run.stderr);
    assert!(
        run.stderr.contains("s3://runner-test/x/keys/") && run.stderr.contains("--no-remote"),
        "{}",
        run.stderr
    );
    let bad = ws.runner(&["--remote", "http://example.com/b", "plan", "r.toml"]);
    assert_eq!(bad.code, exit::USAGE, "{}", bad.stderr);
    assert!(bad.stderr.contains("not an S3 URL"), "{}", bad.stderr);
    // In the recipe: pointed at, with its line.
    ws.write(
        "bad.toml",
        &format!("{}\n[cache]\nremote = \"s3://A_B\"\n", recipe("1e-3")),
    );
    let bad = ws.runner(&["plan", "bad.toml"]);
    assert_eq!(bad.code, exit::USAGE, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("[cache] remote") && bad.stderr.contains("not a bucket name"),
        "{}",
        bad.stderr
    );
    // push and pull need a remote.
    let none = ws.runner(&["push", "r.toml"]);
    assert_eq!(none.code, exit::USAGE, "{}", none.stderr);
    assert!(none.stderr.contains("no remote cache"), "{}", none.stderr);
}

/// A file bigger than a part goes up in parts (here three 5 MiB parts of a
/// 13 MiB model) and comes down whole, the same bytes.
#[test]
fn a_big_file_uploads_in_parts_and_downloads_whole() {
    let Some(bucket) = server() else { return };
    let url = prefix(&bucket, "parts");
    let ws = Workspace::new();
    ws.write(
        "r.toml",
        "[recipe]\nname = \"big\"\n\n[stages.base]\nkind = \"base\"\n\
         init = { arch = \"llama\", hidden = 256, layers = 4, heads = 4, kv_heads = 2, ffn = 688, vocab = 2000 }\n",
    );
    let (one, two) = (cache_arg(&ws, "one"), cache_arg(&ws, "two"));
    let env = [("RUNNER_REMOTE_PART_MIB", "5")];
    let up = ws.runner_limited(
        "true",
        &["--cache", &one, "--remote", &url, "run", "r.toml"],
        &env,
    );
    assert_eq!(up.code, exit::OK, "{}", up.stderr);
    let files = artifact_files(&ws.path("one"));
    let biggest = files.iter().map(|f| f.1.len()).max().unwrap();
    assert!(
        biggest > 2 * (5 << 20),
        "a file of {biggest} bytes is not three parts"
    );
    // S3 names an object put together from N parts with an ETag ending in -N.
    let objects = Remote::open(&url).unwrap().list("artifacts/").unwrap();
    let weights = objects
        .iter()
        .find(|o| o.path.ends_with("/model.safetensors"))
        .unwrap_or_else(|| panic!("{objects:?}"));
    assert!(
        weights.etag.trim_matches('"').ends_with("-3"),
        "{weights:?}"
    );
    assert!(objects
        .iter()
        .filter(|o| o.size < 5 << 20)
        .all(|o| !o.etag.contains('-')));
    let down = ws
        .runner(&["--cache", &two, "--remote", &url, "run", "r.toml"])
        .ok();
    assert!(
        down.stderr.contains("base: downloaded from the remote"),
        "{}",
        down.stderr
    );
    assert!(files == artifact_files(&ws.path("two")));
    let bad = ws.runner_limited(
        "true",
        &["--cache", &two, "--remote", &url, "plan", "r.toml"],
        &[("RUNNER_REMOTE_PART_MIB", "1")],
    );
    assert_eq!(bad.code, exit::USAGE, "{}", bad.stderr);
}

/// Derived data travels with the stage that made it: a cache that pulls
/// one DPO variant also gets its reference log-probs, and the variant it
/// computes itself (same reference, another beta) reuses every pair.
#[test]
fn a_pulled_variants_reference_log_probs_serve_the_variant_computed_here() {
    let Some(bucket) = server() else { return };
    let url = prefix(&bucket, "derived");
    let ws = Workspace::new();
    ws.write("r.toml", &crate::sweeps::sweep_recipe(4, ""));
    let caches: Vec<String> = (0..3).map(|i| cache_arg(&ws, &format!("c{i}"))).collect();
    let runner = |cache: &str, args: &[&str]| {
        let mut all = vec!["--cache", cache, "--remote", url.as_str()];
        all.extend_from_slice(args);
        ws.runner(&all).ok()
    };
    let variant = |cache: &str| {
        runner(
            cache,
            &[
                "run",
                "r.toml",
                "--until",
                "continued@beta=0.5",
                "--force",
                "continued@beta=0.5",
            ],
        );
        ws.runner(&[
            "--cache",
            cache,
            "show",
            "r.toml",
            "continued@beta=0.5",
            "--json",
        ])
        .ok()
        .json()["manifest"]["metrics"]
            .clone()
    };
    runner(
        &caches[0],
        &["run", "r.toml", "--until", "continued@beta=0.1"],
    );
    // With the 0.1 variant pulled first, its reference log-probs come too.
    let pulled = runner(&caches[1], &["pull", "r.toml", "continued@beta=0.1"]);
    assert!(
        pulled.stderr.contains("continued@beta=0.1: downloaded"),
        "{}",
        pulled.stderr
    );
    let reused = variant(&caches[1]);
    // Without it, the reference pass runs here.
    let alone = variant(&caches[2]);
    let computed = alone["reference/pairs_computed"].as_u64().unwrap();
    assert!(computed > 0, "{alone}");
    assert_eq!(
        reused["reference/pairs_computed"].as_u64(),
        Some(0),
        "{reused}"
    );
    assert_eq!(
        reused["reference/pairs_reused"].as_u64(),
        Some(computed),
        "{reused}"
    );

    // A derived file changed on the remote: the folder is left out, said
    // so naming the object, and the stage itself still arrives whole.
    let remote = Remote::open(&url).unwrap();
    let object = remote
        .list("derived/reference-logps-")
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .find(|p| !p.ends_with(".json") || p.matches('/').count() > 1)
        .expect("a reference log-prob file on the remote");
    let mut bytes = remote.get(&object).unwrap().unwrap();
    bytes[0] ^= 1;
    remote.put(&object, &bytes).unwrap();
    let bad_cache = cache_arg(&ws, "c3");
    let pulled = runner(&bad_cache, &["pull", "r.toml", "continued@beta=0.1"]);
    assert!(
        pulled
            .stderr
            .contains("does not match its recorded hash; not used")
            && pulled.stderr.contains(&object),
        "{}",
        pulled.stderr
    );
    let derived = std::path::Path::new(&bad_cache).join("derived");
    assert!(
        !crate::support::list(&derived)
            .iter()
            .any(|n| n.starts_with("reference-logps-")),
        "{:?}",
        crate::support::list(&derived)
    );
}
