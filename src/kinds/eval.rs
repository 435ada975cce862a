//! `eval`: losses, preference accuracy and samples for a model with or
//! without an adapter.

use serde::{Deserialize, Serialize};

use super::lora::{check_adapter_model, check_written_adapter_or_lora};
use super::{inputs, model_refs};
use crate::diag::checks::{at_least, non_negative, positive};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::stage::{
    ArtifactKind, Dtype, FileInput, Kind, ParseContext, Role, RunContext, StageRef, StageView,
};

pub struct Eval;

/// Data an evaluation reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalData {
    /// SFT-shaped rows: completion loss and perplexity.
    #[serde(default)]
    pub sft: Option<Sp<String>>,
    /// Preference rows: accuracy and margin against `reference`.
    #[serde(default)]
    pub dpo: Option<Sp<String>>,
}

/// `[stages.<name>]` with `kind = "eval"`.
#[derive(Clone, Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    pub model: Sp<String>,
    #[serde(default)]
    pub adapter: Option<Sp<String>>,
    /// Reference for preference margins (a model or adapter stage).
    #[serde(default)]
    pub reference: Option<Sp<String>>,
    #[serde(default)]
    pub data: EvalData,
    /// Prompts to complete greedily.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Most tokens generated for each prompt, and for each `data.sft` row
    /// when measuring `sft/exact_match` (greedy completion == the row's completion).
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: Sp<u32>,
    /// Also sample each prompt with this temperature (seeded by the recipe's seed); 0: greedy only.
    #[serde(default)]
    pub temperature: Sp<f64>,
    /// β of the implicit reward used for preference margins.
    #[serde(default = "default_beta")]
    pub beta: Sp<f64>,
    /// Maximum tokens per row; longer rows are cut from the left of the prompt.
    #[serde(default = "default_seq_len")]
    pub seq_len: Sp<u32>,
    /// A built-in chat format ("chatml") for message-list rows.
    #[serde(default)]
    pub format: Option<Sp<String>>,
    #[serde(default)]
    pub dtype: Option<Sp<Dtype>>,
    #[serde(skip)]
    #[schemars(skip)]
    recipe_dir: std::path::PathBuf,
}

fn default_new_tokens() -> Sp<u32> {
    Sp::implicit(32)
}
fn default_beta() -> Sp<f64> {
    Sp::implicit(0.1)
}
fn default_seq_len() -> Sp<u32> {
    Sp::implicit(512)
}

impl Kind for Eval {
    type Params = EvalParams;

    fn name(&self) -> &'static str {
        "eval"
    }
    // 2: the completion starts at the common token prefix (TRL 1.16).
    fn version(&self) -> u32 {
        2
    }
    fn output(&self) -> ArtifactKind {
        ArtifactKind::Evaluation
    }
    fn role(&self) -> Role {
        Role::Evaluate
    }
    fn summary(&self) -> &'static str {
        "evaluate a model (with an optional adapter): losses, preference accuracy, samples"
    }
    fn uses_device(&self) -> bool {
        true
    }

    fn check_written(&self, table: &toml::de::DeTable<'_>, ctx: &ParseContext) -> Vec<Problem> {
        check_written_adapter_or_lora(table, ctx.stage)
    }

    fn prepare(&self, p: &mut EvalParams, ctx: &ParseContext) -> Vec<Problem> {
        let mut problems = Vec::new();
        positive(&mut problems, "beta", &p.beta);
        non_negative(&mut problems, "temperature", &p.temperature);
        at_least(&mut problems, "seq_len", &p.seq_len, 2);
        if p.data.sft.is_none() && p.data.dpo.is_none() && p.prompts.is_empty() {
            problems.push(
                Problem::new(format!(
                    "eval stage `{}` has nothing to evaluate",
                    ctx.stage
                ))
                .at(ctx.stage_start(), "this stage")
                .help("set `data.sft`, `data.dpo` or `prompts`"),
            );
        }
        p.recipe_dir = ctx.recipe_dir.to_path_buf();
        if p.dtype.is_none() {
            p.dtype = Some(Sp::implicit(ctx.dtype));
        }
        problems
    }

    fn refs(&self, p: &EvalParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, Some(&p.reference))
    }

    fn files(&self, p: &EvalParams) -> Vec<FileInput> {
        let dir = &p.recipe_dir;
        let mut files = Vec::new();
        if let Some(f) = &p.data.sft {
            files.push(super::file_input("data.sft", f, dir));
        }
        if let Some(f) = &p.data.dpo {
            files.push(super::file_input("data.dpo", f, dir));
        }
        files
    }

    fn check(&self, _p: &EvalParams, stage: StageView<'_>) -> Vec<Problem> {
        let mut problems = Vec::new();
        check_adapter_model(stage, &mut problems);
        problems
    }

    fn run(&self, p: &EvalParams, ctx: &mut RunContext) -> anyhow::Result<()> {
        crate::train::with_big_stack(|| run_eval(p, ctx))
    }
}

/// Results written to eval.jsonl, one JSON object per line.
pub const RESULTS_FILE: &str = "eval.jsonl";

