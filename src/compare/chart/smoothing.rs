//! Light smoothing for noisy per-step curves.

use crate::compare::summary::Point;

/// Share of a curve's points one smoothing window spans (~5%).
pub const SMOOTHING_FRACTION: f64 = 0.05;

/// Odd window length covering about 5% of `len` points; 1 means "no smoothing".
pub fn smoothing_window(len: usize) -> usize {
    let window = ((len as f64) * SMOOTHING_FRACTION).round() as usize;
    let window = window.max(1);
    // Odd, so the window is centred on the point it replaces.
    if window.is_multiple_of(2) {
        window + 1
    } else {
        window
    }
}

/// Centred moving average over `window` points. Centred rather than trailing so the
/// smoothed curve does not lag the raw one; near the ends the window shrinks to
/// what exists, so the first and last points stay anchored.
pub fn moving_average(points: &[Point], window: usize) -> Vec<Point> {
    let half = window.max(1) / 2;
    (0..points.len())
        .map(|i| {
            let start = i.saturating_sub(half);
            let end = (i + half + 1).min(points.len());
            let slice = &points[start..end];
            let mean = slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64;
            (points[i].0, mean)
        })
        .collect()
}
