//! `runner gc`: remove what no given recipe reaches.

use std::collections::BTreeSet;
use std::fmt::Write;

use crate::cache::Cache;
use crate::fsutil::folder_bytes;
use crate::units::{human_bytes, ByteDigits};

fn pin_dir(cache: &Cache) -> std::path::PathBuf {
    cache.root.join("pins")
}

/// Pin `artifact` under `name`: `gc` keeps it and its lineage.
pub fn pin(cache: &Cache, name: &str, artifact: &str) -> std::io::Result<()> {
    crate::fsutil::write_atomic(&pin_dir(cache).join(name), artifact.as_bytes())
}

/// Remove a pin; false when there was none.
pub fn unpin(cache: &Cache, name: &str) -> std::io::Result<bool> {
    match std::fs::remove_file(pin_dir(cache).join(name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// (name, artifact) of every pin.
pub fn pins(cache: &Cache) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    match std::fs::read_dir(pin_dir(cache)) {
        Ok(rd) => {
            for e in rd {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    out.push((name, std::fs::read_to_string(e.path())?.trim().to_string()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

/// Keys to keep -> reachable artifacts (through key records and lineage);
/// everything else in `artifacts/`, `keys/`, `work/` and `tmp/` goes.
pub fn collect(cache: &Cache, keep_keys: &[String], delete: bool) -> std::io::Result<String> {
    let _exclusive = if delete {
        Some(cache.lock_exclusive()?)
    } else {
        None
    };
    let mut reachable: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = keep_keys
        .iter()
        .filter_map(|k| cache.key_record(k).map(|r| r.artifact))
        .chain(pins(cache)?.into_iter().map(|(_, a)| a))
        .collect();
    while let Some(a) = stack.pop() {
        if reachable.insert(a.clone()) {
            if let Some(m) = cache.manifest(&a) {
                stack.extend(m.parents.into_iter().map(|p| p.artifact));
            }
        }
    }
    let keep: BTreeSet<&String> = keep_keys.iter().collect();
    // Derived artifacts used by kept artifacts stay; unfinished kept stages may need any, so
    // while one has a work folder, all stay.
    let resuming = keep_keys.iter().any(|k| cache.work_dir(k).is_dir());
    let used: BTreeSet<String> = reachable
        .iter()
        .filter_map(|a| cache.manifest(a))
        .flat_map(|m| m.derived)
        .collect();
    let mut doomed = Vec::new();
    for entry in std::fs::read_dir(cache.root.join("artifacts"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !reachable.contains(&name) {
            doomed.push(entry.path());
        }
    }
    for record in cache.all_key_records()? {
        if !keep.contains(&record.key) && !reachable.contains(&record.artifact) {
            doomed.push(cache.root.join("keys").join(format!("{}.json", record.key)));
        }
    }
    if !resuming {
        for entry in std::fs::read_dir(cache.root.join("derived"))? {
            let entry = entry?;
            if !used.contains(&entry.file_name().to_string_lossy().into_owned()) {
                doomed.push(entry.path());
            }
        }
    }
    for folder in ["work", "tmp"] {
        for entry in std::fs::read_dir(cache.root.join(folder))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Unfinished work of a kept stage is a checkpoint to resume from.
            if folder == "work" && keep.contains(&name) {
                continue;
            }
            // A run in progress holds the shared lock; only delete tmp under the exclusive one.
            doomed.push(entry.path());
        }
    }
    let mut out = String::new();
    let mut bytes = 0u64;
    for path in &doomed {
        let size = folder_bytes(path);
        bytes += size;
        let _ = writeln!(
            out,
            "{} {} ({})",
            if delete { "removed" } else { "would remove" },
            path.display(),
            human_bytes(size, ByteDigits::OneDecimal)
        );
        if delete {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            removed.map_err(|e| {
                std::io::Error::new(e.kind(), format!("removing {}: {e}", path.display()))
            })?;
        }
    }
    let _ = writeln!(
        out,
        "{} {} item(s), {}{}",
        if delete { "removed" } else { "would remove" },
        doomed.len(),
        human_bytes(bytes, ByteDigits::OneDecimal),
        if delete {
            ""
        } else {
            " (dry run: add --delete)"
        }
    );
    Ok(out)
}
