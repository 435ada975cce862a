//! The content-addressed cache.
//!
//! Layout under the cache root:
//! - `artifacts/<hash>/`: immutable artifact folders named by the hash of
//!   their files (manifest.json excluded), each with a manifest.json.
//! - `keys/<key>.json`: stage key -> artifact, written last, after the
//!   artifact is whole. A key without a record has not been computed.
//! - `records/<recipe id>/<stage>.json`: what each stage of each recipe
//!   looked like when it last ran, so a plan can say why a stage reruns.
//! - `work/<key>/`: checkpoints of unfinished stages.
//! - `tmp/`: artifacts being written; never read.
//! - `locks/<key>.lock`: advisory locks held while a stage runs.
//! - `derived/<kind>-<key>/`: intermediate results shared by stages and
//!   recipes (tokenized data, reference log-probs), keyed by their inputs.
//! - `memo/`: the hash memo.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::hashing::{self, Hasher, TreeDigest};

pub const MANIFEST: &str = "manifest.json";
/// In the work folder of an unfinished stage: the step it would resume from.
pub const RESUME_FILE: &str = "resume.json";
/// In a `base` artifact: where the referenced model folder is.
pub const SOURCE_FILE: &str = "source.json";
/// Files in an artifact folder that its id does not cover: the manifest,
/// and a training stage's wall-clock figures per step (the trainer's
/// `TIMINGS_FILE`), which differ between machines and runs of the same
/// stage while its content does not.
pub const UNHASHED: [&str; 2] = [MANIFEST, "timings.jsonl"];

/// One upstream artifact a stage consumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Parent {
    pub field: String,
    pub stage: String,
    pub key: String,
    pub artifact: String,
}

/// One file or folder a stage read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InputFile {
    pub field: String,
    pub path: String,
    pub hash: String,
}

/// manifest.json of an artifact: enough to answer where it came from.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Manifest {
    /// The artifact's id (its folder name): its files' hash with its key (`artifact_id`).
    pub artifact: String,
    pub stage: String,
    pub kind: String,
    pub kind_version: u32,
    pub key: String,
    pub recipe: String,
    pub recipe_name: String,
    pub seed: u64,
    /// Resolved parameters, defaults filled in.
    pub params: serde_json::Value,
    /// Upstream artifacts (lineage).
    pub parents: Vec<Parent>,
    pub inputs: Vec<InputFile>,
    /// What the stage reported.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Relative path -> blake3 of every file of the artifact.
    pub files: BTreeMap<String, String>,
    /// Derived artifacts (`derived/<name>`) the stage used.
    #[serde(default)]
    pub derived: Vec<String>,
    /// `runner <version>`.
    pub program: String,
    /// RFC 3339 UTC.
    pub started: String,
    pub finished: String,
    pub wall_seconds: f64,
    /// Peak resident memory of the process while the stage ran (Linux), bytes.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
}

/// keys/<key>.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key: String,
    pub artifact: String,
    pub stage: String,
    pub finished: String,
}

/// State of an artifact on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum Integrity {
    Whole,
    Missing,
    Corrupt(String),
}

#[derive(Clone, Debug)]
pub struct Cache {
    pub root: PathBuf,
    pub hasher: Hasher,
    /// The shared cache this one reads from and writes to (`[cache] remote`).
    pub remote: Option<std::sync::Arc<crate::remote::Remote>>,
}

const FOLDERS: [&str; 8] = [
    "artifacts",
    "keys",
    "records",
    "work",
    "tmp",
    "locks",
    "memo",
    "derived",
];

impl Cache {
    /// Open (creating if needed) a cache at `root`.
    pub fn open(root: &Path) -> std::io::Result<Cache> {
        for f in FOLDERS {
            std::fs::create_dir_all(root.join(f))?;
        }
        let root = root.canonicalize()?;
        Ok(Cache {
            hasher: Hasher::new(root.join("memo")),
            root,
            remote: None,
        })
    }

    pub fn artifact_dir(&self, artifact: &str) -> PathBuf {
        self.root.join("artifacts").join(artifact)
    }

    pub fn work_dir(&self, key: &str) -> PathBuf {
        self.root.join("work").join(key)
    }

    fn key_path(&self, key: &str) -> PathBuf {
        self.root.join("keys").join(format!("{key}.json"))
    }

    /// The file an unfinished stage writes to say where it would resume.
    pub fn resume_file(&self, key: &str) -> PathBuf {
        self.work_dir(key).join(RESUME_FILE)
    }

    /// The step an unfinished stage would resume from, if it checkpointed.
    pub fn resume_step(&self, key: &str) -> Option<u64> {
        let bytes = std::fs::read(self.resume_file(key)).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        json["step"].as_u64()
    }

