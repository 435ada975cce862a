//! The verdict as a picture: a forest plot of the paired differences, one
//! block per metric with its own axis (metrics differ in scale), one row per
//! pair of stages, each difference turned so that right of the zero line is
//! better for the first stage named (a loss's difference is negated). With
//! more than three stages (a sweep) every pair would be too many rows, so
//! each variant is shown against the best on that metric.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::compare::evaluation::{Verdict, METRICS};
use crate::compare::html::escape;

/// Stages beyond which rows are "against the best" instead of every pair.
const ALL_PAIRS_UP_TO: usize = 3;

/// One row: `first` against `second`, right of zero better for `first`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub metric: String,
    pub first: String,
    pub second: String,
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    pub significant: bool,
    pub paired: usize,
}

fn higher_is_better(metric: &str) -> bool {
    METRICS
        .iter()
        .find(|(m, _)| *m == metric)
        .is_none_or(|(_, h)| *h)
}

/// `v` turned so that positive favours `v.a`.
fn oriented(v: &Verdict) -> Row {
    let d = v.difference;
    let (mean, low, high) = if higher_is_better(&v.metric) {
        (d.mean, d.low, d.high)
    } else {
        (-d.mean, -d.high, -d.low)
    };
    Row {
        metric: v.metric.clone(),
        first: v.a.clone(),
        second: v.b.clone(),
        mean,
        low,
        high,
        significant: d.significant(),
        paired: v.paired,
    }
}

/// `row` read from the other side.
fn flipped(row: Row) -> Row {
    Row {
        first: row.second,
        second: row.first,
        mean: -row.mean,
        low: -row.high,
        high: -row.low,
        ..row
    }
}

/// One metric's rows, and whether they are each stage against the best
/// (a sweep) rather than every pair.
pub type Block = (String, Vec<Row>, bool);

/// The rows of the plot, grouped by metric in `METRICS` order.
pub fn rows(verdicts: &[Verdict]) -> Vec<Block> {
    let mut by_metric: BTreeMap<usize, (String, Vec<Row>)> = BTreeMap::new();
    for v in verdicts {
        let order = METRICS
            .iter()
            .position(|(m, _)| *m == v.metric)
            .unwrap_or(METRICS.len());
        by_metric
            .entry(order)
            .or_insert_with(|| (v.metric.clone(), Vec::new()))
            .1
            .push(oriented(v));
    }
    by_metric
        .into_values()
        .map(|(metric, rows)| {
            let all = rows.len();
            let rows = against_the_best(rows);
            let reduced = rows.len() < all;
            (metric, rows, reduced)
        })
        .collect()
}

/// Every pair for a few stages; for more, each stage against the one that
/// is best by its summed advantage over the others.
fn against_the_best(rows: Vec<Row>) -> Vec<Row> {
    let mut advantage: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &rows {
        *advantage.entry(&r.first).or_default() += r.mean;
        *advantage.entry(&r.second).or_default() -= r.mean;
    }
    if advantage.len() <= ALL_PAIRS_UP_TO {
        return rows;
    }
    let best = advantage
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(name, _)| name.to_string())
        .expect("more than three stages");
    rows.into_iter()
        .filter_map(|r| match (r.first == best, r.second == best) {
            (true, _) => Some(r),
            (_, true) => Some(flipped(r)),
            _ => None,
        })
        .collect()
}

/// Characters a row label may take before the plot area.
const LABEL_CHARS: usize = 80;

/// `label` shortened in the middle to `LABEL_CHARS` (the whole is in the
/// row's tooltip).
fn fit_label(label: &str) -> String {
    let chars: Vec<char> = label.chars().collect();
    if chars.len() <= LABEL_CHARS {
        return label.to_string();
    }
    let half = (LABEL_CHARS - 1) / 2;
    let head: String = chars[..half].iter().collect();
    let tail: String = chars[chars.len() - half..].iter().collect();
    format!("{head}…{tail}")
}

/// A tick label: as few decimals as the value needs (ticks are round).
fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (3 - v.abs().log10().floor() as i32).max(0) as usize;
    let text = format!("{v:+.digits$}");
    match text.contains('.') {
        true => text.trim_end_matches('0').trim_end_matches('.').to_string(),
        false => text,
    }
}

/// The smallest of 1, 2, 2.5 and 5 times a power of ten that is at least
/// `x` (> 0), so that the axis ends and half-way ticks are round; 1 for 0.
fn round_reach(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&r| r >= x * (1.0 - 1e-12))
        .unwrap_or(10.0 * power)
}

const LABEL_X: i32 = 16;
/// Width of the plot area; the label column before it is as wide as the
/// longest row label needs.
const PLOT_WIDTH: i32 = 460;
/// Pixels a label character takes at font size 12 (sans-serif, generous).
const CHAR_PX: i32 = 7;
const ROW: i32 = 24;
const HEADING: i32 = 44;
const AXIS: i32 = 30;

