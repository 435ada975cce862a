//! Generation with a KV cache: the cached forward against the full
//! `Decoder::forward`, greedy decoding against a naive re-run-everything loop,
//! seeded sampling, stop tokens and LoRA adapters.

use crate::support::model::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::generate::{
    generate, greedy_token, sample_token, GenerateOptions, KvCache, Sampling,
};
use lora_runner::model::kernels::rng::SplitMix64;
use lora_runner::model::merge::merge_lora;
use lora_runner::model::{LoraConfig, TargetModules};
use std::path::Path;
use std::time::Instant;

const TOL: f32 = 1e-5;

fn load(dir: &Path) -> Decoder {
    Decoder::load(dir, &LoadOptions::default()).unwrap()
}

fn set_sliding_window(dir: &Path, window: usize) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(window);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
}

/// Left-pads `rows` to the longest one with token 0; returns ids and mask.
fn left_pad(rows: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let longest = rows.iter().map(Vec::len).max().unwrap();
    rows.iter()
        .map(|r| {
            let pad = longest - r.len();
            (
                [vec![0; pad], r.clone()].concat(),
                [vec![false; pad], vec![true; r.len()]].concat(),
            )
        })
        .unzip()
}

fn mask_tensor(mask: &[Vec<bool>]) -> Tensor {
    let rows: Vec<Vec<u32>> = mask
        .iter()
        .map(|r| r.iter().map(|&m| m as u32).collect())
        .collect();
    ids_tensor(&rows)
}

/// Feeds a left-padded batch to the cache in chunks (prompt, then single
/// tokens and a multi-token chunk) and checks every real position against
/// `Decoder::forward` over the whole sequence so far.
fn check_cached_forward(model: &Decoder, prompts: &[Vec<u32>]) {
    let (mut ids, mut mask) = left_pad(prompts);
    let continuation = random_ids(prompts.len(), 9, model.config.vocab_size, 77);
    let chunks: [&[usize]; 5] = [&[0], &[1], &[2, 3, 4], &[5], &[6, 7, 8]];
    let mut cache = KvCache::new(prompts.len());
    let mut new_ids = ids.clone();
    let mut new_mask = mask.clone();
    for chunk in chunks {
        let cached = cache.forward(model, &new_ids, Some(&new_mask)).unwrap();
        let past = ids[0].len() - new_ids[0].len();
        let full = model
            .forward(
                Input::padded(&ids_tensor(&ids), Some(&mask_tensor(&mask))),
                Rows::All,
                Mode::Inference,
            )
            .unwrap();
        for (row, row_mask) in new_mask.iter().enumerate() {
            for (i, &real) in row_mask.iter().enumerate() {
                if real {
                    let d = max_abs_diff(
                        &cached.i((row, i)).unwrap(),
                        &full.i((row, past + i)).unwrap(),
                    );
                    assert!(d < TOL, "row {row}, position {}: |diff| {d}", past + i);
                }
            }
        }
        assert_eq!(cache.len(), ids[0].len());
        new_ids = continuation
            .iter()
            .map(|c| chunk.iter().map(|&k| c[k]).collect())
            .collect();
        new_mask = vec![vec![true; chunk.len()]; prompts.len()];
        for (row, extra) in new_ids.iter().enumerate() {
            ids[row].extend(extra);
            mask[row].extend(&new_mask[row]);
        }
    }
}

#[test]
fn cached_forward_matches_full_forward_llama_gqa() {
    let dir = init_dir_amplified("gen-cache-llama", &spec(Architecture::Llama, false, 21));
    let model = load(&dir);
    let prompts = vec![
        random_ids(1, 6, 128, 1).remove(0),
        random_ids(1, 2, 128, 2).remove(0),
        random_ids(1, 4, 128, 3).remove(0),
    ];
    check_cached_forward(&model, &prompts);
    // And a single unpadded sequence.
    check_cached_forward(&model, &prompts[..1]);
}

#[test]
fn cached_forward_matches_full_forward_qwen2_bias_tied() {
    let dir = init_dir_amplified("gen-cache-qwen2", &spec(Architecture::Qwen2, true, 22));
    let model = load(&dir);
    let prompts = vec![
        random_ids(1, 3, 128, 4).remove(0),
        random_ids(1, 7, 128, 5).remove(0),
    ];
    check_cached_forward(&model, &prompts);
}

#[test]
fn cached_forward_matches_full_forward_mistral_sliding_window() {
    let mut s = spec(Architecture::Mistral, false, 23);
    s.head_dim = Some(16);
    let dir = init_dir_amplified("gen-cache-mistral", &s);
    set_sliding_window(&dir, 3);
    let model = load(&dir);
    assert!(model.config.layers.iter().all(|l| l.window == Some(3)));
    let prompts = vec![
        random_ids(1, 5, 128, 6).remove(0),
        random_ids(1, 1, 128, 7).remove(0),
    ];
    check_cached_forward(&model, &prompts);
}