    pub fn key_record(&self, key: &str) -> Option<KeyRecord> {
        let bytes = std::fs::read(self.key_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn all_key_records(&self) -> std::io::Result<Vec<KeyRecord>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join("keys"))? {
            let path = e?.path();
            if path.extension().is_some_and(|x| x == "json") {
                if let Ok(r) = serde_json::from_slice(&std::fs::read(&path)?) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    pub fn write_key_record(&self, record: &KeyRecord) -> std::io::Result<()> {
        fsutil::write_json_atomic(&self.key_path(&record.key), record)
    }

    pub fn remove_key_record(&self, key: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.key_path(key))
    }

    /// The artifact's parent through `field` (its manifest's `parents`):
    /// None when it has none or its manifest cannot be read.
    pub fn parent(&self, artifact: &str, field: &str) -> Option<Parent> {
        self.manifest(artifact)?
            .parents
            .into_iter()
            .find(|p| p.field == field)
    }

    pub fn manifest(&self, artifact: &str) -> Option<Manifest> {
        let bytes = std::fs::read(self.artifact_dir(artifact).join(MANIFEST)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Check an artifact's files against its name (through the hash memo,
    /// so an untouched artifact costs a stat per file).
    pub fn verify(&self, artifact: &str) -> Integrity {
        let dir = self.artifact_dir(artifact);
        if !dir.join(MANIFEST).is_file() {
            return Integrity::Missing;
        }
        let Some(key) = self.manifest(artifact).map(|m| m.key) else {
            return Integrity::Corrupt(format!("{MANIFEST} cannot be read"));
        };
        match self.hasher.tree(&dir, &UNHASHED) {
            Ok(t) if artifact_id(&key, &t.hash) == artifact => Integrity::Whole,
            Ok(t) => {
                let listed = self.manifest(artifact).map(|m| m.files).unwrap_or_default();
                let changed: Vec<&String> = t
                    .files
                    .keys()
                    .chain(listed.keys())
                    .filter(|f| t.files.get(*f) != listed.get(*f))
                    .collect();
                Integrity::Corrupt(match changed.first() {
                    Some(f) => format!("{f} does not match its recorded hash"),
                    None => "content does not match its hash".into(),
                })
            }
            Err(e) => Integrity::Corrupt(e.to_string()),
        }
    }

    /// A fresh folder for a stage to write its artifact into.
    pub fn staging_dir(&self, key: &str) -> std::io::Result<PathBuf> {
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "{}-{}-",
                &key[..16.min(key.len())],
                std::process::id()
            ))
            .tempdir_in(self.root.join("tmp"))?;
        Ok(dir.keep())
    }

    /// Turn a finished staging folder into an artifact: hash it, write the
    /// manifest, fsync everything, rename it into `artifacts/` and only then
    /// write the key record. A crash at any point leaves either no artifact
    /// or a whole one, and no key record pointing at a partial one.
    pub fn promote(
        &self,
        staging: &Path,
        mut manifest: Manifest,
    ) -> std::io::Result<(String, Manifest)> {
        let _ = std::fs::remove_file(staging.join(MANIFEST));
        let tree: TreeDigest = self.hasher.tree(staging, &UNHASHED)?;
        let id = artifact_id(&manifest.key, &tree.hash);
        manifest.artifact = id.clone();
        manifest.files = tree.files.clone();
        fsutil::write_json_atomic(&staging.join(MANIFEST), &manifest)?;
        fsutil::fsync_tree(staging)?;

        self.install(staging, &manifest, &tree)?;
        Ok((id, manifest))
    }

    /// Take in an artifact made elsewhere (downloaded from the remote):
    /// `staging` holds its files and `manifest`, which must name exactly
    /// what is there. Checked, then installed as `promote` installs.
    pub fn adopt(&self, staging: &Path, manifest: &Manifest) -> std::io::Result<()> {
        let tree = self.hasher.tree(staging, &UNHASHED)?;
        if artifact_id(&manifest.key, &tree.hash) != manifest.artifact
            || tree.files != manifest.files
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the files of artifact {} do not match its id",
                    short(&manifest.artifact)
                ),
            ));
        }
        fsutil::fsync_tree(staging)?;
        self.install(staging, manifest, &tree)
    }

    /// Rename a whole, fsynced staging folder into `artifacts/` and then
    /// write the key record, so a key never points at a partial artifact.
    fn install(
        &self,
        staging: &Path,
        manifest: &Manifest,
        tree: &TreeDigest,
    ) -> std::io::Result<()> {
        let id = &manifest.artifact;
        let target = self.artifact_dir(id);
        if target.exists() {
            // A crash after the rename and before the key record: the same
            // key made these bytes before; keep a whole copy.
            if self.verify(id) == Integrity::Whole {
                std::fs::remove_dir_all(staging)?;
            } else {
                fsutil::replace_dir(staging, &target)?;
            }
        } else {
            std::fs::rename(staging, &target)?;
            fsutil::fsync_dir(&self.root.join("artifacts"))?;
        }
        for (rel, hash) in &tree.files {
            let _ = self.hasher.seed(&target.join(rel), hash);
        }
        self.write_key_record(&KeyRecord {
            key: manifest.key.clone(),
            artifact: id.clone(),
            stage: manifest.stage.clone(),
            finished: manifest.finished.clone(),
        })
    }

    fn record_path(&self, recipe: &Path, stage: &str) -> PathBuf {
        let id = blake3::hash(recipe.as_os_str().as_encoded_bytes()).to_hex();
        self.root
            .join("records")
            .join(&id[..24])
            .join(format!("{stage}.json"))
    }

    /// What `stage` of `recipe` looked like when it last ran or was found cached.
    pub fn stage_record<T: serde::de::DeserializeOwned>(
        &self,
        recipe: &Path,
        stage: &str,
    ) -> Option<T> {
        let bytes = std::fs::read(self.record_path(recipe, stage)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn write_stage_record<T: Serialize>(
        &self,
        recipe: &Path,
        stage: &str,
        record: &T,
    ) -> std::io::Result<()> {
        fsutil::write_json_atomic(&self.record_path(recipe, stage), record)
    }

    /// A derived artifact `derived/<kind>-<key>`: built once by `build` into a
    /// temporary folder (under a lock, so concurrent stages build it once),
    /// then renamed into place whole.
    pub fn derived(
        &self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<PathBuf> {
        let name = format!("{kind}-{key}");
        let target = self.derived_path(&name);
        if target.is_dir() {
            return Ok(target);
        }
        let _lock = self.lock_derived(&name)?;
        if target.is_dir() {
            return Ok(target);
        }
        let staging = self.staging_dir(&name)?;
        if let Err(e) = build(&staging) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        Ok(self.install_derived(&staging, &name)?)
    }

    /// Where the derived folder `name` (`<kind>-<key>`) is.
    pub fn derived_path(&self, name: &str) -> PathBuf {
        self.root.join("derived").join(name)
    }

    /// The lock of the derived folder `name`, held by whoever makes or
    /// grows it (a build, the reference pass, a pull).
    pub fn lock_derived(&self, name: &str) -> std::io::Result<StageLock> {
        self.lock_stage(&format!("derived-{name}"), |_| {})
    }

    /// A folder complete in `staging` put in place as the derived folder
    /// `name`, durably (under `lock_derived`).
    pub fn install_derived(&self, staging: &Path, name: &str) -> std::io::Result<PathBuf> {
        let target = self.derived_path(name);
        fsutil::fsync_tree(staging)?;
        std::fs::rename(staging, &target)?;
        fsutil::fsync_dir(&self.root.join("derived"))?;
        Ok(target)
    }

    /// A grow-only derived folder `derived/<kind>-<key>`, created if
    /// missing. The caller writes each file in it atomically, so a
    /// computation stopped halfway keeps what it finished and a later one
    /// adds only what is missing (reference log-probs, batch by batch).
    pub fn derived_growing(&self, kind: &str, key: &str) -> std::io::Result<PathBuf> {
        let target = self.derived_path(&format!("{kind}-{key}"));
        std::fs::create_dir_all(&target)?;
        fsutil::fsync_dir(&self.root.join("derived"))?;
        Ok(target)
    }

    /// Take the lock of stage `key`, waiting if another process holds it.
    /// `waiting` is called once with the holder's PID (when known) before blocking.
    pub fn lock_stage(
        &self,
        key: &str,
        waiting: impl FnOnce(Option<u32>),
    ) -> std::io::Result<StageLock> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                waiting(text.trim().parse().ok());
                file.lock()?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(StageLock { _file: file })
    }

    /// Shared lock on the whole cache held by runs; `gc` takes it exclusively.
    pub fn lock_shared(&self) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("locks").join("cache.lock"))?;
        file.lock_shared()?;
        Ok(file)
    }

    pub fn lock_exclusive(&self) -> std::io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("locks").join("cache.lock"))?;
        file.lock()?;
        Ok(file)
    }
}

