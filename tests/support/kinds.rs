//! Stage kinds defined by the tests, to exercise the engine without training.

use std::io::Write;

use lora_runner::diag::checks::at_least;
use lora_runner::diag::span::Sp;
use lora_runner::diag::Problem;
use lora_runner::kinds::{stage_ref, MODEL};
use lora_runner::stage::{
    ArtifactKind, FileInput, Interrupted, Kind, ParseContext, Registry, Role, RunContext, StageRef,
};
use serde::{Deserialize, Serialize};

/// `kind = "emit"`: writes `message` (and its input's text) into out.txt,
/// one chunk per step, sleeping `sleep_ms` per step.
pub struct Emit {
    pub version: u32,
}

#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitParams {
    pub message: Sp<String>,
    #[serde(default)]
    pub input: Option<Sp<String>>,
    #[serde(default)]
    pub data: Option<Sp<String>>,
    #[serde(default = "one")]
    pub steps: Sp<u64>,
    #[serde(default)]
    pub sleep_ms: Sp<u64>,
    /// Not shared through a remote cache (as a base read from a file).
    #[serde(default)]
    pub local: Option<Sp<bool>>,
}

fn one() -> Sp<u64> {
    Sp::implicit(1)
}

impl Kind for Emit {
    type Params = EmitParams;

    fn name(&self) -> &'static str {
        "emit"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Model
    }
    fn role(&self) -> Role {
        Role::Source
    }
    fn summary(&self) -> &'static str {
        "test kind"
    }
    fn prepare(&self, p: &mut EmitParams, _ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        at_least(&mut problems, "steps", &p.steps, 1);
        problems
    }
    fn key_params(&self, p: &EmitParams) -> serde_json::Value {
        let mut v = serde_json::to_value(p).unwrap();
        // Timing does not change the result.
        v.as_object_mut().unwrap().remove("sleep_ms");
        if p.local.is_none() {
            v.as_object_mut().unwrap().remove("local");
        }
        v
    }
    fn refs(&self, p: &EmitParams) -> Vec<StageRef> {
        p.input
            .iter()
            .map(|i| stage_ref("input", i, MODEL))
            .collect()
    }
    fn shared(&self, p: &EmitParams) -> bool {
        !p.local.as_ref().is_some_and(|l| l.value)
    }
    fn files(&self, p: &EmitParams, recipe_dir: &std::path::Path) -> Vec<FileInput> {
        p.data
            .iter()
            .map(|d| lora_runner::kinds::file_input("data", d, recipe_dir))
            .collect()
    }
    fn run(&self, p: &EmitParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        if let Ok(counter) = std::env::var("LR_COUNTER") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(counter)?;
            writeln!(f, "{}", ctx.stage)?;
        }
        if p.message.value == "fail" {
            anyhow::bail!("asked to fail");
        }
        let mut text = String::new();
        if let Ok(input) = ctx.input("input") {
            text.push_str(&std::fs::read_to_string(input.dir.join("out.txt"))?);
        }
        if let Some(data) = ctx.files.get("data") {
            text.push_str(&std::fs::read_to_string(data)?);
        }
        text.push_str(&p.message.value);
        let mut out = std::fs::File::create(ctx.out_dir.join("out.txt"))?;
        ctx.progress.set_total(p.steps.value);
        for step in 1..=p.steps.value {
            if ctx.interrupted() {
                return Err(Interrupted.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(p.sleep_ms.value));
            if step == p.steps.value {
                out.write_all(text.as_bytes())?;
            } else {
                out.write_all(b".")?;
            }
            out.sync_all()?;
            std::fs::write(
                ctx.work_dir.join(lora_runner::cache::RESUME_FILE),
                format!(r#"{{"step": {step}}}"#),
            )?;
            ctx.progress.set_position(step, "");
        }
        ctx.metrics.insert("length".into(), text.len().into());
        Ok(())
    }
}

/// The built-in kinds plus the test kinds.
pub fn registry() -> Registry {
    let version = std::env::var("LR_EMIT_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    lora_runner::kinds::builtin().with(Emit { version })
}