#[test]
fn cached_forward_rejects_bad_input_and_keeps_the_cache() {
    let dir = init_dir("gen-cache-bad", &spec(Architecture::Qwen2, true, 24));
    let model = load(&dir);
    let mut cache = KvCache::new(2);
    assert!(cache.forward(&model, &[vec![1, 2]], None).is_err());
    assert!(cache.forward(&model, &[vec![1, 2], vec![3]], None).is_err());
    assert!(cache.forward(&model, &[vec![], vec![]], None).is_err());
    assert!(cache.forward(&model, &[vec![1], vec![128]], None).is_err());
    assert!(cache
        .forward(&model, &[vec![1], vec![2]], Some(&[vec![true]]))
        .is_err());
    assert!(cache.is_empty());
    cache
        .forward(&model, &[vec![1, 2], vec![3, 4]], None)
        .unwrap();
    assert_eq!(cache.len(), 2);
    // A cache filled by a model of another shape is refused.
    let mut other_spec = spec(Architecture::Qwen2, true, 24);
    other_spec.num_hidden_layers = 3;
    let other = load(&init_dir("gen-cache-other", &other_spec));
    assert!(cache.forward(&other, &[vec![1], vec![2]], None).is_err());
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.tokens_in_row(1), Some(2));
    assert!(KvCache::new(0).forward(&model, &[], None).is_err());
}

/// Independent reference: re-run `Decoder::forward` over the whole sequence
/// (one prompt, no padding, no cache) and take the first maximal logit.
fn naive_greedy(model: &Decoder, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_new {
        let hidden = model
            .forward(
                Input::padded(&ids_tensor(&[ids.clone()]), None),
                Rows::All,
                Mode::Inference,
            )
            .unwrap();
        let logits = model
            .logits_at(&hidden, &[(0, ids.len() - 1)])
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut best = 0;
        for (id, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = id;
            }
        }
        let token = best as u32;
        out.push(token);
        ids.push(token);
        if stop.contains(&token) {
            break;
        }
    }
    out
}

fn test_prompts() -> Vec<Vec<u32>> {
    vec![
        random_ids(1, 5, 128, 31).remove(0),
        random_ids(1, 1, 128, 32).remove(0),
        random_ids(1, 8, 128, 33).remove(0),
    ]
}

#[test]
fn greedy_generate_matches_naive_loop() {
    for (arch, tie, seed) in [
        (Architecture::Llama, false, 41),
        (Architecture::Qwen2, true, 42),
        (Architecture::Mistral, false, 43),
    ] {
        let dir = init_dir_amplified("gen-greedy", &spec(arch, tie, seed));
        if arch == Architecture::Mistral {
            set_sliding_window(&dir, 4);
        }
        let model = load(&dir);
        let prompts = test_prompts();
        let generated = generate(&model, &prompts, &GenerateOptions::greedy(12, vec![])).unwrap();
        for (prompt, got) in prompts.iter().zip(&generated) {
            assert_eq!(got.len(), 12);
            assert_eq!(got, &naive_greedy(&model, prompt, 12, &[]), "{arch:?}");
        }
        // Batched or alone, a prompt generates the same tokens.
        let alone = generate(&model, &prompts[2..], &GenerateOptions::greedy(12, vec![])).unwrap();
        assert_eq!(alone[0], generated[2]);
    }
}

fn sampling(temperature: f64, top_p: f64, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 16,
        stop_tokens: vec![],
        sampling: Sampling::Sample {
            temperature,
            top_p,
            seed,
        },
    }
}

#[test]
fn sampling_is_seeded_and_tiny_top_p_is_greedy() {
    // Not amplified: near-uniform next-token distributions over 128 ids, so
    // two seeds agreeing on 16 tokens would be a ~128^-16 event.
    let dir = init_dir("gen-sample", &spec(Architecture::Qwen2, true, 51));
    let model = load(&dir);
    let prompts = test_prompts();
    let first = generate(&model, &prompts, &sampling(1.5, 0.95, 7)).unwrap();
    let again = generate(&model, &prompts, &sampling(1.5, 0.95, 7)).unwrap();
    let other = generate(&model, &prompts, &sampling(1.5, 0.95, 8)).unwrap();
    assert_eq!(first, again);
    for (a, b) in first.iter().zip(&other) {
        assert_ne!(a, b);
    }
    // Each row has its own stream: a prompt samples the same alone.
    let alone = generate(&model, &prompts[..1], &sampling(1.5, 0.95, 7)).unwrap();
    assert_eq!(alone[0], first[0]);
    // Sequences in the batch differ from each other too (own streams).
    assert_ne!(first[0], first[1]);

    let amplified = load(&init_dir_amplified(
        "gen-sample-amp",
        &spec(Architecture::Llama, false, 52),
    ));
    let greedy = generate(&amplified, &prompts, &GenerateOptions::greedy(16, vec![])).unwrap();
    for seed in [1, 2, 3] {
        let nucleus = generate(&amplified, &prompts, &sampling(1.0, 1e-9, seed)).unwrap();
        assert_eq!(nucleus, greedy);
    }
}

