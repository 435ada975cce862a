//! What the model reads and writes on disk: HF checkpoints (`weights`, with
//! the tensor `names`), GGUF files (`gguf`), PEFT adapters (`peft`), merged and adapter exports
//! (`export`), tokenizer files (`tokenizer`), and atomic JSON/safetensors
//! writes (`io`).

pub mod export;
pub mod gguf;
pub mod gguf_out;
pub mod io;
pub mod names;
pub mod peft;
pub mod tokenizer;
pub mod weights;
