//! Synthetic stages shared by the comparison tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use lora_runner::compare::StageSummary;
use lora_runner::stage::Objective;
use serde_json::{json, Value};

/// Deterministic noise in -1..1 (xorshift), so tests need no RNG crate.
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Self {
        Noise(seed.max(1))
    }
    pub fn sample(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

pub fn empty_stage(name: &str, objective: Objective) -> StageSummary {
    StageSummary {
        name: name.to_string(),
        objective,
        label: String::new(),
        rows: Vec::new(),
        final_metrics: BTreeMap::new(),
        trainable_parameters: 0,
        bytes_on_disk: 0,
        peak_memory_bytes: None,
        wall_seconds: 0.0,
        steps: 0,
        lora: String::new(),
        reference: String::new(),
        merge_precision: BTreeMap::new(),
        evaluated: Default::default(),
    }
}

/// SFT loss falling from 7 to ~1.2 over 300 steps, with noise; eval every 50 steps.
pub fn sft_stage() -> StageSummary {
    let mut noise = Noise::new(7);
    let steps = 300;
    let mut rows: Vec<Value> = Vec::new();
    for step in 1..=steps {
        let t = step as f64 / steps as f64;
        let loss = 1.2 + 5.8 * (-5.0 * t).exp() + 0.25 * noise.sample();
        rows.push(json!({"step": step, "loss": loss, "lr": 2e-4, "grad_norm": 1.0 + noise.sample().abs(), "tokens_per_s": 900.0}));
        if step % 50 == 0 {
            rows.push(json!({"step": step, "eval/loss": 1.35 + 5.8 * (-5.0 * t).exp()}));
        }
    }
    let mut stage = empty_stage("sft", Objective::Sft);
    stage.label = "supervised fine-tuning".into();
    stage.final_metrics =
        BTreeMap::from([("loss".into(), 1.2345678), ("eval/loss".into(), 1.3567)]);
    stage.rows = rows;
    stage.trainable_parameters = 4_587_520;
    stage.bytes_on_disk = 18_350_080;
    stage.peak_memory_bytes = Some(3_221_225_472);
    stage.wall_seconds = 754.2;
    stage.steps = steps;
    stage.lora = "r=8 alpha=16 targets=all-linear".into();
    stage.reference = "base: SmolLM2-135M".into();
    stage
}

/// A DPO stage over 150 steps: loss 0.69 → ~end_loss, margin 0 → ~end_margin,
/// accuracy 0 → 1; eval every 25 steps.
pub fn dpo_stage(
    name: &str,
    label: &str,
    seed: u64,
    end_loss: f64,
    end_margin: f64,
) -> StageSummary {
    let mut noise = Noise::new(seed);
    let steps = 150;
    let mut rows: Vec<Value> = Vec::new();
    for step in 1..=steps {
        let t = step as f64 / steps as f64;
        let ease = 1.0 - (-4.0 * t).exp();
        let loss = 0.693 - (0.693 - end_loss) * ease + 0.03 * noise.sample();
        let margin = end_margin * ease + 0.06 * noise.sample();
        let accuracy = (ease + 0.15 * noise.sample()).clamp(0.0, 1.0);
        rows.push(json!({
            "step": step, "loss": loss, "lr": 5e-6, "grad_norm": 0.5, "tokens_per_s": 400.0,
            "rewards/chosen": margin / 2.0, "rewards/rejected": -margin / 2.0,
            "rewards/accuracies": accuracy, "rewards/margins": margin,
            "logps/chosen": -120.0, "logps/rejected": -130.0,
        }));
        if step % 25 == 0 {
            rows.push(json!({
                "step": step, "eval/loss": loss + 0.02,
                "eval/rewards/accuracies": (ease * (0.85 + 0.02 * (seed % 5) as f64)).min(1.0),
                "eval/rewards/margins": end_margin * ease * 0.9,
            }));
        }
    }
    let mut stage = empty_stage(name, Objective::Dpo);
    stage.label = label.into();
    stage.rows = rows;
    stage.steps = steps;
    stage.lora = "r=8 alpha=16 targets=all-linear".into();
    stage
}

/// SFT plus both DPO schemes, with the numbers the table tests check.
pub fn realistic_stages() -> Vec<StageSummary> {
    let mut one = dpo_stage(
        "dpo-one",
        "scheme one: continue the SFT adapter",
        11,
        0.50,
        0.40,
    );
    one.final_metrics = BTreeMap::from([
        ("loss".into(), 0.5012),
        ("eval/loss".into(), 0.52149),
        ("eval/rewards/accuracies".into(), 0.875),
        ("eval/rewards/margins".into(), 0.41234),
    ]);
    one.trainable_parameters = 4_587_520;
    one.bytes_on_disk = 18_350_080;
    one.peak_memory_bytes = Some(4_294_967_296);
    one.wall_seconds = 421.0;
    one.reference = "SFT model (base + SFT adapter)".into();

    let mut two = dpo_stage(
        "dpo-two",
        "scheme two: merge, then a fresh adapter",
        23,
        0.48,
        0.45,
    );
    two.final_metrics = BTreeMap::from([
        ("loss".into(), 0.4801),
        ("eval/loss".into(), 0.5003),
        ("eval/rewards/accuracies".into(), 0.9),
        ("eval/rewards/margins".into(), 0.45),
    ]);
    two.trainable_parameters = 4_587_520;
    two.bytes_on_disk = 288_358_400;
    two.peak_memory_bytes = None;
    two.wall_seconds = 3725.0;
    two.reference = "merged SFT model".into();
    vec![sft_stage(), one, two]
}
