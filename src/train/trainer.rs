//! The optimisation loop shared by SFT and DPO: micro-batches with gradient
//! accumulation, global-norm clipping, the LR schedule, AdamW, metrics as
//! JSONL, evaluation, checkpoints, Ctrl-C and exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use candle_core::{backprop::GradStore, Tensor, Var};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::adamw::{clip_factor, AdamW, AdamWConfig};
use super::checkpoint::{self, LoopState};
use super::order;
use super::schedule::{lr_at, Schedule};
use crate::model::decoder::{Decoder, Mode};
use crate::model::kernels::cpu;
use crate::sink::{Interrupted, Progress};

/// Scalar metrics by TRL's names.
pub type Metrics = BTreeMap<String, f64>;

/// What the forward pass of one shard of a micro-batch hands the loss.
pub struct ShardOutput {
    /// Per-unit values with their graph (SFT: each completion token's
    /// log-prob; DPO: each sequence's summed log-prob).
    pub values: Tensor,
    /// Per-unit counts the loss needs besides (DPO: completion tokens).
    pub counts: Vec<f32>,
    /// Per-unit weights without a graph (DPO with WPO: each row's); empty
    /// when unused.
    pub weights: Vec<f32>,
}

/// The loss a stage optimises, over its examples. A micro-batch is split
/// into shards (`shards::split`) whose forward passes run apart; the loss
/// then sees all of their outputs, so it may couple a batch's examples.
pub trait TrainingObjective: Sync {
    /// Number of training examples (rows or pairs).
    fn examples(&self) -> usize;

    /// Tokens the forward pass reads for example `i` (tokens/s).
    fn tokens(&self, i: usize) -> usize;

    /// The forward pass of the shard made of `examples` (indices).
    fn forward(
        &self,
        model: &Decoder,
        examples: &[usize],
        mode: Mode,
    ) -> anyhow::Result<ShardOutput>;

    /// Mean loss of a micro-batch and its metrics from its shards' outputs,
    /// in order; `examples` are the shards' examples one after another.
    fn loss(&self, shards: &[ShardOutput], examples: &[usize])
        -> anyhow::Result<(Tensor, Metrics)>;

    /// Metrics on held-out data, named `eval/...`; empty without an eval split.
    fn evaluate(&self, model: &Decoder) -> anyhow::Result<Metrics>;
}

/// Metrics file in the work folder (survives a crash; copied into the artifact at the end).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Each step's wall-clock figures, beside metrics.jsonl; outside the
/// artifact's id (`cache::UNHASHED`).
pub const TIMINGS_FILE: &str = "timings.jsonl";

/// The optimisation settings of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Linear warmup steps.
    pub warmup: u64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Clip gradients to this global norm; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only on Ctrl-C).
    pub checkpoint_every: u64,
    /// Seed of the data order and dropout masks.
    pub seed: u64,
    /// Whether dropout is active while training (LoRA dropout > 0 and not disabled).
    pub dropout: bool,
}

/// Where the loop keeps its files and whom it tells.
pub struct LoopEnv<'a> {
    /// Survives crashes: checkpoints and the metrics written so far.
    pub work_dir: &'a Path,
    /// The file that says which step a rerun would resume from (read by `plan`).
    pub resume_file: &'a Path,
    /// Where the finished run's metrics.jsonl goes.
    pub out_dir: &'a Path,
    pub progress: &'a dyn Progress,
    /// Set by Ctrl-C: checkpoint at the next step boundary and stop.
    pub interrupt: &'a AtomicBool,
    /// Gets every metrics line as it is written (a live view).
    pub tracker: &'a dyn crate::sink::Tracker,
}

/// Train the model's LoRA parameters; returns the final metrics.
pub fn train(
    model: &Decoder,
    objective: &dyn TrainingObjective,
    s: &LoopSettings,
    env: &LoopEnv,
) -> anyhow::Result<Metrics> {
    let mut run = Run::start(model, objective, s, env)?;
    while run.state.step < s.steps {
        run.step()?;
    }
    run.finish()
}

/// A training run between its start (fresh or resumed) and its end.
struct Run<'a> {
    model: &'a Decoder,
    objective: &'a dyn TrainingObjective,
    s: &'a LoopSettings,
    env: &'a LoopEnv<'a>,
    params: Vec<(String, Var)>,
    optimizer: AdamW,
    state: LoopState,
    metrics_path: PathBuf,
    metrics_file: std::fs::File,
    /// Lines still go to `env.tracker` (false once it failed).
    tracking: bool,
    /// The last step's metrics.
    last: Metrics,
    tokens_total: usize,
    /// Started when the loop begins (after setup and resume).
    clock: Instant,
}

/// What a step's micro-batches add up to.
struct Accumulated {
    grads: Vec<Tensor>,
    /// Loss and metrics, averaged over the micro-batches.
    sums: Metrics,
    tokens: usize,
}

