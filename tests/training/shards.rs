//! A micro-batch split into shards of whole examples (forward and backward
//! on threads of their own, gradients summed in shard order) gives the loss
//! and LoRA gradients of the whole batch in one pass, with and without
//! activation checkpointing, and the same bytes on any number of threads.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lora_runner::data::{load_sft, ModelTokenizer, SftExample, TokenizeSettings};
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::model::kernels::cpu::with_threads;
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use lora_runner::train::sft::{completion_logprob, SftObjective};
use lora_runner::train::shards::split;
use lora_runner::train::trainer::{micro_batch, TrainingObjective};

use crate::support::model::{flat_f64, set_lora_b};

/// A tiny model with LoRA (B ≠ 0, so A has a gradient too) and SFT data.
fn setup(dir: &Path, dtype: DType, dropout: f64) -> (Decoder, SftObjective) {
    let base = dir.join("base");
    init_model(&RandomModel::tiny(5), &base).unwrap();
    let opts = LoadOptions {
        dtype: Some(dtype),
        device: Device::Cpu,
    };
    let mut model = Decoder::load(&base, &opts).unwrap();
    let mut lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
    lora.dropout = dropout;
    model.apply_lora(&lora, 9).unwrap();
    set_lora_b(&model, 0.2);
    let tokenizer = ModelTokenizer::load(&base.join("tokenizer.json")).unwrap();
    // Completions of 20 to 200 letters: shards of one long example and of
    // several short ones (`shards::split` closes a shard at 128 tokens).
    let rows: String = [150, 60, 90, 200, 30, 20, 110, 45]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let text: String = (0..n)
                .map(|k| (b'a' + ((k * 7 + i) % 26) as u8) as char)
                .collect();
            format!("{{\"prompt\": \"copy {i}:\", \"completion\": \" {text}\"}}\n")
        })
        .collect();
    let data = dir.join("sft.jsonl");
    std::fs::write(&data, rows).unwrap();
    let train = load_sft(&data, &tokenizer, &TokenizeSettings::new(256)).unwrap();
    let objective = SftObjective {
        train,
        eval: None,
        pad_id: tokenizer.pad_id(),
        device: Device::Cpu,
    };
    (model, objective)
}

/// Loss and LoRA gradients of the batch in one forward and one backward.
fn one_pass(model: &Decoder, objective: &SftObjective, examples: &[usize]) -> (f64, Vec<f64>) {
    let rows: Vec<&SftExample> = examples
        .iter()
        .map(|&i| &objective.train.examples[i])
        .collect();
    let (sum, n) =
        completion_logprob(model, &rows, objective.pad_id, &Device::Cpu, Mode::Eval).unwrap();
    let loss = (sum.neg().unwrap() / n as f64).unwrap();
    let store = loss.backward().unwrap();
    let grads: Vec<Tensor> = model
        .lora_parameters()
        .iter()
        .map(|(_, v)| store.get(v.as_tensor()).unwrap().clone())
        .collect();
    (loss.to_scalar::<f64>().unwrap(), flat_f64(&grads))
}

fn max_relative_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(scale > 1e-6, "the gradients are not all zero");
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn sharded_micro_batch_gives_the_one_pass_loss_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, objective) = setup(tmp.path(), DType::F64, 0.0);
    // Rows of different lengths, one repeated.
    let examples = [0, 1, 2, 3, 4, 5, 1];
    let tokens: Vec<usize> = examples.iter().map(|&i| objective.tokens(i)).collect();
    let shards = split(&tokens, true);
    assert!(
        shards.len() >= 3 && shards.iter().any(|s| s.len() > 1),
        "several shards, some of several examples: {shards:?} of {tokens:?}"
    );
    let (loss, expected) = one_pass(&model, &objective, &examples);
    let params = model.lora_parameters();
    for checkpointing in [false, true] {
        let mut model = model.clone();
        if checkpointing {
            model.enable_checkpointing();
        }
        let step = with_threads(2, || {
            micro_batch(&model, &params, &objective, &examples, Mode::Eval, 1.0).unwrap()
        });
        assert!(
            (step.loss - loss).abs() < 1e-12,
            "loss {} vs {loss} (checkpointing {checkpointing})",
            step.loss
        );
        let n: usize = examples.iter().map(|&i| objective.tokens(i)).sum();
        assert_eq!(step.tokens, n);
        // The LoRA Vars and their gradients are f32 (cast from the f64
        // computation): each shard's gradient is rounded before the sum.
        let diff = max_relative_difference(&flat_f64(&step.grads), &expected);
        assert!(diff < 1e-6, "{diff} (checkpointing {checkpointing})");
    }
}

#[test]
fn sharded_gradients_are_the_same_bytes_on_any_number_of_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, objective) = setup(tmp.path(), DType::F32, 0.1);
    let params = model.lora_parameters();
    let examples = [2, 4, 1, 6, 5];
    let mode = Mode::Train { dropout_seed: 11 };
    let mut checkpointed = model.clone();
    checkpointed.enable_checkpointing();
    let run = |model: &Decoder, threads: usize| {
        let step = with_threads(threads, || {
            micro_batch(model, &params, &objective, &examples, mode, 1.0).unwrap()
        });
        let bits: Vec<u32> = step
            .grads
            .iter()
            .flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect();
        (step.loss.to_bits(), bits)
    };
    let one = run(&model, 1);
    assert_eq!(run(&model, 2), one, "2 threads");
    assert_eq!(run(&model, 3), one, "3 threads");
    // More threads than examples: each shard's products and attention
    // spread over two threads of a pool.
    assert_eq!(run(&model, 8), one, "8 threads");
    // Checkpointed layers' gradients go through each shard's own store.
    let one = run(&checkpointed, 1);
    for _ in 0..3 {
        assert_eq!(run(&checkpointed, 2), one, "2 threads, checkpointing");
    }
    // Dropout is on: a different seed changes the gradients.
    let other = with_threads(2, || {
        let mode = Mode::Train { dropout_seed: 12 };
        micro_batch(&model, &params, &objective, &examples, mode, 1.0).unwrap()
    });
    assert_ne!(
        other.loss.to_bits(),
        run(&model, 1).0,
        "the dropout seed matters"
    );
}
