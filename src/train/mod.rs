//! Training: the optimizer, schedules, losses, checkpoints and the loop
//! shared by the `sft` and `dpo` stages.

pub mod adamw;
pub mod checkpoint;
pub mod dpo;
pub mod dpo_loss;
pub mod inputs;
pub mod order;
pub mod samples;
pub mod scaler;
pub mod schedule;
pub mod sft;
pub mod trainer;
pub use trainer::with_big_stack;
