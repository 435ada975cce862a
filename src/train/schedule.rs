//! Learning-rate schedules with linear warmup, as Hugging Face's
//! `get_*_schedule_with_warmup` define them (so recipes port over unchanged).

use serde::{Deserialize, Serialize};

/// Learning-rate schedule after warmup.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, peak: f64, step: u64, total: u64, warmup: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    peak * factor.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_each_decay_matches_its_closed_form() {
        // Warmup: 0, 0.25, 0.5, 0.75 of the peak.
        for (s, want) in [(0, 0.0), (1, 0.25), (3, 0.75)] {
            assert_eq!(lr_at(Schedule::Linear, 2.0, s, 14, 4), 2.0 * want);
        }
        // After warmup, 10 decay steps.
        assert_eq!(lr_at(Schedule::Constant, 2.0, 9, 14, 4), 2.0);
        assert!((lr_at(Schedule::Linear, 2.0, 9, 14, 4) - 2.0 * 0.5).abs() < 1e-12);
        assert!(
            (lr_at(Schedule::Cosine, 2.0, 9, 14, 4) - 1.0).abs() < 1e-12,
            "cos(pi/2) halfway"
        );
        assert!((lr_at(Schedule::Cosine, 2.0, 4, 14, 4) - 2.0).abs() < 1e-12);
        assert!(lr_at(Schedule::Linear, 2.0, 14, 14, 4).abs() < 1e-12);
    }
}
