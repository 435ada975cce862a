//! The first DPO step of both schemes runs at policy == reference, where
//! every implicit-reward logit is 0. There the sigmoid loss is ln 2 and its
//! gradient is the closed form −(β/2B)·∇Σᵢ(log π(chosenᵢ) − log π(rejectedᵢ)),
//! so the LoRA gradient of one step must equal that, computed here from the
//! summed log-probs alone, without the loss.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lora_runner::data::{load_dpo, DpoExample, ModelTokenizer, TokenizeSettings};
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::train::dpo::{pair_logprobs, score_pairs, DpoObjective};
use lora_runner::train::preference_loss::{LossParams, LossTerm, PreferenceLoss};
use lora_runner::train::trainer::micro_batch;

use crate::support::model::{flat_f64, set_lora_b};

fn lora_gradients(model: &Decoder, loss: &Tensor) -> Vec<f64> {
    let grads = loss.backward().unwrap();
    let per_var: Vec<Tensor> = model
        .lora_parameters()
        .iter()
        .map(|(_, var)| match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like().unwrap(),
        })
        .collect();
    flat_f64(&per_var)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn first_dpo_step_gradient_is_half_beta_times_the_margin_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_model(&RandomModel::tiny(3), &base).unwrap();
    let mut model = Decoder::load(
        &base,
        &LoadOptions {
            dtype: Some(DType::F64),
            device: Device::Cpu,
        },
    )
    .unwrap();
    model
        .apply_lora(&LoraConfig::new(4, 8.0, TargetModules::AllLinear), 9)
        .unwrap();
    // A continued SFT adapter has B ≠ 0, so A's gradient is not zero either.
    set_lora_b(&model, 0.2);
    let tokenizer = ModelTokenizer::load(&base.join("tokenizer.json")).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/data/dpo_eval.jsonl");
    let pairs = load_dpo(&data, &tokenizer, &TokenizeSettings::new(32)).unwrap();
    let pad = tokenizer.pad_id();
    let chosen: Vec<usize> = vec![0, 1, 2];
    let beta = 0.1;

    // The reference is the policy itself, frozen.
    let reference = score_pairs(&model, &pairs, pad, &Device::Cpu, None).unwrap();
    let objective = DpoObjective {
        train: pairs.clone(),
        train_reference: Some(reference),
        eval: None,
        loss: PreferenceLoss::single(
            LossTerm::Sigmoid,
            LossParams {
                beta,
                ..LossParams::default()
            },
        ),
        weighting: Default::default(),
        pad_id: pad,
        device: Device::Cpu,
    };
    // As the training loop computes it: shards of pairs, the loss over all
    // three, each shard's backward apart, the gradients summed.
    let params = model.lora_parameters();
    let step = micro_batch(&model, &params, &objective, &chosen, Mode::Eval, 1.0).unwrap();
    // Reference log-probs are kept in f32, so Δ is 0 to f32 rounding.
    assert!(
        (step.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        step.loss
    );
    let from_loss = flat_f64(&step.grads);

    // The closed form, from the log-probs alone.
    let picked: Vec<&DpoExample> = chosen.iter().map(|&i| &pairs.examples[i]).collect();
    let (sums, _) = pair_logprobs(&model, &picked, pad, &Device::Cpu, Mode::Eval).unwrap();
    let b = picked.len();
    let margin = (sums.narrow(0, 0, b).unwrap().sum_all().unwrap()
        - sums.narrow(0, b, b).unwrap().sum_all().unwrap())
    .unwrap();
    let scale = -beta / (2.0 * b as f64);
    let expected: Vec<f64> = lora_gradients(&model, &margin)
        .into_iter()
        .map(|g| scale * g)
        .collect();

    assert!(norm(&expected) > 1e-6, "the margin has a gradient");
    let relative = (norm(&from_loss) - norm(&expected)).abs() / norm(&expected);
    assert!(
        relative < 1e-6,
        "grad norm {} vs closed form {}",
        norm(&from_loss),
        norm(&expected)
    );
    let diff: Vec<f64> = from_loss
        .iter()
        .zip(&expected)
        .map(|(a, e)| a - e)
        .collect();
    assert!(norm(&diff) / norm(&expected) < 1e-6);
}
