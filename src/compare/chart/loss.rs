//! Training loss per step, one line per stage.
//!
//! SFT cross-entropy (~7 → ~1) and the DPO sigmoid loss (~0.69 → ~0.5) differ by an
//! order of magnitude, so on shared axes the DPO curves would be flat lines at the
//! bottom. One file holds one panel per objective instead (SFT above DPO), each with
//! its own y and step ranges; the two DPO schemes share a panel, which is the
//! comparison that matters.

use std::path::Path;

use super::canvas::{write_svg, ChartLayout};
use super::legend::legend_for;
use super::panel::{Panel, PanelSeries};
use crate::compare::summary::StageSummary;
use crate::stage::Objective;

pub const LOSS_CHART_TITLE: &str = "Training loss per step";

/// Writes the loss chart as SVG to `path`. Stages keep the colour of their index in
/// `stages`; pass the same slice to `dpo_chart` so colours match.
pub fn loss_chart(stages: &[StageSummary], path: impl AsRef<Path>) -> anyhow::Result<()> {
    write_svg(&loss_chart_layout(stages), path.as_ref())
}

pub fn loss_chart_layout(stages: &[StageSummary]) -> ChartLayout {
    let mut panels = Vec::new();
    for objective in [Objective::Sft, Objective::Dpo] {
        let series: Vec<PanelSeries> = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.objective == objective)
            .map(|(stage_index, s)| PanelSeries {
                stage_index,
                training: s.training_points("loss"),
                eval: s.eval_points("eval/loss"),
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let (caption, y_label) = match objective {
            Objective::Sft => ("SFT: cross-entropy loss", "loss (cross-entropy)"),
            Objective::Dpo => ("DPO: preference loss", "loss (DPO)"),
        };
        panels.push(Panel {
            caption: caption.to_string(),
            y_label: y_label.to_string(),
            series,
            y_range: None,
            include_zero: false,
        });
    }
    if panels.is_empty() {
        panels.push(Panel {
            caption: "no stages".to_string(),
            y_label: "loss".to_string(),
            series: Vec::new(),
            y_range: None,
            include_zero: false,
        });
    }
    ChartLayout {
        title: LOSS_CHART_TITLE.to_string(),
        legend: legend_for(stages, |_| true),
        note: "Thick line: centred moving average over ~5% of steps; faint line: raw per-step \
               loss; markers: held-out eval loss."
            .to_string(),
        panels,
        shared_x: false,
    }
}
