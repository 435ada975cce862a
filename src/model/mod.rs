//! The model side of lora-runner: a trainable decoder for the Llama,
//! Mistral, Qwen2/3, Gemma 2/3, OLMo 2 and SmolLM3 families with LoRA, and
//! what reads, writes, builds and sizes it. A library: it takes paths and plain values.
//!
//! - `family` declares what differs between model families; `config` reads
//!   an HF config.json into one `ModelConfig` as transformers reads it;
//!   `rope` computes each rope type's frequencies.
//! - `decoder::Decoder` is the model: `Decoder::load` reads an HF folder,
//!   `apply_lora` or `formats::peft::load_adapter` attach adapters,
//!   `forward` runs a padded or packed batch (`Input`) in a `Mode` at the
//!   rows a loss reads (`Rows`), `token_logprobs` scores them, and
//!   `backward` returns the LoRA gradients (merging those that
//!   checkpointed layers recompute). `generate` decodes with a KV cache.
//! - `layers/`: the decoder's blocks (attention, MLP, projections, LoRA).
//! - `kernels/`: the CPU kernels under them, with one numeric trait and one
//!   dtype dispatch (`kernels::float`), and activation checkpointing.
//! - `formats/`: HF weights, PEFT adapters, exports, tokenizer files.
//! - `init` writes seeded models for tests and demos, `merge` folds
//!   adapters into the weights, `memory` estimates a run's peak.
//!
//! Backward walks candle's graph recursively: call it on a thread with a
//! 64 MiB stack.

pub mod config;
pub mod decoder;
pub mod error;
pub mod family;
pub mod formats;
pub mod generate;
pub mod init;
pub mod kernels;
pub mod layers;
pub mod memory;
pub mod merge;
pub mod mode;
pub mod rope;

pub use config::{linear_module_names, Architecture, ModelConfig};
pub use decoder::{Decoder, Input, LoadOptions, Rows};
pub use error::{ModelError, Result};
pub use layers::lora::{LoraConfig, TargetModules};
pub use mode::Mode;
