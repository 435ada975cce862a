//! Training: the optimizer, schedules, losses, checkpoints and the loop
//! shared by the `sft` and `dpo` stages (evaluation metrics are in
//! `metrics`). A library: it takes plain values
//! (paths, settings, a progress sink, an interrupt flag) and knows nothing
//! of recipes, stages or the cache.

pub mod adamw;
pub mod checkpoint;
pub mod dpo;
pub mod order;
pub mod preference_loss;
pub mod scaler;
pub mod schedule;
pub mod sft;
pub mod shards;
pub mod trainer;
pub use trainer::with_big_stack;
