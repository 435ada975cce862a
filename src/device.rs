//! Choosing the compute device: `device = "auto" | "cpu" | "cuda:N"` in the
//! recipe or `--device`. Auto takes a GPU when the binary has CUDA and one is
//! present. The device kind enters the keys of stages that compute (results
//! differ between CPU and GPU).

use crate::recipe::params::DeviceSpec;

/// Resolve `auto` and check that a requested GPU can be used.
pub fn resolve(spec: &DeviceSpec) -> Result<DeviceSpec, String> {
    match spec {
        DeviceSpec::Cpu => Ok(DeviceSpec::Cpu),
        DeviceSpec::Auto => Ok(if cuda_available() {
            DeviceSpec::Cuda(0)
        } else {
            DeviceSpec::Cpu
        }),
        DeviceSpec::Cuda(n) if !cfg!(feature = "cuda") => Err(format!(
            "device cuda:{n} asked for, but this runner was built without CUDA \
             (build it with scripts/build-cuda.sh, or use device = \"cpu\")"
        )),
        DeviceSpec::Cuda(n) if !cuda_available() => Err(format!(
            "device cuda:{n} asked for, but no CUDA device is present"
        )),
        DeviceSpec::Cuda(n) => Ok(DeviceSpec::Cuda(*n)),
    }
}

/// "cpu" or "cuda": what enters stage keys.
pub fn kind(device: &DeviceSpec) -> &'static str {
    match device {
        DeviceSpec::Cuda(_) => "cuda",
        _ => "cpu",
    }
}

/// The candle device for a resolved spec.
pub fn candle(device: &DeviceSpec) -> anyhow::Result<candle_core::Device> {
    Ok(match device {
        DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(*n as usize)?,
        _ => candle_core::Device::Cpu,
    })
}

fn cuda_available() -> bool {
    cfg!(feature = "cuda") && candle_core::utils::cuda_is_available()
}
