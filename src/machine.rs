//! What this machine offers a stage: its memory, the smaller of the
//! physical memory and the cgroup limit when one is set (a Slurm job's
//! `--mem`, a container's), or `RUNNER_MACHINE_MEMORY` when set (to plan
//! for another machine, and for tests); and a GPU's memory, from
//! `nvidia-smi` or `RUNNER_DEVICE_MEMORY`.

use std::path::Path;

/// Memory a stage may use, and where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Available {
    pub bytes: u64,
    pub what: String,
}

pub const MEMORY_ENV: &str = "RUNNER_MACHINE_MEMORY";

/// This machine's memory for stages; None when it cannot be read (not
/// Linux). An unreadable `RUNNER_MACHINE_MEMORY` is an error.
pub fn memory() -> Result<Option<Available>, String> {
    if let Some(set) = from_env(MEMORY_ENV)? {
        return Ok(Some(set));
    }
    let physical = meminfo_total().map(|bytes| Available {
        bytes,
        what: "physical memory".into(),
    });
    let limit = cgroup_limit().map(|(bytes, file)| Available {
        bytes,
        what: format!("the cgroup limit ({file})"),
    });
    Ok(match (physical, limit) {
        (Some(p), Some(l)) if l.bytes < p.bytes => Some(l),
        (Some(p), _) => Some(p),
        (None, l) => l,
    })
}

pub const DEVICE_MEMORY_ENV: &str = "RUNNER_DEVICE_MEMORY";

/// The memory of CUDA device `index` as this process numbers it (after
/// `CUDA_VISIBLE_DEVICES`), or `RUNNER_DEVICE_MEMORY` when set; None when
/// neither tells (no `nvidia-smi`, no such device).
pub fn gpu_memory(index: u32) -> Result<Option<Available>, String> {
    if let Some(set) = from_env(DEVICE_MEMORY_ENV)? {
        return Ok(Some(set));
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    Ok(nvidia_smi_memory(
        Path::new("nvidia-smi"),
        &physical_device(visible.as_deref(), index),
    ))
}

/// nvidia-smi's name for the device CUDA numbers `index`: the index-th
/// entry of `CUDA_VISIBLE_DEVICES` (an index or a UUID), else `index`.
fn physical_device(visible: Option<&str>, index: u32) -> String {
    visible
        .and_then(|v| v.split(',').nth(index as usize))
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| index.to_string())
}

/// `program --query-gpu=memory.total,name -i device`: total MiB and the
/// card's name.
fn nvidia_smi_memory(program: &Path, device: &str) -> Option<Available> {
    let out = std::process::Command::new(program)
        .args([
            "--query-gpu=memory.total,name",
            "--format=csv,noheader,nounits",
            "-i",
            device,
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (mib, name) = text.lines().next()?.split_once(',')?;
    let mib: u64 = mib.trim().parse().ok()?;
    Some(Available {
        bytes: mib.checked_mul(1 << 20)?,
        what: format!("{} (GPU {device}, nvidia-smi)", name.trim()),
    })
}

/// The size environment variable `name` sets, if set.
fn from_env(name: &str) -> Result<Option<Available>, String> {
    let Ok(text) = std::env::var(name) else {
        return Ok(None);
    };
    let bytes = parse_bytes(&text)
        .ok_or_else(|| format!("{name}={text:?} is not a size (e.g. 16GiB, 512MiB, 2000000000)"))?;
    Ok(Some(Available {
        bytes,
        what: name.to_string(),
    }))
}

/// "16GiB", "512 MiB", "1.5GB", "2000000000" (bytes).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        _ => return None,
    };
    let bytes = value * scale;
    (bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), when one is set.
fn cgroup_limit() -> Option<(u64, String)> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(Path::new("/sys/fs/cgroup").join(path).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                Path::new("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.limit_in_bytes"),
            );
        }
    }
    candidates.push("/sys/fs/cgroup/memory.max".into());
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    candidates.into_iter().find_map(|file| {
        let text = std::fs::read_to_string(&file).ok()?;
        let bytes: u64 = text.trim().parse().ok()?; // "max": no limit
                                                    // cgroup v1 writes a huge number for "no limit".
        (bytes < 1 << 60).then(|| (bytes, file.display().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("2000000000"), Some(2_000_000_000));
        assert_eq!(parse_bytes("512MiB"), Some(512 << 20));
        assert_eq!(parse_bytes("16 GiB"), Some(16 << 30));
        assert_eq!(parse_bytes("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("-3GiB"), None);
    }

    #[test]
    fn cuda_numbering_follows_cuda_visible_devices() {
        assert_eq!(physical_device(None, 1), "1");
        assert_eq!(physical_device(Some("3,5"), 1), "5");
        assert_eq!(physical_device(Some("GPU-8f3a, GPU-1b2c"), 1), "GPU-1b2c");
        // Fewer visible than asked: CUDA would refuse; the index stands.
        assert_eq!(physical_device(Some("2"), 1), "1");
    }

    #[test]
    fn gpu_memory_is_read_from_nvidia_smi() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nvidia-smi");
        // Answers as nvidia-smi does for the device it is asked for, and
        // fails for any other, as nvidia-smi does for an unknown -i.
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$4\" = 5 ] || exit 6\necho '81559, NVIDIA H100 80GB HBM3'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = nvidia_smi_memory(&fake, "5").unwrap();
        assert_eq!(found.bytes, 81559 << 20);
        assert_eq!(found.what, "NVIDIA H100 80GB HBM3 (GPU 5, nvidia-smi)");
        assert_eq!(nvidia_smi_memory(&fake, "0"), None);
        assert_eq!(nvidia_smi_memory(&dir.path().join("absent"), "5"), None);
    }

    #[test]
    fn this_machine_has_some_memory() {
        if std::env::var(MEMORY_ENV).is_err() {
            let m = memory().unwrap().expect("Linux reports its memory");
            assert!(m.bytes > 64 << 20, "{m:?}");
        }
    }
}
