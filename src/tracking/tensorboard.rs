//! One stage's TensorBoard run: a folder `<root>/<recipe>/<stage>` holding
//! one event file. A resumed stage rewrites the file from its metrics lines
//! (cut back to the checkpoint it resumes from), so no step is logged twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::tfrecord::{self, HParam};
use crate::sink::Tracker;

pub struct TensorBoardRun {
    dir: PathBuf,
    run: String,
    params: Vec<(String, HParam)>,
    file: Mutex<Option<std::fs::File>>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether `name` is an event file TensorBoard reads.
fn is_event_file(name: &str) -> bool {
    name.contains("tfevents")
}

impl TensorBoardRun {
    /// The run `run` (`recipe/stage`) under `root`; its folder is made.
    pub fn new(root: &Path, run: &str, params: Vec<(String, HParam)>) -> std::io::Result<Self> {
        let dir = root.join(run);
        std::fs::create_dir_all(&dir)?;
        Ok(TensorBoardRun {
            dir,
            run: run.to_string(),
            params,
            file: Mutex::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, records: &[Vec<u8>]) -> Result<(), String> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let f = file.as_mut().ok_or("the event file is not open")?;
        for r in records {
            f.write_all(&tfrecord::record(r))
                .map_err(|e| format!("writing {}: {e}", self.dir.display()))?;
        }
        // TensorBoard reads the file while it grows: each line is flushed.
        f.flush().map_err(|e| e.to_string())
    }
}

/// A value's tag as TRL's TensorBoard callback writes it: `eval/...` kept,
/// training values under `train/`.
fn tag(name: &str) -> String {
    match name.starts_with("eval/") {
        true => name.to_string(),
        false => format!("train/{name}"),
    }
}

fn scalars(line: &serde_json::Value) -> Option<Vec<u8>> {
    let (step, values) = super::line_values(line)?;
    let values: Vec<(String, f32)> = values.iter().map(|(k, v)| (tag(k), *v as f32)).collect();
    (!values.is_empty()).then(|| tfrecord::scalars(now(), step, &values))
}

impl Tracker for TensorBoardRun {
    fn restart(&self, lines: &[serde_json::Value]) -> Result<(), String> {
        let io = |e: std::io::Error| format!("{}: {e}", self.dir.display());
        // Earlier files of this run hold steps the resumed run redoes.
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if is_event_file(&entry.file_name().to_string_lossy()) {
                std::fs::remove_file(entry.path()).map_err(io)?;
            }
        }
        let started = now();
        let name = format!(
            "events.out.tfevents.{}.{}.{}.runner",
            started as u64,
            host(),
            std::process::id()
        );
        let file = std::fs::File::create(self.dir.join(name)).map_err(io)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
        let mut records = vec![
            tfrecord::file_version(started),
            tfrecord::session_start(started, &self.run, &self.params),
        ];
        records.extend(lines.iter().filter_map(scalars));
        self.write(&records)
    }

    fn line(&self, line: &serde_json::Value) -> Result<(), String> {
        match scalars(line) {
            Some(r) => self.write(&[r]),
            None => Ok(()),
        }
    }

    fn end(&self, _finished: bool) -> Result<(), String> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = file.take() {
            f.sync_all().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_are_trls() {
        assert_eq!(super::tag("learning_rate"), "train/learning_rate");
        assert_eq!(super::tag("rewards/margins"), "train/rewards/margins");
        assert_eq!(super::tag("eval/loss"), "eval/loss");
    }
}
