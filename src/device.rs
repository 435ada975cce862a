//! Choosing the compute device: `device = "auto" | "cpu" | "cuda:N"` in the
//! recipe or `--device`. Auto takes a GPU when the binary has CUDA and one is
//! present. The device kind enters the keys of stages that compute (results
//! differ between CPU and GPU).

use crate::stage::DeviceSpec;

/// A device that was asked for and cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device cuda:{0} asked for, but this runner was built without CUDA \
         (build it with scripts/build-cuda.sh, or use device = \"cpu\")"
    )]
    NotBuilt(u32),
    #[error("device cuda:{0} asked for, but no CUDA device is present")]
    Absent(u32),
}

/// Resolve `auto` and check that a requested GPU can be used.
pub fn resolve(spec: &DeviceSpec) -> Result<DeviceSpec, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(DeviceSpec::Cpu),
        DeviceSpec::Auto => Ok(if cuda_available() {
            DeviceSpec::Cuda(0)
        } else {
            DeviceSpec::Cpu
        }),
        DeviceSpec::Cuda(n) if !cfg!(feature = "cuda") => Err(DeviceError::NotBuilt(*n)),
        DeviceSpec::Cuda(n) if !cuda_available() => Err(DeviceError::Absent(*n)),
        DeviceSpec::Cuda(n) => Ok(DeviceSpec::Cuda(*n)),
    }
}

/// The candle device for a resolved spec.
pub fn candle(device: &DeviceSpec) -> anyhow::Result<candle_core::Device> {
    Ok(match device {
        DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(*n as usize)?,
        _ => candle_core::Device::Cpu,
    })
}

/// Whether a CUDA device can really be opened (a driver library that loads but
/// has no GPU behind it must not count).
fn cuda_available() -> bool {
    cfg!(feature = "cuda")
        && candle_core::utils::cuda_is_available()
        && candle_core::Device::new_cuda(0).is_ok()
}

/// Largest |difference| between the logits of a small seeded model computed
/// on `device` and on the CPU, in f32, on a padded batch.
pub fn logits_check(device: &DeviceSpec) -> anyhow::Result<f64> {
    use crate::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
    let dir = tempfile::tempdir()?;
    let mut spec = crate::model::init::RandomModel::tiny(7);
    spec.embedding_std = 1.0 / (spec.hidden_size as f64).sqrt();
    crate::model::init::init_model(&spec, dir.path())?;
    let ids: Vec<u32> = (0..24u32)
        .map(|i| (i * 37 + 11) % spec.vocab_size as u32)
        .collect();
    let mask: Vec<f32> = (0..24)
        .map(|i| if i % 12 < 9 { 1.0 } else { 0.0 })
        .collect();
    let logits = |device: &DeviceSpec| -> anyhow::Result<Vec<f32>> {
        let dev = candle(device)?;
        let model = Decoder::load(
            dir.path(),
            &LoadOptions {
                dtype: Some(candle_core::DType::F32),
                device: dev.clone(),
            },
        )?;
        let ids = candle_core::Tensor::from_vec(ids.clone(), (2, 12), &dev)?;
        let mask = candle_core::Tensor::from_vec(mask.clone(), (2, 12), &dev)?;
        let hidden = model.forward(Input::padded(&ids, Some(&mask)), Rows::All, Mode::Inference)?;
        Ok(model
            .logits(&hidden)?
            .flatten_all()?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?)
    };
    let (here, cpu) = (logits(device)?, logits(&DeviceSpec::Cpu)?);
    Ok(here
        .iter()
        .zip(&cpu)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max))
}
