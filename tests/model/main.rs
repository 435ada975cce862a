//! The model tests as one binary (each test binary links candle, which is
//! slow to link): forward against candle-transformers, generation, init and
//! tokenizers, loading errors, LoRA gradients, DoRA, merge, custom ops, PEFT format.

mod checkpointing;
mod dora;
mod families;
mod forward_reference;
mod fp8;
mod fused_attention;
mod fused_linear;
mod generate;
mod gguf;
mod gguf_export;
mod head_logprobs;
mod init_and_tokenizer;
mod loading_errors;
mod lora_gradients;
mod memory;
mod merge;
mod ops_backward;
mod packing;
mod peft_format;
mod quantized;
#[path = "../support/mod.rs"]
mod support;
