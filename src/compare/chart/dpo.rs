//! DPO reward margin and accuracy per step for the DPO stages: two panels in one
//! file, sharing the step axis so the schemes line up vertically.

use std::path::Path;

use super::canvas::{write_svg, ChartLayout};
use super::legend::legend_for;
use super::panel::{Panel, PanelSeries};
use crate::compare::summary::StageSummary;
use crate::stage::Objective;

pub const DPO_CHART_TITLE: &str = "DPO rewards per step";

/// Writes the DPO chart as SVG to `path`; non-DPO stages are skipped (but keep
/// their index, so colours match `loss_chart` for the same slice).
pub fn dpo_chart(stages: &[StageSummary], path: impl AsRef<Path>) -> anyhow::Result<()> {
    write_svg(&dpo_chart_layout(stages), path.as_ref())
}

pub fn dpo_chart_layout(stages: &[StageSummary]) -> ChartLayout {
    let series_for = |train_key: &str, eval_key: &str| -> Vec<PanelSeries> {
        stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.objective == Objective::Dpo)
            .map(|(stage_index, s)| PanelSeries {
                stage_index,
                training: s.training_points(train_key),
                eval: s.eval_points(eval_key),
            })
            .collect()
    };
    let margins = Panel {
        caption: "Reward margin (chosen − rejected)".to_string(),
        y_label: "rewards/margins".to_string(),
        series: series_for("rewards/margins", "eval/rewards/margins"),
        y_range: None,
        include_zero: true,
    };
    let accuracies = Panel {
        caption: "Reward accuracy (share of pairs ranked correctly)".to_string(),
        y_label: "rewards/accuracies".to_string(),
        series: series_for("rewards/accuracies", "eval/rewards/accuracies"),
        // Accuracy is a share: fixed axes make the schemes comparable at a glance.
        y_range: Some(-0.04..1.04),
        include_zero: true,
    };
    ChartLayout {
        title: DPO_CHART_TITLE.to_string(),
        legend: legend_for(stages, |s| s.objective == Objective::Dpo),
        note: "Thick line: centred moving average over ~5% of steps; faint line: raw per-step \
               value; markers: held-out eval."
            .to_string(),
        panels: vec![margins, accuracies],
        shared_x: true,
    }
}
