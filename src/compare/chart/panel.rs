//! One panel: axes, grid, a smoothed line per stage with its raw values faint
//! behind it, and held-out eval values as markers.

use std::ops::Range;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::marker::draw_marker;
use super::smoothing::{moving_average, smoothing_window};
use super::style::{
    padded_range, stage_colour, stage_marker, step_range, text_style, tick_decimals,
    AXIS_DESC_SIZE, GRID_BOLD, GRID_LIGHT, PANEL_CAPTION_SIZE, RAW_OPACITY, SMOOTHED_STROKE,
    TICK_LABEL_SIZE,
};
use crate::compare::summary::Point;

/// One stage's data in one panel.
#[derive(Clone, Debug)]
pub struct PanelSeries {
    /// Index of the stage in the caller's `stages` slice; picks colour and marker.
    pub stage_index: usize,
    /// Per-step training values, sorted by step.
    pub training: Vec<Point>,
    /// Held-out eval values, sorted by step.
    pub eval: Vec<Point>,
}

#[derive(Clone, Debug)]
pub struct Panel {
    pub caption: String,
    pub y_label: String,
    pub series: Vec<PanelSeries>,
    /// Fixed y range (e.g. accuracy 0..1); None fits the data.
    pub y_range: Option<Range<f64>>,
    /// Keep 0 visible (margins: the sign matters).
    pub include_zero: bool,
}

pub const X_LABEL: &str = "optimizer step";

impl Panel {
    fn all_points(&self) -> impl Iterator<Item = &Point> {
        self.series
            .iter()
            .flat_map(|s| s.training.iter().chain(s.eval.iter()))
    }

    /// Every step that has a value in this panel.
    pub fn steps(&self) -> Vec<f64> {
        self.all_points().map(|p| p.0).collect()
    }

    /// Steps spanned by this panel's data (padded).
    pub fn x_range(&self) -> Range<f64> {
        step_range(self.steps())
    }

    fn fitted_y_range(&self) -> Range<f64> {
        match &self.y_range {
            Some(range) => range.clone(),
            None => padded_range(self.all_points().map(|p| p.1), 0.06, self.include_zero),
        }
    }

    fn is_empty(&self) -> bool {
        self.all_points().next().is_none()
    }
}

/// A tick label with `decimals` places; never "-0.0" for a tick at zero.
fn tick_label(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    match text.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => text,
    }
}

/// Draws `panel` filling `area`, over the given x range.
pub fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    x_range: Range<f64>,
) -> anyhow::Result<()> {
    let y_range = panel.fitted_y_range();
    let y_decimals = tick_decimals(&y_range);
    // Few steps would otherwise give repeated integer tick labels.
    let x_ticks = ((x_range.end - x_range.start).ceil() as usize).clamp(2, 10);

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.caption, text_style(PANEL_CAPTION_SIZE))
        .margin(12)
        .margin_right(30)
        .x_label_area_size(56)
        .y_label_area_size(84)
        .build_cartesian_2d(x_range.clone(), y_range.clone())?;

    let x_formatter = |v: &f64| format!("{v:.0}");
    let y_formatter = |v: &f64| tick_label(*v, y_decimals);
    chart
        .configure_mesh()
        .x_desc(X_LABEL)
        .y_desc(&panel.y_label)
        .axis_desc_style(text_style(AXIS_DESC_SIZE))
        .label_style(text_style(TICK_LABEL_SIZE))
        .x_labels(x_ticks)
        .y_labels(8)
        .x_label_formatter(&x_formatter)
        .y_label_formatter(&y_formatter)
        // One light line between labelled ones: plotters' default is a dense mesh.
        .max_light_lines(1)
        .light_line_style(GRID_LIGHT)
        .bold_line_style(GRID_BOLD)
        .draw()?;

    for series in &panel.series {
        let colour = stage_colour(series.stage_index);
        let window = smoothing_window(series.training.len());
        if window > 1 {
            chart.draw_series(LineSeries::new(
                series.training.iter().copied(),
                colour.mix(RAW_OPACITY).stroke_width(1),
            ))?;
        }
        if !series.training.is_empty() {
            chart.draw_series(LineSeries::new(
                moving_average(&series.training, window),
                colour.stroke_width(SMOOTHED_STROKE),
            ))?;
        }
        // A lone training point is an invisible line; give it a dot.
        if let [only] = series.training.as_slice() {
            chart.draw_series(std::iter::once(Circle::new(*only, 4, colour.filled())))?;
        }
    }
    // Markers after every line, so no stage's line hides another's eval points;
    // in reverse so the first stage's (smaller-footprint) markers end up on top.
    let plot = chart.plotting_area();
    for series in panel.series.iter().rev() {
        let colour = stage_colour(series.stage_index);
        for &point in &series.eval {
            draw_marker(plot, point, stage_marker(series.stage_index), colour)?;
        }
    }

    if panel.is_empty() {
        let centre = (
            (x_range.start + x_range.end) / 2.0,
            (y_range.start + y_range.end) / 2.0,
        );
        let style = text_style(AXIS_DESC_SIZE).pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .plotting_area()
            .draw(&Text::new("no data", centre, style))?;
    }
    Ok(())
}
