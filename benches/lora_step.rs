//! LoRA step throughput: r 16 on all seven projections of a hidden-512,
//! 8-layer model (8 heads, 4 KV heads, FFN 1376, vocab 8192), seq 256, f32.
//! Prints forward and forward+backward tokens/s and RSS figures (VmRSS /
//! VmHWM from /proc/self/status).
//!
//! Run: RAYON_NUM_THREADS=2 cargo bench --bench lora_step
//! Env: BENCH_BATCH (default 1), BENCH_ITERS (default 3).

use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};
use std::time::Instant;

fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` value 5).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn run() -> anyhow::Result<()> {
    let batch = env_usize("BENCH_BATCH", 1);
    let iters = env_usize("BENCH_ITERS", 3).max(1);
    let seq = 256usize;
    let spec = RandomModel {
        architecture: Architecture::Llama,
        hidden_size: 512,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        intermediate_size: 1376,
        vocab_size: 8192,
        head_dim: None,
        rope_theta: 10000.0,
        tie_word_embeddings: false,
        dtype: DType::F32,
        seed: 1,
        embedding_std: 0.02,
    };
    let dir = std::env::temp_dir().join(format!("lora-runner-bench-{}", std::process::id()));
    init_model(&spec, &dir)?;
    let mut model = Decoder::load(&dir, &LoadOptions::default())?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut lora = LoraConfig::new(16, 32.0, TargetModules::AllLinear);
    lora.dropout = 0.05;
    model.apply_lora(&lora, 0)?;
    let n_params: usize = model.trainable_vars().iter().map(|v| v.elem_count()).sum();
    let peak_init = status_mib("VmHWM:");
    let rss_loaded = status_mib("VmRSS:");

    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 7919 + 13) % 8192) as u32)
        .collect();
    let input = Tensor::from_vec(ids.clone(), (batch, seq), &Device::Cpu)?;
    // Next-token log-probs at every position, as an SFT loss would need.
    let targets: Vec<(usize, usize, u32)> = (0..batch)
        .flat_map(|b| (0..seq - 1).map(move |t| (b, t)))
        .map(|(b, t)| (b, t, ids[b * seq + t + 1]))
        .collect();
    let tokens = (batch * seq) as f64;

    let forward = |mode: Mode| -> anyhow::Result<Tensor> {
        let hidden = model.forward(Input::padded(&input, None), Rows::All, mode)?;
        Ok(model.token_logprobs(&hidden, &targets)?.mean_all()?.neg()?)
    };
    let time_forward = || -> anyhow::Result<f64> {
        let start = Instant::now();
        std::hint::black_box(forward(Mode::Inference)?.to_scalar::<f32>()?);
        Ok(start.elapsed().as_secs_f64())
    };
    let time_train_step = |seed: u64| -> anyhow::Result<f64> {
        let start = Instant::now();
        let grads = forward(Mode::Train { dropout_seed: seed })?.backward()?;
        std::hint::black_box(grads);
        Ok(start.elapsed().as_secs_f64())
    };

    time_train_step(0)?; // warm-up
                         // Memory of one training step: with the forward graph held, then the peak.
    let peak_reset = reset_peak();
    let rss_before = status_mib("VmRSS:");
    let (rss_graph, peak_step) = {
        let loss = forward(Mode::Train { dropout_seed: 99 })?;
        let rss_graph = status_mib("VmRSS:");
        let grads = loss.backward()?;
        std::hint::black_box(&grads);
        (rss_graph, status_mib("VmHWM:"))
    };

    let mut fwd = Vec::new();
    let mut step = Vec::new();
    for i in 0..iters {
        fwd.push(time_forward()?);
        step.push(time_train_step(i as u64 + 1)?);
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |m| format!("{m:.0} MiB"));
    println!("lora_step: hidden 512, 8 layers, 8 heads / 4 kv, ffn 1376, vocab 8192, batch {batch}, seq {seq}, f32");
    println!("  LoRA r 16 on all 7 projections ({n_params} trainable parameters), dropout 0.05");
    println!(
        "  RAYON_NUM_THREADS={}, {iters} timed iterations, load average {}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "(unset)".into()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    println!(
        "  forward (no graph, hidden + next-token log-probs): best {:.3}s mean {:.3}s -> {:.0} tokens/s",
        best(&fwd),
        mean(&fwd),
        tokens / best(&fwd)
    );
    println!(
        "  forward + backward (training step):                best {:.3}s mean {:.3}s -> {:.0} tokens/s",
        best(&step),
        mean(&step),
        tokens / best(&step)
    );
    println!(
        "  RSS after init + load: {} (VmHWM incl. writing the init checkpoint: {})",
        show(rss_loaded),
        show(peak_init)
    );
    if peak_reset {
        println!(
            "  one training step: RSS before {}, with forward graph held {}, peak through backward {}",
            show(rss_before),
            show(rss_graph),
            show(peak_step)
        );
        println!(
            "  peak RSS since the reset, all timed steps included (VmHWM): {}",
            show(status_mib("VmHWM:"))
        );
    } else {
        println!(
            "  peak RSS (VmHWM, includes init): {}",
            show(status_mib("VmHWM:"))
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Backward walks the graph recursively: give it a 64 MiB stack.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(run)?
        .join()
        .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
}
