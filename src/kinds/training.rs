//! What the two training kinds (`sft`, `dpo`) share: data files as inputs,
//! the recipe checks of a training stage, the policy model, and running the
//! training library's loop in the stage's folders.

use std::path::PathBuf;

use super::lora::{self, LoraUse};
use super::params::{DataSpec, LoraSpec, TrainSpec};
use super::{file_input, input, inputs};
use crate::diag::span::Sp;
use crate::diag::Problem;
use crate::sink::Tracker;
use crate::stage::{Dtype, FileInput, ParseContext, RunContext, StageView};
use crate::train::trainer::{self, LoopEnv, Metrics, TrainingObjective};

/// `data.train` and `data.eval` as stage inputs.
pub fn data_files(data: &Option<DataSpec>, recipe_dir: &std::path::Path) -> Vec<FileInput> {
    let Some(data) = data else { return Vec::new() };
    let mut files = vec![file_input(input::TRAIN, &data.train, recipe_dir)];
    if let Some(eval) = &data.eval {
        files.push(file_input(input::EVAL, eval, recipe_dir));
    }
    files
}

/// Range checks of the tables a training stage has.
pub fn check_tables(
    lora: &Option<LoraSpec>,
    train: &TrainSpec,
    data: &Option<DataSpec>,
    problems: &mut Vec<Problem>,
) {
    if let Some(l) = lora {
        l.check(problems);
    }
    train.check(problems);
    if let Some(d) = data {
        d.check(problems);
    }
}

/// Defaults a training stage gets: a new adapter with the default LoRA when
/// it neither continues one nor declares one, and the recipe's dtype.
pub fn fill_defaults(
    adapter: &Option<Sp<String>>,
    lora: &mut Option<LoraSpec>,
    dtype: &mut Option<Sp<Dtype>>,
    ctx: &ParseContext,
) {
    if adapter.is_none() && lora.is_none() {
        *lora = Some(toml::from_str("").expect("LoRA defaults"));
    }
    if dtype.is_none() {
        *dtype = Some(Sp::implicit(ctx.dtype));
    }
}

/// The checks of a training stage against the stages it refers to, in the
/// order they are reported: data, the adapter's model, the LoRA shape.
pub fn check(
    view: StageView<'_>,
    data: &Option<DataSpec>,
    lora_use: LoraUse<'_>,
    span: std::ops::Range<usize>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    if data.is_none() {
        problems.push(
            Problem::new(format!("training stage `{}` has no `data`", view.name()))
                .at(span, "this stage")
                .help("add data = { train = \"data/train.jsonl\" }"),
        );
    }
    lora::check_adapter_model(view, &mut problems);
    lora::check_lora(view, lora_use, &mut problems);
    problems
}

