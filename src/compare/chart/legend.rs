//! The legend, drawn in its own strip above the panels so it never covers data.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::marker::draw_marker;
use super::style::{
    stage_colour, stage_marker, text_style, LEGEND_ROW_HEIGHT, LEGEND_SIZE, NOTE_COLOUR, NOTE_SIZE,
    SMOOTHED_STROKE,
};
use crate::compare::summary::StageSummary;

#[derive(Clone, Debug)]
pub struct LegendEntry {
    pub stage_index: usize,
    pub text: String,
}

/// Left edge of the legend, lined up with the panels' y axis.
const LEGEND_LEFT: i32 = 96;
const SAMPLE_WIDTH: i32 = 44;

/// Height the legend strip needs for `entries` plus the reading note.
pub fn legend_height(entries: usize) -> u32 {
    (entries as u32 + 1) * LEGEND_ROW_HEIGHT + 8
}

/// One row per entry: a line sample with the stage's marker, then its text; the
/// last row says how to read lines and markers.
pub fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[LegendEntry],
    note: &str,
) -> anyhow::Result<()> {
    let row = LEGEND_ROW_HEIGHT as i32;
    for (i, entry) in entries.iter().enumerate() {
        let y = row / 2 + i as i32 * row;
        let colour = stage_colour(entry.stage_index);
        // A filled rectangle rather than a polyline: polylines are reserved for data.
        let half = (SMOOTHED_STROKE as i32 + 1) / 2;
        area.draw(&Rectangle::new(
            [
                (LEGEND_LEFT, y - half),
                (LEGEND_LEFT + SAMPLE_WIDTH, y + half),
            ],
            colour.filled(),
        ))?;
        draw_marker(
            area,
            (LEGEND_LEFT + SAMPLE_WIDTH / 2, y),
            stage_marker(entry.stage_index),
            colour,
        )?;
        let style = text_style(LEGEND_SIZE).pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(
            entry.text.clone(),
            (LEGEND_LEFT + SAMPLE_WIDTH + 12, y),
            style,
        ))?;
    }
    let y = row / 2 + entries.len() as i32 * row;
    let style = text_style(NOTE_SIZE)
        .color(&NOTE_COLOUR)
        .pos(Pos::new(HPos::Left, VPos::Center));
    area.draw(&Text::new(note.to_string(), (LEGEND_LEFT, y), style))?;
    Ok(())
}

/// One legend entry per stage that `keep` accepts, in `stages` order.
pub fn legend_for(
    stages: &[StageSummary],
    keep: impl Fn(&StageSummary) -> bool,
) -> Vec<LegendEntry> {
    stages
        .iter()
        .enumerate()
        .filter(|(_, s)| keep(s))
        .map(|(stage_index, s)| LegendEntry {
            stage_index,
            text: s.display_name(),
        })
        .collect()
}
