//! Parameter tables shared by several stage kinds (`lora`, `train`, `data`,
//! `dpo`), their defaults and their range checks.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::diag::checks::{at_least, non_negative, positive, unit_interval};
use crate::diag::span::Sp;
use crate::diag::{did_you_mean, Problem};
use crate::train::preference_loss::{Divergence, LossParams, LossTerm, PreferenceLoss, Smoothing};

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
    pub fn to_model(&self) -> crate::model::layers::lora::TargetModules {
        use crate::model::layers::lora::TargetModules;
        match self {
            Targets::List(l) => TargetModules::List(l.clone()),
            Targets::Pattern(p) if p == "all-linear" => TargetModules::AllLinear,
            Targets::Pattern(p) => TargetModules::Regex(p.clone()),
        }
    }

    /// Does `module` (a full dotted name such as `model.layers.0.self_attn.q_proj`) match?
    pub fn matches(&self, module: &str) -> bool {
        crate::model::layers::lora::LoraConfig::new(1, 1.0, self.to_model())
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
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output row times
    /// the row-normalised W + s·B·A. In the key only when on.
    #[serde(default, alias = "use_dora", skip_serializing_if = "is_off")]
    pub dora: Sp<bool>,
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

/// How the stages that load a model hold its decoder layers' projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
pub enum Quantize {
    /// Dense, in the loading stage's dtype.
    #[serde(rename = "none")]
    None,
    /// 8-bit blocks of 32 (8.5 bits a weight).
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 4-bit super-blocks of 256 (4.5 bits a weight); rows that are not a
    /// multiple of 256 use q5_0 (5.5 bits), as llama.cpp does.
    #[serde(rename = "q4_k")]
    Q4K,
    /// float8_e4m3fn with an f32 scale per 128 × 128 block (8.002 bits a
    /// weight), as transformers' fine-grained FP8 checkpoints hold them.
    #[serde(rename = "fp8")]
    Fp8,
}

/// Leaves `quantize` out of a stage key when it asks for nothing, so that
/// keys made before the setting existed stand.
pub fn no_quantize(q: &Option<Sp<Quantize>>) -> bool {
    q.as_ref().is_none_or(|q| q.value == Quantize::None)
}

impl Quantize {
    pub fn quantization(self) -> Option<crate::model::kernels::quantized::Quantization> {
        use crate::model::kernels::quantized::Quantization;
        match self {
            Quantize::None => None,
            Quantize::Q8_0 => Some(Quantization::Q8_0),
            Quantize::Q4K => Some(Quantization::Q4K),
            Quantize::Fp8 => Some(Quantization::Fp8),
        }
    }
}
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
    /// Activation checkpointing: keep only each decoder layer's input during
    /// the forward pass and recompute the layer in backward (less memory,
    /// about a third more compute). Gradients equal the plain ones to float
    /// rounding. Left out of the stage key when off, so older keys stand.
    #[serde(default, skip_serializing_if = "is_off")]
    pub checkpointing: Sp<bool>,
}

fn is_off(flag: &Sp<bool>) -> bool {
    !flag.value
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
            checkpointing: Sp::default(),
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

/// Preference-optimisation settings (`dpo = { ... }`).
#[derive(Clone, Debug, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpoSpec {
    /// Temperature of the implicit reward (> 0): β of DPO, τ of IPO, λ of ORPO.
    #[serde(default = "default_beta")]
    pub beta: Sp<f64>,
    /// The loss: one name, or a list of names summed with `loss_weights`
    /// (Σ wₖ·mean(Lₖ), as TRL's `loss_type` list). `simpo` and `orpo` (and
    /// `sft` alone) need no reference model.
    #[serde(default)]
    pub loss: Sp<LossNames>,
    /// One weight (>= 0) per loss; all 1 when left out.
    #[serde(default)]
    pub loss_weights: Option<Sp<Vec<f64>>>,
    /// ε, the probability that a preference label is flipped: cDPO with
    /// `sigmoid`, and `robust`, `aot`, `aot_unpaired`, `simpo` in [0, 0.5);
    /// `exo_pair` needs it in (0, 0.5).
    #[serde(default)]
    pub label_smoothing: Sp<f64>,
    /// SimPO's target reward margin γ (>= 0).
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: Sp<f64>,
    /// DiscoPOP's temperature τ (> 0).
    #[serde(default = "default_discopop_tau")]
    pub discopop_tau: Sp<f64>,
    /// LD-DPO's α in [0, 1] (TRL's `ld_alpha`): completion tokens past the
    /// shorter side's length count α in both sides' log-probs, the
    /// policy's and the reference's, so verbosity earns less reward; 1 is
    /// plain DPO, 0 ignores the longer side's tail.
    #[serde(default)]
    pub ld_alpha: Option<Sp<f64>>,
    /// f-DPO's divergence between policy and reference (TRL's
    /// `f_divergence_type`): "reverse_kl" (standard DPO), "forward_kl",
    /// "js_divergence" or "alpha_divergence". Only the losses built on the
    /// chosen-rejected reward difference take another than reverse_kl:
    /// sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (and
    /// sft beside them).
    #[serde(default = "default_divergence")]
    pub f_divergence_type: Sp<String>,
    /// α of "alpha_divergence" (TRL's `f_alpha_divergence_coef`).
    #[serde(default = "default_alpha_coef")]
    pub f_alpha_divergence_coef: Sp<f64>,
    /// WPO (TRL's `use_weighting`): each pair's loss weighed by the
    /// policy's own length-normalised probability of its chosen and
    /// rejected completions against each token distribution's Σ p²,
    /// held constant. Not with aot, aot_unpaired, sft, simpo or orpo.
    #[serde(default)]
    pub use_weighting: Sp<bool>,
    /// Turn LoRA dropout off while training DPO (as TRL does by default).
    #[serde(default = "yes")]
    pub disable_dropout: Sp<bool>,
}