/// Held while a stage runs; the OS releases it when the process dies, so no lock is ever stale.
pub struct StageLock {
    _file: File,
}

/// Files of a folder that make up an artifact's payload.
/// An artifact's id: its files' tree hash, with the key that made them.
/// One key, one artifact, so the manifest (the stage, its parameters and
/// metrics) is that key's even when two keys make the same bytes (an
/// adapter trained on q8_0 blocks or on their exact f32 values); the same
/// key makes the same id on every machine.
pub fn artifact_id(key: &str, tree_hash: &str) -> String {
    blake3::hash(format!("artifact\n{key}\n{tree_hash}").as_bytes())
        .to_hex()
        .to_string()
}

/// Files that make up an artifact's payload, in the format other tools read:
/// a referenced model folder is followed to its source.
pub fn payload_dir(artifact: &Path) -> std::io::Result<PathBuf> {
    let source = artifact.join(SOURCE_FILE);
    if source.is_file() {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&source)?)
            .map_err(|e| bad(format!("{}: {e}", source.display())))?;
        let path = json["path"]
            .as_str()
            .ok_or_else(|| bad(format!("{} has no `path`", source.display())))?;
        Ok(PathBuf::from(path))
    } else {
        Ok(artifact.to_path_buf())
    }
}

pub fn payload_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    hashing::payload_files(dir, &UNHASHED)
}

/// Current time as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Short form of a key or hash for display.
pub fn short(hash: &str) -> &str {
    &hash[..12.min(hash.len())]
}
