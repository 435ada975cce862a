//! Colours, markers, fonts and axis ranges shared by every chart.

use std::ops::Range;

use plotters::style::{FontDesc, FontFamily, FontStyle, RGBColor, TextStyle};

/// Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0x00, 0x72, 0xB2), // blue
    RGBColor(0xD5, 0x5E, 0x00), // vermilion
    RGBColor(0x00, 0x9E, 0x73), // bluish green
    RGBColor(0xCC, 0x79, 0xA7), // reddish purple
    RGBColor(0xE6, 0x9F, 0x00), // orange
    RGBColor(0x56, 0xB4, 0xE9), // sky blue
    RGBColor(0x00, 0x00, 0x00), // black
];

/// A stage's colour follows its index in the `stages` slice, so the same stage has
/// the same colour in every chart drawn from that slice.
pub fn stage_colour(stage_index: usize) -> RGBColor {
    PALETTE[stage_index % PALETTE.len()]
}

/// Eval markers differ in shape as well as colour, for grey-scale prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerShape {
    Circle,
    Triangle,
    Square,
    Cross,
}

pub fn stage_marker(stage_index: usize) -> MarkerShape {
    const SHAPES: [MarkerShape; 4] = [
        MarkerShape::Circle,
        MarkerShape::Triangle,
        MarkerShape::Square,
        MarkerShape::Cross,
    ];
    SHAPES[stage_index % SHAPES.len()]
}

pub const TEXT_COLOUR: RGBColor = RGBColor(0x20, 0x20, 0x20);
pub const NOTE_COLOUR: RGBColor = RGBColor(0x55, 0x55, 0x55);
pub const GRID_LIGHT: RGBColor = RGBColor(0xEE, 0xEE, 0xEE);
pub const GRID_BOLD: RGBColor = RGBColor(0xD0, 0xD0, 0xD0);

// plotters writes font-size = size / 1.24 into the SVG; the comments give the result.
pub const TITLE_SIZE: f64 = 30.0; // ~24 px
pub const PANEL_CAPTION_SIZE: f64 = 24.0; // ~19 px
pub const AXIS_DESC_SIZE: f64 = 20.0; // ~16 px
pub const TICK_LABEL_SIZE: f64 = 18.0; // ~14.5 px
pub const LEGEND_SIZE: f64 = 20.0; // ~16 px
pub const NOTE_SIZE: f64 = 17.0; // ~13.7 px

/// Raw per-step values are drawn this faint behind the smoothed line.
pub const RAW_OPACITY: f64 = 0.25;
pub const SMOOTHED_STROKE: u32 = 2;
pub const MARKER_SIZE: i32 = 6;

pub const CHART_WIDTH: u32 = 1000;
pub const PANEL_HEIGHT: u32 = 380;
pub const TITLE_HEIGHT: u32 = 48;
pub const LEGEND_ROW_HEIGHT: u32 = 26;

pub fn text_style(size: f64) -> TextStyle<'static> {
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal).color(&TEXT_COLOUR)
}

pub fn bold_text_style(size: f64) -> TextStyle<'static> {
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Bold).color(&TEXT_COLOUR)
}

/// The smallest range holding every finite value, padded by `pad` of its span on
/// each side. A single value gets a span around it; no values give 0..1.
pub fn padded_range(
    values: impl IntoIterator<Item = f64>,
    pad: f64,
    include_zero: bool,
) -> Range<f64> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.into_iter().filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        // A flat series: give it room so it sits mid-panel instead of on an axis.
        let half = (lo.abs() * 0.1).max(0.5);
        return (lo - half)..(hi + half);
    }
    let margin = (hi - lo) * pad;
    (lo - margin)..(hi + margin)
}

/// Like `padded_range` but for step counts: never starts below 0 when the data doesn't.
pub fn step_range(steps: impl IntoIterator<Item = f64>) -> Range<f64> {
    let steps: Vec<f64> = steps.into_iter().filter(|v| v.is_finite()).collect();
    let non_negative = steps.iter().all(|&s| s >= 0.0);
    let range = padded_range(steps, 0.02, false);
    if non_negative {
        range.start.max(0.0)..range.end
    } else {
        range
    }
}

/// Enough decimals to tell ticks apart (about eight ticks per axis), at most four.
pub fn tick_decimals(range: &Range<f64>) -> usize {
    let tick = (range.end - range.start).abs() / 8.0;
    if !tick.is_finite() || tick <= 0.0 {
        return 2;
    }
    (-tick.log10()).ceil().clamp(0.0, 4.0) as usize
}

/// The stage's colour as SVG writes it ("#0072B2"), for documents and tests.
pub fn stage_colour_hex(stage_index: usize) -> String {
    let RGBColor(r, g, b) = stage_colour(stage_index);
    format!("#{r:02X}{g:02X}{b:02X}")
}
