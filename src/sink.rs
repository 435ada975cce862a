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
