//! Helpers shared by the model tests: scratch folders, a big-stack thread, init specs.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::error::ModelError;
use lora_runner::model::formats::io::read_json;
use lora_runner::model::formats::tokenizer::TokenizerConfig;
use lora_runner::model::init::{init_model, RandomModel};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

const PREFIX: &str = "lora-runner-model-test-";

/// Removes scratch folders left by earlier test processes that have exited
/// (folders are named after the owning pid), once per process.
fn sweep_stale_dirs() {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// A fresh, empty scratch folder under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    sweep_stale_dirs();
    let dir = std::env::temp_dir().join(format!(
        "{PREFIX}{}-{}-{}",
        std::process::id(),
        tag,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Backward walks the graph recursively: run on a thread with a 64 MiB stack.
pub fn with_big_stack<F: FnOnce() + Send + 'static>(f: F) {
    lora_runner::train::with_big_stack(f)
}

pub fn spec(arch: Architecture, tie: bool, seed: u64) -> RandomModel {
    RandomModel {
        architecture: arch,
        tie_word_embeddings: tie,
        ..RandomModel::tiny(seed)
    }
}

pub fn init_dir(tag: &str, spec: &RandomModel) -> PathBuf {
    let dir = scratch_dir(tag);
    init_model(spec, &dir).unwrap();
    dir
}

/// Deterministic pseudo-random token ids in [0, vocab).
pub fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..b)
        .map(|_| {
            (0..t)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

pub fn ids_tensor(ids: &[Vec<u32>]) -> Tensor {
    let b = ids.len();
    let t = ids[0].len();
    Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len(), "shape mismatch");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs test `name` of this test binary again in a child process with
/// `LORA_RUNNER_GENERIC_OPS=1`: the compositions a GPU runs, on the CPU
/// (the switch is read once per process), with attention tiles of 16
/// query tokens so that tiny models cross tile boundaries, and checks that
/// it passed.
pub fn passes_on_the_generic_path(name: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1"])
        .env("LORA_RUNNER_GENERIC_OPS", "1")
        .env("LORA_RUNNER_ATTENTION_TILE", "16")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} on the generic path: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The largest |a − b|, in f64.
pub fn max_abs_diff_f64(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Each parameter's gradient in `grads` against `expected[key(name)]`,
/// within `tolerance` relative to that tensor's largest entry.
pub fn assert_gradients_match(
    grads: &candle_core::backprop::GradStore,
    params: Vec<(String, candle_core::Var)>,
    expected: &std::collections::HashMap<String, Tensor>,
    key: impl Fn(&str) -> String,
    tolerance: f64,
    context: &str,
) {
    for (name, var) in params {
        let want = &expected[&key(&name)];
        let got = grads.get(var.as_tensor()).expect("a gradient");
        let scale = max_abs_diff_f64(want, &want.zeros_like().unwrap());
        let rel = max_abs_diff_f64(got, want) / scale;
        assert!(
            rel < tolerance,
            "{context}: {name} gradient off by {rel} relative"
        );
    }
}

/// init uses std 0.02 (HF's default), which makes attention almost uniform
/// and hides rope/mask bugs. Tests rescale every matrix and bias by
/// `factor` so attention is peaked and every part of the model matters.
pub fn amplify_weights(dir: &std::path::Path, factor: f64) {
    let path = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let scaled: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = if n.contains("norm") {
                t
            } else {
                (t * factor).unwrap()
            };
            (n, t)
        })
        .collect();
    candle_core::safetensors::save(&scaled, &path).unwrap();
}

pub fn init_dir_amplified(tag: &str, spec: &RandomModel) -> PathBuf {
    let dir = init_dir(tag, spec);
    amplify_weights(&dir, 10.0);
    dir
}

/// Sets every LoRA B of `model` to fixed values in ±`amplitude`/2: a fresh
/// adapter's B is zero, which hides A's gradient and the adapter itself.
pub fn set_lora_b(model: &lora_runner::model::decoder::Decoder, amplitude: f32) {
    for (name, var) in model.lora_parameters() {
        if name.contains("lora_B") {
            let n = var.as_tensor().elem_count();
            let values: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * amplitude)
                .collect();
            let t = Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }
}

/// The elements of `tensors`, one after another, as f64.
pub fn flat_f64(tensors: &[Tensor]) -> Vec<f64> {
    tensors
        .iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

/// A tokenizer loaded from an HF folder.
pub struct LoadedTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    /// The chat template (Jinja source), from tokenizer_config.json or chat_template.jinja.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A reference loader for the tokenizer tests (the program loads through
/// `data::ModelTokenizer`): loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`
/// (special tokens, chat template) or `dir/chat_template.jinja`.
pub fn load_tokenizer(dir: &Path) -> Result<LoadedTokenizer, ModelError> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let tokenizer: tokenizers::Tokenizer =
        text.parse()
            .map_err(|e: tokenizers::Error| ModelError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = if cfg_path.exists() {
        TokenizerConfig::from_json(&read_json(&cfg_path)?)
            .map_err(|m| ModelError::config(&cfg_path, m))?
    } else {
        TokenizerConfig::default()
    };
    let mut chat_template = cfg.chat_template;
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.exists() {
        chat_template =
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?);
    }
    Ok(LoadedTokenizer {
        tokenizer,
        chat_template,
        bos_token: cfg.bos_token,
        eos_token: cfg.eos_token,
        pad_token: cfg.pad_token,
    })
}

/// `Decoder::forward` of `sequences` packed into one row, and where each
/// sequence starts in it.
pub fn forward_packed(
    model: &lora_runner::model::decoder::Decoder,
    sequences: &[&[u32]],
    mode: lora_runner::model::decoder::Mode,
) -> (Tensor, Vec<usize>) {
    use lora_runner::model::decoder::{packed_starts, Input, Rows};
    let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
    let hidden = model
        .forward(Input::Packed(sequences), Rows::All, mode)
        .unwrap();
    (hidden, packed_starts(&lengths))
}

/// The tiny checkpoints transformers wrote for every family
/// (tests/fixtures/families, from scripts/family_reference.py).
pub const FIXTURE_FAMILIES: [&str; 10] = [
    "llama3",
    "llama-yarn",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "olmo2",
    "smollm3",
    "phi3",
];

/// The folder of one of them.
pub fn fixture_family(family: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(family)
}

/// The final-norm hidden states [1, t, hidden] of `row` run alone.
pub fn row_hidden(
    model: &lora_runner::model::decoder::Decoder,
    row: &[u32],
    mode: lora_runner::model::decoder::Mode,
) -> Tensor {
    use lora_runner::model::decoder::{Input, Rows};
    let ids = Tensor::new(row, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(Input::padded(&ids, None), Rows::All, mode)
        .unwrap()
}

/// The logits [t, vocab] of `row` run alone, without a graph.
pub fn row_logits(model: &lora_runner::model::decoder::Decoder, row: &[u32]) -> Tensor {
    let hidden = row_hidden(model, row, lora_runner::model::decoder::Mode::Inference);
    model.logits(&hidden).unwrap().squeeze(0).unwrap()
}

/// Σ log p(next token) over `row` run alone, as an f64 scalar (with a
/// graph in `Mode::Eval`).
pub fn row_logprob_sum(
    model: &lora_runner::model::decoder::Decoder,
    row: &[u32],
    mode: lora_runner::model::decoder::Mode,
) -> Tensor {
    let hidden = row_hidden(model, row, mode);
    let targets: Vec<_> = (0..row.len() - 1).map(|t| (0, t, row[t + 1])).collect();
    model
        .token_logprobs(&hidden, &targets)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// Mean next-token loss of one row of `ids` under `model` (f64).
pub fn mean_nll(model: &lora_runner::model::decoder::Decoder, ids: &[u32]) -> f64 {
    let sum = row_logprob_sum(model, ids, lora_runner::model::decoder::Mode::Inference);
    -sum.to_scalar::<f64>().unwrap() / (ids.len() - 1) as f64
}

/// SmolLM2's GGUF as `.ci/run` fetches it (RUNNER_TEST_SMOLLM2), or None
/// with a SKIPPED line; under CI=true a missing model fails the test, so a
/// failed download is never a silent pass.
pub fn smollm2() -> Option<std::path::PathBuf> {
    match std::env::var("RUNNER_TEST_SMOLLM2") {
        Ok(path) if !path.is_empty() => {
            let path = std::path::PathBuf::from(path);
            assert!(
                path.is_file(),
                "RUNNER_TEST_SMOLLM2={} is not a file: run scripts/fetch-smollm2.sh",
                path.display()
            );
            Some(std::fs::canonicalize(path).unwrap())
        }
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "RUNNER_TEST_SMOLLM2 is not set under CI: .ci/run must fetch SmolLM2 (scripts/fetch-smollm2.sh)"
            );
            eprintln!("SKIPPED: no SmolLM2 (scripts/fetch-smollm2.sh, then RUNNER_TEST_SMOLLM2=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)");
            None
        }
    }
}
