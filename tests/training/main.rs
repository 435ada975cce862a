//! Training and data, one binary: tokenization and its errors, tokenized
//! caches and batches, the DPO reference, and training stages end to end.

#[path = "../support/mod.rs"]
mod support;

mod boundary_merge;
mod data_cache_batch;
mod data_errors;
mod data_tokenize;
mod dora;
mod dpo_gradient;
mod eval_prompts;
mod families;
mod fuzz;
mod generate_cli;
mod gguf_base;
mod memory_check;
mod portable;
mod preference_loss;
mod quantized;
mod real_model;
mod reference;
mod remote;
mod shards;
mod slurm;
mod stages;
mod sweeps;
mod task_metrics;
mod tracking;

/// Entry point of the child processes `Workspace::child` starts.
#[test]
fn child_entry() {
    support::child_entry();
}
