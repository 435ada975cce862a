//! Parameter tables shared by several stage kinds (`lora`, `train`, `data`,
//! `dpo`), their defaults and their range checks.

use serde::{Deserialize, Serialize};

use crate::diag::checks::{at_least, non_negative, positive, unit_interval};
use crate::diag::span::Sp;
use crate::diag::Problem;

/// Which modules get LoRA layers: a list of names (exact, or matching the
/// end of a module's dotted name), a regular expression matched against the
/// whole module name, or "all-linear".
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    Pattern(String),
}

impl Targets {
    /// The same targets in the model code's terms (PEFT's matching rules live there).
    pub fn to_model(&self) -> crate::model::lora::TargetModules {
        use crate::model::lora::TargetModules;
        match self {
            Targets::List(l) => TargetModules::List(l.clone()),
            Targets::Pattern(p) if p == "all-linear" => TargetModules::AllLinear,
            Targets::Pattern(p) => TargetModules::Regex(p.clone()),
        }
    }

    /// Does `module` (a full dotted name such as `model.layers.0.self_attn.q_proj`) match?
    pub fn matches(&self, module: &str) -> bool {
        crate::model::lora::LoraConfig::new(1, 1.0, self.to_model())
            .targets(module)
            .unwrap_or(false)
    }
}

/// A new LoRA adapter's shape.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the update B·A (>= 1).
    #[serde(default = "default_r")]
    pub r: Sp<u32>,
    /// Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora).
    #[serde(default = "default_alpha")]
    pub alpha: Sp<f64>,
    /// Dropout on the adapter's input during training, in [0, 1).
    #[serde(default)]
    pub dropout: Sp<f64>,
    /// Modules that get an adapter.
    #[serde(default = "default_targets")]
    pub targets: Sp<Targets>,
    /// Rank-stabilised scaling alpha / sqrt(r).
    #[serde(default)]
    pub rslora: Sp<bool>,
}

fn default_r() -> Sp<u32> {
    Sp::implicit(8)
}
fn default_alpha() -> Sp<f64> {
    Sp::implicit(16.0)
}
fn default_targets() -> Sp<Targets> {
    Sp::implicit(Targets::List(vec!["q_proj".into(), "v_proj".into()]))
}

impl LoraSpec {
    pub fn check(&self, problems: &mut Vec<Problem>) {
        at_least(problems, "lora.r", &self.r, 1);
        positive(problems, "lora.alpha", &self.alpha);
        unit_interval(problems, "lora.dropout", &self.dropout);
        match &self.targets.value {
            Targets::List(l) if l.is_empty() => problems.push(
                Problem::new("`lora.targets` is empty")
                    .at(self.targets.span.clone(), "no module would get an adapter"),
            ),
            Targets::Pattern(p) if p != "all-linear" => {
                if let Err(e) = regex::Regex::new(p) {
                    problems.push(
                        Problem::new(format!(
                            "`lora.targets` is not a valid regular expression: {e}"
                        ))
                        .at(self.targets.span.clone(), "invalid regex")
                        .help("write a list of module names, a regex, or \"all-linear\""),
                    );
                }
            }
            _ => {}
        }
    }
}

pub use crate::data::settings::{BadRows, Overlong};
pub use crate::train::dpo_loss::DpoLoss;
pub use crate::train::schedule::Schedule;

/// Optimisation settings of a training stage.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimizer steps (>= 1).
    #[serde(default = "default_steps")]
    pub steps: Sp<u64>,
    /// Rows per micro-batch (>= 1).
    #[serde(default = "default_batch")]
    pub batch: Sp<u32>,
    /// Micro-batches per optimizer step (>= 1).
    #[serde(default = "one_u32")]
    pub grad_accum: Sp<u32>,
    /// Peak learning rate (> 0).
    #[serde(default = "default_lr")]
    pub lr: Sp<f64>,
    #[serde(default)]
    pub schedule: Sp<Schedule>,
    /// Linear warmup steps (< steps).
    #[serde(default)]
    pub warmup: Sp<u64>,
    /// Decoupled weight decay (>= 0).
    #[serde(default)]
    pub weight_decay: Sp<f64>,
    /// AdamW betas, each in [0, 1).
    #[serde(default = "default_betas")]
    pub betas: Sp<[f64; 2]>,
    /// AdamW epsilon (> 0).
    #[serde(default = "default_eps")]
    pub eps: Sp<f64>,
    /// Clip gradients to this global norm; 0 turns clipping off.
    #[serde(default = "default_clip")]
    pub max_grad_norm: Sp<f64>,
    /// Maximum tokens per row (>= 2).
    #[serde(default = "default_seq_len")]
    pub seq_len: Sp<u32>,
    #[serde(default)]
    pub overlong: Sp<Overlong>,
    #[serde(default)]
    pub bad_rows: Sp<BadRows>,
    /// Evaluate every N steps (0: only at the end).
    #[serde(default)]
    pub eval_every: Sp<u64>,
    /// Write a checkpoint every N steps (0: only on Ctrl-C).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: Sp<u64>,
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            steps: default_steps(),
            batch: default_batch(),
            grad_accum: one_u32(),
            lr: default_lr(),
            schedule: Sp::default(),
            warmup: Sp::default(),
            weight_decay: Sp::default(),
            betas: default_betas(),
            eps: default_eps(),
            max_grad_norm: default_clip(),
            seq_len: default_seq_len(),
            overlong: Sp::default(),
            bad_rows: Sp::default(),
            eval_every: Sp::default(),
            checkpoint_every: default_checkpoint_every(),
        }
    }
}

