//! The comparison as a markdown document: table first, then the charts.

use std::fmt::Write;

use crate::compare::summary::StageSummary;
use crate::compare::table::{ComparisonTable, METRIC_COLUMN};

/// `charts` are (title, path relative to the markdown file) pairs, embedded
/// in order; `verdict` (plain text lines) goes first, with its forest plot
/// (`verdict_chart`, a path relative to the file) under it.
pub fn markdown_report(
    stages: &[StageSummary],
    charts: &[(String, String)],
    verdict: &str,
    verdict_chart: Option<&str>,
) -> String {
    let table = ComparisonTable::build(stages);
    let mut out = String::new();
    if !verdict.is_empty() {
        out.push_str("## Verdict\n\n");
        for line in verdict.lines() {
            let _ = writeln!(out, "- {}", line.trim());
        }
        out.push('\n');
        if let Some(path) = verdict_chart {
            let _ = writeln!(out, "![Paired differences with 95% intervals]({path})\n");
        }
    }
    out.push_str("## Comparison\n\n");
    if stages.is_empty() {
        out.push_str("No stages to compare.\n");
    } else {
        out.push_str(&markdown_table(&table));
    }
    for (title, path) in charts {
        // writeln! into a String cannot fail.
        let _ = write!(
            out,
            "\n### {}\n\n![{}]({})\n",
            one_line(title),
            escape_alt(title),
            path.replace(' ', "%20")
        );
    }
    out
}

fn markdown_table(table: &ComparisonTable) -> String {
    let mut out = String::new();
    let header: Vec<String> = std::iter::once(METRIC_COLUMN.to_string())
        .chain(table.stage_names.iter().map(|n| escape_cell(n)))
        .collect();
    push_row(&mut out, &header);
    let rule: Vec<String> = vec!["---".to_string(); header.len()];
    push_row(&mut out, &rule);
    for row in &table.rows {
        let cells: Vec<String> = std::iter::once(row.label.to_string())
            .chain(row.cells.iter().map(|c| escape_cell(c)))
            .collect();
        push_row(&mut out, &cells);
    }
    out
}

fn push_row(out: &mut String, cells: &[String]) {
    out.push_str("| ");
    out.push_str(&cells.join(" | "));
    out.push_str(" |\n");
}

/// A pipe would end the cell and a newline the row.
fn escape_cell(text: &str) -> String {
    one_line(text).replace('|', "\\|")
}

fn escape_alt(text: &str) -> String {
    one_line(text).replace('[', "(").replace(']', ")")
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
