//! The decoder's building blocks, laid out like candle-transformers'
//! `qwen2.rs`: a `layer` is `attention` then `mlp` between RMSNorms, every
//! projection a `linear` that may carry a `lora` adapter.

pub mod attention;
pub mod layer;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod norm;