impl Default for DpoSpec {
    fn default() -> Self {
        DpoSpec {
            beta: default_beta(),
            loss: Sp::default(),
            loss_weights: None,
            label_smoothing: Sp::default(),
            simpo_gamma: default_simpo_gamma(),
            discopop_tau: default_discopop_tau(),
            ld_alpha: None,
            f_divergence_type: default_divergence(),
            f_alpha_divergence_coef: default_alpha_coef(),
            use_weighting: Sp::default(),
            disable_dropout: yes(),
        }
    }
}

fn default_divergence() -> Sp<String> {
    Sp::implicit(Divergence::NAMES[0].to_string())
}
fn default_alpha_coef() -> Sp<f64> {
    Sp::implicit(0.5)
}

fn default_beta() -> Sp<f64> {
    Sp::implicit(LossParams::default().beta)
}
fn default_simpo_gamma() -> Sp<f64> {
    Sp::implicit(LossParams::default().simpo_gamma)
}
fn default_discopop_tau() -> Sp<f64> {
    Sp::implicit(LossParams::default().discopop_tau)
}
fn yes() -> Sp<bool> {
    Sp::implicit(true)
}

/// `loss = "sigmoid"` or `loss = ["sigmoid", "sft"]`, names as written.
#[derive(Clone, Debug, PartialEq)]
pub struct LossNames(pub Vec<Sp<String>>);

impl Default for LossNames {
    fn default() -> Self {
        LossNames(vec![Sp::implicit(LossTerm::Sigmoid.name().to_string())])
    }
}

impl<'de> Deserialize<'de> for LossNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = LossNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a loss name or a list of loss names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LossNames, E> {
                // The span is the whole value's, filled in by the caller.
                Ok(LossNames(vec![Sp::implicit(v.to_string())]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<LossNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<Sp<String>>()? {
                    names.push(name);
                }
                Ok(LossNames(names))
            }
        }
        d.deserialize_any(Names)
    }
}

impl schemars::JsonSchema for LossNames {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "LossNames".into()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let term = generator.subschema_for::<LossTerm>();
        schemars::json_schema!({
            "description": "A loss name, or a list of names whose weighted sum is the loss.",
            "anyOf": [term, {"type": "array", "items": term, "minItems": 1}]
        })
    }
}

impl DpoSpec {
    /// The loss terms with their spans, once `check` has passed.
    fn terms(&self) -> Vec<(LossTerm, Range<usize>)> {
        self.loss
            .0
            .iter()
            .filter_map(|n| LossTerm::from_name(n).map(|t| (t, self.name_span(n))))
            .collect()
    }

    fn name_span(&self, name: &Sp<String>) -> Range<usize> {
        if name.is_written() {
            name.span.clone()
        } else {
            self.loss.span.clone()
        }
    }

    /// The training library's loss for this table.
    pub fn loss(&self) -> PreferenceLoss {
        let terms = self.terms();
        let weights = self
            .loss_weights
            .as_ref()
            .map_or_else(|| vec![1.0; terms.len()], |w| w.value.clone());
        PreferenceLoss {
            terms: terms.into_iter().map(|(t, _)| t).zip(weights).collect(),
            params: LossParams {
                beta: self.beta.value,
                label_smoothing: self.label_smoothing.value,
                simpo_gamma: self.simpo_gamma.value,
                discopop_tau: self.discopop_tau.value,
                divergence: match self.divergence() {
                    // TRL's own fallback: α within 1e-6 of 1 is reverse KL.
                    Some(Divergence::Alpha(a)) if (a - 1.0).abs() < 1e-6 => Divergence::ReverseKl,
                    Some(d) => d,
                    None => Divergence::ReverseKl,
                },
            },
        }
    }

