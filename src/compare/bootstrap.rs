//! Paired bootstrap confidence intervals for the difference of two stages'
//! mean per-example metric, and the verdict they support.
//!
//! Both stages are scored on the same examples, so the per-example
//! differences dᵢ = aᵢ − bᵢ carry the pairing. Each of `resamples` draws
//! takes n of them with replacement (seeded) and keeps their mean; the
//! interval is the 2.5th and 97.5th percentiles of those means (the
//! percentile method), and the difference is significant when it excludes 0.

use serde::{Deserialize, Serialize};

use crate::model::kernels::rng::SplitMix64;

/// Resamples when the caller does not say.
pub const DEFAULT_RESAMPLES: usize = 10_000;

/// The mean difference and its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Interval {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    /// Whether 0 lies outside the interval.
    pub fn significant(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// Interval for mean(a − b) over paired values; `None` with no pairs.
pub fn paired_difference(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> Option<Interval> {
    assert_eq!(a.len(), b.len(), "paired samples");
    let n = a.len();
    if n == 0 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let mut rng = SplitMix64::for_stream(seed, "paired-bootstrap");
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            let mut sum = 0.0;
            for _ in 0..n {
                sum += d[(rng.next_u64() % n as u64) as usize];
            }
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    Some(Interval {
        mean,
        low: at(0.025),
        high: at(0.975),
    })
}
