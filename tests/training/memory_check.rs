//! Stages that cannot fit are refused before anything runs: each stage's
//! estimate against the machine's memory (RUNNER_MACHINE_MEMORY stands in
//! for a small machine here), refused at the stage's line with exit 2,
//! warned of near the limit, run anyway with --ignore-memory-check; and a
//! shape no machine holds is a recipe error whatever the flags.

use crate::support::{Run, Workspace};
use lora_runner::cli::exit;

fn runner_with_memory(ws: &Workspace, memory: &str, args: &[&str]) -> Run {
    ws.runner_limited("true", args, &[("RUNNER_MACHINE_MEMORY", memory)])
}

/// `plan --json`'s memory estimate of `stage` in the workspace's recipe.
fn planned_memory(ws: &Workspace, stage: &str) -> serde_json::Value {
    let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
    plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stage)
        .unwrap()["memory"]
        .clone()
}

const SHAPE: &str = r#"init = { arch = "llama", hidden = 8192, layers = 64, heads = 64, kv_heads = 64, ffn = 32768, vocab = 1000000 }"#;

#[test]
fn a_stage_that_cannot_fit_is_refused_at_its_line_before_anything_runs() {
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        &format!("[recipe]\nname = \"typo\"\n\n[stages.base]\nkind = \"base\"\n{SHAPE}\n"),
    );
    // A 2026 typo: an 85-billion-parameter `init` on a 16 GiB machine.
    for command in ["plan", "run"] {
        let run = runner_with_memory(&ws, "16GiB", &[command, "recipe.toml"]);
        assert_eq!(run.code, exit::USAGE, "{command}: {}", run.stderr);
        for says in [
            "stage `base` needs ~573 GiB peak",
            "this machine has 16.0 GiB (RUNNER_MACHINE_MEMORY)",
            "recipe.toml:4:1",
            "--ignore-memory-check",
        ] {
            assert!(
                run.stderr.contains(says),
                "{command}: {says} in {}",
                run.stderr
            );
        }
    }
    assert!(!ws.cache().join("artifacts").exists() || ws.artifacts().is_empty());
    // The flag turns the refusal into a warning (plan only: the model is
    // not made here).
    let run = runner_with_memory(
        &ws,
        "16GiB",
        &["plan", "recipe.toml", "--ignore-memory-check"],
    );
    assert_eq!(run.code, exit::OK, "{}", run.stderr);
    assert!(run.stderr.contains("warning (--ignore-memory-check)"));
    // A size that is not one.
    let run = runner_with_memory(&ws, "lots", &["plan", "recipe.toml"]);
    assert_eq!(run.code, exit::USAGE);
    assert!(run
        .stderr
        .contains("RUNNER_MACHINE_MEMORY=\"lots\" is not a size"));
}

