//! The CPU kernels under the layers: custom candle ops whose backward
//! computes only the gradients training needs (`ops`, `fused_attention`,
//! `fused_linear`, `quantized`, with FP8 blocks in `fp8`), activation checkpointing (`recompute`),
//! attention in tiles of queries wherever the fused one does not run
//! (`tiled_attention`) and the head's token log-probs without their logits
//! kept (`head_logprobs`),
//! seeded randomness (`rng`), and what they share: one numeric trait and
//! one dtype dispatch (`float`), storage access, threads and products
//! (`cpu`). Elsewhere than on the CPU each op falls back to a composition
//! of candle ops.

pub mod cpu;
pub mod float;
pub mod fp8;
pub mod fused_attention;
pub mod fused_linear;
pub mod head_logprobs;
pub mod ops;
pub mod quantized;
pub mod recompute;
pub mod rng;
pub mod tiled_attention;
