//! Lays out a whole chart file: title, legend strip, then panels stacked vertically.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::legend::{draw_legend, legend_height, LegendEntry};
use super::panel::{draw_panel, Panel};
use super::style::{
    bold_text_style, step_range, CHART_WIDTH, PANEL_HEIGHT, TITLE_HEIGHT, TITLE_SIZE,
};

pub struct ChartLayout {
    pub title: String,
    pub legend: Vec<LegendEntry>,
    /// How to read the chart (smoothing, markers), shown under the legend.
    pub note: String,
    pub panels: Vec<Panel>,
    /// One x range for all panels (same metric family, comparable steps) or one each.
    pub shared_x: bool,
}

/// Renders the layout to SVG text.
pub fn render_svg(layout: &ChartLayout) -> anyhow::Result<String> {
    let panels = layout.panels.len().max(1) as u32;
    let legend = legend_height(layout.legend.len());
    let height = TITLE_HEIGHT + legend + panels * PANEL_HEIGHT;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (title_area, rest) = root.split_vertically(TITLE_HEIGHT);
        let (legend_area, panels_area) = rest.split_vertically(legend);

        let title_style = bold_text_style(TITLE_SIZE).pos(Pos::new(HPos::Center, VPos::Center));
        title_area.draw(&Text::new(
            layout.title.clone(),
            (CHART_WIDTH as i32 / 2, TITLE_HEIGHT as i32 / 2 + 4),
            title_style,
        ))?;
        draw_legend(&legend_area, &layout.legend, &layout.note)?;

        let shared = step_range(layout.panels.iter().flat_map(Panel::steps));
        let areas = panels_area.split_evenly((layout.panels.len().max(1), 1));
        for (panel, area) in layout.panels.iter().zip(areas.iter()) {
            let x_range = if layout.shared_x {
                shared.clone()
            } else {
                panel.x_range()
            };
            draw_panel(area, panel, x_range)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Renders and writes the chart, creating the parent folder if needed.
pub fn write_svg(layout: &ChartLayout, path: &Path) -> anyhow::Result<()> {
    let svg = render_svg(layout).with_context(|| format!("drawing chart {:?}", layout.title))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}
