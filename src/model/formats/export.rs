//! Export helpers the engine calls at the end of a stage.

use crate::model::decoder::Decoder;
use crate::model::error::Result;
use crate::model::formats::peft::save_adapter;
use crate::model::merge::{merge_lora, save_model_folder};
use std::path::Path;

/// Writes the decoder's adapter as a PEFT folder (adapter_config.json +
/// adapter_model.safetensors) into `dir`.
pub fn export_adapter(decoder: &Decoder, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    save_adapter(decoder, dir, base_model_name_or_path)
}

/// Merges the adapter (if any) and writes a complete HF model folder
/// (config.json, weights, tokenizer files copied from `base_dir`) into `dir`.
pub fn export_merged_model(
    decoder: &Decoder,
    base_dir: &Path,
    dir: &Path,
    max_shard_bytes: u64,
) -> Result<()> {
    let merged = merge_lora(decoder)?;
    save_model_folder(&merged, dir, Some(base_dir), max_shard_bytes)
}