fn run_eval(p: &EvalParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    use crate::train::{dpo, sft};
    use std::io::Write;
    let device = crate::device::candle(&ctx.device)?;
    let dtype = inputs::dtype(p.dtype.as_ref().map_or(Dtype::F32, |d| d.value));
    let model_dir = inputs::model_dir(ctx.input("model")?)?;
    let mut model = inputs::load_model(&model_dir, dtype, &device)?;
    if let Some(adapter) = ctx.inputs.get("adapter") {
        inputs::load_adapter(&mut model, adapter)?;
    }
    let tokenizer = inputs::load_tokenizer(&model_dir)?;
    let mut settings = crate::data::TokenizeSettings::new(p.seq_len.value as usize);
    settings.chat_format = p.format.as_ref().map(|f| f.value.clone());
    let mut results = Vec::new();
    let metric = |ctx: &mut RunContext, name: &str, value: f64| {
        ctx.metrics.insert(name.to_string(), value.into());
    };

    if let Some(file) = ctx.files.get("data.sft").cloned() {
        let data = inputs::sft_tokens(ctx, &file, &tokenizer, &model_dir, &settings)?;
        let loss = sft::mean_completion_loss(&model, &data.examples, tokenizer.pad_id(), &device)?;
        metric(ctx, "sft/loss", loss);
        metric(ctx, "sft/perplexity", loss.exp());
        let stop: Vec<u32> = tokenizer.eos().map(|e| e.id).into_iter().collect();
        let matched = crate::train::task::greedy_exact_match(
            &model,
            &data.examples,
            &stop,
            p.max_new_tokens.value as usize,
            ctx.progress,
            ctx.interrupt,
        )?;
        let exact = matched.iter().filter(|m| **m).count() as f64 / matched.len().max(1) as f64;
        metric(ctx, "sft/exact_match", exact);
        results.push(serde_json::json!({
            "sft/loss": loss,
            "sft/perplexity": loss.exp(),
            "sft/exact_match": exact,
            "rows": data.examples.len(),
        }));
    }

    if let Some(file) = ctx.files.get("data.dpo").cloned() {
        let (data, data_key) = inputs::dpo_tokens(ctx, &file, &tokenizer, &model_dir, &settings)?;
        let policy = dpo::score_pairs(&model, &data, tokenizer.pad_id(), &device)?;
        let n = policy.chosen.len().max(1) as f64;
        // Reference-free: does the model itself rank chosen above rejected?
        let prefers = policy
            .chosen
            .iter()
            .zip(&policy.rejected)
            .filter(|(c, r)| c > r)
            .count() as f64
            / n;
        let logp_margin = policy
            .chosen
            .iter()
            .zip(&policy.rejected)
            .map(|(c, r)| (c - r) as f64)
            .sum::<f64>()
            / n;
        metric(ctx, "preference/accuracy", prefers);
        metric(ctx, "preference/logp_margin", logp_margin);
        let mut line = serde_json::json!({ "preference/accuracy": prefers, "preference/logp_margin": logp_margin, "pairs": policy.chosen.len() });
        // Against a reference: `reference`, else the model without the adapter.
        let reference = match (
            ctx.inputs.contains_key("reference"),
            ctx.inputs.get("adapter"),
        ) {
            (true, _) => Some(super::dpo::reference_spec(ctx)?),
            (false, Some(_)) => {
                let m = ctx.input("model")?;
                Some(super::dpo::ReferenceSpec {
                    model: model_dir.clone(),
                    model_artifact: m
                        .dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    adapter: None,
                    description: m.stage.clone(),
                })
            }
            (false, None) => None,
        };
        if let Some(reference) = reference {
            let scores = super::dpo::reference_scores(
                ctx,
                &reference,
                &data,
                &data_key,
                dtype,
                &device,
                tokenizer.pad_id(),
            )?;
            let (beta, mut wins, mut margin) = (p.beta.value, 0usize, 0f64);
            for i in 0..policy.chosen.len() {
                let rc = beta * (policy.chosen[i] - scores.chosen[i]) as f64;
                let rr = beta * (policy.rejected[i] - scores.rejected[i]) as f64;
                wins += usize::from(rc > rr);
                margin += rc - rr;
            }
            metric(ctx, "rewards/accuracies", wins as f64 / n);
            metric(ctx, "rewards/margins", margin / n);
            line["rewards/accuracies"] = (wins as f64 / n).into();
            line["rewards/margins"] = (margin / n).into();
            line["reference"] = reference.description.clone().into();
            ctx.metrics
                .insert("reference".into(), reference.description.into());
        }
        results.push(line);
    }

    for sample in crate::train::samples::complete(
        &model,
        &tokenizer,
        &p.prompts,
        p.max_new_tokens.value as usize,
        p.temperature.value,
        ctx.seed,
    )? {
        results.push(serde_json::to_value(&sample)?);
    }
    if !p.prompts.is_empty() {
        ctx.metrics.insert(
            "samples".into(),
            serde_json::to_value(
                results
                    .iter()
                    .filter(|r| r.get("prompt").is_some())
                    .collect::<Vec<_>>(),
            )?,
        );
    }

    let mut out = std::fs::File::create(ctx.out_dir.join(RESULTS_FILE))?;
    for r in &results {
        writeln!(out, "{r}")?;
    }
    out.sync_all()?;
    Ok(())
}
