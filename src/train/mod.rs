//! Training: the optimizer, schedules, losses and checkpoints shared by the
//! `sft` and `dpo` stages.

pub mod adamw;
pub mod dpo_loss;
pub mod schedule;
