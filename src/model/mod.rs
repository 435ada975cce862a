//! The model side of lora-runner: config parsing, a trainable decoder for
//! Llama / Mistral / Qwen2, custom ops with cheap backward, LoRA, the PEFT
//! adapter format, seeded `init` models and tokenizers, merging and export.
//!
//! Typical use by the engine:
//! - `init::init_model(&spec, dir)` writes a seeded HF folder;
//! - `decoder::Decoder::load(dir, &LoadOptions)` loads any HF folder;
//! - `decoder.apply_lora(&lora_config, seed)` or `peft::load_adapter(&mut decoder, dir)`;
//! - `decoder.forward_hidden(ids, mask, Mode::Train { dropout_seed })` then
//!   `decoder.token_logprobs(&hidden, &targets)` for a loss;
//!   `decoder.lora_parameters()` gives the Vars by PEFT tensor name;
//! - `export::export_adapter` / `export::export_merged_model` at the end.
//!
//! Backward walks candle's graph recursively: call it on a thread with a
//! 64 MiB stack.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod error;
pub mod export;
pub mod fused_attention;
pub mod fused_linear;
pub mod generate;
pub mod init;
pub mod io;
pub mod kernel;
pub mod layer;
pub mod linear;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod mlp;
pub mod names;
pub mod ops;
pub mod peft;
pub mod quantized;
pub mod recompute;
pub mod rng;
pub mod tokenizer;
pub mod weights;

pub use config::{linear_module_names, Architecture, ModelConfig};
pub use decoder::{Decoder, LoadOptions, Mode};
pub use error::{ModelError, Result};
pub use lora::{LoraConfig, TargetModules};