impl<'a> Run<'a> {
    /// The optimizer and loop state, resumed from the newest checkpoint
    /// when there is one, and the metrics file opened for appending.
    fn start(
        model: &'a Decoder,
        objective: &'a dyn TrainingObjective,
        s: &'a LoopSettings,
        env: &'a LoopEnv<'a>,
    ) -> anyhow::Result<Self> {
        let params = model.lora_parameters();
        anyhow::ensure!(
            !params.is_empty(),
            "the model has no LoRA parameters to train"
        );
        let mut optimizer = AdamW::new(
            params.clone(),
            AdamWConfig {
                beta1: s.betas[0],
                beta2: s.betas[1],
                eps: s.eps,
                weight_decay: s.weight_decay,
            },
        )?;
        let metrics_path = env.work_dir.join(METRICS_FILE);
        let fresh = LoopState {
            step: 0,
            metrics_lines: 0,
            examples_seen: 0,
            seed: s.seed,
            // f16 gradients underflow without loss scaling; bf16 and f32 need none.
            scaler: (model.dtype == candle_core::DType::F16)
                .then(super::scaler::LossScaler::default),
        };
        let state =
            resume(&params, &mut optimizer, &metrics_path, &model.device, env)?.unwrap_or(fresh);
        let metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)?;
        // The tracker starts over from the lines kept (none on a fresh run).
        let kept: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let tracking = match env.tracker.restart(&kept) {
            Ok(()) => true,
            Err(e) => {
                env.progress
                    .log(&format!("warning: {e}; not tracking this run"));
                false
            }
        };
        env.progress.set_total(s.steps);
        env.progress.set_position(state.step, "");
        Ok(Run {
            model,
            objective,
            s,
            env,
            params,
            optimizer,
            state,
            metrics_path,
            metrics_file,
            tracking,
            last: Metrics::new(),
            tokens_total: 0,
            clock: Instant::now(),
        })
    }

    /// One optimizer step: its micro-batches, clipping, the update, the
    /// metrics line, then evaluation and checkpoints when due. A step whose
    /// f16 gradients overflowed is skipped with a smaller loss scale.
    fn step(&mut self) -> anyhow::Result<()> {
        let (s, step) = (self.s, self.state.step);
        let started = Instant::now();
        let lr = lr_at(s.schedule, s.lr, step, s.steps, s.warmup);
        let Accumulated {
            mut grads,
            sums,
            tokens,
        } = self.accumulate(step)?;
        let (norm, factor) = clip_factor(&grads, s.max_grad_norm)?;
        if let Some(scaler) = self.state.scaler.as_mut() {
            if !scaler.update(norm.is_finite()) {
                self.env.progress.log(&format!(
                    "step {}: f16 gradients overflowed; skipped, loss scale now {}",
                    step + 1,
                    scaler.scale
                ));
                self.state.step += 1;
                return Ok(());
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
        self.optimizer.apply(&grads, lr)?;
        self.state.step += 1;
        self.tokens_total += tokens;
        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
        // elapsed_s: seconds since this process began the loop, so a benchmark
        // can time steps end to end (checkpoints and evaluations included).
        let mut line = serde_json::json!({ "step": self.state.step, "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": tokens_per_s, "elapsed_s": self.clock.elapsed().as_secs_f64() });
        for (k, v) in &sums {
            line[k] = (*v).into();
        }
        self.write_line(line)?;
        self.env.progress.set_position(
            self.state.step,
            &format!("loss {:.4} {:.0} tok/s", sums["loss"], tokens_per_s),
        );
        self.last = sums;
        self.last.insert("grad_norm".into(), norm);
        self.after_step()
    }

    /// The gradients, loss and metrics of step `step`'s micro-batches,
    /// unscaled and averaged.
    fn accumulate(&mut self, step: u64) -> anyhow::Result<Accumulated> {
        let (s, accum) = (self.s, self.s.grad_accum);
        let mut grads: Option<Vec<Tensor>> = None;
        let mut sums = Metrics::new();
        let mut tokens = 0;
        for micro in 0..accum {
            let examples = order::take(
                s.seed,
                self.objective.examples(),
                self.state.examples_seen,
                s.batch,
            );
            self.state.examples_seen += s.batch as u64;
            let mode = micro_batch_mode(s, step, micro);
            let scale = self.state.scaler.as_ref().map_or(1.0, |sc| sc.scale);
            let mut done = micro_batch(
                self.model,
                &self.params,
                self.objective,
                &examples,
                mode,
                scale / accum as f64,
            )?;
            let value = done.loss;
            if !value.is_finite() {
                anyhow::bail!(
                    "step {}: the loss is {value}; stopped (the last good checkpoint, if any, is kept)",
                    step + 1
                );
            }
            *sums.entry("loss".into()).or_default() += value / accum as f64;
            for (k, v) in done.metrics {
                *sums.entry(k).or_default() += v / accum as f64;
            }
            tokens += done.tokens;
            if scale != 1.0 {
                done.grads = done
                    .grads
                    .iter()
                    .map(|t| t / scale)
                    .collect::<candle_core::Result<_>>()?;
            }
            grads = Some(match grads {
                None => done.grads,
                Some(acc) => add_gradients(&acc, &done.grads)?,
            });
        }
        let grads = grads.expect("at least one micro-batch");
        Ok(Accumulated {
            grads,
            sums,
            tokens,
        })
    }

    /// Evaluation and checkpoints the finished step calls for, and a stop on
    /// Ctrl-C (after a checkpoint).
    fn after_step(&mut self) -> anyhow::Result<()> {
        let (done, steps) = (self.state.step, self.s.steps);
        let every = |n: u64| n > 0 && done.is_multiple_of(n) && done < steps;
        if every(self.s.eval_every) {
            let eval = self.objective.evaluate(self.model)?;
            self.write_eval(&eval)?;
        }
        if self.env.interrupt.load(Ordering::SeqCst) {
            self.checkpoint()?;
            self.env
                .progress
                .log(&format!("checkpointed at step {}", self.state.step));
            return Err(Interrupted.into());
        }
        if every(self.s.checkpoint_every) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// The metrics so far on disk, then a checkpoint of this step.
    fn checkpoint(&self) -> anyhow::Result<()> {
        self.metrics_file.sync_all()?;
        let tensors = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(
            self.env.work_dir,
            self.env.resume_file,
            &self.state,
            &tensors,
            &self.optimizer.state(),
        )
    }

    /// The final evaluation, metrics.jsonl copied into the artifact, and the
    /// run's metrics.
    fn finish(mut self) -> anyhow::Result<Metrics> {
        let eval = self.objective.evaluate(self.model)?;
        self.write_eval(&eval)?;
        self.metrics_file.sync_all()?;
        split_timings(&self.metrics_path, self.env.out_dir)?;
        let mut out = self.last;
        out.extend(eval);
        out.insert("steps".into(), self.s.steps as f64);
        out.insert(
            "trainable_parameters".into(),
            self.params
                .iter()
                .map(|(_, v)| v.as_tensor().elem_count())
                .sum::<usize>() as f64,
        );
        out.insert(
            "tokens_per_s".into(),
            self.tokens_total as f64 / self.clock.elapsed().as_secs_f64().max(1e-9),
        );
        Ok(out)
    }

    fn write_line(&mut self, line: serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.metrics_file, "{line}")?;
        self.state.metrics_lines += 1;
        if self.tracking {
            if let Err(e) = self.env.tracker.line(&line) {
                self.env
                    .progress
                    .log(&format!("warning: {e}; not tracking the rest of this run"));
                self.tracking = false;
            }
        }
        Ok(())
    }

    /// One `eval/...` line at this step; none when `eval` is empty.
    fn write_eval(&mut self, eval: &Metrics) -> anyhow::Result<()> {
        if eval.is_empty() {
            return Ok(());
        }
        let mut line = serde_json::json!({ "step": self.state.step });
        for (k, v) in eval {
            line[k] = (*v).into();
        }
        self.write_line(line)
    }
}

/// The loop state of the newest checkpoint in the work folder, with the
/// parameters and optimizer restored and metrics.jsonl cut back to it;
/// None (and no metrics file) when there is none.
fn resume(
    params: &[(String, Var)],
    optimizer: &mut AdamW,
    metrics_path: &Path,
    device: &candle_core::Device,
    env: &LoopEnv,
) -> anyhow::Result<Option<LoopState>> {
    let Some(ck) = checkpoint::latest(env.work_dir, device)? else {
        let _ = std::fs::remove_file(metrics_path);
        return Ok(None);
    };
    for (name, var) in params {
        let t = ck
            .params
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("checkpoint lacks parameter `{name}`"))?;
        var.set(t)?;
    }
    optimizer.load_state(&ck.optimizer, ck.state.step)?;
    truncate_lines(metrics_path, ck.state.metrics_lines)?;
    env.progress
        .log(&format!("resuming from step {}", ck.state.step));
    Ok(Some(ck.state))
}

