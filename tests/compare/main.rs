//! `runner compare`'s rendering: tables, JSON, markdown and SVG charts.
//!
//! One test binary for the whole comparison, so candle is linked once rather
//! than once per file.

mod bootstrap;
mod charts;
mod fixtures;
mod format;
mod series;
mod svg_check;
mod tables;
