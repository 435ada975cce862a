//! Crash-safe file operations: every write goes to a temporary path in the
//! same folder, is fsynced and renamed over the target, and the folder is
//! fsynced so the rename itself survives a power cut. Also what a file tree
//! weighs on disk (`gc` and `compare` both report it).

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// The last component of `path` as a string (lossy); empty when there is none.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_dir(path);
    let written = (|| {
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        fsync_dir(dir)
    })();
    // The kind stays (a full disk is still StorageFull); the text names the
    // file, and the OS's reason without the temporary file's name.
    written.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("writing {}: {}", path.display(), os_reason(&e)),
        )
    })
}

/// Write JSON atomically, pretty-printed with a trailing newline.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub fn fsync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsync every file below `dir` and every folder, deepest first.
pub fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fsync_tree(&path)?;
        } else {
            fsync_file(&path)?;
        }
    }
    fsync_dir(dir)
}

/// Put folder `staged` at `target`, replacing whatever was there. The old
/// folder is moved aside first and removed only once the new one is in place.
pub fn replace_dir(staged: &Path, target: &Path) -> std::io::Result<()> {
    let parent = parent_dir(target);
    let old = if target.exists() {
        let aside = parent.join(format!(
            ".runner-old-{}-{}",
            std::process::id(),
            target
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::rename(target, &aside)?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(staged, target)?;
    fsync_dir(parent)?;
    if let Some(old) = old {
        std::fs::remove_dir_all(old)?;
    }
    Ok(())
}

/// Bytes `path` takes: a file's length, or everything below a folder, hidden
/// files included; symlinks count as themselves, not as what they point to, so
/// the sum is what deleting `path` frees. Unreadable entries count as 0.
pub fn folder_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| folder_bytes(&e.path()))
                    .sum()
            })
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The folder containing `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The OS's reason for an I/O error ("No space left on device (os error
/// 28)"), found through wrappers (the temporary-file crate names its own
/// file); the error's text when there is none.
fn os_reason(error: &std::io::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(c) = cause {
        if let Some(code) = c
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return std::io::Error::from_raw_os_error(code).to_string();
        }
        cause = match c.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|r| r as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    // tempfile's errors end in ` at path "<its temporary file>"`.
    let text = error.to_string();
    match text.find(" at path \"") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::folder_bytes;

    #[test]
    fn folder_bytes_counts_files_below_hidden_ones_too() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 5]).unwrap();
        std::fs::write(dir.path().join(".hidden"), [0u8; 3]).unwrap();
        assert_eq!(folder_bytes(dir.path()), 18);
        assert_eq!(folder_bytes(&dir.path().join("a")), 10);
        assert_eq!(folder_bytes(&dir.path().join("missing")), 0);
    }
}