/// The forward mode of micro-batch `micro` of step `step`: dropout seeded
/// by both when it is on.
fn micro_batch_mode(s: &LoopSettings, step: u64, micro: u64) -> Mode {
    if s.dropout {
        Mode::Train {
            dropout_seed: order::dropout_seed(s.seed, step, micro),
        }
    } else {
        Mode::Eval
    }
}

/// What one micro-batch gives the training loop.
pub struct MicroBatch {
    /// The objective's loss (not scaled).
    pub loss: f64,
    pub metrics: Metrics,
    /// Gradients of `loss · scale` for the parameters, in their order;
    /// empty when the loss is not finite.
    pub grads: Vec<Tensor>,
    /// Tokens the forward passes read.
    pub tokens: usize,
}

/// One micro-batch as the training loop computes it: the shards' forward
/// passes on their threads, the loss over all of their outputs, then the
/// shards' backward passes on their threads, seeded with the loss's
/// gradient at their outputs; the gradients are summed in shard order.
pub fn micro_batch(
    model: &Decoder,
    params: &[(String, Var)],
    objective: &dyn TrainingObjective,
    examples: &[usize],
    mode: Mode,
    scale: f64,
) -> anyhow::Result<MicroBatch> {
    let tokens: Vec<usize> = examples.iter().map(|&i| objective.tokens(i)).collect();
    let shards = super::shards::split(&tokens, model.device.is_cpu());
    let threads = cpu::threads_here();
    let outputs = super::shards::run(shards.len(), threads, |i| {
        let mode = match mode {
            Mode::Train { dropout_seed } => Mode::Train {
                dropout_seed: order::shard_dropout_seed(dropout_seed, i),
            },
            other => other,
        };
        objective.forward(model, &examples[shards[i].clone()], mode)
    })?;
    // The loss sees each shard's output as a leaf, so its backward stops
    // there; each shard then backpropagates its own part.
    let leaves: Vec<Var> = outputs
        .iter()
        .map(|o| Var::from_tensor(&o.values.detach()))
        .collect::<candle_core::Result<_>>()?;
    let as_leaves: Vec<ShardOutput> = outputs
        .iter()
        .zip(&leaves)
        .map(|(o, leaf)| ShardOutput {
            values: leaf.as_tensor().clone(),
            counts: o.counts.clone(),
            weights: o.weights.clone(),
        })
        .collect();
    let (loss, metrics) = objective.loss(&as_leaves, examples)?;
    let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let mut done = MicroBatch {
        loss: value,
        metrics,
        grads: Vec::new(),
        tokens: tokens.iter().sum(),
    };
    if !value.is_finite() {
        return Ok(done);
    }
    let upstream = (loss * scale)?.backward()?;
    let seeds: Vec<Tensor> = leaves
        .iter()
        .map(|leaf| gradient_or_zeros(&upstream, leaf))
        .collect::<candle_core::Result<_>>()?;
    let grads = super::shards::run(shards.len(), threads, |i| {
        let store = model.backward(&(&outputs[i].values * &seeds[i])?.sum_all()?)?;
        params
            .iter()
            .map(|(_, var)| gradient_or_zeros(&store, var))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(Into::into)
    })?;
    let mut shard_grads = grads.into_iter();
    let first = shard_grads.next().expect("a micro-batch has a shard");
    done.grads = shard_grads.try_fold(first, |acc, g| add_gradients(&acc, &g))?;
    Ok(done)
}

