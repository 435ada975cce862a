//! lora-runner: declarative, cached, resumable two-stage LoRA fine-tuning.
//!
//! Three layers, each importing only from the layers below it:
//! 1. `cli`: parses the command line, calls one entry point per command (a
//!    file each), renders errors with their exit codes.
//! 2. The stage kinds (`kinds`), the comparison (`compare`) and the device
//!    choice (`device`): they turn a stage's parameters into work for the
//!    libraries below.
//! 3. The engine (`recipe`, `stage`, `graph`, `plan`, `executor`, `cache`,
//!    `hashing`, `gc`, `progress`, `schema`) and, beside it, the ML
//!    libraries (`model`, `data`, `train`, `metrics`), which know nothing of recipes,
//!    stages or the cache. Leaves every layer may use: `diag` (problems with
//!    spans), `fsutil` (atomic writes, folder sizes), `sink` (progress and
//!    Ctrl-C), `units` (byte sizes for people).
//!
//! `tests/engine/layering.rs` keeps it that way.

pub mod alloc_guard;
pub mod cache;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
pub mod diag;
pub mod executor;
pub mod fsutil;
pub mod gc;
pub mod graph;
pub mod hashing;
pub mod kinds;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod remote;
pub mod schema;
pub mod sharing;
pub mod sink;
pub mod stage;
pub mod tracking;
pub mod train;
pub mod units;
