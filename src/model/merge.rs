//! Merging LoRA into the base weights (W' = W + s·B·A, computed in f32 and
//! cast once to the base dtype; with DoRA W' = m ∘ (W + s·B·A) / ‖W + s·B·A‖
//! per output row, as PEFT merges it) and saving a model as an HF folder,
//! sharded with an index above a size limit.

use crate::model::decoder::Decoder;
use crate::model::error::{ModelError, Result};
use crate::model::formats::io::{
    read_json, write_file_atomic, write_json_atomic, write_safetensors_atomic,
};
use crate::model::formats::weights::{torch_dtype_name, INDEX_FILE, SINGLE_FILE};
use crate::model::kernels::quantized::FrozenWeight;
use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Files copied next to the weights when present in the source folder.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// A copy of `decoder` with every adapter merged into its base weight and
/// removed. The copy shares the untouched tensors (no memory copy).
pub fn merge_lora(decoder: &Decoder) -> Result<Decoder> {
    let mut merged = decoder.clone();
    for layer in &mut merged.layers {
        for linear in layer.linears_mut() {
            if let Some(lora) = linear.lora.take() {
                // A quantized weight is dequantised: the merged one is dense.
                let w = linear.weight.to_dense(DType::F32)?;
                let w = (&w + lora.delta_weight()?.to_device(w.device())?)?;
                let w = match &lora.dora {
                    None => w,
                    Some(dora) => {
                        let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
                        let m = dora.magnitude.as_tensor().unsqueeze(1)?;
                        w.broadcast_mul(&m.broadcast_div(&norm)?)?
                    }
                };
                linear.weight = FrozenWeight::Dense(w.to_dtype(decoder.dtype)?);
            }
        }
    }
    merged.lora_config = None;
    Ok(merged)
}

/// Saves the base weights of `decoder` (merge first to include an adapter)
/// into `dir` as `model.safetensors`, or as `model-0000i-of-0000N.safetensors`
/// shards plus `model.safetensors.index.json` when they exceed
/// `max_shard_bytes`. config.json comes from `source_dir` when given (with
/// torch_dtype updated), else from the parsed config; tokenizer files are
/// copied from `source_dir`.
pub fn save_model_folder(
    decoder: &Decoder,
    dir: &Path,
    source_dir: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<()> {
    save_folder(decoder, dir, source_dir, max_shard_bytes, None)
}

/// [`save_model_folder`] with the decoder layers' projections written as
/// FP8 codes in transformers' fine-grained layout: `float8_e4m3fn` weights,
/// an f32 `weight_scale_inv` per `block`, and config.json's
/// `quantization_config` saying so (what transformers and vLLM load).
pub fn save_fp8_model_folder(
    decoder: &Decoder,
    dir: &Path,
    source_dir: Option<&Path>,
    max_shard_bytes: u64,
    block: [usize; 2],
) -> Result<()> {
    save_folder(decoder, dir, source_dir, max_shard_bytes, Some(block))
}

fn save_folder(
    decoder: &Decoder,
    dir: &Path,
    source_dir: Option<&Path>,
    max_shard_bytes: u64,
    fp8_block: Option<[usize; 2]>,
) -> Result<()> {
    if decoder.linears().any(|l| l.lora.is_some()) {
        return Err(ModelError::Input(
            "the model still has LoRA adapters; merge_lora it before saving".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors = decoder.base_tensors()?;
    if let Some(block) = fp8_block {
        tensors = fp8_projections(decoder, tensors, block)?;
    }
    // Greedy sharding in checkpoint order.
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if current > 0 && current + bytes > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        total += bytes;
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
    }
    if shards.len() == 1 {
        write_safetensors_atomic(&dir.join(SINGLE_FILE), &shards[0])?;
        // A stale index from an earlier sharded save would take precedence.
        let stale = dir.join(INDEX_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| ModelError::io(&stale, e))?;
        }
    } else {
        let n = shards.len();
        let mut weight_map = Map::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
            write_safetensors_atomic(&dir.join(&file), shard)?;
            for (name, _) in shard {
                weight_map.insert(name.clone(), json!(file));
            }
        }
        write_json_atomic(
            &dir.join(INDEX_FILE),
            &json!({"metadata": {"total_size": total}, "weight_map": Value::Object(weight_map)}),
        )?;
    }
    let mut config = match source_dir
        .map(|s| s.join("config.json"))
        .filter(|p| p.exists())
    {
        Some(p) => read_json(&p)?,
        None => decoder.config.to_json(),
    };
    if let Some(obj) = config.as_object_mut() {
        obj.insert("torch_dtype".into(), json!(torch_dtype_name(decoder.dtype)));
        match fp8_block {
            Some(block) => {
                obj.insert(
                    "quantization_config".into(),
                    json!({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block,
                           "activation_scheme": "dynamic"}),
                );
            }
            // The weights written are dense, whatever the source held.
            None => {
                obj.remove("quantization_config");
            }
        }
    }
    write_json_atomic(&dir.join("config.json"), &config)?;
    if let Some(src) = source_dir {
        copy_tokenizer_files(src, dir)?;
    }
    Ok(())
}

/// `tensors` with each decoder-layer projection weight replaced by its FP8
/// codes and, after it, its `weight_scale_inv`.
fn fp8_projections(
    decoder: &Decoder,
    tensors: Vec<(String, Tensor)>,
    block: [usize; 2],
) -> Result<Vec<(String, Tensor)>> {
    use crate::model::formats::names;
    use crate::model::kernels::fp8::Fp8Weight;
    let projections: std::collections::HashSet<String> =
        decoder.linears().map(|l| names::weight(&l.name)).collect();
    let mut out = Vec::with_capacity(tensors.len() + projections.len());
    for (name, t) in tensors {
        if projections.contains(&name) {
            let fp8 = Fp8Weight::quantize(&t, block, &candle_core::Device::Cpu)?;
            let scale_name = format!("{name}_scale_inv");
            out.push((name, fp8.codes));
            out.push((scale_name, fp8.scale_inv));
        } else {
            out.push((name, t));
        }
    }
    Ok(out)
}

/// Copies tokenizer and generation files that exist in `src` into `dst`.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            write_file_atomic(&dst.join(name), &bytes)?;
        }
    }
    Ok(())
}
