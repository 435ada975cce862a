//! `export`: copy an artifact out of the cache into a folder other tools
//! read (a PEFT adapter folder, a Hugging Face model folder).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{key_json, parse_table, stage_ref};
use crate::cache::{self, SOURCE_FILE};
use crate::fsutil;
use crate::recipe::diag::Problem;
use crate::recipe::span::Sp;
use crate::recipe::ParseContext;
use crate::stage::{ArtifactKind, RunContext, StageKind, StageParams, StageRef};

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

impl StageParams for ExportParams {
    fn key_params(&self) -> serde_json::Value {
        let mut v = key_json(self);
        v["path"] = serde_json::Value::String(self.destination.display().to_string());
        v
    }
    fn refs(&self) -> Vec<StageRef> {
        vec![stage_ref("from", &self.from, EXPORTABLE)]
    }
    fn outside_changed(&self, artifact: &Path) -> Option<String> {
        let record: serde_json::Value = std::fs::read(artifact.join("export.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        let missing = record["files"]
            .as_array()?
            .iter()
            .filter_map(|f| f.as_str())
            .find(|f| !self.destination.join(f).is_file())?;
        Some(format!(
            "exported file missing: {}",
            self.destination.join(missing).display()
        ))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Files that make up an artifact's payload, in the format other tools read:
/// a referenced model folder is followed to its source.
pub fn payload_dir(artifact: &Path) -> anyhow::Result<PathBuf> {
    let source = artifact.join(SOURCE_FILE);
    if source.is_file() {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&source)?)?;
        let path = json["path"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("{} has no `path`", source.display()))?;
        Ok(PathBuf::from(path))
    } else {
        Ok(artifact.to_path_buf())
    }
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

impl StageKind for Export {
    fn name(&self) -> &'static str {
        "export"
    }
    fn version(&self) -> u32 {
        1
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Export
    }
    fn role(&self) -> crate::stage::Role {
        crate::stage::Role::Export
    }
    fn summary(&self) -> &'static str {
        "copy a stage's artifact to a folder outside the cache (PEFT or Hugging Face layout)"
    }

    fn parse(
        &self,
        table: toml::Spanned<toml::de::DeValue<'_>>,
        ctx: &ParseContext,
    ) -> Result<Box<dyn StageParams>, Vec<Problem>> {
        let mut p: ExportParams = parse_table(table, ctx, |_: &ExportParams, _| {})?;
        p.destination = ctx.resolve(&p.path);
        Ok(Box::new(p))
    }

    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<ExportParams>()
    }

    fn run(&self, params: &dyn StageParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        let params = params
            .as_any()
            .downcast_ref::<ExportParams>()
            .expect("export stage params");
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
