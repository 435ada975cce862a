//! `export`: copy an artifact out of the cache into a folder other tools
//! read (a PEFT adapter folder, a Hugging Face model folder).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{key_with_path, stage_ref};
use crate::cache::{self, payload_dir};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::fsutil;
use crate::stage::{ArtifactKind, Kind, ParseContext, Role, RunContext, StageRef};

pub struct Export;

const EXPORTABLE: &[ArtifactKind] = &[
    ArtifactKind::Model,
    ArtifactKind::Adapter,
    ArtifactKind::Evaluation,
];

/// `[stages.<name>]` with `kind = "export"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// The stage whose artifact to export.
    pub from: Sp<String>,
    /// Destination folder, relative to the recipe; replaced as a whole.
    pub path: Sp<String>,
    #[serde(skip)]
    #[schemars(skip)]
    destination: PathBuf,
}

/// Copy `from` (a folder) to `to`, replacing `to` whole: the copy is made
/// beside it and renamed into place, so `to` is never half-written.
pub fn export_folder(from: &Path, to: &Path) -> anyhow::Result<Vec<String>> {
    let parent = fsutil::parent_dir(to);
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".runner-export-")
        .tempdir_in(parent)?;
    let mut copied = Vec::new();
    for file in cache::payload_files(from)? {
        let rel = file.strip_prefix(from)?;
        let dest = staging.path().join(rel);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::copy(&file, &dest)?;
        fsutil::fsync_file(&dest)?;
        copied.push(rel.display().to_string());
    }
    let staged = staging.keep();
    fsutil::replace_dir(&staged, to)?;
    Ok(copied)
}

impl Kind for Export {
    type Params = ExportParams;

    fn name(&self) -> &'static str {
        "export"
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Export
    }
    fn role(&self) -> Role {
        Role::Export
    }
    fn summary(&self) -> &'static str {
        "copy a stage's artifact to a folder outside the cache (PEFT or Hugging Face layout)"
    }

    fn prepare(&self, p: &mut ExportParams, ctx: &ParseContext) -> Vec<Problem> {
        p.destination = ctx.resolve(&p.path);
        Vec::new()
    }

    fn key_params(&self, p: &ExportParams) -> serde_json::Value {
        key_with_path(p, &p.destination)
    }

    fn refs(&self, p: &ExportParams) -> Vec<StageRef> {
        vec![stage_ref("from", &p.from, EXPORTABLE)]
    }

    fn outside_changed(&self, p: &ExportParams, artifact: &Path) -> Option<String> {
        let record: serde_json::Value = std::fs::read(artifact.join("export.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let missing = record["files"]
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str())
            .find(|f| !p.destination.join(f).is_file())?;
        Some(format!(
            "exported file missing: {}",
            p.destination.join(missing).display()
        ))
    }
    fn run(&self, params: &ExportParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let input = ctx.input("from")?;
        let from = payload_dir(&input.dir)?;
        let files = export_folder(&from, &params.destination)?;
        ctx.progress.log(&format!(
            "exported `{}` to {}",
            input.stage,
            params.destination.display()
        ));
        let record = serde_json::json!({
            "path": params.destination.display().to_string(),
            "from": input.stage,
            "files": files,
        });
        fsutil::write_atomic(
            &ctx.out_dir.join("export.json"),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        Ok(())
    }
}
