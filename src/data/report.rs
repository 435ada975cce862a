//! Counts of what happened to the rows of one data file.

use serde::{Deserialize, Serialize};

/// `read == kept + dropped + skipped` always holds; `truncated` counts the
/// kept rows that were shortened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataReport {
    /// Non-blank lines seen.
    pub read: usize,
    /// Rows that became examples.
    pub kept: usize,
    /// Kept rows that were shortened to fit `seq_len`.
    pub truncated: usize,
    /// Over-long rows left out (`Overlong::Drop`, or truncation left nothing
    /// to learn from).
    pub dropped: usize,
    /// Malformed rows left out under `BadRows::Skip`.
    pub skipped: usize,
    /// Rows whose prompt tokens were not a prefix of the prompt+completion
    /// tokens (TRL warns about the same): the loss starts where the two
    /// diverge, so it covers the tokens the boundary merged.
    pub prompt_boundary_mismatches: usize,
    /// First few skipped rows as "file:line: reason", for the run log.
    pub skipped_examples: Vec<String>,
}

/// How many skipped rows to quote in the report.
pub(crate) const SKIPPED_EXAMPLES_KEPT: usize = 5;