#[test]
fn a_shape_no_machine_holds_is_a_recipe_error_even_when_told_to_ignore_memory() {
    let ws = Workspace::new();
    let shape = SHAPE.replace("hidden = 8192", "hidden = 819200");
    ws.write(
        "recipe.toml",
        &format!("[recipe]\nname = \"typo\"\n\n[stages.base]\nkind = \"base\"\n{shape}\n"),
    );
    let run = ws.runner(&["plan", "recipe.toml", "--ignore-memory-check"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(run.stderr.contains("more than 2^40"), "{}", run.stderr);
    assert!(run.stderr.contains("recipe.toml:6:"), "{}", run.stderr);
}

#[test]
fn training_stages_are_checked_against_the_machine_and_warned_of_near_it() {
    let ws = Workspace::new();
    let data = crate::support::recipe_data("sft_train.jsonl");
    ws.write(
        "recipe.toml",
        &format!(
            "[recipe]\nname = \"fit\"\n\n[stages.base]\nkind = \"base\"\n\
             init = {{ arch = \"qwen2\", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}\n\n\
             [stages.sft]\nkind = \"sft\"\nmodel = \"base\"\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 1, batch = 2, seq_len = 32 }}\n",
            data.display()
        ),
    );
    let need = planned_memory(&ws, "sft")["estimate_bytes"]
        .as_u64()
        .unwrap();
    // Just under the estimate: refused; just over: a warning, and it runs.
    let run = runner_with_memory(&ws, &(need - 1).to_string(), &["run", "recipe.toml"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(run.stderr.contains("stage `sft` needs"), "{}", run.stderr);
    assert!(run.stderr.contains("train.checkpointing"), "{}", run.stderr);
    let run = runner_with_memory(
        &ws,
        &(need + need / 20).to_string(),
        &["run", "recipe.toml"],
    );
    assert_eq!(run.code, exit::OK, "{}", run.stderr);
    assert!(
        run.stderr.contains("warning: stage `sft` needs"),
        "{}",
        run.stderr
    );
}

/// Run anyway on a machine that cannot hold it (`ulimit -v` stands in for
/// it), the stage ends with a message naming it and the size it could not
/// allocate, exit 3, and nothing cached: not Rust's abort.
#[test]
fn an_allocation_the_machine_refuses_ends_the_stage_with_exit_3_not_an_abort() {
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        &format!("[recipe]\nname = \"typo\"\n\n[stages.base]\nkind = \"base\"\n{SHAPE}\n"),
    );
    let run = ws.runner_limited(
        "ulimit -v 4000000",
        &["run", "recipe.toml", "--ignore-memory-check"],
        &[("RUNNER_MACHINE_MEMORY", "16GiB")],
    );
    let stderr = &run.stderr;
    assert_eq!(run.code, exit::ENVIRONMENT, "{stderr}");
    assert!(
        stderr.contains("runner: stage `base`: out of memory")
            && stderr.contains("allocation of 32768000000 bytes"),
        "{stderr}"
    );
    assert!(ws.artifacts().is_empty());
}

/// With --jobs, stages start together only when their estimates fit the
/// machine together: two SFT stages that fit one at a time run one after
/// the other.
#[test]
fn parallel_stages_do_not_overcommit_the_machine_together() {
    let ws = Workspace::new();
    let data = crate::support::recipe_data("sft_train.jsonl");
    let sft = |name: &str, lr: &str| {
        format!(
            "[stages.{name}]\nkind = \"sft\"\nmodel = \"base\"\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 3, batch = 2, seq_len = 32, lr = {lr} }}\n\n",
            data.display()
        )
    };
    ws.write(
        "recipe.toml",
        &format!(
            "[recipe]\nname = \"two\"\n\n[stages.base]\nkind = \"base\"\n\
             init = {{ arch = \"qwen2\", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}\n\n{}{}",
            sft("a", "1e-3"),
            sft("b", "2e-3")
        ),
    );
    let need = planned_memory(&ws, "a")["estimate_bytes"].as_u64().unwrap();
    let memory = (need + need / 2).to_string();
    ws.runner_limited(
        "true",
        &["run", "recipe.toml", "--jobs", "2"],
        &[("RUNNER_MACHINE_MEMORY", &memory)],
    )
    .ok();
    let span = |stage: &str| {
        let m = ws
            .runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .json()["manifest"]
            .clone();
        (
            m["started"].as_str().unwrap().to_string(),
            m["finished"].as_str().unwrap().to_string(),
        )
    };
    let (a, b) = (span("a"), span("b"));
    // RFC 3339 UTC strings order as times do.
    assert!(a.1 <= b.0 || b.1 <= a.0, "a {a:?} and b {b:?} overlapped");
}

/// A stage computed on a GPU is checked against the GPU's memory, not the
/// machine's (the plan is made for `cuda:0` as a GPU machine would resolve
/// it; no GPU is needed to plan).
#[test]
fn stages_on_a_gpu_are_checked_against_the_gpus_memory() {
    use lora_runner::machine::Available;
    use lora_runner::plan::memory_check::{check, Offered};
    let ws = Workspace::new();
    let data = crate::support::recipe_data("sft_train.jsonl");
    let path = ws.write(
        "recipe.toml",
        &format!(
            "[recipe]\nname = \"gpu\"\n\n[stages.base]\nkind = \"base\"\n\
             init = {{ arch = \"qwen2\", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 100 }}\n\n\
             [stages.sft]\nkind = \"sft\"\nmodel = \"base\"\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 1, batch = 2, seq_len = 32 }}\n",
            data.display()
        ),
    );
    let recipe = lora_runner::recipe::load(&path, &crate::support::kinds::registry()).unwrap();
    let dag = lora_runner::graph::build(&recipe).unwrap();
    let cache = lora_runner::cache::Cache::open(&ws.cache()).unwrap();
    let plan_on = |device| {
        let overrides = lora_runner::plan::Overrides {
            device,
            ..Default::default()
        };
        lora_runner::plan::plan(&recipe, &dag, &cache, &overrides).unwrap()
    };
    let gpu_plan = plan_on(lora_runner::stage::DeviceSpec::Cuda(0));
    let cpu_plan = plan_on(lora_runner::stage::DeviceSpec::Cpu);
    let tiny = |what: &str| Available {
        bytes: 1 << 20,
        what: what.into(),
    };
    let ample = |what: &str| Available {
        bytes: 1 << 40,
        what: what.into(),
    };
    let refused = |plan, offered: Offered| -> Vec<String> {
        check(&recipe, plan, None, &offered)
            .refused
            .into_iter()
            .map(|p| p.message)
            .collect()
    };
    // A GPU too small for the SFT: refused, naming the GPU; the base (made
    // on the CPU) fits the machine.
    let on_gpu = refused(
        &gpu_plan,
        Offered {
            host: Some(ample("physical memory")),
            gpu: Some(tiny("NVIDIA T4 (GPU 0, nvidia-smi)")),
        },
    );
    assert_eq!(on_gpu.len(), 1, "{on_gpu:?}");
    assert!(on_gpu[0].starts_with("stage `sft` needs"), "{on_gpu:?}");
    assert!(
        on_gpu[0].ends_with("the GPU has 1.00 MiB (NVIDIA T4 (GPU 0, nvidia-smi))"),
        "{on_gpu:?}"
    );
    // A small machine with a large GPU: only the CPU's stage is refused.
    let on_host = refused(
        &gpu_plan,
        Offered {
            host: Some(tiny("physical memory")),
            gpu: Some(ample("GPU")),
        },
    );
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert!(on_host[0].starts_with("stage `base` needs"), "{on_host:?}");
    // An unknown GPU memory checks nothing on it; the same recipe on the
    // CPU is checked against the machine.
    let unknown = refused(
        &gpu_plan,
        Offered {
            host: Some(ample("physical memory")),
            gpu: None,
        },
    );
    assert!(unknown.is_empty(), "{unknown:?}");
    let on_cpu = refused(
        &cpu_plan,
        Offered {
            host: Some(tiny("physical memory")),
            gpu: Some(ample("GPU")),
        },
    );
    assert_eq!(on_cpu.len(), 2, "{on_cpu:?}");
    // The GPU's path keeps more than the CPU's fused ops: its estimate is
    // its own. Under LORA_RUNNER_GENERIC_OPS=1 the CPU runs the GPU's path,
    // and its estimate says so.
    let estimate = |plan: &lora_runner::plan::Plan| {
        lora_runner::plan::render::plan_json(&recipe, plan).stages[1]
            .memory
            .unwrap()
            .estimate_bytes
    };
    if lora_runner::model::kernels::cpu::fused_kernels(&candle_core::Device::Cpu) {
        assert!(estimate(&gpu_plan) > estimate(&cpu_plan));
    } else {
        assert_eq!(estimate(&gpu_plan), estimate(&cpu_plan));
    }
}

/// Writing a model GGUF states its estimate in `plan` (an `export` stage)
/// and `runner export --gguf` checks it before writing anything.
#[test]
fn a_gguf_export_is_estimated_and_checked_before_anything_is_written() {
    let ws = Workspace::new();
    ws.write(
        "recipe.toml",
        "[recipe]\nname = \"out\"\n\n[stages.base]\nkind = \"base\"\n\
         init = { arch = \"llama\", hidden = 32, layers = 2, heads = 4, kv_heads = 2, ffn = 64, vocab = 300 }\n\n\
         [stages.out]\nkind = \"export\"\nfrom = \"base\"\npath = \"out\"\ngguf = \"q8_0\"\n",
    );
    let (base, out) = (planned_memory(&ws, "base"), planned_memory(&ws, "out"));
    // The model as loaded, plus its written blocks and the conversion's
    // temporaries.
    let (w_out, w_base) = (
        out["weights_bytes"].as_f64().unwrap(),
        base["weights_bytes"].as_f64().unwrap(),
    );
    assert!((w_out / w_base - 1.0).abs() < 0.05, "{out} {base}");
    let copies = out["copies_bytes"].as_u64().unwrap();
    assert!(copies > 4 * 4 * 300 * 32, "{out}");
    ws.runner(&["run", "recipe.toml", "--until", "base"]).ok();
    let need = out["estimate_bytes"].as_u64().unwrap();
    let export = |extra: &[&str]| {
        let mut args = vec![
            "export",
            "recipe.toml",
            "base",
            "exported",
            "--gguf",
            "--gguf-type",
            "q8_0",
        ];
        args.extend(extra);
        runner_with_memory(&ws, &(need - 1).to_string(), &args)
    };
    let run = export(&[]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(
        run.stderr.contains("writing `base` as GGUF needs"),
        "{}",
        run.stderr
    );
    assert!(!ws.path("exported").exists(), "nothing written");
    let run = export(&["--ignore-memory-check"]);
    assert_eq!(run.code, exit::OK, "{}", run.stderr);
    assert!(ws.path("exported/model.gguf").is_file());
    // Every stage that ran records its estimate beside the measured peak.
    ws.runner(&["run", "recipe.toml"]).ok();
    for (stage, planned) in [("base", &base), ("out", &out)] {
        let manifest = ws
            .runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .json()["manifest"]
            .clone();
        let gib = planned["estimate_bytes"].as_f64().unwrap() / (1u64 << 30) as f64;
        let recorded = manifest["metrics"]["memory/estimate_gib"].as_f64().unwrap();
        assert!(
            (recorded - gib).abs() < 1e-3,
            "{stage}: {recorded} vs {gib}"
        );
        assert!(manifest["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
}
