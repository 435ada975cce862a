//! DPO datasets: rows `{"prompt", "chosen", "rejected"}` → one prompt and
//! two completions as token ids.

use std::path::Path;

use crate::data::error::{DataError, RowError};
use crate::data::load::{process_rows, PairEncoder, RowOutcome};
use crate::data::report::DataReport;
use crate::data::rows::parse_dpo_row;
use crate::data::settings::TokenizeSettings;
use crate::data::tokenizer::ModelTokenizer;
use crate::data::truncate::{fit_dpo, Fitted};

/// One preference pair. The model sees `prompt_ids ++ chosen_ids` and
/// `prompt_ids ++ rejected_ids` (each exactly the full tokenization of
/// prompt + completion); loss and log-probs use the completions only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoExample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// A tokenized DPO file with what happened to its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpoDataset {
    /// The 1-based line of the data file each example came from (what
    /// per-example evaluation results are paired by).
    pub lines: Vec<usize>,
    pub examples: Vec<DpoExample>,
    pub report: DataReport,
}

/// Reads and tokenizes a DPO JSONL file.
pub fn load_dpo(
    path: &Path,
    tokenizer: &ModelTokenizer,
    settings: &TokenizeSettings,
) -> Result<DpoDataset, DataError> {
    let encoder = PairEncoder::new(tokenizer, settings)?;
    let (examples, lines, report) = process_rows(path, settings, |map| {
        let row = parse_dpo_row(map)?;
        let chosen = encoder.encode(&row.prompt, &row.chosen, "chosen")?;
        let rejected = encoder.encode(&row.prompt, &row.rejected, "rejected")?;
        // As TRL 1.16: the shared prompt is the shorter of the two common
        // token prefixes, so the model sees exactly each full tokenization.
        let start = chosen.completion_start().min(rejected.completion_start());
        let prompt_ids = &chosen.full_ids[..start];
        let (chosen_ids, rejected_ids) = (&chosen.full_ids[start..], &rejected.full_ids[start..]);
        if chosen_ids == rejected_ids {
            // Texts differ but tokens do not (e.g. trailing whitespace).
            return Err(RowError::ChosenEqualsRejected.into());
        }
        let boundary_mismatch = !chosen.prompt_is_prefix() || !rejected.prompt_is_prefix();
        let fitted = fit_dpo(
            prompt_ids,
            chosen_ids,
            rejected_ids,
            settings.seq_len,
            settings.overlong,
        );
        let ((prompt_ids, chosen_ids, rejected_ids), truncated) = match fitted {
            Fitted::Unchanged(kept) => (kept, false),
            Fitted::Truncated(kept) => (kept, true),
            Fitted::Dropped => return Ok(RowOutcome::Dropped),
        };
        Ok(RowOutcome::Kept {
            example: DpoExample {
                prompt_ids,
                chosen_ids,
                rejected_ids,
            },
            truncated,
            boundary_mismatch,
        })
    })?;
    Ok(DpoDataset {
        examples,
        lines,
        report,
    })
}