/// The forest plot as SVG, or None with no verdict to draw.
pub fn forest_svg(verdicts: &[Verdict]) -> Option<String> {
    let blocks = rows(verdicts);
    if blocks.is_empty() {
        return None;
    }
    let height = 40
        + blocks
            .iter()
            .map(|(_, r, _)| HEADING + ROW * r.len() as i32 + AXIS)
            .sum::<i32>();
    let longest = blocks
        .iter()
        .flat_map(|(_, rows, _)| rows)
        .map(|r| {
            fit_label(&format!("{} vs {}", r.first, r.second))
                .chars()
                .count()
        })
        .max()
        .unwrap_or(0) as i32;
    let plot_left = (LABEL_X + CHAR_PX * longest + 16).max(330);
    let plot_right = plot_left + PLOT_WIDTH;
    let width = plot_right + 30;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" font-family=\"sans-serif\">\
<text x=\"{LABEL_X}\" y=\"22\" font-size=\"15\" font-weight=\"bold\">Paired differences with 95% intervals (right of 0: the first stage is better)</text>"
    );
    let mut y = 40;
    for (metric, rows, reduced) in &blocks {
        let mut direction = if higher_is_better(metric) {
            "higher is better"
        } else {
            "lower is better: differences negated"
        }
        .to_string();
        if *reduced {
            direction.push_str("; each stage against the best");
        }
        let _ = write!(
            svg,
            "<text x=\"{LABEL_X}\" y=\"{}\" font-size=\"13\" font-weight=\"bold\">{}</text>\
<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#555\">({direction})</text>",
            y + 18,
            escape(metric),
            LABEL_X + 12 + 8 * metric.len() as i32,
            y + 18
        );
        let _ = write!(
            svg,
            "<text x=\"{plot_left}\" y=\"{}\" font-size=\"11\" fill=\"#a40\">← second better</text>\
<text x=\"{plot_right}\" y=\"{}\" font-size=\"11\" fill=\"#276\" text-anchor=\"end\">first better →</text>",
            y + 36,
            y + 36
        );
        // A symmetric axis keeps zero in the middle of every block.
        let reach = round_reach(
            rows.iter()
                .flat_map(|r| [r.low.abs(), r.high.abs()])
                .fold(0.0f64, f64::max)
                * 1.05,
        );
        let x = |v: f64| {
            let mid = (plot_left + plot_right) as f64 / 2.0;
            (mid + v / reach * PLOT_WIDTH as f64 / 2.0).round() as i32
        };
        let top = y + HEADING;
        let bottom = top + ROW * rows.len() as i32;
        for (i, r) in rows.iter().enumerate() {
            let cy = top + ROW * i as i32 + ROW / 2;
            if i % 2 == 0 {
                let _ = write!(
                    svg,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{ROW}\" fill=\"#f5f5f5\"/>",
                    LABEL_X - 6,
                    cy - ROW / 2,
                    plot_right - LABEL_X + 12
                );
            }
            let colour = match (r.significant, r.mean > 0.0) {
                (false, _) => "#888",
                (true, true) => "#276",
                (true, false) => "#a40",
            };
            let verdict = match (r.significant, r.mean > 0.0) {
                (false, _) => "no significant difference".to_string(),
                (true, true) => format!("{} better", r.first),
                (true, false) => format!("{} better", r.second),
            };
            let _ = write!(
                svg,
                "<text x=\"{LABEL_X}\" y=\"{}\" font-size=\"12\"><title>{} vs {}</title>{}</text>\
<line x1=\"{}\" y1=\"{cy}\" x2=\"{}\" y2=\"{cy}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
<circle cx=\"{}\" cy=\"{cy}\" r=\"5\" fill=\"{colour}\"><title>{}: {:+.4} [{:+.4}, {:+.4}], {} paired examples: {}</title></circle>",
                cy + 4,
                escape(&r.first),
                escape(&r.second),
                escape(&fit_label(&format!("{} vs {}", r.first, r.second))),
                x(r.low),
                x(r.high),
                x(r.low),
                cy - 5,
                x(r.low),
                cy + 5,
                x(r.high),
                cy - 5,
                x(r.high),
                cy + 5,
                x(r.mean),
                escape(metric),
                r.mean,
                r.low,
                r.high,
                r.paired,
                escape(&verdict)
            );
        }
        // The zero line, then the axis with its ticks.
        let _ = write!(
            svg,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>\
<line x1=\"{plot_left}\" y1=\"{bottom}\" x2=\"{plot_right}\" y2=\"{bottom}\" stroke=\"#333\"/>",
            x(0.0),
            top - 4,
            x(0.0)
        );
        for k in [-1.0, -0.5, 0.0, 0.5, 1.0] {
            let v = k * reach;
            let _ = write!(
                svg,
                "<line x1=\"{0}\" y1=\"{bottom}\" x2=\"{0}\" y2=\"{1}\" stroke=\"#333\"/>\
<text x=\"{0}\" y=\"{2}\" font-size=\"10\" text-anchor=\"middle\">{3}</text>",
                x(v),
                bottom + 4,
                bottom + 16,
                tick(v)
            );
        }
        y = bottom + AXIS;
    }
    svg.push_str("</svg>");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::bootstrap::Interval;

    fn verdict(a: &str, b: &str, metric: &str, (mean, low, high): (f64, f64, f64)) -> Verdict {
        Verdict {
            a: a.into(),
            b: b.into(),
            metric: metric.into(),
            difference: Interval { mean, low, high },
            paired: 40,
            better: None,
            text: String::new(),
        }
    }

    #[test]
    fn a_loss_difference_is_negated_so_right_is_better() {
        // a's loss is higher by 0.5: b is better, drawn left of zero.
        let blocks = rows(&[
            verdict("a", "b", "sft/loss", (0.5, 0.2, 0.8)),
            verdict("a", "b", "sft/exact_match", (0.1, -0.05, 0.25)),
        ]);
        // METRICS order: exact match first, loss after.
        assert_eq!(blocks[0].0, "sft/exact_match");
        let loss = &blocks[1].1[0];
        assert_eq!((loss.mean, loss.low, loss.high), (-0.5, -0.8, -0.2));
        assert!(loss.significant);
        let em = &blocks[0].1[0];
        assert_eq!((em.mean, em.low, em.high), (0.1, -0.05, 0.25));
        assert!(!em.significant, "the interval holds 0");
    }

    #[test]
    fn a_sweep_is_drawn_against_the_best() {
        // Four variants; v2 beats every other on accuracy.
        let mut vs = Vec::new();
        let means = [("v0", 0.1), ("v1", 0.2), ("v2", 0.6), ("v3", 0.3)];
        for (i, (a, ma)) in means.iter().enumerate() {
            for (b, mb) in &means[i + 1..] {
                let d = ma - mb;
                vs.push(verdict(
                    a,
                    b,
                    "preference/accuracy",
                    (d, d - 0.05, d + 0.05),
                ));
            }
        }
        let blocks = rows(&vs);
        assert!(blocks[0].2, "marked as against the best");
        let rows = &blocks[0].1;
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows.iter().all(|r| r.first == "v2" && r.mean > 0.0));
        let v0 = rows.iter().find(|r| r.second == "v0").unwrap();
        assert!((v0.mean - 0.5).abs() < 1e-12 && (v0.low - 0.45).abs() < 1e-12);
        // Three stages: every pair.
        let three: Vec<Verdict> = vs
            .into_iter()
            .filter(|v| v.a != "v3" && v.b != "v3")
            .collect();
        assert_eq!(super::rows(&three)[0].1.len(), 3);
        assert!(!super::rows(&three)[0].2);
    }

    #[test]
    fn axes_end_at_round_numbers() {
        assert_eq!(round_reach(0.0183), 0.02);
        assert_eq!(round_reach(0.0251), 0.05);
        assert_eq!(round_reach(0.025), 0.025);
        assert_eq!(round_reach(0.63), 1.0);
        assert_eq!(round_reach(0.0), 1.0, "an interval of zero width");
        assert_eq!(tick(0.0125), "+0.0125");
        assert_eq!(tick(-0.5), "-0.5");
        assert_eq!(tick(2.0), "+2");
        assert_eq!(tick(0.0), "0");
        let long = "dpo_fresh@beta=0.5-r=16-lr=0.0005-dropout=0.1 vs dpo_fresh@beta=1.0-r=16-lr=0.001-dropout=0.1";
        let short = fit_label(long);
        assert_eq!(short.chars().count(), LABEL_CHARS - 1);
        assert!(short.starts_with("dpo_fresh@beta=0.5") && short.ends_with("dropout=0.1"));
        assert_eq!(fit_label("a vs b"), "a vs b");
    }

    #[test]
    fn the_svg_has_a_point_an_interval_and_a_zero_line_per_row() {
        let svg = forest_svg(&[
            verdict("one", "two", "sft/loss", (0.5, 0.2, 0.8)),
            verdict("one", "two", "preference/accuracy", (0.3, 0.1, 0.5)),
        ])
        .unwrap();
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(
            svg.matches("stroke-dasharray").count(),
            2,
            "a zero line per block"
        );
        assert!(svg.contains("<title>one vs two</title>one vs two"));
        assert!(svg.contains("lower is better"));
        assert!(svg.contains("two better"), "the loss favours two");
        assert!(forest_svg(&[]).is_none());
        // METRICS order puts the loss first: its point (−0.5) is left of
        // the zero line, accuracy's right.
        let cx: Vec<i32> = svg
            .split("<circle cx=\"")
            .skip(1)
            .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
            .collect();
        // Short labels: the label column's least width.
        let mid = 330 + PLOT_WIDTH / 2;
        assert!(cx[0] < mid && cx[1] > mid, "{cx:?}");
    }
}
