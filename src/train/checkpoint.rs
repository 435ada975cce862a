//! Checkpoints of a training stage, in its work folder:
//! `ckpt-<step>/` holds the adapter weights, the optimizer moments and the
//! loop state; a resume file (its path given by the caller) names the newest. Each checkpoint is written
//! into a temporary folder, fsynced and renamed, so a kill at any moment
//! leaves the previous checkpoint whole.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Loop state besides tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps finished.
    pub step: u64,
    /// Lines of metrics.jsonl written by then (later lines are dropped on resume).
    pub metrics_lines: u64,
    /// Examples consumed (the data-order cursor; the order itself is a function of the seed).
    pub examples_seen: u64,
    /// The seed every random choice derives from, with the step (dropout, order).
    pub seed: u64,
    /// f16 loss scaling state (absent for other dtypes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<super::scaler::LossScaler>,
}

pub struct Checkpoint {
    pub state: LoopState,
    pub params: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

const PARAMS: &str = "adapter.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

fn name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

fn save_tensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

/// Write a checkpoint for `state.step` and make it the one to resume from.
pub fn save(
    work: &Path,
    resume_file: &Path,
    state: &LoopState,
    params: &BTreeMap<String, Tensor>,
    optimizer: &BTreeMap<String, Tensor>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(work)?;
    let staging = tempfile::Builder::new().prefix(".ckpt-").tempdir_in(work)?;
    save_tensors(&staging.path().join(PARAMS), params)?;
    save_tensors(&staging.path().join(OPTIMIZER), optimizer)?;
    fsutil::write_json_atomic(&staging.path().join(STATE), state)?;
    fsutil::fsync_tree(staging.path())?;
    let target = work.join(name(state.step));
    fsutil::replace_dir(&staging.keep(), &target)?;
    fsutil::write_json_atomic(resume_file, &serde_json::json!({ "step": state.step }))?;
    // Older checkpoints are no longer needed.
    for (step, dir) in list(work)? {
        if step != state.step {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}

fn list(work: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(work) else {
        return Ok(out);
    };
    for e in rd {
        let e = e?;
        let file_name = e.file_name();
        if let Some(step) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix("ckpt-"))
            .and_then(|s| s.parse().ok())
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest whole checkpoint, if any, with tensors on `device`.
pub fn latest(work: &Path, device: &Device) -> anyhow::Result<Option<Checkpoint>> {
    let Some((_, dir)) = list(work)?.pop() else {
        return Ok(None);
    };
    let load = |file: &str| -> anyhow::Result<BTreeMap<String, Tensor>> {
        let path = dir.join(file);
        let tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", path.display()))?;
        Ok(tensors.into_iter().collect())
    };
    let state: LoopState = serde_json::from_slice(&std::fs::read(dir.join(STATE))?)
        .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", dir.join(STATE).display()))?;
    Ok(Some(Checkpoint {
        state,
        params: load(PARAMS)?,
        optimizer: load(OPTIMIZER)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_latest_round_trips_and_keeps_only_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let t = |v: f32| Tensor::new(&[v, v + 1.0], &Device::Cpu).unwrap();
        for step in [5, 10] {
            let state = LoopState {
                step,
                metrics_lines: step,
                examples_seen: step * 4,
                seed: 3,
                scaler: None,
            };
            let params = BTreeMap::from([("a".to_string(), t(step as f32))]);
            let opt = BTreeMap::from([("a.exp_avg".to_string(), t(0.5))]);
            save(
                dir.path(),
                &dir.path().join("resume.json"),
                &state,
                &params,
                &opt,
            )
            .unwrap();
        }
        let ck = latest(dir.path(), &Device::Cpu).unwrap().unwrap();
        assert_eq!(ck.state.step, 10);
        assert_eq!(ck.params["a"].to_vec1::<f32>().unwrap(), vec![10.0, 11.0]);
        assert_eq!(
            ck.optimizer["a.exp_avg"].to_vec1::<f32>().unwrap(),
            vec![0.5, 1.5]
        );
        assert_eq!(list(dir.path()).unwrap().len(), 1);
        let resume: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("resume.json")).unwrap())
                .unwrap();
        assert_eq!(resume["step"], 10);
    }

    #[test]
    fn a_half_written_checkpoint_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".ckpt-abc")).unwrap();
        assert!(latest(dir.path(), &Device::Cpu).unwrap().is_none());
    }
}