#[test]
fn sample_token_follows_the_nucleus_distribution() {
    // Probabilities 0.5, 0.3, 0.2 (and one impossible token).
    let logits = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln(), f64::NEG_INFINITY];
    let mut rng = SplitMix64::new(3);
    let mut counts = [0usize; 4];
    let draws = 20_000;
    for _ in 0..draws {
        counts[sample_token(&logits, 1.0, 1.0, &mut rng).unwrap() as usize] += 1;
    }
    for (id, p) in [0.5, 0.3, 0.2, 0.0].iter().enumerate() {
        let freq = counts[id] as f64 / draws as f64;
        assert!((freq - p).abs() < 0.015, "token {id}: {freq} vs {p}");
    }
    // top_p 0.6 keeps {0, 1}, renormalised to 5/8 and 3/8.
    let mut counts = [0usize; 4];
    for _ in 0..draws {
        counts[sample_token(&logits, 1.0, 0.6, &mut rng).unwrap() as usize] += 1;
    }
    assert_eq!(counts[2] + counts[3], 0);
    let freq = counts[0] as f64 / draws as f64;
    assert!((freq - 0.625).abs() < 0.015, "{freq}");
    // Ties: greedy and a tiny top_p both take the lowest id.
    let tied = [1.0, 3.0, 3.0, -2.0];
    assert_eq!(greedy_token(&tied).unwrap(), 1);
    assert_eq!(sample_token(&tied, 1.0, 1e-9, &mut rng).unwrap(), 1);
    // Bad parameters and logits are errors, not panics.
    assert!(sample_token(&logits, 0.0, 1.0, &mut rng).is_err());
    assert!(sample_token(&logits, f64::NAN, 1.0, &mut rng).is_err());
    assert!(sample_token(&logits, 1.0, 0.0, &mut rng).is_err());
    assert!(sample_token(&logits, 1.0, 1.5, &mut rng).is_err());
    assert!(sample_token(&[f64::NAN, 1.0], 1.0, 1.0, &mut rng).is_err());
    assert!(sample_token(&[f64::NEG_INFINITY], 1.0, 1.0, &mut rng).is_err());
    assert!(greedy_token(&[]).is_err());
}

#[test]
fn stop_tokens_end_generation_and_are_included() {
    let dir = init_dir_amplified("gen-stop", &spec(Architecture::Llama, false, 61));
    let model = load(&dir);
    let prompts = test_prompts();
    let free = generate(&model, &prompts, &GenerateOptions::greedy(12, vec![])).unwrap();
    // A token row 0 first produces at step >= 2 becomes the stop token.
    let k = (2..12)
        .find(|&k| !free[0][..k].contains(&free[0][k]))
        .expect("row 0 repeats one token throughout");
    let stop = free[0][k];
    let stopped = generate(&model, &prompts, &GenerateOptions::greedy(12, vec![stop])).unwrap();
    assert_eq!(stopped[0], free[0][..=k].to_vec());
    assert_eq!(stopped[0].last(), Some(&stop));
    for (row, (got, unstopped)) in stopped.iter().zip(&free).enumerate() {
        let end = unstopped
            .iter()
            .position(|&t| t == stop)
            .map_or(unstopped.len(), |p| p + 1);
        assert_eq!(got, &unstopped[..end].to_vec(), "row {row}");
        assert_eq!(got, &naive_greedy(&model, &prompts[row], 12, &[stop]));
    }
}

#[test]
fn generate_handles_edge_cases_and_bad_input() {
    let dir = init_dir("gen-edge", &spec(Architecture::Qwen2, true, 71));
    let model = load(&dir);
    let none: Vec<Vec<u32>> = vec![];
    assert!(generate(&model, &none, &GenerateOptions::greedy(4, vec![]))
        .unwrap()
        .is_empty());
    assert_eq!(
        generate(&model, &[vec![1, 2]], &GenerateOptions::greedy(0, vec![])).unwrap(),
        vec![Vec::<u32>::new()]
    );
    assert!(generate(
        &model,
        &[vec![1], vec![]],
        &GenerateOptions::greedy(4, vec![])
    )
    .is_err());
    assert!(generate(&model, &[vec![1, 500]], &GenerateOptions::greedy(4, vec![])).is_err());
    assert!(generate(&model, &[vec![1]], &sampling(0.0, 0.9, 1)).is_err());
    assert!(generate(&model, &[vec![1]], &sampling(1.0, 0.0, 1)).is_err());
    assert_eq!(
        generate(&model, &[vec![1]], &GenerateOptions::greedy(1, vec![]))
            .unwrap()
            .concat()
            .len(),
        1
    );
}

