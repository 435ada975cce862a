//! What every long computation reports to and listens for: a progress sink
//! and the Ctrl-C stop. A leaf module: the engine implements the sink, the
//! training and evaluation libraries take it as a plain value.

/// Where a running computation reports progress.
pub trait Progress: Send + Sync {
    /// Set the number of steps of the current stage.
    fn set_total(&self, total: u64);
    /// Report that `done` steps are finished, with a short status message.
    fn set_position(&self, done: u64, message: &str);
    /// A log line (shown above bars on a terminal).
    fn log(&self, line: &str);
}

/// A computation that stopped because the user pressed Ctrl-C. It should
/// have saved whatever lets it resume before returning this.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Where a training loop's metrics lines go besides metrics.jsonl (a live
/// view: TensorBoard, MLflow). An error is reported once by the caller and
/// the tracker dropped: tracking never fails a stage.
pub trait Tracker: Send + Sync {
    /// The run from its start: every line so far (a resumed run's, cut back
    /// to its checkpoint), replacing whatever was logged before.
    fn restart(&self, lines: &[serde_json::Value]) -> Result<(), String>;
    /// One more line (a step's metrics, or an evaluation's).
    fn line(&self, line: &serde_json::Value) -> Result<(), String>;
    /// The run ended: `finished`, or failed or interrupted.
    fn end(&self, finished: bool) -> Result<(), String>;
}

/// No tracking.
pub struct NoTracker;

impl Tracker for NoTracker {
    fn restart(&self, _: &[serde_json::Value]) -> Result<(), String> {
        Ok(())
    }
    fn line(&self, _: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn end(&self, _: bool) -> Result<(), String> {
        Ok(())
    }
}
