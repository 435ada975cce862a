//! The SVG charts of a comparison: `loss` (training loss per objective) and
//! `dpo` (reward margin and accuracy of the DPO stages). Both lay out panels on a
//! `canvas`, with a `legend` strip above; `panel` draws one plot, `style` holds
//! colours, fonts and ranges, `marker` the eval markers and `smoothing` the
//! moving average behind the thick lines.

mod canvas;
mod dpo;
mod legend;
mod loss;
mod marker;
mod panel;
mod smoothing;
mod style;

pub use dpo::{dpo_chart, DPO_CHART_TITLE};
pub use loss::{loss_chart, LOSS_CHART_TITLE};
pub use smoothing::{moving_average, smoothing_window};
pub use style::stage_colour_hex;