    /// LD-DPO's α when it weighs anything (1 weighs every token fully).
    pub fn ld_alpha(&self) -> Option<f64> {
        self.ld_alpha
            .as_ref()
            .map(|a| a.value)
            .filter(|&a| a != 1.0)
    }

    /// The f-divergence as written, once `check` has passed.
    fn divergence(&self) -> Option<Divergence> {
        Divergence::from_name(
            &self.f_divergence_type.value,
            self.f_alpha_divergence_coef.value,
        )
    }

    pub fn check(&self, problems: &mut Vec<Problem>) {
        positive(problems, "dpo.beta", &self.beta);
        non_negative(problems, "dpo.simpo_gamma", &self.simpo_gamma);
        positive(problems, "dpo.discopop_tau", &self.discopop_tau);
        let known: Vec<&str> = LossTerm::ALL.iter().map(|t| t.name()).collect();
        for name in &self.loss.0 {
            if LossTerm::from_name(name).is_none() {
                let p = Problem::new(format!("unknown loss `{}`", name.value))
                    .at(self.name_span(name), "unknown loss");
                problems.push(match did_you_mean(name, known.iter().copied()) {
                    Some(s) => p.help(format!("did you mean `{s}`?")),
                    None => p.help(format!("expected one of: {}", known.join(", "))),
                });
            }
        }
        if self.loss.0.is_empty() {
            problems.push(
                Problem::new("`dpo.loss` is an empty list").at(self.loss.span.clone(), "no loss"),
            );
        }
        if let Some(w) = &self.loss_weights {
            if w.value.len() != self.loss.0.len() {
                problems.push(
                    Problem::new(format!(
                        "`dpo.loss_weights` has {} weights for {} losses",
                        w.value.len(),
                        self.loss.0.len()
                    ))
                    .at(w.span.clone(), "one weight per loss"),
                );
            } else if w.value.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                problems.push(
                    Problem::new("`dpo.loss_weights` must all be >= 0")
                        .at(w.span.clone(), "out of range"),
                );
            } else if w.value.iter().all(|x| *x == 0.0) {
                problems.push(
                    Problem::new("`dpo.loss_weights` are all 0: nothing would be trained")
                        .at(w.span.clone(), "all zero"),
                );
            }
        }
        self.check_smoothing(problems);
        self.check_length_and_divergence(problems);
    }

    /// `ld_alpha` in [0, 1] on losses that read summed log-probs; the
    /// f-divergence known, on losses that have an f-divergence form, with
    /// its α only where it is read.
    fn check_length_and_divergence(&self, problems: &mut Vec<Problem>) {
        let terms = self.terms();
        if let Some(a) = &self.ld_alpha {
            if !(0.0..=1.0).contains(&a.value) {
                problems.push(
                    Problem::new(format!("`dpo.ld_alpha` must be in [0, 1], got {}", a.value))
                        .at(a.span.clone(), "out of range"),
                );
            }
            // TRL's sft term reads unweighted log-probs; SimPO and ORPO are
            // not TRL's DPO trainer's and have no LD-DPO form there.
            if let Some((t, span)) = terms
                .iter()
                .find(|(t, _)| matches!(t, LossTerm::Sft | LossTerm::Simpo | LossTerm::Orpo))
            {
                problems.push(
                    Problem::new(format!(
                        "`dpo.ld_alpha` does not apply to loss `{}`",
                        t.name()
                    ))
                    .at(a.span.clone(), "LD-DPO weighting")
                    .at(span.clone(), "this loss")
                    .help("LD-DPO weighs the reward terms' log-probs; use it without sft, simpo and orpo"),
                );
            }
        }
        let d = &self.f_divergence_type;
        match self.divergence() {
            None => problems.push(
                Problem::new(format!("unknown `dpo.f_divergence_type` `{}`", d.value))
                    .at(d.span.clone(), "unknown divergence")
                    .help(format!("expected one of: {}", Divergence::NAMES.join(", "))),
            ),
            // Refused by name, as TRL does (α = 1 included).
            Some(Divergence::ReverseKl) => {}
            Some(_) => {
                if let Some((t, span)) = terms.iter().find(|(t, _)| !t.takes_divergence()) {
                    problems.push(
                        Problem::new(format!(
                            "`dpo.f_divergence_type = \"{}\"` does not apply to loss `{}`",
                            d.value,
                            t.name()
                        ))
                        .at(d.span.clone(), "an f-divergence")
                        .at(span.clone(), "this loss")
                        .help("only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (and sft) read the reward difference an f-divergence reshapes"),
                    );
                }
            }
        }
        if self.use_weighting.value {
            if let Some((t, span)) = terms.iter().find(|(t, _)| !t.takes_weighting()) {
                problems.push(
                    Problem::new(format!(
                        "`dpo.use_weighting` (WPO) does not apply to loss `{}`",
                        t.name()
                    ))
                    .at(span.clone(), "this loss")
                    .help("the AOT losses sort pairs, which would misalign per-pair weights; TRL's sft term fails under WPO; simpo and orpo are not TRL's DPO losses"),
                );
            }
        }
        let coef = &self.f_alpha_divergence_coef;
        if !coef.value.is_finite() {
            problems.push(
                Problem::new("`dpo.f_alpha_divergence_coef` must be a finite number")
                    .at(coef.span.clone(), "not finite"),
            );
        } else if coef.is_written() && !matches!(self.divergence(), Some(Divergence::Alpha(_))) {
            problems.push(
                Problem::new("`dpo.f_alpha_divergence_coef` has no effect without `f_divergence_type = \"alpha_divergence\"`")
                    .at(coef.span.clone(), "unused"),
            );
        }
    }

    /// `label_smoothing` in the range the chosen losses need, and not
    /// written for losses that ignore it.
    fn check_smoothing(&self, problems: &mut Vec<Problem>) {
        let ls = &self.label_smoothing;
        let terms = self.terms();
        let required = terms
            .iter()
            .find(|(t, _)| t.smoothing() == Smoothing::Required);
        let used = terms
            .iter()
            .any(|(t, _)| t.smoothing() != Smoothing::Unused);
        if let Some((term, _)) = required {
            if !(ls.value > 0.0 && ls.value < 0.5) {
                let p = Problem::new(format!(
                    "loss `{}` needs `dpo.label_smoothing` in (0, 0.5), got {}",
                    term.name(),
                    ls.value
                ));
                problems.push(if ls.is_written() {
                    p.at(ls.span.clone(), "out of range")
                } else {
                    p.at(self.name_span(&self.loss.0[0]), "needs label_smoothing")
                        .help("the EXO paper suggests `label_smoothing = 1e-3`")
                });
            }
        } else if used && !(0.0..0.5).contains(&ls.value) {
            problems.push(
                Problem::new(format!(
                    "`dpo.label_smoothing` must be in [0, 0.5), got {}",
                    ls.value
                ))
                .at(ls.span.clone(), "out of range"),
            );
        } else if !used && ls.is_written() && ls.value != 0.0 {
            problems.push(
                Problem::new("`dpo.label_smoothing` has no effect on the chosen loss")
                    .at(ls.span.clone(), "unused")
                    .help("it applies to sigmoid, robust, exo_pair, aot, aot_unpaired and simpo"),
            );
        }
    }
}