#[test]
fn lora_adapters_are_applied_during_generation() {
    let dir = init_dir_amplified("gen-lora", &spec(Architecture::Qwen2, true, 81));
    let base = load(&dir);
    let mut adapted = base.clone();
    adapted
        .apply_lora(&LoraConfig::new(4, 8.0, TargetModules::AllLinear), 5)
        .unwrap();
    // PEFT initialises B to zero; give every adapter a non-zero B.
    let mut rng = SplitMix64::new(9);
    for linear in adapted.linears() {
        let b = &linear.lora.as_ref().unwrap().b;
        let values: Vec<f32> = (0..b.elem_count())
            .map(|_| 0.2 * rng.normal() as f32)
            .collect();
        b.set(&Tensor::from_vec(values, b.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let merged = merge_lora(&adapted).unwrap();
    let prompts = test_prompts();

    // The cached forward agrees with the merged weights, and the adapter matters.
    let (ids, mask) = left_pad(&prompts);
    let hidden = |m: &Decoder| {
        KvCache::new(prompts.len())
            .forward(m, &ids, Some(&mask))
            .unwrap()
            .i((.., ids[0].len() - 1))
            .unwrap()
    };
    assert!(max_abs_diff(&hidden(&adapted), &hidden(&merged)) < 1e-4);
    assert!(max_abs_diff(&hidden(&adapted), &hidden(&base)) > 1e-1);

    let opts = GenerateOptions::greedy(12, vec![]);
    let with_adapter = generate(&adapted, &prompts, &opts).unwrap();
    assert_eq!(with_adapter, generate(&merged, &prompts, &opts).unwrap());
    assert_ne!(with_adapter, generate(&base, &prompts, &opts).unwrap());
    let opts = sampling(1.0, 0.9, 3);
    assert_eq!(
        generate(&adapted, &prompts, &opts).unwrap(),
        generate(&merged, &prompts, &opts).unwrap()
    );
    // Generation builds no graph: nothing reaches the adapters' Vars.
    let out = KvCache::new(1)
        .forward(&adapted, &prompts[..1], None)
        .unwrap();
    assert!(out
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get_id(adapted.trainable_vars()[0].id())
        .is_none());
}

/// Tokens/s of greedy generation with and without the cache (hidden 64,
/// 2 layers, 64 new tokens). Run with
/// `cargo test --release --test model_generate throughput -- --nocapture`.
#[test]
fn throughput_with_and_without_cache() {
    let mut s = spec(Architecture::Llama, false, 91);
    s.hidden_size = 64;
    s.intermediate_size = 128;
    s.dtype = DType::F32;
    let model = load(&init_dir_amplified("gen-speed", &s));
    let prompt = random_ids(1, 8, 128, 92);
    let new_tokens = 64;
    let best_of = |f: &dyn Fn() -> Vec<u32>| {
        let mut best = f64::INFINITY;
        let mut tokens = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            tokens = f();
            best = best.min(start.elapsed().as_secs_f64());
        }
        (tokens, best)
    };
    let (cached, cached_s) = best_of(&|| {
        generate(
            &model,
            &prompt,
            &GenerateOptions::greedy(new_tokens, vec![]),
        )
        .unwrap()
        .remove(0)
    });
    let (naive, naive_s) = best_of(&|| naive_greedy(&model, &prompt[0], new_tokens, &[]));
    assert_eq!(cached, naive);
    println!(
        "greedy, hidden 64, 2 layers, prompt 8, {new_tokens} new tokens: \
         with cache {:.0} tokens/s ({:.2} ms), without {:.0} tokens/s ({:.2} ms), x{:.1}",
        new_tokens as f64 / cached_s,
        cached_s * 1e3,
        new_tokens as f64 / naive_s,
        naive_s * 1e3,
        naive_s / cached_s
    );
}

/// The KV cache gives the full forward's states for every family's
/// transformers checkpoint: windows per layer, local/global rope, NoPE
/// layers, soft-caps and q/k norms all continue from cached keys.
#[test]
fn cached_forward_matches_full_forward_for_every_family_checkpoint() {
    for family in crate::support::model::FIXTURE_FAMILIES {
        let model = load(&crate::support::model::fixture_family(family));
        let prompts = vec![
            random_ids(1, 6, model.config.vocab_size, 8).remove(0),
            random_ids(1, 2, model.config.vocab_size, 9).remove(0),
        ];
        check_cached_forward(&model, &prompts);
    }
}