fn default_steps() -> Sp<u64> {
    Sp::implicit(100)
}
fn default_batch() -> Sp<u32> {
    Sp::implicit(8)
}
fn one_u32() -> Sp<u32> {
    Sp::implicit(1)
}
fn default_lr() -> Sp<f64> {
    Sp::implicit(1e-4)
}
fn default_betas() -> Sp<[f64; 2]> {
    Sp::implicit([0.9, 0.999])
}
fn default_eps() -> Sp<f64> {
    Sp::implicit(1e-8)
}
fn default_clip() -> Sp<f64> {
    Sp::implicit(1.0)
}
fn default_seq_len() -> Sp<u32> {
    Sp::implicit(512)
}
fn default_checkpoint_every() -> Sp<u64> {
    Sp::implicit(50)
}

impl TrainSpec {
    /// The training library's settings for this table.
    pub fn loop_settings(&self, seed: u64, dropout: bool) -> crate::train::trainer::LoopSettings {
        crate::train::trainer::LoopSettings {
            steps: self.steps.value,
            batch: self.batch.value as usize,
            grad_accum: self.grad_accum.value as u64,
            lr: self.lr.value,
            schedule: self.schedule.value,
            warmup: self.warmup.value,
            weight_decay: self.weight_decay.value,
            betas: self.betas.value,
            eps: self.eps.value,
            max_grad_norm: self.max_grad_norm.value,
            eval_every: self.eval_every.value,
            checkpoint_every: self.checkpoint_every.value,
            seed,
            dropout,
        }
    }

    pub fn check(&self, problems: &mut Vec<Problem>) {
        at_least(problems, "train.steps", &self.steps, 1);
        at_least(problems, "train.batch", &self.batch, 1);
        at_least(problems, "train.grad_accum", &self.grad_accum, 1);
        positive(problems, "train.lr", &self.lr);
        at_least(problems, "train.seq_len", &self.seq_len, 2);
        positive(problems, "train.eps", &self.eps);
        non_negative(problems, "train.weight_decay", &self.weight_decay);
        non_negative(problems, "train.max_grad_norm", &self.max_grad_norm);
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                problems.push(
                    Problem::new(format!("`train.betas[{i}]` must be in [0, 1), got {b}"))
                        .at(self.betas.span.clone(), "out of range"),
                );
            }
        }
        if self.warmup.value >= self.steps.value && self.warmup.value > 0 {
            problems.push(
                Problem::new(format!(
                    "`train.warmup` ({}) must be smaller than `train.steps` ({})",
                    self.warmup.value, self.steps.value
                ))
                .at(self.warmup.span.clone(), "too many warmup steps")
                .also(self.steps.span.clone(), "steps"),
            );
        }
    }
}

/// Data files of a training stage (JSONL).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training rows.
    pub train: Sp<String>,
    /// Held-out rows for evaluation.
    #[serde(default)]
    pub eval: Option<Sp<String>>,
    /// A built-in chat format ("chatml") for message-list rows, overriding
    /// the model's own chat template; needed when the model has none.
    #[serde(default)]
    pub format: Option<Sp<String>>,
}

impl DataSpec {
    pub fn check(&self, problems: &mut Vec<Problem>) {
        if let Some(f) = &self.format {
            let known = crate::data::BUILTIN_FORMATS;
            if !known.contains(&f.value.as_str()) {
                problems.push(
                    Problem::new(format!("unknown chat format `{}`", f.value))
                        .at(f.span.clone(), "not a built-in format")
                        .help(format!("built-in formats: {}", known.join(", "))),
                );
            }
        }
    }
}

/// DPO settings.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoSpec {
    /// Temperature of the implicit reward (> 0).
    #[serde(default = "default_beta")]
    pub beta: Sp<f64>,
    #[serde(default)]
    pub loss: Sp<DpoLoss>,
    /// Probability that a preference label is flipped, in [0, 0.5).
    #[serde(default)]
    pub label_smoothing: Sp<f64>,
    /// Turn LoRA dropout off while training DPO (as TRL does by default).
    #[serde(default = "yes")]
    pub disable_dropout: Sp<bool>,
}

impl Default for DpoSpec {
    fn default() -> Self {
        DpoSpec {
            beta: default_beta(),
            loss: Sp::default(),
            label_smoothing: Sp::default(),
            disable_dropout: yes(),
        }
    }
}

fn default_beta() -> Sp<f64> {
    Sp::implicit(0.1)
}
fn yes() -> Sp<bool> {
    Sp::implicit(true)
}

impl DpoSpec {
    /// The training library's settings for this table.
    pub fn settings(&self) -> crate::train::dpo::DpoSettings {
        crate::train::dpo::DpoSettings {
            loss: self.loss.value,
            beta: self.beta.value,
            label_smoothing: self.label_smoothing.value,
        }
    }

    pub fn check(&self, problems: &mut Vec<Problem>) {
        positive(problems, "dpo.beta", &self.beta);
        let ls = self.label_smoothing.value;
        if !(0.0..0.5).contains(&ls) {
            problems.push(
                Problem::new(format!(
                    "`dpo.label_smoothing` must be in [0, 0.5), got {ls}"
                ))
                .at(self.label_smoothing.span.clone(), "out of range"),
            );
        }
    }
}
