//! `eval`: losses, preference accuracy and samples for a model with or
//! without an adapter.

use std::path::Path;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::lora::{check_adapter_model, check_written_adapter_or_lora};
use super::reference::{reference_scores, reference_spec, ReferenceSpec};
use super::{inputs, model_refs};
use crate::data::ModelTokenizer;
use crate::diag::checks::{at_least, non_negative, positive};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::metrics::task;
use crate::model::decoder::Decoder;
use crate::stage::{
    ArtifactKind, Dtype, FileInput, InputArtifact, Kind, ParseContext, Role, RunContext, StageRef,
    StageView,
};
use crate::train::dpo;

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
    /// Send each prompt as a user message through the chat template (the
    /// model's own, or `format`'s) with its generation prompt, as an
    /// instruct model is asked; plain text when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub chat_prompts: Sp<bool>,
    /// Most tokens generated for each prompt, and for each `data.sft` row
    /// when measuring `sft/exact_match` (greedy completion == the row's completion).
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: Sp<u32>,
    /// Exact match compares the decoded texts with runs of whitespace made
    /// one space and the ends trimmed, instead of the tokens.
    #[serde(default)]
    pub normalize_whitespace: Sp<bool>,
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
}

fn is_false(b: &Sp<bool>) -> bool {
    !b.value
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
    // 3: task metrics and per-example results (examples.jsonl).
    fn version(&self) -> u32 {
        3
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
        if p.dtype.is_none() {
            p.dtype = Some(Sp::implicit(ctx.dtype));
        }
        problems
    }

    fn plan_memory(
        &self,
        p: &EvalParams,
        stage: StageView<'_>,
        _on_gpu: bool,
    ) -> Option<crate::units::MemoryEstimate> {
        use crate::metrics::task::{GENERATE_BATCH, SCORE_BATCH};
        let model = stage.target("model")?;
        let config = super::lineage::model_config(model)?.ok()?;
        let dtype = inputs::planned_dtype(p.dtype.as_ref().map(|d| d.value), &config);
        let weights = crate::model::memory::weights_bytes(
            &config,
            dtype,
            super::lineage::quantization(model),
            super::lineage::stored_bits(model),
        );
        Some(crate::model::memory::eval_estimate(
            &config,
            dtype,
            weights,
            (SCORE_BATCH, GENERATE_BATCH),
            p.seq_len.value as usize,
            p.max_new_tokens.value as usize,
        ))
    }

    fn refs(&self, p: &EvalParams) -> Vec<StageRef> {
        model_refs(&p.model, &p.adapter, Some(&p.reference))
    }

    fn files(&self, p: &EvalParams, recipe_dir: &Path) -> Vec<FileInput> {
        let mut files = Vec::new();
        if let Some(f) = &p.data.sft {
            files.push(super::file_input(super::input::SFT_ROWS, f, recipe_dir));
        }
        if let Some(f) = &p.data.dpo {
            files.push(super::file_input(super::input::DPO_ROWS, f, recipe_dir));
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
/// One JSON object per evaluated row: `data` ("sft" or "dpo"), `file`,
/// `line` (1-based, in the data file) and the row's metrics.
pub const EXAMPLES_FILE: &str = "examples.jsonl";

fn run_eval(p: &EvalParams, ctx: &mut RunContext) -> anyhow::Result<()> {
    let mut eval = Evaluator::new(p, ctx)?;
    if let Some(file) = ctx.files.get(super::input::SFT_ROWS).cloned() {
        eval.sft_rows(ctx, &file)?;
    }
    if let Some(file) = ctx.files.get(super::input::DPO_ROWS).cloned() {
        eval.dpo_rows(ctx, &file)?;
    }
    if eval.generation_seconds > 0.0 {
        metric(ctx, "generation/seconds", eval.generation_seconds);
    }
    eval.samples(ctx)?;
    eval.write(ctx)
}

fn metric(ctx: &mut RunContext, name: &str, value: f64) {
    ctx.metrics.insert(name.to_string(), value.into());
}

/// One model (with the stage's adapter, if any) being evaluated, and what
/// has been found so far.
struct Evaluator<'p> {
    p: &'p EvalParams,
    device: Device,
    dtype: DType,
    source: inputs::ModelSource,
    adapter: Option<InputArtifact>,
    model: Decoder,
    tokenizer: ModelTokenizer,
    settings: crate::data::TokenizeSettings,
    /// Token ids that end a greedy completion.
    stop: Vec<u32>,
    /// eval.jsonl: a line per data file, then the samples.
    results: Vec<serde_json::Value>,
    /// One line per evaluated row, paired across stages by (data, line).
    examples: Vec<serde_json::Value>,
    /// What greedy decoding for the task metrics cost.
    generation_seconds: f64,
}

impl<'p> Evaluator<'p> {
    fn new(p: &'p EvalParams, ctx: &RunContext) -> anyhow::Result<Self> {
        let device = crate::device::candle(&ctx.device)?;
        let dtype = inputs::dtype(p.dtype.as_ref().map_or(Dtype::F32, |d| d.value));
        let source = inputs::model_source(ctx.input("model")?)?;
        let adapter = ctx.inputs.get("adapter").cloned();
        let model = load(&source, &adapter, dtype, &device)?;
        let tokenizer = inputs::load_tokenizer(&source.dir)?;
        let mut settings = crate::data::TokenizeSettings::new(p.seq_len.value as usize);
        settings.chat_format = p.format.as_ref().map(|f| f.value.clone());
        let stop = tokenizer.eos().map(|e| e.id).into_iter().collect();
        Ok(Evaluator {
            p,
            device,
            dtype,
            source,
            adapter,
            model,
            tokenizer,
            settings,
            stop,
            results: Vec::new(),
            examples: Vec::new(),
            generation_seconds: 0.0,
        })
    }

    /// Greedy completions of `rows`, timed into `generation_seconds`.
    fn greedy(
        &mut self,
        ctx: &RunContext,
        rows: &[crate::data::SftExample],
    ) -> anyhow::Result<Vec<task::Greedy>> {
        let started = std::time::Instant::now();
        let greedy = task::greedy_match(
            &self.model,
            rows,
            &self.stop,
            self.p.max_new_tokens.value as usize,
            ctx.progress,
            ctx.interrupt,
        )?;
        self.generation_seconds += started.elapsed().as_secs_f64();
        Ok(greedy)
    }

    /// Prompt/completion rows: teacher-forced loss and accuracy, greedy
    /// exact and prefix match, and what quantization costs.
    fn sft_rows(&mut self, ctx: &mut RunContext, file: &Path) -> anyhow::Result<()> {
        let (tokenizer, model_dir) = (&self.tokenizer, &self.source.dir);
        let data = inputs::sft_tokens(ctx, file, tokenizer, model_dir, &self.settings)?;
        let forced = task::teacher_forced(
            &self.model,
            &data.examples,
            tokenizer.pad_id(),
            &self.device,
        )?;
        let mut greedy = self.greedy(ctx, &data.examples)?;
        if self.p.normalize_whitespace.value {
            let text = |ids: &[u32]| -> anyhow::Result<String> {
                Ok(task::normalize_whitespace(
                    &self.tokenizer.decode_completion(ids, &self.stop)?,
                ))
            };
            for (g, e) in greedy.iter_mut().zip(&data.examples) {
                g.exact = text(&g.generated)? == text(e.completion_ids())?;
            }
        }
        if self.source.quantize.is_some() {
            self.quantization_cost(ctx, &data.examples)?;
        }
        let tokens: usize = forced.iter().map(|f| f.tokens).sum();
        let loss = forced.iter().map(|f| f.nll).sum::<f64>() / tokens.max(1) as f64;
        let rows = data.examples.len().max(1) as f64;
        let exact = greedy.iter().filter(|g| g.exact).count() as f64 / rows;
        let prefix = greedy.iter().map(|g| g.prefix).sum::<f64>() / rows;
        let accuracy =
            forced.iter().map(|f| f.correct).sum::<usize>() as f64 / tokens.max(1) as f64;
        for (name, value) in [
            ("sft/loss", loss),
            ("sft/perplexity", loss.exp()),
            ("sft/exact_match", exact),
            ("sft/prefix_match", prefix),
            ("sft/token_accuracy", accuracy),
        ] {
            metric(ctx, name, value);
        }
        self.results.push(serde_json::json!({
            "sft/loss": loss,
            "sft/perplexity": loss.exp(),
            "sft/exact_match": exact,
            "sft/prefix_match": prefix,
            "sft/token_accuracy": accuracy,
            "rows": data.examples.len(),
        }));
        let name = crate::fsutil::file_name(file);
        for ((line, f), g) in data.lines.iter().zip(&forced).zip(&greedy) {
            let per = f.tokens.max(1) as f64;
            self.examples.push(serde_json::json!({
                "data": "sft",
                "file": name,
                "line": line,
                "sft/loss": f.nll / per,
                "sft/exact_match": f64::from(u8::from(g.exact)),
                "sft/prefix_match": g.prefix,
                "sft/token_accuracy": f.correct as f64 / per,
            }));
        }
        Ok(())
    }

    /// What holding the model quantized costs, once, against the same
    /// model and adapter dense in f32.
    fn quantization_cost(
        &self,
        ctx: &mut RunContext,
        rows: &[crate::data::SftExample],
    ) -> anyhow::Result<()> {
        let unquantized = load(
            &self.source.dense(),
            &self.adapter,
            DType::F32,
            &self.device,
        )?;
        let d = crate::metrics::divergence::divergence(&unquantized, &self.model, rows)?;
        metric(ctx, "quantization/kl", d.mean_kl);
        metric(ctx, "quantization/logits_max_abs_err", d.max_logit_error);
        Ok(())
    }

    /// Preference pairs: does the model rank chosen above rejected, by how
    /// much, does greedy decoding give the chosen completion, and the
    /// rewards against a reference when there is one.
    fn dpo_rows(&mut self, ctx: &mut RunContext, file: &Path) -> anyhow::Result<()> {
        let (tokenizer, model_dir) = (&self.tokenizer, &self.source.dir);
        let (data, data_key) = inputs::dpo_tokens(ctx, file, tokenizer, model_dir, &self.settings)?;
        let policy = dpo::score_pairs(&self.model, &data, tokenizer.pad_id(), &self.device, None)?;
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
        // Does greedy decoding from the prompt give the chosen completion?
        let chosen_rows: Vec<crate::data::SftExample> = data
            .examples
            .iter()
            .map(|e| crate::data::SftExample {
                input_ids: [e.prompt_ids.as_slice(), &e.chosen_ids].concat(),
                completion_start: e.prompt_ids.len(),
            })
            .collect();
        let chosen_greedy = self.greedy(ctx, &chosen_rows)?;
        let chosen_exact = chosen_greedy.iter().filter(|g| g.exact).count() as f64 / n;
        metric(ctx, "preference/chosen_exact_match", chosen_exact);
        let name = crate::fsutil::file_name(file);
        let mut pairs: Vec<serde_json::Value> = (0..policy.chosen.len())
            .map(|i| {
                let margin = f64::from(policy.chosen[i] - policy.rejected[i]);
                serde_json::json!({
                    "data": "dpo",
                    "file": name,
                    "line": data.lines[i],
                    "preference/accuracy": f64::from(u8::from(margin > 0.0)),
                    "preference/logp_margin": margin,
                    "preference/chosen_exact_match": f64::from(u8::from(chosen_greedy[i].exact)),
                })
            })
            .collect();
        let mut line = serde_json::json!({
            "preference/accuracy": prefers,
            "preference/logp_margin": logp_margin,
            "preference/chosen_exact_match": chosen_exact,
            "pairs": policy.chosen.len(),
        });
        if let Some(reference) = self.reference(ctx)? {
            let scores = {
                let all: Vec<usize> = (0..data.examples.len()).collect();
                let (dtype, pad_id) = (self.dtype, self.tokenizer.pad_id());
                reference_scores(
                    ctx,
                    &reference,
                    &data,
                    &data_key,
                    &all,
                    dtype,
                    &self.device,
                    pad_id,
                    None,
                )?
            };
            let (wins, margin) = self.rewards(&policy, &scores, &mut pairs);
            metric(ctx, "rewards/accuracies", wins / n);
            metric(ctx, "rewards/margins", margin / n);
            line["rewards/accuracies"] = (wins / n).into();
            line["rewards/margins"] = (margin / n).into();
            line["reference"] = reference.description.clone().into();
            ctx.metrics
                .insert("reference".into(), reference.description.into());
        }
        self.results.push(line);
        self.examples.extend(pairs);
        Ok(())
    }

    /// TRL's implicit rewards of each pair against the reference, written
    /// into its line; returns how many pairs the chosen reward wins and the
    /// summed reward margin.
    fn rewards(
        &self,
        policy: &dpo::PairScores,
        reference: &dpo::PairScores,
        pairs: &mut [serde_json::Value],
    ) -> (f64, f64) {
        let (beta, mut wins, mut margin) = (self.p.beta.value, 0usize, 0f64);
        for (i, pair) in pairs.iter_mut().enumerate() {
            let rc = beta * (policy.chosen[i] - reference.chosen[i]) as f64;
            let rr = beta * (policy.rejected[i] - reference.rejected[i]) as f64;
            wins += usize::from(rc > rr);
            margin += rc - rr;
            pair["rewards/accuracies"] = f64::from(u8::from(rc > rr)).into();
            pair["rewards/margins"] = (rc - rr).into();
        }
        (wins as f64, margin)
    }

    /// The rewards' reference: `reference`, else the model without the adapter.
    fn reference(&self, ctx: &RunContext) -> anyhow::Result<Option<ReferenceSpec>> {
        Ok(
            match (ctx.inputs.contains_key("reference"), &self.adapter) {
                (true, _) => Some(reference_spec(ctx)?),
                (false, Some(_)) => Some(ReferenceSpec::of(ctx.input("model")?, None)?),
                (false, None) => None,
            },
        )
    }

    /// Completions of the stage's `prompts`, into eval.jsonl and the manifest.
    fn samples(&mut self, ctx: &mut RunContext) -> anyhow::Result<()> {
        let p = self.p;
        let template = match p.chat_prompts.value && !p.prompts.is_empty() {
            true => Some(
                crate::data::ChatTemplate::resolve(
                    p.format.as_ref().map(|f| f.value.as_str()),
                    &self.tokenizer,
                )?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "`chat_prompts` needs a chat template: the model's tokenizer has none; set `format` (e.g. \"chatml\")"
                    )
                })?,
            ),
            false => None,
        };
        for sample in crate::metrics::samples::complete(
            &self.model,
            &self.tokenizer,
            &p.prompts,
            template.as_ref(),
            p.max_new_tokens.value as usize,
            p.temperature.value,
            ctx.seed,
        )? {
            self.results.push(serde_json::to_value(&sample)?);
        }
        if !p.prompts.is_empty() {
            ctx.metrics.insert(
                "samples".into(),
                serde_json::to_value(
                    self.results
                        .iter()
                        .filter(|r| r.get("prompt").is_some())
                        .collect::<Vec<_>>(),
                )?,
            );
        }
        Ok(())
    }

    /// eval.jsonl and examples.jsonl into the artifact.
    fn write(&self, ctx: &RunContext) -> anyhow::Result<()> {
        use std::io::Write;
        for (file, lines) in [
            (RESULTS_FILE, &self.results),
            (EXAMPLES_FILE, &self.examples),
        ] {
            let mut out = std::fs::File::create(ctx.out_dir.join(file))?;
            for r in lines {
                writeln!(out, "{r}")?;
            }
            out.sync_all()?;
        }
        Ok(())
    }
}

/// The model in `source` with the stage's adapter, if it has one.
fn load(
    source: &inputs::ModelSource,
    adapter: &Option<InputArtifact>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Decoder> {
    let mut model = inputs::load_model(source, dtype, device)?;
    if let Some(adapter) = adapter {
        inputs::load_adapter(&mut model, adapter)?;
    }
    Ok(model)
}
