//! `runner plan` and a fully cached `runner run` on a recipe whose base
//! folder holds 1 GiB of safetensors: cold (first hash) and warm (memo).
//!
//! cargo bench --bench plan
//!
//! Times are whole `runner` processes, as a user sees them. The cold run
//! hashes files that were just written, so they are in the page cache: it
//! measures hashing, not the disk.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const GIB: usize = 1 << 30;
const SHARDS: usize = 2;

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("models/big");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"model_type": "qwen2", "num_hidden_layers": 24}"#,
    )
    .unwrap();
    let t = Instant::now();
    for shard in 1..=SHARDS {
        write_noise(
            &model.join(format!("model-{shard:05}-of-{SHARDS:05}.safetensors")),
            GIB / SHARDS,
            shard as u64,
        );
    }
    eprintln!(
        "wrote {} GiB of weights in {:.1}s",
        GIB >> 30,
        t.elapsed().as_secs_f64()
    );
    std::fs::write(
        dir.path().join("recipe.toml"),
        "[recipe]\nname = \"bench\"\n[stages.base]\nkind = \"base\"\npath = \"models/big\"\n",
    )
    .unwrap();

    let cold_plan = time(dir.path(), &["plan", "recipe.toml"]);
    let warm_plan = median(dir.path(), &["plan", "recipe.toml"], 7);
    time(dir.path(), &["run", "recipe.toml"]);
    let cached_run = median(dir.path(), &["run", "recipe.toml"], 7);
    // A cold *run*: a fresh cache, so the first hash happens inside `run`.
    std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
    let cold_run = time(dir.path(), &["run", "recipe.toml"]);

    println!("| what (1 GiB of safetensors in 2 shards) | wall time |");
    println!("|---|---|");
    println!(
        "| `runner plan`, cold (first hash) | {:.0} ms |",
        cold_plan * 1e3
    );
    println!(
        "| `runner plan`, warm (memo), median of 7 | {:.1} ms |",
        warm_plan * 1e3
    );
    println!(
        "| `runner run`, cold cache (hash + record) | {:.0} ms |",
        cold_run * 1e3
    );
    println!(
        "| `runner run`, fully cached, median of 7 | {:.1} ms |",
        cached_run * 1e3
    );
}

/// Fast deterministic bytes (xorshift), so the hash does real work.
fn write_noise(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..len / buf.len() {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

fn time(dir: &Path, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .current_dir(dir)
        .env("RUNNER_CACHE", dir.join("cache"))
        .output()
        .expect("runner runs");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn median(dir: &Path, args: &[&str], n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|_| time(dir, args)).collect();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}
