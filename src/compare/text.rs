//! The comparison table for a terminal: aligned plain-text columns, no colour.

use crate::compare::summary::StageSummary;
use crate::compare::table::{ComparisonTable, METRIC_COLUMN};

/// Columns are padded to their widest cell (counted in characters, so "—" is one).
pub fn text_table(stages: &[StageSummary]) -> String {
    if stages.is_empty() {
        return "No stages to compare.\n".to_string();
    }
    let table = ComparisonTable::build(stages);
    let mut lines: Vec<Vec<String>> = Vec::with_capacity(table.rows.len() + 1);
    lines.push(
        std::iter::once(METRIC_COLUMN.to_string())
            .chain(table.stage_names.iter().map(|n| single_line(n)))
            .collect(),
    );
    for row in &table.rows {
        lines.push(
            std::iter::once(row.label.to_string())
                .chain(row.cells.iter().map(|c| single_line(c)))
                .collect(),
        );
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            lines
                .iter()
                .map(|line| line[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();

    let mut out = String::new();
    for (index, line) in lines.iter().enumerate() {
        out.push_str(&render_line(line, &widths));
        if index == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            out.push_str(&render_line(&rule, &widths));
        }
    }
    out
}

fn render_line(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .map(|(cell, &width)| {
            let pad = width.saturating_sub(cell.chars().count());
            format!("{cell}{}", " ".repeat(pad))
        })
        .collect();
    // Two spaces between columns; no trailing whitespace.
    format!("{}\n", padded.join("  ").trim_end())
}

/// Tabs and newlines would break the alignment.
fn single_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
