//! Fitting over-long rows into `seq_len` tokens.

use crate::data::settings::Overlong;

/// Result of fitting a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fitted<T> {
    Unchanged(T),
    Truncated(T),
    /// Left out: `Overlong::Drop`, or truncation left nothing to learn from.
    Dropped,
}

/// Fits an SFT row of `prompt` then `completion` into `seq_len`; returns
/// the kept (prompt, completion).
pub fn fit_sft(
    prompt: &[u32],
    completion: &[u32],
    seq_len: usize,
    mode: Overlong,
) -> Fitted<(Vec<u32>, Vec<u32>)> {
    if prompt.len() + completion.len() <= seq_len {
        return Fitted::Unchanged((prompt.to_vec(), completion.to_vec()));
    }
    match mode {
        Overlong::Drop => Fitted::Dropped,
        Overlong::TruncateLeft => {
            let completion = &completion[..completion.len().min(seq_len)];
            let prompt = keep_end(prompt, seq_len - completion.len());
            Fitted::Truncated((prompt.to_vec(), completion.to_vec()))
        }
        Overlong::TruncateRight => {
            // A prompt that fills the window leaves no completion token to
            // train on (TRL drops these too).
            if prompt.len() >= seq_len {
                return Fitted::Dropped;
            }
            let completion = &completion[..seq_len - prompt.len()];
            Fitted::Truncated((prompt.to_vec(), completion.to_vec()))
        }
    }
}

/// Fits a DPO row so that prompt+chosen and prompt+rejected each fit
/// `seq_len`, sharing one prompt; returns (prompt, chosen, rejected).
pub fn fit_dpo(
    prompt: &[u32],
    chosen: &[u32],
    rejected: &[u32],
    seq_len: usize,
    mode: Overlong,
) -> Fitted<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let longest = chosen.len().max(rejected.len());
    if prompt.len() + longest <= seq_len {
        return Fitted::Unchanged((prompt.to_vec(), chosen.to_vec(), rejected.to_vec()));
    }
    let (prompt, chosen, rejected) = match mode {
        Overlong::Drop => return Fitted::Dropped,
        Overlong::TruncateLeft => {
            let prompt = keep_end(prompt, seq_len.saturating_sub(longest));
            (
                prompt,
                keep_start(chosen, seq_len),
                keep_start(rejected, seq_len),
            )
        }
        Overlong::TruncateRight => {
            if prompt.len() >= seq_len {
                return Fitted::Dropped;
            }
            let room = seq_len - prompt.len();
            (prompt, keep_start(chosen, room), keep_start(rejected, room))
        }
    };
    // Cutting both answers may erase the only difference between them; such
    // a pair has zero DPO gradient, so it is dropped rather than kept.
    if chosen == rejected {
        return Fitted::Dropped;
    }
    Fitted::Truncated((prompt.to_vec(), chosen.to_vec(), rejected.to_vec()))
}

fn keep_start(ids: &[u32], n: usize) -> &[u32] {
    &ids[..ids.len().min(n)]
}

fn keep_end(ids: &[u32], n: usize) -> &[u32] {
    &ids[ids.len().saturating_sub(n)..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_left_cuts_prompt_then_completion_end() {
        let fitted = fit_sft(&[1, 2, 3], &[7, 8], 4, Overlong::TruncateLeft);
        assert_eq!(fitted, Fitted::Truncated((vec![2, 3], vec![7, 8])));
        let fitted = fit_sft(&[1, 2, 3], &[7, 8, 9], 2, Overlong::TruncateLeft);
        assert_eq!(fitted, Fitted::Truncated((vec![], vec![7, 8])));
    }

    #[test]
    fn sft_right_cuts_end_and_drops_prompt_only_rows() {
        let fitted = fit_sft(&[1, 2, 3], &[7, 8], 4, Overlong::TruncateRight);
        assert_eq!(fitted, Fitted::Truncated((vec![1, 2, 3], vec![7])));
        assert_eq!(
            fit_sft(&[1, 2, 3], &[7], 3, Overlong::TruncateRight),
            Fitted::Dropped
        );
    }

    #[test]
    fn dpo_truncation_that_equalises_answers_drops() {
        let fitted = fit_dpo(&[1], &[5, 6, 7], &[5, 6, 8], 3, Overlong::TruncateRight);
        assert_eq!(fitted, Fitted::Dropped);
        let fitted = fit_dpo(&[1, 2], &[5, 6], &[5, 7, 8], 4, Overlong::TruncateLeft);
        assert_eq!(
            fitted,
            Fitted::Truncated((vec![2], vec![5, 6], vec![5, 7, 8]))
        );
    }
}
