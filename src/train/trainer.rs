//! The optimisation loop shared by SFT and DPO: micro-batches with gradient
//! accumulation, global-norm clipping, the LR schedule, AdamW, metrics as
//! JSONL, evaluation, checkpoints, Ctrl-C and exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use candle_core::Tensor;

use super::adamw::{clip_factor, AdamW, AdamWConfig};
use super::checkpoint::{self, LoopState};
use super::order;
use super::schedule::lr_at;
use crate::model::decoder::{Decoder, Mode};
use crate::recipe::params::TrainSpec;
use crate::stage::{Interrupted, RunContext};

/// Scalar metrics by TRL's names.
pub type Metrics = BTreeMap<String, f64>;

/// The loss a stage optimises, over its examples.
pub trait Objective {
    /// Number of training examples (rows or pairs).
    fn examples(&self) -> usize;

    /// Mean loss of the micro-batch made of `examples` (indices), its metrics,
    /// and the number of tokens it processed.
    fn loss(
        &self,
        model: &Decoder,
        examples: &[usize],
        mode: Mode,
    ) -> anyhow::Result<(Tensor, Metrics, usize)>;

    /// Metrics on held-out data, named `eval/...`; empty without an eval split.
    fn evaluate(&self, model: &Decoder) -> anyhow::Result<Metrics>;
}

/// Metrics file in the work folder (survives a crash; copied into the artifact at the end).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// What the loop needs besides the model and the objective.
pub struct LoopSettings<'a> {
    pub train: &'a TrainSpec,
    pub seed: u64,
    /// Whether dropout is active while training (LoRA dropout > 0 and not disabled).
    pub dropout: bool,
}

