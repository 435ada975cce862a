//! The comparison as one self-contained HTML file: the verdict first, then
//! the table with intervals, the curves (inline SVG), the task metric before
//! and after training, and greedy samples side by side. No script, no
//! network: everything is in the file.

use std::fmt::Write;

use crate::compare::evaluation::{Bootstrap, Verdict};
use crate::compare::summary::StageSummary;
use crate::compare::table::{ComparisonTable, METRIC_COLUMN};

/// The task metric the summary sentence and the before/after chart use,
/// in order of preference.
const HEADLINE: &[(&str, &str)] = &[
    ("sft/exact_match", "exact match"),
    ("preference/accuracy", "preference accuracy"),
];

/// Text as HTML/SVG character data or an attribute value.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222}\
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}\
th{background:#f3f3f3}.verdict{font-size:1.1rem;font-weight:600;background:#eef6ee;border-left:4px solid #3a3;padding:.6rem 1rem}\
.none{background:#f6f3ea;border-left-color:#aa3}li{margin:.2rem 0}figure{margin:1rem 0}svg{max-width:100%;height:auto}\
code{background:#f3f3f3;padding:0 .2rem}.note{color:#666}";

/// The headline sentence: on the first headline metric any verdict covers.
/// With more than two stages (a sweep), the best stage on that metric against
/// each other one, not every pair.
fn headline(verdicts: &[Verdict], stages: &[StageSummary]) -> (String, bool) {
    for (metric, label) in HEADLINE {
        let mut on: Vec<&Verdict> = verdicts.iter().filter(|v| v.metric == *metric).collect();
        if on.is_empty() {
            continue;
        }
        let mut lead = String::new();
        if on.len() > 1 {
            let higher_is_better = crate::compare::evaluation::METRICS
                .iter()
                .find(|(m, _)| m == metric)
                .is_none_or(|(_, h)| *h);
            let value = |s: &StageSummary| {
                s.evaluated
                    .evaluation
                    .as_ref()
                    .and_then(|e| e.metrics.get(*metric).copied())
            };
            let best =
                stages
                    .iter()
                    .filter_map(|s| Some((s, value(s)?)))
                    .max_by(|(_, x), (_, y)| {
                        if higher_is_better {
                            x.total_cmp(y)
                        } else {
                            y.total_cmp(x)
                        }
                    });
            if let Some((best, v)) = best {
                on.retain(|x| x.a == best.name || x.b == best.name);
                lead = format!(
                    "Best on {label} of {} stages: {} ({v:.3}). ",
                    stages.len(),
                    best.name
                );
            }
        }
        let lines: Vec<String> = on
            .iter()
            .map(|v| match &v.better {
                Some(w) => {
                    let other = if *w == v.a { &v.b } else { &v.a };
                    format!(
                        "{w} served better than {other} on {label}: by {:.3} (95% interval of {} − {}: {:+.3} to {:+.3})",
                        v.difference.mean.abs(),
                        v.a,
                        v.b,
                        v.difference.low,
                        v.difference.high
                    )
                }
                None => format!(
                    "No significant difference between {} and {} on {label} ({} − {} = {:+.3}, 95% interval {:+.3} to {:+.3})",
                    v.a, v.b, v.a, v.b, v.difference.mean, v.difference.low, v.difference.high
                ),
            })
            .collect();
        let decided = on.iter().any(|v| v.better.is_some());
        return (format!("{lead}{}", lines.join(". ")), decided);
    }
    (
        "No verdict: the compared stages have no evaluation in common (add eval stages over the same data)."
            .into(),
        false,
    )
}

/// Bars of the headline metric for each stage's parent evaluation and its own.
fn before_after_svg(stages: &[StageSummary]) -> Option<String> {
    let (metric, label) = HEADLINE.iter().find(|(m, _)| {
        stages.iter().any(|s| {
            s.evaluated
                .evaluation
                .as_ref()
                .is_some_and(|e| e.metrics.contains_key(*m))
        })
    })?;
    let groups: Vec<(&str, Option<f64>, f64)> = stages
        .iter()
        .filter_map(|s| {
            let after = *s.evaluated.evaluation.as_ref()?.metrics.get(*metric)?;
            let before = s
                .evaluated
                .change
                .as_ref()
                .and_then(|c| c.evaluation.metrics.get(*metric).copied());
            Some((s.name.as_str(), before, after))
        })
        .collect();
    let (width, height, top, bottom, left) = (160 * groups.len() as i32 + 80, 260, 30, 50, 50);
    let plot = height - top - bottom;
    let max = groups
        .iter()
        .flat_map(|(_, b, a)| [b.unwrap_or(0.0), *a])
        .fold(1e-9f64, f64::max)
        .max(if *metric == "sft/exact_match" {
            1.0
        } else {
            0.0
        });
    let y = |v: f64| top + plot - (v / max * plot as f64).round() as i32;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\">\
<text x=\"{left}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{} before and after training</text>\
<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>",
        escape(label),
        top + plot,
        width - 20,
        top + plot
    );
    for (i, (name, before, after)) in groups.iter().enumerate() {
        let x0 = left + 20 + 160 * i as i32;
        for (k, (value, colour, what)) in
            [(*before, "#bbb", "before"), (Some(*after), "#3a7", "after")]
                .into_iter()
                .enumerate()
        {
            let Some(v) = value else { continue };
            let x = x0 + 55 * k as i32;
            let _ = write!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"45\" height=\"{}\" fill=\"{colour}\"><title>{what}: {v:.3}</title></rect>\
<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{v:.3}</text>\
<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#555\">{what}</text>",
                y(v),
                top + plot - y(v),
                x + 22,
                y(v) - 4,
                x + 22,
                top + plot + 14
            );
        }
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            x0 + 50,
            top + plot + 34,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    Some(svg)
}

/// `charts`: (title, SVG text) pairs, inlined in order.
pub fn html_report(
    title: &str,
    stages: &[StageSummary],
    verdicts: &[Verdict],
    bootstrap: Bootstrap,
    charts: &[(String, String)],
    forest: Option<&str>,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    // The verdict.
    let (sentence, decided) = headline(verdicts, stages);
    let _ = write!(
        out,
        "<section id=\"verdict\"><h2>Verdict</h2><p class=\"verdict{}\">{}</p>",
        if decided { "" } else { " none" },
        escape(&sentence)
    );
    // What training cost or gained on the headline metric, per stage.
    let costs: Vec<String> = stages
        .iter()
        .filter_map(|s| {
            let c = s.evaluated.change.as_ref()?;
            let (metric, label) = HEADLINE.iter().find(|(m, _)| c.deltas.contains_key(*m))?;
            let d = c.deltas[*metric];
            Some(format!(
                "{}: {label} {:+.3} (95% interval {:+.3} to {:+.3}) against `{}`{}",
                s.name,
                d.mean,
                d.low,
                d.high,
                c.from,
                if d.significant() {
                    ""
                } else {
                    ", not significant"
                }
            ))
        })
        .collect();
    if !costs.is_empty() {
        let _ = write!(
            out,
            "<p class=\"change\"><b>What training changed:</b> {}</p>",
            escape(&costs.join("; "))
        );
    }
    if let Some(svg) = forest {
        let _ = write!(
            out,
            "<figure class=\"chart\"><figcaption>Every paired difference: a point and its 95% interval, right of the dashed zero line when the first stage named is better</figcaption>{svg}</figure>"
        );
    }
    out.push_str("<ul>");
    for v in verdicts {
        let _ = write!(out, "<li>{}</li>", escape(&v.text));
    }
    out.push_str("</ul>");
    for s in stages {
        for h in &s.evaluated.hints {
            let _ = write!(
                out,
                "<p class=\"note\">{}: {}</p>",
                escape(&s.name),
                escape(h)
            );
        }
    }
    let _ = writeln!(
        out,
        "<p class=\"note\">Paired bootstrap over evaluated examples (each stage scored on the same rows): {} resamples, seed {}, 95% percentile intervals. Cells read value (change from the stage it was trained from [interval]).</p></section>",
        bootstrap.resamples, bootstrap.seed
    );
    // The table.
    let table = ComparisonTable::build(stages);
    out.push_str("<section id=\"table\"><h2>Table</h2><table><tr>");
    let _ = write!(out, "<th>{METRIC_COLUMN}</th>");
    for name in &table.stage_names {
        let _ = write!(out, "<th>{}</th>", escape(name));
    }
    out.push_str("</tr>");
    for row in &table.rows {
        let _ = write!(out, "<tr><th>{}</th>", escape(row.label));
        for cell in &row.cells {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></section>\n<section id=\"curves\"><h2>Curves</h2>");
    for (title, svg) in charts {
        let _ = write!(
            out,
            "<figure class=\"chart\"><figcaption>{}</figcaption>{}</figure>",
            escape(title),
            strip_prolog(svg)
        );
    }
    if let Some(svg) = before_after_svg(stages) {
        let _ = write!(
            out,
            "<figure class=\"chart\"><figcaption>Task metric before and after</figcaption>{svg}</figure>"
        );
    }
    out.push_str("</section>\n");
    samples(&mut out, stages);
    out.push_str("</body></html>\n");
    out
}

/// Greedy completions: one row per prompt; the parent's, then each stage's.
fn samples(out: &mut String, stages: &[StageSummary]) {
    let mut columns: Vec<(String, &[(String, String)])> = Vec::new();
    if let Some(c) = stages.iter().find_map(|s| s.evaluated.change.as_ref()) {
        columns.push((format!("{} (before)", c.from), &c.evaluation.samples));
    }
    for s in stages {
        if let Some(e) = &s.evaluated.evaluation {
            columns.push((s.name.clone(), &e.samples));
        }
    }
    let prompts: Vec<&String> = columns
        .iter()
        .flat_map(|(_, s)| s.iter().map(|(p, _)| p))
        .fold(Vec::new(), |mut acc, p| {
            if !acc.contains(&p) {
                acc.push(p);
            }
            acc
        });
    out.push_str("<section id=\"samples\"><h2>Samples (greedy)</h2>");
    if prompts.is_empty() {
        out.push_str("<p class=\"note\">No eval stage lists `prompts`.</p></section>\n");
        return;
    }
    out.push_str("<table><tr><th>prompt</th>");
    for (name, _) in &columns {
        let _ = write!(out, "<th>{}</th>", escape(name));
    }
    out.push_str("</tr>");
    for prompt in prompts {
        let _ = write!(out, "<tr><td><code>{}</code></td>", escape(prompt));
        for (_, samples) in &columns {
            let cell = samples
                .iter()
                .find(|(p, _)| p == prompt)
                .map_or("—".to_string(), |(_, c)| c.clone());
            let _ = write!(out, "<td><code>{}</code></td>", escape(&cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></section>\n");
}

/// An SVG file's text without its XML declaration, to inline in HTML.
fn strip_prolog(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}
