//! The local cache's artifacts shared through a remote (`remote`).
//!
//! Layout under the remote's prefix, as in the local cache:
//! - `artifacts/<id>/<file>`: every file of an artifact, its manifest.json last;
//! - `keys/<key>.json`: the key record, written last and create-only, so it
//!   only ever names an artifact uploaded whole, and the first machine to
//!   finish a stage wins when two race.
//!
//! Nothing read from the remote is trusted: a pulled artifact's files are
//! hashed as they arrive and checked against its manifest and id before the
//! local cache takes them in.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cache::{self, Cache, KeyRecord, Manifest, MANIFEST, SOURCE_FILE, UNHASHED};
use crate::hashing;
use crate::remote::{interrupted, Remote, RemoteError};
use crate::stage::Progress;

fn key_path(key: &str) -> String {
    format!("keys/{key}.json")
}

fn artifact_path(artifact: &str, file: &str) -> String {
    format!("artifacts/{artifact}/{file}")
}

/// The remote's record of `key`; None when it has none, or one that cannot
/// be read (which a push then replaces).
pub fn remote_record(remote: &Remote, key: &str) -> Result<Option<KeyRecord>, RemoteError> {
    Ok(remote
        .get(&key_path(key))?
        .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
}

/// What a push did.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    /// Uploaded: this many files, this many bytes.
    Uploaded { files: usize, bytes: u64 },
    /// The remote already has a result for the key (this artifact, or
    /// another machine's that finished first).
    AlreadyThere { artifact: String },
    /// Not shared: the artifact only refers to files on this machine.
    NotShared(&'static str),
}

/// Upload `artifact` (whole in the local cache) and then its key record.
pub fn push(
    cache: &Cache,
    remote: &Remote,
    artifact: &str,
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<Pushed, RemoteError> {
    let dir = cache.artifact_dir(artifact);
    if dir.join(SOURCE_FILE).is_file() {
        return Ok(Pushed::NotShared(
            "it refers to a model folder on this machine; every machine plans from its own copy",
        ));
    }
    let manifest = cache.manifest(artifact).ok_or_else(|| {
        RemoteError::Io(std::io::Error::other(format!(
            "artifact {} has no readable {MANIFEST}",
            cache::short(artifact)
        )))
    })?;
    if let Some(bytes) = remote.get(&key_path(&manifest.key))? {
        match serde_json::from_slice::<KeyRecord>(&bytes) {
            Ok(record) => {
                return Ok(Pushed::AlreadyThere {
                    artifact: record.artifact,
                })
            }
            // Not a record any reader takes: replaced by this one.
            Err(_) => remote.delete(&key_path(&manifest.key))?,
        }
    }
    let mut files: Vec<String> = manifest.files.keys().cloned().collect();
    // Unhashed companions (timings) travel too when present; the manifest goes last.
    files.extend(
        UNHASHED
            .iter()
            .filter(|f| **f != MANIFEST && dir.join(f).is_file())
            .map(|f| f.to_string()),
    );
    files.push(MANIFEST.to_string());
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len()))
        .sum();
    progress.set_total(total);
    let mut done = 0u64;
    for file in &files {
        if interrupt.load(Ordering::SeqCst) {
            return Err(interrupted());
        }
        let path = dir.join(file);
        remote.upload(&artifact_path(artifact, file), &path, &mut |sent| {
            progress.set_position(done + sent, &format!("{} uploaded", mib(done + sent)));
            !interrupt.load(Ordering::SeqCst)
        })?;
        done += std::fs::metadata(&path).map_or(0, |m| m.len());
    }
    // What the stage derived and other stages reuse (reference log-probs).
    push_derived(cache, remote, &manifest.derived, progress, interrupt)?;
    let record = KeyRecord {
        key: manifest.key.clone(),
        artifact: artifact.to_string(),
        stage: manifest.stage.clone(),
        finished: manifest.finished.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
    if remote.put_new(&key_path(&manifest.key), &bytes)? {
        Ok(Pushed::Uploaded {
            files: files.len(),
            bytes: total,
        })
    } else {
        let winner = remote_record(remote, &manifest.key)?
            .map_or_else(|| "(unreadable)".to_string(), |r| r.artifact);
        Ok(Pushed::AlreadyThere { artifact: winner })
    }
}

/// What a pull found.
#[derive(Debug, PartialEq)]
pub enum Pulled {
    /// Downloaded, checked and recorded in the local cache.
    Whole { artifact: String, bytes: u64 },
    /// The remote has no record of the key (any more).
    Missing,
    /// What the remote holds is not what its record promises: not used.
    Corrupt(String),
}

/// Download the artifact the remote records for `key` into the local cache.
/// A copy that fails its check loses its key record on the remote, so the
/// stage recomputed here is uploaded in its place.
pub fn pull(
    cache: &Cache,
    remote: &Remote,
    key: &str,
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<Pulled, RemoteError> {
    match pull_checked(cache, remote, key, progress, interrupt)? {
        // Read-only credentials cannot remove it: still recomputed here.
        Pulled::Corrupt(why) => Ok(Pulled::Corrupt(match remote.delete(&key_path(key)) {
            Ok(()) => why,
            Err(e) => format!("{why}; its key record stays on the remote: {e}"),
        })),
        other => Ok(other),
    }
}

fn pull_checked(
    cache: &Cache,
    remote: &Remote,
    key: &str,
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<Pulled, RemoteError> {
    // Under the stage's lock: a run here computing or pulling the same key
    // finishes first, and then there is nothing to download.
    let _lock = cache.lock_stage(key, |_| {})?;
    if let Some(local) = cache.key_record(key) {
        if cache.verify(&local.artifact) == cache::Integrity::Whole {
            return Ok(Pulled::Whole {
                artifact: local.artifact,
                bytes: 0,
            });
        }
    }
    let Some(record) = remote_record(remote, key)? else {
        return Ok(Pulled::Missing);
    };
    let id = record.artifact;
    let Some(bytes) = remote.get(&artifact_path(&id, MANIFEST))? else {
        return Ok(Pulled::Corrupt(format!(
            "{} is missing",
            remote.show(&artifact_path(&id, MANIFEST))
        )));
    };
    let manifest: Manifest = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Pulled::Corrupt(format!(
                "{} cannot be read: {e}",
                remote.show(&artifact_path(&id, MANIFEST))
            )))
        }
    };
    if manifest.artifact != id
        || manifest.key != key
        || cache::artifact_id(key, &hashing::tree_hash(&manifest.files)) != id
    {
        return Ok(Pulled::Corrupt(format!(
            "the manifest of artifact {} does not match its id and key",
            cache::short(&id)
        )));
    }
    if cache.verify(&id) == cache::Integrity::Whole {
        // The artifact is here under another name's record (a gc'd key, a
        // copied cache): only the key record was missing.
        cache.write_key_record(&KeyRecord {
            key: key.to_string(),
            artifact: id.clone(),
            stage: manifest.stage.clone(),
            finished: manifest.finished.clone(),
        })?;
        return Ok(Pulled::Whole {
            artifact: id,
            bytes: 0,
        });
    }
    let staging = cache.staging_dir(key)?;
    let result = download_into(
        &cache.hasher,
        &staging,
        remote,
        &manifest,
        &bytes,
        progress,
        interrupt,
    );
    match result {
        Ok(Ok(total)) => match cache.adopt(&staging, &manifest) {
            Ok(()) => {
                let derived = pull_derived(cache, remote, &manifest.derived, progress, interrupt)?;
                Ok(Pulled::Whole {
                    artifact: id,
                    bytes: total + derived,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let _ = std::fs::remove_dir_all(&staging);
                Ok(Pulled::Corrupt(e.to_string()))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(e.into())
            }
        },
        Ok(Err(why)) => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(Pulled::Corrupt(why))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Every file of the artifact into `staging`, each hashed as it arrives:
/// Ok(Err(why)) when one is missing or not what the manifest says.
fn download_into(
    memo: &crate::hashing::Hasher,
    staging: &Path,
    remote: &Remote,
    manifest: &Manifest,
    manifest_bytes: &[u8],
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<Result<u64, String>, RemoteError> {
    // Checked against the key and the files before any download.
    let id = manifest.artifact.as_str();
    let mut done = 0u64;
    let prefix = artifact_path(id, "");
    let total: u64 = remote
        .list(&prefix)?
        .iter()
        .filter(|o| {
            o.path
                .strip_prefix(&prefix)
                .is_some_and(|rel| manifest.files.contains_key(rel))
        })
        .map(|o| o.size)
        .sum();
    progress.set_total(total);
    for (rel, expected) in &manifest.files {
        let fetched = fetch_checked(
            remote,
            (&artifact_path(id, ""), "manifest"),
            staging,
            (rel, expected),
            interrupt,
            &mut |n| {
                done += n;
                progress.set_position(done, &format!("{} downloaded", mib(done)));
            },
        )?;
        match fetched {
            // Hashed as it arrived: `adopt` then checks the tree without reading it again.
            Ok(dest) => memo.seed(&dest, expected)?,
            Err(why) => return Ok(Err(why)),
        }
    }
    for extra in UNHASHED.iter().filter(|f| **f != MANIFEST) {
        // Timings are not covered by the id: a missing one is no loss.
        remote.download(&artifact_path(id, extra), &staging.join(extra), &mut |_| {
            true
        })?;
    }
    crate::fsutil::write_atomic(&staging.join(MANIFEST), manifest_bytes)?;
    Ok(Ok(done))
}

/// The object `folder` + `rel` downloaded to `staging/rel`, hashed as it
/// arrives (`counted` gets each chunk's length): Ok(Err(why)) when `rel`
/// leaves its folder (as the `listing`, a manifest or an index, names it),
/// the object is missing, or its blake3 is not `expected`.
fn fetch_checked(
    remote: &Remote,
    (folder, listing): (&str, &str),
    staging: &Path,
    (rel, expected): (&str, &str),
    interrupt: &AtomicBool,
    counted: &mut dyn FnMut(u64),
) -> Result<Result<PathBuf, String>, RemoteError> {
    if interrupt.load(Ordering::SeqCst) {
        return Err(interrupted());
    }
    if rel
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Ok(Err(format!(
            "the {listing} names a file outside its folder: `{rel}`"
        )));
    }
    let dest = staging.join(rel);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let object = format!("{folder}{rel}");
    let mut hasher = blake3::Hasher::new();
    let found = remote.download(&object, &dest, &mut |chunk| {
        hasher.update(chunk);
        counted(chunk.len() as u64);
        !interrupt.load(Ordering::SeqCst)
    })?;
    if !found {
        return Ok(Err(format!("{} is missing", remote.show(&object))));
    }
    if hasher.finalize().to_hex().as_str() != expected {
        return Ok(Err(format!(
            "{} does not match its recorded hash",
            remote.show(&object)
        )));
    }
    Ok(Ok(dest))
}

fn mib(bytes: u64) -> String {
    crate::units::human_bytes(bytes, crate::units::ByteDigits::OneDecimal)
}

fn derived_index(name: &str) -> String {
    format!("derived/{name}.json")
}

/// Upload the derived folders a stage used (`derived/<name>/…`) that the
/// remote lacks, each followed by its index (file → blake3), create-only:
/// a reader takes a derived folder only through its index.
fn push_derived(
    cache: &Cache,
    remote: &Remote,
    names: &[String],
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<(), RemoteError> {
    for name in names {
        let dir = cache.derived_path(name);
        if !dir.is_dir() || remote.get(&derived_index(name))?.is_some() {
            continue;
        }
        let tree = cache.hasher.tree(&dir, &[])?;
        for rel in tree.files.keys() {
            if interrupt.load(Ordering::SeqCst) {
                return Err(interrupted());
            }
            remote.upload(
                &format!("derived/{name}/{rel}"),
                &dir.join(rel),
                &mut |_| !interrupt.load(Ordering::SeqCst),
            )?;
        }
        let index = serde_json::to_vec_pretty(&tree.files).map_err(std::io::Error::other)?;
        remote.put_new(&derived_index(name), &index)?;
        progress.log(&format!(
            "uploaded derived data {name} ({} files)",
            tree.files.len()
        ));
    }
    Ok(())
}

/// Download the derived folders a pulled stage used that are not here, so
/// stages computed here reuse them (another DPO variant's reference
/// log-probs). Each file is checked against the index; a folder that fails
/// is left out (it is recomputed when needed) and said so. Bytes downloaded.
fn pull_derived(
    cache: &Cache,
    remote: &Remote,
    names: &[String],
    progress: &dyn Progress,
    interrupt: &AtomicBool,
) -> Result<u64, RemoteError> {
    let mut bytes = 0;
    for name in names {
        let target = cache.derived_path(name);
        if target.exists() {
            continue;
        }
        let Some(index) = remote.get(&derived_index(name))? else {
            continue;
        };
        let Ok(files) =
            serde_json::from_slice::<std::collections::BTreeMap<String, String>>(&index)
        else {
            progress.log(&format!(
                "derived data {name}: its index on the remote cannot be read; not used"
            ));
            continue;
        };
        let _lock = cache.lock_derived(name)?;
        if target.exists() {
            continue;
        }
        let staging = cache.staging_dir(name)?;
        let mut fetched = 0u64;
        let mut bad = None;
        for (rel, expected) in &files {
            let got = fetch_checked(
                remote,
                (&format!("derived/{name}/"), "index"),
                &staging,
                (rel, expected),
                interrupt,
                &mut |n| fetched += n,
            );
            match got {
                Ok(Ok(_)) => {}
                Ok(Err(why)) => {
                    bad = Some(why);
                    break;
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(e);
                }
            }
        }
        match bad {
            Some(why) => {
                let _ = std::fs::remove_dir_all(&staging);
                progress.log(&format!(
                    "derived data {name} on the remote: {why}; not used"
                ));
            }
            None => {
                cache.install_derived(&staging, name)?;
                bytes += fetched;
            }
        }
    }
    Ok(bytes)
}

/// Objects listed under `folder` by the name below it (`artifacts/<id>/…`;
/// `derived/<name>/…` with its index `derived/<name>.json`): their paths,
/// total size, and whether any is `recent`.
fn grouped(
    objects: Vec<crate::remote::Listed>,
    folder: &str,
    recent: &dyn Fn(&crate::remote::Listed) -> bool,
) -> std::collections::BTreeMap<String, (Vec<String>, u64, bool)> {
    let mut out: std::collections::BTreeMap<String, (Vec<String>, u64, bool)> = Default::default();
    for object in objects {
        let Some(rest) = object.path.strip_prefix(folder) else {
            continue;
        };
        let name = match rest.split_once('/') {
            Some((name, _)) => name,
            None => rest.strip_suffix(".json").unwrap_or(rest),
        };
        let entry = out.entry(name.to_string()).or_default();
        entry.1 += object.size;
        entry.2 |= recent(&object);
        entry.0.push(object.path);
    }
    out
}

/// Deletes `objects`, `first` (the object readers take the group through)
/// before the others.
fn delete_group(remote: &Remote, first: &str, objects: &[String]) -> Result<(), RemoteError> {
    remote.delete(first)?;
    for object in objects.iter().filter(|o| *o != first) {
        remote.delete(object)?;
    }
    Ok(())
}

/// `runner gc --on-remote`: remove from the remote every artifact that no
/// key in `keep_keys` and no artifact in `pinned` reaches (through key
/// records and lineage), and every key record of an artifact removed.
/// Artifacts with an object younger than `grace` stay: they may be an
/// upload in progress whose key record is not written yet. A dry run
/// unless `delete`; returns the report.
pub fn collect_remote(
    remote: &Remote,
    keep_keys: &[String],
    pinned: &[String],
    grace: std::time::Duration,
    delete: bool,
) -> Result<String, RemoteError> {
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Write;

    let mut records: BTreeMap<String, KeyRecord> = BTreeMap::new();
    let keys = remote.list("keys/")?;
    for object in &keys {
        let Some(key) = object
            .path
            .strip_prefix("keys/")
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        if let Some(record) = remote_record(remote, key)? {
            records.insert(key.to_string(), record);
        }
    }
    let mut reachable: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = keep_keys
        .iter()
        .filter_map(|k| records.get(k).map(|r| r.artifact.clone()))
        .chain(pinned.iter().cloned())
        .collect();
    let mut used: BTreeSet<String> = BTreeSet::new();
    while let Some(a) = stack.pop() {
        if reachable.insert(a.clone()) {
            if let Some(bytes) = remote.get(&artifact_path(&a, MANIFEST))? {
                if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                    stack.extend(m.parents.into_iter().map(|p| p.artifact));
                    used.extend(m.derived);
                }
            }
        }
    }
    // Artifacts by id: their objects, total size, and whether any is recent.
    let now = std::time::SystemTime::now();
    let recent = |o: &crate::remote::Listed| {
        o.modified
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() < grace)
    };
    let artifacts = grouped(remote.list("artifacts/")?, "artifacts/", &recent);
    let keep: BTreeSet<&String> = keep_keys.iter().collect();
    let mut out = String::new();
    let verb = if delete { "removed" } else { "would remove" };
    let (mut items, mut bytes, mut young) = (0usize, 0u64, 0usize);
    // Key records first: a record never outlives its artifact.
    for (key, record) in &records {
        if keep.contains(key) || reachable.contains(&record.artifact) {
            continue;
        }
        if delete {
            remote.delete(&key_path(key))?;
        }
        items += 1;
        let _ = writeln!(
            out,
            "{verb} {} (stage {})",
            remote.show(&key_path(key)),
            record.stage
        );
    }
    for (id, (objects, size, is_recent)) in &artifacts {
        if reachable.contains(id) {
            continue;
        }
        if *is_recent {
            young += 1;
            continue;
        }
        // The manifest first: a reader then sees no artifact, never a partial one.
        if delete {
            delete_group(remote, &artifact_path(id, MANIFEST), objects)?;
        }
        items += 1;
        bytes += size;
        let _ = writeln!(
            out,
            "{verb} {} ({})",
            remote.show(&artifact_path(id, "")),
            mib(*size)
        );
    }
    // Derived folders no kept artifact used: the index first, then the files.
    let derived = grouped(remote.list("derived/")?, "derived/", &recent);
    for (name, (objects, size, is_recent)) in &derived {
        if used.contains(name) || *is_recent {
            continue;
        }
        if delete {
            delete_group(remote, &derived_index(name), objects)?;
        }
        items += 1;
        bytes += size;
        let _ = writeln!(
            out,
            "{verb} {} ({})",
            remote.show(&format!("derived/{name}/")),
            mib(*size)
        );
    }
    if young > 0 {
        let _ = writeln!(
            out,
            "kept {young} unreached artifact(s) written in the last {} (an upload may be under way)",
            humantime::format_duration(grace)
        );
    }
    let _ = writeln!(
        out,
        "{verb} {items} item(s), {}{}",
        mib(bytes),
        if delete {
            ""
        } else {
            " (dry run: add --delete)"
        }
    );
    Ok(out)
}