/// Train the model's LoRA parameters; returns the final metrics.
pub fn train(
    model: &Decoder,
    objective: &dyn Objective,
    s: &LoopSettings,
    ctx: &mut RunContext,
) -> anyhow::Result<Metrics> {
    let spec = s.train;
    let params = model.lora_parameters();
    anyhow::ensure!(
        !params.is_empty(),
        "the model has no LoRA parameters to train"
    );
    let mut optimizer = AdamW::new(
        params.clone(),
        AdamWConfig {
            beta1: spec.betas.value[0],
            beta2: spec.betas.value[1],
            eps: spec.eps.value,
            weight_decay: spec.weight_decay.value,
        },
    )?;
    let (steps, batch, accum) = (
        spec.steps.value,
        spec.batch.value as usize,
        spec.grad_accum.value as u64,
    );
    let metrics_path = ctx.work_dir.join(METRICS_FILE);
    let mut state = LoopState {
        step: 0,
        metrics_lines: 0,
        examples_seen: 0,
        seed: s.seed,
        // f16 gradients underflow without loss scaling; bf16 and f32 need none.
        scaler: (model.dtype == candle_core::DType::F16).then(super::scaler::LossScaler::default),
    };
    match checkpoint::latest(&ctx.work_dir, &model.device)? {
        Some(ck) => {
            for (name, var) in &params {
                let t = ck
                    .params
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint lacks parameter `{name}`"))?;
                var.set(t)?;
            }
            optimizer.load_state(&ck.optimizer, ck.state.step)?;
            state = ck.state;
            truncate_lines(&metrics_path, state.metrics_lines)?;
            ctx.progress
                .log(&format!("resuming from step {}", state.step));
        }
        None => {
            let _ = std::fs::remove_file(&metrics_path);
        }
    }
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    fn write_line(
        file: &mut std::fs::File,
        state: &mut LoopState,
        line: serde_json::Value,
    ) -> anyhow::Result<()> {
        writeln!(file, "{line}")?;
        state.metrics_lines += 1;
        Ok(())
    }
    fn write_eval(
        file: &mut std::fs::File,
        state: &mut LoopState,
        eval: &Metrics,
    ) -> anyhow::Result<()> {
        if eval.is_empty() {
            return Ok(());
        }
        let mut line = serde_json::json!({ "step": state.step });
        for (k, v) in eval {
            line[k] = (*v).into();
        }
        write_line(file, state, line)
    }
    let save = |state: &LoopState, optimizer: &AdamW| -> anyhow::Result<()> {
        let tensors = params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(&ctx.work_dir, state, &tensors, &optimizer.state())
    };

    ctx.progress.set_total(steps);
    ctx.progress.set_position(state.step, "");
    let mut last: Metrics = Metrics::new();
    let (mut tokens_total, clock) = (0usize, Instant::now());
    while state.step < steps {
        let step = state.step;
        let started = Instant::now();
        let lr = lr_at(
            spec.schedule.value,
            spec.lr.value,
            step,
            steps,
            spec.warmup.value,
        );
        let mut grads: Option<Vec<Tensor>> = None;
        let mut sums = Metrics::new();
        let mut tokens = 0;
        for micro in 0..accum {
            let examples = order::take(s.seed, objective.examples(), state.examples_seen, batch);
            state.examples_seen += batch as u64;
            let mode = if s.dropout {
                Mode::Train {
                    dropout_seed: order::dropout_seed(s.seed, step, micro),
                }
            } else {
                Mode::Eval
            };
            let (loss, m, n) = objective.loss(model, &examples, mode)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                anyhow::bail!(
                    "step {}: the loss is {value}; stopped (the last good checkpoint, if any, is kept)",
                    step + 1
                );
            }
            *sums.entry("loss".into()).or_default() += value / accum as f64;
            for (k, v) in m {
                *sums.entry(k).or_default() += v / accum as f64;
            }
            tokens += n;
            let scale = state.scaler.as_ref().map_or(1.0, |sc| sc.scale);
            let mut g = optimizer.gradients(&(loss * (scale / accum as f64))?.backward()?)?;
            if scale != 1.0 {
                g = g
                    .iter()
                    .map(|t| t / scale)
                    .collect::<candle_core::Result<_>>()?;
            }
            grads = Some(match grads {
                None => g,
                Some(acc) => acc
                    .iter()
                    .zip(&g)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let mut grads = grads.expect("at least one micro-batch");
        let (norm, factor) = clip_factor(&grads, spec.max_grad_norm.value)?;
        if let Some(scaler) = state.scaler.as_mut() {
            if !scaler.update(norm.is_finite()) {
                // Overflow under loss scaling: skip this step with a smaller scale.
                ctx.progress.log(&format!(
                    "step {}: f16 gradients overflowed; skipped, loss scale now {}",
                    step + 1,
                    scaler.scale
                ));
                state.step += 1;
                continue;
            }
        }
        if !norm.is_finite() {
            anyhow::bail!("step {}: the gradient norm is {norm}; stopped (the last good checkpoint, if any, is kept)", step + 1);
        }
        if factor < 1.0 {
            grads = grads
                .iter()
                .map(|g| g * factor)
                .collect::<candle_core::Result<_>>()?;
        }
        optimizer.apply(&grads, lr)?;
        state.step += 1;
        tokens_total += tokens;

        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let mut line = serde_json::json!({ "step": state.step, "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": tokens_per_s });
        for (k, v) in &sums {
            line[k] = (*v).into();
        }
        write_line(&mut metrics_file, &mut state, line)?;
        ctx.progress.set_position(
            state.step,
            &format!("loss {:.4} {:.0} tok/s", sums["loss"], tokens_per_s),
        );
        last = sums;
        last.insert("grad_norm".into(), norm);

        let done = state.step;
        let every = |n: u64| n > 0 && done.is_multiple_of(n) && done < steps;
        if every(spec.eval_every.value) {
            let eval = objective.evaluate(model)?;
            write_eval(&mut metrics_file, &mut state, &eval)?;
        }
        if ctx.interrupted() {
            metrics_file.sync_all()?;
            save(&state, &optimizer)?;
            ctx.progress
                .log(&format!("checkpointed at step {}", state.step));
            return Err(Interrupted.into());
        }
        if every(spec.checkpoint_every.value) {
            metrics_file.sync_all()?;
            save(&state, &optimizer)?;
        }
    }

    let eval = objective.evaluate(model)?;
    write_eval(&mut metrics_file, &mut state, &eval)?;
    metrics_file.sync_all()?;
    std::fs::copy(&metrics_path, ctx.out_dir.join(METRICS_FILE))?;
    let mut out = last;
    out.extend(eval);
    out.insert("steps".into(), steps as f64);
    out.insert(
        "trainable_parameters".into(),
        params
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum::<usize>() as f64,
    );
    out.insert(
        "tokens_per_s".into(),
        tokens_total as f64 / clock.elapsed().as_secs_f64().max(1e-9),
    );
    Ok(out)
}

/// Keep the first `lines` lines of a file (drop what a killed run wrote after its checkpoint).
fn truncate_lines(path: &std::path::Path, lines: u64) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text.split_inclusive('\n').take(lines as usize).collect();
    crate::fsutil::write_atomic(path, kept.as_bytes())
}

/// Run `f` on a thread with a 64 MiB stack: backward walks the graph recursively.
pub fn with_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("train".into())
            .stack_size(64 << 20)
            .spawn_scoped(scope, f)
            .expect("spawn training thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
