//! Evaluation metrics on a trained model: task skill on rows with a known
//! completion (`task`), how far two models' predictions are apart
//! (`divergence`), and completions of listed prompts for a person to read
//! (`samples`). A library beside `train`: it takes models, examples and
//! plain settings.

pub mod divergence;
pub mod samples;
pub mod task;
