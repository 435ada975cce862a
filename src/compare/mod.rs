//! Comparing the stages of a run: the SFT stage and the two ways of doing DPO
//! ("scheme one" continues the SFT adapter, "scheme two" merges it into the base and
//! trains a fresh adapter). Produces SVG charts, a markdown report, a terminal table
//! and JSON, all from `StageSummary` values.

mod chart_canvas;
mod chart_legend;
mod chart_marker;
mod chart_panel;
mod chart_style;
mod dpo_chart;
pub mod format;
mod json;
mod loss_chart;
mod markdown;
mod smoothing;
mod stage;
mod table;
mod text;

pub use chart_style::stage_colour_hex;
pub use dpo_chart::{dpo_chart, DPO_CHART_TITLE};
pub use format::{human_bytes, human_duration, MISSING};
pub use json::json;
pub use loss_chart::{loss_chart, LOSS_CHART_TITLE};
pub use markdown::markdown_report;
pub use smoothing::{moving_average, smoothing_window};
pub use stage::{is_eval_row, Point, StageKind, StageSummary, UnknownStageKind};
pub use table::{ComparisonTable, TableRow};
pub use text::text_table;
