//! lora-runner: declarative, cached, resumable two-stage LoRA fine-tuning.
//!
//! The engine is a set of libraries the `runner` binary drives: `recipe`
//! (parsing with spans), `graph` (the typed DAG), `plan` (keys and reasons),
//! `cache` (content-addressed artifacts), `exec` (running stages), and the
//! stage kinds in `kinds`.

pub mod cache;
pub mod cli;
pub mod compare;
pub mod data;
pub mod device;
pub mod exec;
pub mod fsutil;
pub mod gc;
pub mod graph;
pub mod hashing;
pub mod kinds;
pub mod model;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod schema;
pub mod stage;
pub mod train;
pub mod units;