/// `var`'s gradient in `store`, zeros where backward produced none.
fn gradient_or_zeros(store: &GradStore, var: &Var) -> candle_core::Result<Tensor> {
    match store.get(var.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => var.as_tensor().zeros_like(),
    }
}

/// Two lists of gradients (the same parameters, in order) added.
fn add_gradients(a: &[Tensor], b: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
    a.iter().zip(b).map(|(a, b)| a + b).collect()
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

/// Wall-clock fields of a metrics line: they differ between machines and
/// runs, so they go to the unhashed timings file, not metrics.jsonl.
const TIMING_FIELDS: [&str; 2] = ["tokens_per_s", "elapsed_s"];

/// The run's metrics lines into the artifact: metrics.jsonl without the
/// wall-clock fields (what the artifact's id covers), and those fields by
/// step in the timings file beside it.
fn split_timings(metrics: &std::path::Path, out_dir: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(metrics)?;
    let (mut kept, mut timings) = (String::new(), String::new());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)?;
        let mut timing = serde_json::Map::new();
        for field in TIMING_FIELDS {
            if let Some(v) = row.remove(field) {
                timing.insert(field.into(), v);
            }
        }
        if !timing.is_empty() {
            for field in ["step", "tokens"] {
                if let Some(v) = row.get(field) {
                    timing.insert(field.into(), v.clone());
                }
            }
            timings.push_str(&serde_json::Value::Object(timing).to_string());
            timings.push('\n');
        }
        kept.push_str(&serde_json::Value::Object(row).to_string());
        kept.push('\n');
    }
    crate::fsutil::write_atomic(&out_dir.join(METRICS_FILE), kept.as_bytes())?;
    crate::fsutil::write_atomic(&out_dir.join(TIMINGS_FILE), timings.as_bytes())?;
    Ok(())
}