// The cache key holds the loss as it is computed: every term with its
// weight, and only the parameters some term reads, so `loss = "sigmoid"`
// and `loss = ["sigmoid"]` share a key and an unused `discopop_tau` is not
// a reason to retrain.
impl Serialize for DpoSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let loss = self.loss();
        let uses = |f: &dyn Fn(LossTerm) -> bool| loss.terms.iter().any(|(t, _)| f(*t));
        let mut key = serde_json::Map::new();
        key.insert("beta".into(), self.beta.value.into());
        key.insert(
            "loss".into(),
            loss.terms
                .iter()
                .map(|(t, w)| serde_json::json!([t.name(), w]))
                .collect(),
        );
        if uses(&|t| t.smoothing() != Smoothing::Unused) {
            key.insert("label_smoothing".into(), self.label_smoothing.value.into());
        }
        if uses(&|t| t == LossTerm::Simpo) {
            key.insert("simpo_gamma".into(), self.simpo_gamma.value.into());
        }
        if uses(&|t| t == LossTerm::Discopop) {
            key.insert("discopop_tau".into(), self.discopop_tau.value.into());
        }
        if let Some(a) = self.ld_alpha() {
            key.insert("ld_alpha".into(), a.into());
        }
        if self.use_weighting.value {
            key.insert("use_weighting".into(), true.into());
        }
        match loss.params.divergence {
            Divergence::ReverseKl => {}
            Divergence::Alpha(a) => {
                key.insert("f_divergence_type".into(), "alpha_divergence".into());
                key.insert("f_alpha_divergence_coef".into(), a.into());
            }
            _ => {
                key.insert(
                    "f_divergence_type".into(),
                    self.f_divergence_type.value.clone().into(),
                );
            }
        }
        key.insert("disable_dropout".into(), self.disable_dropout.value.into());
        key.serialize(serializer)
    }
}
