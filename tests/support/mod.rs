//! Test helpers: a recipe workspace in a temp folder, the `runner` binary,
//! and a child-process runner with test-only stage kinds.
#![allow(dead_code)]

pub mod fixtures;
pub mod kinds;
pub mod model;

use lora_runner::cli::exit;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temp folder holding a recipe, its data and a cache.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn write_bytes(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A fake Hugging Face folder: enough for recipe checks and hashing.
    pub fn model_folder(&self, rel: &str, layers: usize) -> PathBuf {
        let mut spec = lora_runner::model::init::RandomModel::tiny(0);
        spec.num_hidden_layers = layers;
        let config = spec.model_config().unwrap().to_json();
        self.write(&format!("{rel}/config.json"), &config.to_string());
        self.write_bytes(&format!("{rel}/model.safetensors"), &[7u8; 4096]);
        self.path(rel)
    }

    pub fn cache(&self) -> PathBuf {
        self.path("cache")
    }

    /// Run the real `runner` binary in this folder.
    pub fn runner(&self, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(args)
            .current_dir(self.dir.path())
            .env("RUNNER_CACHE", self.cache())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .output()
            .expect("runner runs");
        Run::from(out)
    }

    /// Run the real `runner` binary after `limits` in a shell (`ulimit -v
    /// 4000000`, a file-size limit…), with `env` set: a machine that refuses
    /// what the run asks of it.
    pub fn runner_limited(&self, limits: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{limits}; exec {} {}",
                env!("CARGO_BIN_EXE_runner"),
                quoted.join(" ")
            ))
            .current_dir(self.dir.path())
            .env("RUNNER_CACHE", self.cache())
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .output()
            .expect("runner runs");
        Run::from(out)
    }

    /// Run the CLI with the test stage kinds, in a child process (this test binary).
    pub fn child(&self, args: &[&str]) -> Run {
        self.child_with(args, &[])
    }

    /// As `child`, with extra environment variables.
    pub fn child_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = self.child_command(args);
        cmd.envs(env.iter().copied());
        let mut run = Run::from(cmd.output().expect("child runs"));
        // Drop what the test harness printed before the child's own output.
        if let Some((_, rest)) = run.stdout.split_once("test child_entry ... ") {
            run.stdout = rest.to_string();
        }
        run
    }

    pub fn child_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .current_dir(self.dir.path())
            .env(CHILD_ENV, serde_json::to_string(args).unwrap())
            .env("RUNNER_CACHE", self.cache())
            .env("NO_COLOR", "1")
            .env("LR_COUNTER", self.path("runs.log"));
        cmd
    }

    /// How many times test stages actually executed (from the counter file).
    pub fn executions(&self, stage: &str) -> usize {
        std::fs::read_to_string(self.path("runs.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == stage)
            .count()
    }

    pub fn artifacts(&self) -> Vec<String> {
        list(&self.cache().join("artifacts"))
    }

    pub fn keys(&self) -> Vec<String> {
        list(&self.cache().join("keys"))
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub const CHILD_ENV: &str = "LORA_RUNNER_TEST_CHILD_ARGS";

/// Call from a `#[test] fn child_entry()` in each test binary that uses `Workspace::child`.
pub fn child_entry() {
    child_entry_with(kinds::registry());
}

/// As `child_entry`, with the stage kinds of `registry`.
pub fn child_entry_with(registry: lora_runner::stage::Registry) {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let code =
        lora_runner::cli::run_with(std::iter::once("runner".to_string()).chain(args), &registry);
    std::process::exit(code);
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            exit::OK,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The plan's JSON stage entry for `name`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Sends Ctrl-C (SIGINT) to `child` and checks that it exits with 130.
pub fn interrupt_and_wait(child: std::process::Child) -> std::process::Output {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(exit::INTERRUPTED),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Plan `recipe` with `--json` and return (status, reason, key) of `stage`.
pub fn plan_entry(plan: &serde_json::Value, stage: &str) -> (String, String, String) {
    let s = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap_or_else(|| panic!("no stage {stage} in {plan}"));
    (
        s["status"].as_str().unwrap().to_string(),
        s["reason"].as_str().unwrap().to_string(),
        s["key"].as_str().unwrap().to_string(),
    )
}

/// A data file of the demo recipes (recipes/data/NAME), by absolute path.
pub fn recipe_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("recipes/data")
        .join(name)
}
