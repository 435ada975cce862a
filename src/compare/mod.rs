//! Comparing the stages of a run: the SFT stage and the two ways of doing DPO
//! ("scheme one" continues the SFT adapter, "scheme two" merges it into the base and
//! trains a fresh adapter). Produces SVG charts, a markdown report, a terminal table
//! and JSON, all from `StageSummary` values, which `collect` gathers from the cache;
//! `report` writes them down (and says what a finished run prints).

pub mod bootstrap;
mod chart;
mod collect;
mod error;
pub mod evaluation;
pub mod forest;
pub mod format;
mod html;
mod json;
mod markdown;
pub mod report;
pub mod select;
mod summary;
mod table;
mod text;

pub use chart::{
    dpo_chart, loss_chart, moving_average, smoothing_window, stage_colour_hex, DPO_CHART_TITLE,
    LOSS_CHART_TITLE,
};
pub use collect::{collect, leaf_training_stages, report_dir, training_stages};
pub use error::CompareError;
pub use format::{human_bytes, human_duration, MISSING};
pub use html::html_report;
pub use json::{compare_json, compare_schema, json, CompareJson};
pub use markdown::markdown_report;
pub use summary::{is_eval_row, Point, StageSummary};
pub use table::{ComparisonTable, TableRow};
pub use text::text_table;
