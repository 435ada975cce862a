//! `runner run --executor slurm`: every stage that is not cached becomes one
//! `sbatch` job running `runner run RECIPE --only STAGE` on the same cache,
//! with `--dependency=afterok:` on its parents' jobs. The cache is the only
//! source of truth about what is done; the job id of each submitted stage is
//! recorded under `jobs/<key>/` with the job's script and output, so
//! submitting again skips stages that are cached, queued or running.
//!
//! Jobs are submitted with `--requeue` and `--open-mode=append`: a requeued
//! or resubmitted stage resumes from its own checkpoints, and
//! `--kill-on-invalid-dep=yes`: the dependants of a failed stage end at once
//! (CANCELLED, DependencyNeverSatisfied) instead of pending forever.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::{Executor, JobState, StageCommand};
use crate::cache::Cache;
use crate::plan::{Plan, PlannedStage};
use crate::recipe::executor::SlurmSettings;
use crate::recipe::Recipe;

/// The Slurm command-line tools (`sbatch`, `squeue`, `scancel`) on PATH.
pub struct Slurm;

/// `jobs/<key>/job.json`: the last job submitted for a stage key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub executor: String,
    pub id: String,
    pub stage: String,
    pub recipe: String,
    pub key: String,
    /// The job's stdout and stderr.
    pub output: PathBuf,
    pub submitted: String,
}

/// Folder of a stage key's jobs: script, output, record.
pub fn job_dir(cache: &Cache, key: &str) -> PathBuf {
    cache.root.join("jobs").join(key)
}