/// The policy model: the `model` input with a new adapter, or with the
/// `adapter` input loaded trainable; checkpointed when `train` says so.
fn policy(
    ctx: &RunContext,
    lora: &Option<LoraSpec>,
    train: &TrainSpec,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> anyhow::Result<(crate::model::decoder::Decoder, PathBuf)> {
    let source = inputs::model_source(ctx.input("model")?)?;
    let mut model = inputs::load_model(&source, dtype, device)?;
    match (ctx.inputs.get("adapter"), lora) {
        (Some(adapter), _) => inputs::load_adapter(&mut model, adapter)?,
        (None, Some(spec)) => model.apply_lora(&lora::lora_config(spec), ctx.seed)?,
        (None, None) => anyhow::bail!("stage `{}` has neither `adapter` nor `lora`", ctx.stage),
    }
    if train.checkpointing.value {
        model.enable_checkpointing();
    }
    Ok((model, source.dir))
}

/// What a training stage starts from: where and in what it computes, the
/// policy (its model with the adapter it trains), the model's folder and
/// tokenizer, how its data is tokenized, and the step's memory estimate.
pub struct Start {
    pub device: candle_core::Device,
    pub dtype: candle_core::DType,
    pub model: crate::model::decoder::Decoder,
    pub model_dir: PathBuf,
    pub tokenizer: crate::data::ModelTokenizer,
    pub settings: crate::data::TokenizeSettings,
    pub memory: Option<crate::model::memory::MemoryEstimate>,
    /// The training file, and the held-out one if the stage has it.
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
}

/// The start of a training stage with these tables and micro-batch.
pub fn start(
    ctx: &RunContext,
    lora: &Option<LoraSpec>,
    train: &TrainSpec,
    data: &Option<DataSpec>,
    dtype: &Option<Sp<Dtype>>,
    batch: super::memory::MicroBatch,
) -> anyhow::Result<Start> {
    let data = data.as_ref().expect("checked when parsing");
    let device = crate::device::candle(&ctx.device)?;
    let dtype = inputs::dtype(dtype.as_ref().map_or(Dtype::F32, |d| d.value));
    let (model, model_dir) = policy(ctx, lora, train, dtype, &device)?;
    let memory = memory_estimate(&model, train, batch);
    let tokenizer = inputs::load_tokenizer(&model_dir)?;
    Ok(Start {
        settings: inputs::settings(train, data),
        train_file: ctx.files[input::TRAIN].clone(),
        eval_file: ctx.files.get(input::EVAL).cloned(),
        device,
        dtype,
        model,
        model_dir,
        tokenizer,
        memory,
    })
}

/// Beside an adapter trained on a quantized base: the base and its formats.
pub const BASE_QUANTIZATION_FILE: &str = "base_quantization.json";

/// Train `model` on `objective` in the stage's folders, save the adapter as
/// the artifact, and record the metrics before and after.
pub fn train_and_save(
    ctx: &mut RunContext,
    start: &Start,
    objective: &dyn TrainingObjective,
    settings: &trainer::LoopSettings,
) -> anyhow::Result<()> {
    let (model, memory) = (&start.model, start.memory);
    let before = objective.evaluate(model)?;
    let resume_file = ctx.cache.resume_file(&ctx.key);
    let (trackers, warnings) = ctx.tracking.open();
    for w in warnings {
        ctx.progress.log(&format!("warning: {w}"));
    }
    let tracker = crate::tracking::Fanout(trackers);
    let env = LoopEnv {
        work_dir: &ctx.work_dir,
        resume_file: &resume_file,
        out_dir: &ctx.out_dir,
        progress: ctx.progress,
        interrupt: ctx.interrupt,
        tracker: &tracker,
    };
    let trained = trainer::train(model, objective, settings, &env);
    if let Err(e) = tracker.end(trained.is_ok()) {
        ctx.progress.log(&format!("warning: {e}"));
    }
    let metrics: Metrics = trained?;
    let (bits_per_weight, formats) = base_precision(model);
    ctx.metrics
        .insert("base/bits_per_weight".into(), bits_per_weight.into());
    // The estimate goes beside the measured peak the manifest records.
    if let Some(estimate) = memory {
        ctx.metrics.insert(
            crate::units::ESTIMATE_METRIC.into(),
            crate::units::gib_metric(estimate.estimate_bytes).into(),
        );
    }
    let model_name = super::inputs::model_name(ctx.input("model")?);
    crate::model::formats::peft::save_adapter(model, &ctx.out_dir, &model_name)?;
    if model.quantization.is_some() || formats.keys().any(|f| *f != "dense") {
        // The adapter is ordinary PEFT and loads on the full-precision base;
        // this says what it was trained against (`quantize` null: the
        // base's own blocks or FP8 codes, as stored).
        let note = serde_json::json!({
            "base_model_name_or_path": model_name,
            "quantize": model.quantization,
            "formats": formats,
        });
        crate::fsutil::write_atomic(
            &ctx.out_dir.join(BASE_QUANTIZATION_FILE),
            serde_json::to_string_pretty(&note)?.as_bytes(),
        )?;
    }
    for (k, v) in before {
        ctx.metrics.insert(format!("before/{k}"), v.into());
    }
    for (k, v) in metrics {
        ctx.metrics.insert(k, v.into());
    }
    Ok(())
}

/// The projections' mean bits a weight, and how many are held in each
/// format ("dense" or a block format's name).
fn base_precision(
    model: &crate::model::decoder::Decoder,
) -> (f64, std::collections::BTreeMap<&'static str, usize>) {
    let (mut bits, mut weights) = (0.0, 0.0);
    let mut formats = std::collections::BTreeMap::new();
    for linear in model.linears() {
        let (out, inp) = linear.weight.dims();
        bits += 8.0 * linear.weight.bytes() as f64;
        weights += (out * inp) as f64;
        *formats.entry(linear.weight.label()).or_default() += 1;
    }
    (bits / weights.max(1.0), formats)
}

/// The memory estimate of a training step on the loaded `model`: `rows`
/// sequences of `train.seq_len` a micro-batch, a reference model beside it
/// or not (each training kind's `micro_batch`).
fn memory_estimate(
    model: &crate::model::decoder::Decoder,
    train: &TrainSpec,
    batch: super::memory::MicroBatch,
) -> Option<crate::model::memory::MemoryEstimate> {
    let lora = model.lora_config.as_ref()?;
    let targets = lora.resolve(&model.config).ok()?;
    Some(crate::model::memory::estimate(
        &crate::model::memory::StepShape {
            config: &model.config,
            dtype: model.dtype,
            quantization: model.quantization,
            // A GGUF's own blocks: the bits its projections take as loaded.
            stored_bits: (model.quantization.is_none()
                && model.linears().any(|l| l.weight.format().is_some()))
            .then(|| base_precision(model).0),
            targets: &targets,
            dropout: lora.dropout > 0.0,
            rows: batch.rows,
            seq_len: train.seq_len.value as usize,
            checkpointing: model.checkpointing(),
            reference_model: batch.reference,
            fused: crate::model::memory::fused_path(!model.device.is_cpu(), model.dtype),
        },
    ))
}
