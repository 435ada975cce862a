//! Memory-mapped safetensors checkpoints, single-file or sharded with
//! `model.safetensors.index.json`. Lookups name the tensor and the file.

use crate::model::error::{ModelError, Result};
use crate::model::io::read_json;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub struct CheckpointFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// tensor name -> index into `files`
    routing: HashMap<String, usize>,
    /// What to name in "missing tensor" errors: the index or the single file.
    describe: PathBuf,
}

fn open_mmap(path: &Path) -> Result<MmapedSafetensors> {
    if !path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    // SAFETY: the file is mapped read-only; like every mmap user we rely on
    // nobody truncating a checkpoint while it is loaded.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl CheckpointFiles {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::config(&index, "missing \"weight_map\" object"))?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            let mut files = Vec::new();
            let mut routing = HashMap::new();
            let mut shard_names: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shard_names.sort();
            shard_names.dedup();
            for shard in shard_names {
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(ModelError::config(
                        &index,
                        format!("shard name {shard:?} is not a plain file name"),
                    ));
                }
                let path = dir.join(shard);
                shard_ids.insert(shard.to_string(), files.len());
                files.push((path.clone(), open_mmap(&path)?));
            }
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    ModelError::config(
                        &index,
                        format!("weight_map entry for {name} is not a string"),
                    )
                })?;
                routing.insert(name.clone(), shard_ids[shard]);
            }
            Ok(CheckpointFiles {
                files,
                routing,
                describe: index,
            })
        } else {
            let path = dir.join(SINGLE_FILE);
            if !path.exists() {
                let pickled = ["pytorch_model.bin", "pytorch_model.bin.index.json"]
                    .iter()
                    .any(|f| dir.join(f).exists());
                let hint = if pickled {
                    " (only safetensors checkpoints are supported, not pytorch_model.bin)"
                } else {
                    ""
                };
                return Err(ModelError::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}"),
                    ),
                ));
            }
            let st = open_mmap(&path)?;
            let routing = st.tensors().into_iter().map(|(n, _)| (n, 0)).collect();
            Ok(CheckpointFiles {
                files: vec![(path.clone(), st)],
                routing,
                describe: path,
            })
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Dtype of the first floating-point tensor, used when config.json does not say.
    pub fn first_float_dtype(&self) -> Option<DType> {
        for (_, st) in &self.files {
            for (_, view) in st.tensors() {
                if let Ok(dt) = DType::try_from(view.dtype()) {
                    if dt.is_float() {
                        return Some(dt);
                    }
                }
            }
        }
        None
    }

    /// Loads one tensor, checks its shape and converts it to `dtype`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let idx = *self
            .routing
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                tensor: name.to_string(),
                file: self.describe.clone(),
            })?;
        let (path, st) = &self.files[idx];
        let view = st.get(name).map_err(|_| ModelError::MissingTensor {
            tensor: name.to_string(),
            file: path.clone(),
        })?;
        if view.shape() != shape {
            return Err(ModelError::MisshapenTensor {
                tensor: name.to_string(),
                file: path.clone(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let t = view.load(device).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: format!("tensor {name:?}: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// Names in the checkpoint, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routing.keys().cloned().collect();
        v.sort();
        v
    }
}

/// A checkpoint read at one dtype on one device (as candle-nn's VarBuilder):
/// what each module's `load` takes.
pub struct WeightLoader<'a> {
    pub files: &'a CheckpointFiles,
    pub dtype: DType,
    pub device: &'a Device,
}

impl WeightLoader<'_> {
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.files.load(name, shape, self.dtype, self.device)
    }
}

/// Maps a config.json `torch_dtype` string to a candle dtype.
pub fn parse_torch_dtype(s: &str) -> Option<DType> {
    match s.trim_start_matches("torch.") {
        "float32" | "float" => Some(DType::F32),
        "float16" | "half" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}