pub fn job_record(cache: &Cache, key: &str) -> Option<JobRecord> {
    let bytes = std::fs::read(job_dir(cache, key).join("job.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A stage of this submission: its job, and whether it was queued just now.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub stage: String,
    pub key: String,
    pub id: String,
    pub fresh: bool,
    pub output: PathBuf,
    /// Its result goes to the remote cache (`Kind::shared`); one that does
    /// not stays on its job's node when the job has a cache of its own.
    pub shared: bool,
}

/// What a submission needs besides the plan.
pub struct Submission<'a> {
    pub program: PathBuf,
    /// `--threads` of each job when `cpus` is not set.
    pub threads: Option<usize>,
    pub device: Option<String>,
    pub force: &'a [String],
    /// `--ignore-memory-check`: each job's check on its node is skipped too.
    pub ignore_memory_check: bool,
    /// Every job uses a cache folder of its own (`cache_reach`).
    pub own_caches: bool,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script of one stage. Without a remote cache it refuses to run
/// when it cannot see the marker the submitting host wrote into the cache:
/// a cache on storage that the node does not share. With one, such a node
/// (or any, with RUNNER_NODE_CACHE set, or every one when `own_caches`: the
/// shared folder's locks do not work) uses a cache folder of its own, and
/// the job pulls its inputs from the remote and pushes its result there.
/// `%j` in RUNNER_NODE_CACHE is the job id, as in sbatch's file names.
fn script(command: &StageCommand, marker: &Path, own_caches: bool) -> String {
    // After `--cache PATH`: the cache is chosen in the script.
    let args: Vec<String> = command.args()[2..].iter().map(|a| quote(a)).collect();
    let choose = match &command.remote {
        None => format!(
            "cache={cache}\n\
             if [ ! -f {marker} ]; then\n  \
               echo \"runner: job on $(hostname) cannot see the cache {shown} (the cache must be on storage every node sees, or set a remote cache)\" >&2\n  \
               exit 3\n\
             fi\n",
            cache = quote(&command.cache.display().to_string()),
            shown = command.cache.display(),
            marker = quote(&marker.display().to_string()),
        ),
        Some(url) => format!(
            "cache={cache}\n\
             if [ -n \"${{RUNNER_NODE_CACHE:-}}\" ]; then\n  \
               cache=\"$(printf '%s' \"$RUNNER_NODE_CACHE\" | sed \"s/%j/${{SLURM_JOB_ID:-0}}/g\")\"\n\
             elif {own} || [ ! -f {marker} ]; then\n  \
               cache=\"${{TMPDIR:-/tmp}}/runner-cache-$(id -u)\"\n\
             fi\n\
             echo \"runner: job on $(hostname): cache $cache, results shared through \"{url} >&2\n",
            cache = quote(&command.cache.display().to_string()),
            marker = quote(&marker.display().to_string()),
            url = quote(url),
            own = own_caches,
        ),
    };
    format!(
        "#!/bin/sh\n\
         # Written by runner: stage `{stage}` of {recipe}, on the cache {cache}.\n\
         {choose}\
         export RUNNER_PLAIN=1\n\
         exec {program} --cache \"$cache\" {args}\n",
        stage = command.stage,
        recipe = command.recipe.display(),
        cache = command.cache.display(),
        program = quote(&command.program.display().to_string()),
        args = args.join(" "),
    )
}

/// How jobs will reach the cache, said at submission: through this cache
/// folder, which needs working file locks, or through the remote. True:
/// every job uses a cache folder of its own (a remote, and no locks here).
pub fn cache_reach(cache: &Cache) -> anyhow::Result<(String, bool)> {
    let locks = locks_work(cache);
    match (&cache.remote, locks) {
        (Some(remote), Ok(())) => Ok((
            format!(
                "jobs share results through the remote {}; a node that cannot see {} uses a cache folder of its own",
                remote.url(),
                cache.root.display()
            ),
            false,
        )),
        (Some(remote), Err(e)) => Ok((
            format!(
                "jobs share results through the remote {}; {e}, so every job uses a cache folder of its own",
                remote.url()
            ),
            true,
        )),
        (None, Ok(())) => Ok((
            format!(
                "jobs share the cache folder {} (file locks work here; it must be on storage every node sees)",
                cache.root.display()
            ),
            false,
        )),
        (None, Err(e)) => bail!(
            "{e}: jobs need a cache on storage with locks, or a remote cache ([cache] remote, --remote)"
        ),
    }
}

/// Whether advisory locks work in the cache folder (a Lustre mount with
/// `flock` off refuses them).
fn locks_work(cache: &Cache) -> anyhow::Result<()> {
    let probe = cache.root.join("locks").join("probe.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&probe)
        .with_context(|| format!("opening {}", probe.display()))?;
    match file.try_lock_shared() {
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => Ok(()),
        Err(std::fs::TryLockError::Error(e)) => bail!(
            "the cache folder {} has no working file locks ({e})",
            cache.root.display()
        ),
    }
}

/// Submit every selected stage that is not cached, in plan order, each after
/// its parents' jobs. Stages whose last job is still queued or running keep it.
pub fn submit(
    executor: &dyn Executor,
    recipe: &Recipe,
    cache: &Cache,
    plan: &Plan,
    selected: &[usize],
    submission: &Submission,
) -> anyhow::Result<Vec<Submitted>> {
    let mut to_run: Vec<&PlannedStage> = plan
        .stages
        .iter()
        .filter(|p| selected.contains(&p.index) && p.status.will_run())
        .collect();
    if cache.remote.is_some() {
        // A stage no cache shares (a base read from a file) that others read
        // runs inside each of their jobs (`select`), which may have caches
        // of their own; a job of its own would leave it on its node.
        let read: Vec<usize> = to_run
            .iter()
            .flat_map(|p| p.deps.iter().map(|(_, d)| *d))
            .collect();
        to_run.retain(|p| {
            let stage = &recipe.stages[p.index];
            stage.kind.shared(stage.params.as_ref()) || !read.contains(&p.index)
        });
    }
    let records: BTreeMap<usize, JobRecord> = to_run
        .iter()
        .filter_map(|p| Some((p.index, job_record(cache, &p.key)?)))
        .collect();
    let known: Vec<String> = records.values().map(|r| r.id.clone()).collect();
    let states = if known.is_empty() {
        BTreeMap::new()
    } else {
        executor.state(&known)?
    };
    let mut jobs: BTreeMap<usize, String> = BTreeMap::new();
    let mut out = Vec::new();
    for p in to_run {
        let stage = &recipe.stages[p.index];
        if let Some(record) = records.get(&p.index) {
            if states.get(&record.id).is_some_and(JobState::active) {
                jobs.insert(p.index, record.id.clone());
                out.push(Submitted {
                    stage: p.name.clone(),
                    key: p.key.clone(),
                    id: record.id.clone(),
                    fresh: false,
                    output: record.output.clone(),
                    shared: stage.kind.shared(stage.params.as_ref()),
                });
                continue;
            }
        }
        let settings = recipe.executor.slurm.settings(
            stage.kind.name(),
            &p.name,
            stage.variant.as_ref().map(|v| v.of.as_str()),
        );
        let threads = settings
            .cpus
            .map(|c| c as usize)
            .or(submission.threads)
            .unwrap_or(1);
        let command = StageCommand {
            program: submission.program.clone(),
            cache: cache.root.clone(),
            recipe: recipe.canonical.clone(),
            stage: p.name.clone(),
            threads,
            device: submission.device.clone(),
            force: submission.force.contains(&p.name),
            ignore_memory_check: submission.ignore_memory_check,
            tensorboard: recipe.tensorboard.clone(),
            mlflow: recipe.mlflow.clone(),
            remote: cache.remote.as_ref().map(|r| r.url().to_string()),
        };
        let dir = job_dir(cache, &p.key);
        std::fs::create_dir_all(&dir)?;
        let marker = dir.join("submitted");
        crate::fsutil::write_atomic(&marker, crate::cache::now_rfc3339().as_bytes())?;
        let script_path = dir.join("job.sh");
        crate::fsutil::write_atomic(
            &script_path,
            script(&command, &marker, submission.own_caches).as_bytes(),
        )?;
        let after: Vec<String> = p
            .deps
            .iter()
            .filter_map(|(_, d)| jobs.get(d).cloned())
            .collect();
        let name = format!("runner:{}:{}", recipe.header.name.value, p.name);
        let id = executor
            .submit(
                &name,
                &command,
                &after,
                &settings,
                &dir.join("slurm-%j.out"),
            )
            .with_context(|| format!("submitting stage `{}`", p.name))?;
        let output = dir.join(format!("slurm-{id}.out"));
        let record = JobRecord {
            executor: "slurm".into(),
            id: id.clone(),
            stage: p.name.clone(),
            recipe: recipe.canonical.display().to_string(),
            key: p.key.clone(),
            output: output.clone(),
            submitted: crate::cache::now_rfc3339(),
        };
        crate::fsutil::write_json_atomic(&dir.join("job.json"), &record)?;
        jobs.insert(p.index, id.clone());
        out.push(Submitted {
            stage: p.name.clone(),
            key: p.key.clone(),
            id,
            fresh: true,
            output,
            shared: stage.kind.shared(stage.params.as_ref()),
        });
    }
    Ok(out)
}

/// Each stage of the plan that has a job record: the record and the job's state.
pub fn jobs_of(
    executor: &dyn Executor,
    cache: &Cache,
    plan: &Plan,
) -> anyhow::Result<BTreeMap<String, (JobRecord, JobState)>> {
    let records: Vec<(String, JobRecord)> = plan
        .stages
        .iter()
        .filter_map(|p| job_record(cache, &p.key).map(|r| (p.name.clone(), r)))
        .collect();
    if records.is_empty() {
        return Ok(BTreeMap::new());
    }
    let ids: Vec<String> = records.iter().map(|(_, r)| r.id.clone()).collect();
    let states = executor.state(&ids)?;
    Ok(records
        .into_iter()
        .map(|(stage, r)| {
            let state = states.get(&r.id).cloned().unwrap_or(JobState::Unknown);
            (stage, (r, state))
        })
        .collect())
}

/// Read Slurm's state names (squeue `%T`) and reasons (`%r`).
fn parse_state(state: &str, reason: &str) -> JobState {
    match state {
        "PENDING" if reason == "DependencyNeverSatisfied" => JobState::Never(reason.into()),
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => {
            JobState::Pending(reason.into())
        }
        "RUNNING" | "COMPLETING" | "CONFIGURING" | "SUSPENDED" | "RESIZING" | "STAGE_OUT"
        | "SIGNALING" => JobState::Running,
        "COMPLETED" => JobState::Completed,
        "CANCELLED" if reason == "DependencyNeverSatisfied" => JobState::Never(reason.into()),
        other if reason.is_empty() || reason == "None" => JobState::Failed(other.into()),
        other => JobState::Failed(format!("{other} ({reason})")),
    }
}

fn run_tool(command: &mut Command, what: &str) -> anyhow::Result<std::process::Output> {
    command.output().with_context(|| {
        format!("cannot run `{what}`: is Slurm installed and on PATH? (scripts/slurm-local/ starts a local test cluster)")
    })
}

impl Executor for Slurm {
    fn submit(
        &self,
        name: &str,
        command: &StageCommand,
        after: &[String],
        settings: &SlurmSettings,
        output: &Path,
    ) -> anyhow::Result<String> {
        let dir = output.parent().expect("the output is in the job folder");
        let mut sbatch = Command::new("sbatch");
        sbatch
            .arg("--parsable")
            .arg(format!("--job-name={name}"))
            .arg(format!("--output={}", output.display()))
            .arg("--open-mode=append")
            .arg("--requeue")
            .arg("--kill-on-invalid-dep=yes")
            .arg(format!("--chdir={}", dir.display()))
            .arg(format!("--cpus-per-task={}", command.threads));
        if !after.is_empty() {
            sbatch.arg(format!("--dependency=afterok:{}", after.join(":")));
        }
        let flags = [
            ("--partition", &settings.partition),
            ("--time", &settings.time),
            ("--mem", &settings.memory),
            ("--gres", &settings.gres),
            ("--account", &settings.account),
        ];
        // An empty value unsets what a level above set (`gres = ""` for a merge).
        for (flag, value) in flags {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                sbatch.arg(format!("{flag}={v}"));
            }
        }
        sbatch.args(settings.extra.iter().flatten());
        sbatch.arg(dir.join("job.sh"));
        let out = run_tool(&mut sbatch, "sbatch")?;
        if !out.status.success() {
            bail!(
                "sbatch refused it: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // `ID` or `ID;CLUSTER`.
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            bail!("sbatch printed no job id: {text:?}");
        }
        Ok(id)
    }

    fn state(&self, ids: &[String]) -> anyhow::Result<BTreeMap<String, JobState>> {
        let mut states: BTreeMap<String, JobState> = ids
            .iter()
            .map(|id| (id.clone(), JobState::Unknown))
            .collect();
        if ids.is_empty() {
            return Ok(states);
        }
        let out = run_tool(
            Command::new("squeue")
                .args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j"])
                .arg(ids.join(",")),
            "squeue",
        )?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            // Every id forgotten (purged after MinJobAge): all unknown.
            if err.contains("Invalid job id") {
                return Ok(states);
            }
            bail!("squeue failed: {}", err.trim());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.splitn(3, '|');
            let (Some(id), Some(state), reason) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if let Some(slot) = states.get_mut(id.trim()) {
                *slot = parse_state(state.trim(), reason.unwrap_or("").trim());
            }
        }
        Ok(states)
    }

    fn cancel(&self, ids: &[String]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let out = run_tool(Command::new("scancel").args(ids), "scancel")?;
        if !out.status.success() {
            bail!(
                "scancel failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// Follow submitted jobs until each has ended, showing their state changes
/// and each running stage's last step. Ctrl-C stops the waiting, not the jobs.
pub fn wait(
    executor: &dyn Executor,
    cache: &Cache,
    submitted: &[Submitted],
    reporter: &dyn crate::progress::Reporter,
    interrupt: &std::sync::atomic::AtomicBool,
    poll: std::time::Duration,
) -> anyhow::Result<crate::executor::Report> {
    use crate::executor::Outcome;
    use std::sync::atomic::Ordering;
    reporter.start_pipeline(submitted.len());
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut last: BTreeMap<String, JobState> = BTreeMap::new();
    let mut bars: BTreeMap<String, Box<dyn crate::sink::Progress + '_>> = BTreeMap::new();
    loop {
        let open: Vec<&Submitted> = submitted
            .iter()
            .filter(|s| !outcomes.contains_key(&s.stage))
            .collect();
        if open.is_empty() {
            break;
        }
        if interrupt.load(Ordering::SeqCst) {
            for s in open {
                outcomes.insert(s.stage.clone(), Outcome::Interrupted);
            }
            break;
        }
        let ids: Vec<String> = open.iter().map(|s| s.id.clone()).collect();
        let states = executor.state(&ids)?;
        for s in open {
            let state = states.get(&s.id).cloned().unwrap_or(JobState::Unknown);
            if last.get(&s.stage) != Some(&state) {
                reporter.stage_line(&format!("{}: job {} {}", s.stage, s.id, state.label()));
                last.insert(s.stage.clone(), state.clone());
            }
            // A job on a node with a cache of its own leaves its result on the remote.
            let artifact = || {
                cache.key_record(&s.key).map(|r| r.artifact).or_else(|| {
                    let remote = cache.remote.as_ref()?;
                    crate::sharing::remote_record(remote, &s.key)
                        .ok()
                        .flatten()
                        .map(|r| r.artifact)
                })
            };
            let outcome = match &state {
                JobState::Pending(_) => None,
                JobState::Running => {
                    let bar = bars.entry(s.stage.clone()).or_insert_with(|| {
                        reporter.start_stage(&s.stage, "slurm", &format!("job {}", s.id))
                    });
                    if let Some((done, total)) = last_step(&s.output) {
                        bar.set_total(total);
                        bar.set_position(done, "");
                    }
                    None
                }
                JobState::Completed | JobState::Unknown => Some(match artifact() {
                    Some(artifact) => Outcome::Ran {
                        artifact,
                        seconds: 0.0,
                    },
                    // Completed on a node with a cache of its own, which keeps it.
                    None if !s.shared && cache.remote.is_some() => Outcome::Ran {
                        artifact: String::new(),
                        seconds: 0.0,
                    },
                    None => Outcome::Failed(format!(
                        "job {} ended without the stage's artifact; see {}",
                        s.id,
                        s.output.display()
                    )),
                }),
                JobState::Failed(what) => Some(Outcome::Failed(format!(
                    "job {} {what}; see {}",
                    s.id,
                    s.output.display()
                ))),
                JobState::Never(_) => Some(Outcome::Blocked(format!(
                    "job {} never started: an input's job failed",
                    s.id
                ))),
            };
            if let Some(outcome) = outcome {
                bars.remove(&s.stage);
                let line = match &outcome {
                    Outcome::Ran { artifact, .. } if artifact.is_empty() => {
                        format!("{}: done (kept in its job's own cache)", s.stage)
                    }
                    Outcome::Ran { artifact, .. } => {
                        format!("{}: done ({})", s.stage, crate::cache::short(artifact))
                    }
                    Outcome::Failed(why) => format!("{}: FAILED: {why}", s.stage),
                    Outcome::Blocked(why) => format!("{}: skipped ({why})", s.stage),
                    _ => String::new(),
                };
                reporter.stage_done(&line);
                outcomes.insert(s.stage.clone(), outcome);
            }
        }
        let slept = std::time::Instant::now();
        while slept.elapsed() < poll && !interrupt.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    drop(bars);
    reporter.finish();
    Ok(crate::executor::Report {
        stages: submitted
            .iter()
            .filter_map(|s| outcomes.remove(&s.stage).map(|o| (s.stage.clone(), o)))
            .collect(),
        unpushed: Vec::new(),
    })
}

/// The last `step a/b` a job's output shows (its stage logs plain lines).
pub fn last_step(output: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(output).ok()?;
    text.lines().rev().find_map(|line| {
        let rest = line.split(": step ").nth(1)?;
        let (done, rest) = rest.split_once('/')?;
        let total: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some((done.trim().parse().ok()?, total.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_as_an_executor_needs_them() {
        assert_eq!(
            parse_state("PENDING", "Dependency"),
            JobState::Pending("Dependency".into())
        );
        assert!(parse_state("PENDING", "Dependency").active());
        assert_eq!(
            parse_state("PENDING", "DependencyNeverSatisfied"),
            JobState::Never("DependencyNeverSatisfied".into())
        );
        assert!(!parse_state("PENDING", "DependencyNeverSatisfied").active());
        assert_eq!(
            parse_state("CANCELLED", "DependencyNeverSatisfied"),
            JobState::Never("DependencyNeverSatisfied".into())
        );
        assert!(parse_state("COMPLETING", "None").active());
        assert_eq!(parse_state("COMPLETED", "None"), JobState::Completed);
        assert_eq!(
            parse_state("FAILED", "NonZeroExitCode"),
            JobState::Failed("FAILED (NonZeroExitCode)".into())
        );
        assert_eq!(
            parse_state("TIMEOUT", "None"),
            JobState::Failed("TIMEOUT".into())
        );
        assert!(!parse_state("CANCELLED", "None").active());
    }

    #[test]
    fn the_script_quotes_what_it_runs() {
        let command = StageCommand {
            program: "/opt/run ner/runner".into(),
            cache: "/shared/it's/cache".into(),
            recipe: "/r/sweep.toml".into(),
            stage: "dpo@beta=0.5".into(),
            threads: 2,
            device: None,
            force: false,
            ignore_memory_check: false,
            tensorboard: None,
            mlflow: None,
            remote: None,
        };
        let text = script(
            &command,
            Path::new("/shared/it's/cache/jobs/k/submitted"),
            false,
        );
        assert!(text.contains("if [ ! -f '/shared/it'\\''s/cache/jobs/k/submitted' ]"));
        assert!(text.contains("cache='/shared/it'\\''s/cache'\n"));
        assert!(text.contains(
            "exec '/opt/run ner/runner' --cache \"$cache\" '--threads' '2' '--no-remote' 'run' '/r/sweep.toml' '--only' 'dpo@beta=0.5'\n"
        ));
    }

    /// The script run by sh with `echo` as the program: which cache a job
    /// uses, with and without a remote, with the marker seen or not.
    #[test]
    fn the_script_picks_the_cache_a_job_can_reach() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let marker = shared.join("submitted");
        let run = |remote: Option<&str>, node_cache: Option<&str>, own: bool| {
            let command = StageCommand {
                program: "/bin/echo".into(),
                cache: shared.clone(),
                recipe: "/r/x.toml".into(),
                stage: "sft".into(),
                threads: 1,
                device: None,
                force: false,
                ignore_memory_check: false,
                tensorboard: None,
                mlflow: None,
                remote: remote.map(str::to_string),
            };
            let path = dir.path().join("job.sh");
            std::fs::write(&path, script(&command, &marker, own)).unwrap();
            let mut sh = std::process::Command::new("sh");
            sh.arg(&path)
                .current_dir(dir.path())
                .env("TMPDIR", dir.path())
                .env_remove("RUNNER_NODE_CACHE");
            if let Some(n) = node_cache {
                sh.env("RUNNER_NODE_CACHE", n);
            }
            let out = sh.output().unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            )
        };
        let uid = String::from_utf8(
            std::process::Command::new("id")
                .arg("-u")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let own = format!("{}/runner-cache-{}", dir.path().display(), uid.trim());
        let shared_s = shared.display().to_string();
        // The marker unseen: no remote, no job; with one, a cache of its own.
        assert_eq!(run(None, None, false).0, Some(3));
        let (code, out) = run(Some("s3://b-1/p"), None, false);
        assert_eq!(code, Some(0));
        assert_eq!(
            out,
            format!("--cache {own} --threads 1 --remote s3://b-1/p run /r/x.toml --only sft")
        );
        // The marker seen: the shared cache, unless RUNNER_NODE_CACHE says otherwise.
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(&marker, "now").unwrap();
        assert!(run(None, None, false)
            .1
            .starts_with(&format!("--cache {shared_s} ")));
        assert!(run(Some("s3://b-1/p"), None, false)
            .1
            .starts_with(&format!("--cache {shared_s} ")));
        assert!(run(Some("s3://b-1/p"), Some("/scratch/n"), false)
            .1
            .starts_with("--cache /scratch/n "));
        // Locks that do not work in the shared folder: every job its own.
        assert!(run(Some("s3://b-1/p"), None, true)
            .1
            .starts_with(&format!("--cache {own} ")));
        // `%j` is the job id; a URL is data to the shell, never code.
        let (code, out) = run(
            Some("s3://b-1/$(touch x)`y`\"z"),
            Some("/scratch/%j/c"),
            false,
        );
        assert_eq!(code, Some(0));
        assert!(out.starts_with("--cache /scratch/0/c "), "{out}");
        assert!(out.contains("--remote s3://b-1/$(touch x)`y`\"z "), "{out}");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn the_last_step_of_a_job_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out");
        std::fs::write(
            &log,
            "[runner] dpo: step 3/40 loss 0.6\n[runner] dpo: step 17/40 loss 0.5\n[runner] other\n",
        )
        .unwrap();
        assert_eq!(last_step(&log), Some((17, 40)));
        assert_eq!(last_step(&dir.path().join("none")), None);
    }
}
