//! DoRA through the CLI: `lora = { dora = true }` trains, continues in
//! scheme one, merges in scheme two and trains a fresh DoRA adapter on the
//! merge; resumes after SIGKILL to the same bytes; keys stay as they were
//! without it; and a llama.cpp export of a DoRA adapter is refused at plan.

use crate::stages::{artifact_file, recipe, straight_and_resumed_sft};
use crate::support::model::max_abs_diff;
use crate::support::{plan_entry, Workspace};
use candle_core::{DType, Device, Tensor};
use lora_runner::cli::exit;
use std::collections::HashMap;

const SFT_LORA: &str = r#"lora = { r = 8, alpha = 16, targets = "all-linear" }"#;
const FRESH_LORA: &str =
    r#"lora = { r = 4, alpha = 8, targets = ["q_proj", "v_proj", "down_proj"] }"#;

/// The stages test's two-scheme recipe with DoRA on both new adapters.
fn dora_recipe(sft_steps: u32, dpo_steps: u32) -> String {
    let text = recipe(sft_steps, dpo_steps, "");
    assert!(text.contains(SFT_LORA) && text.contains(FRESH_LORA));
    text.replace(SFT_LORA, &SFT_LORA.replace(" }", ", dora = true }"))
        .replace(FRESH_LORA, &FRESH_LORA.replace(" }", ", use_dora = true }"))
}

fn tensors(ws: &Workspace, stage: &str) -> HashMap<String, Tensor> {
    let bytes = artifact_file(ws, stage, "adapter_model.safetensors");
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap()
}

fn magnitudes(t: &HashMap<String, Tensor>) -> Vec<(&String, &Tensor)> {
    let mut m: Vec<_> = t
        .iter()
        .filter(|(n, _)| n.ends_with(".lora_magnitude_vector"))
        .collect();
    m.sort_by_key(|(n, _)| n.as_str());
    m
}

#[test]
fn dora_trains_in_both_schemes_and_merges() {
    let ws = Workspace::new();
    ws.write("recipe.toml", &dora_recipe(30, 10));
    ws.runner(&["run", "recipe.toml"]).ok();

    // SFT: a magnitude per module (7 projections × 2 layers), trained away
    // from PEFT's start ‖W‖ and learning the task.
    let sft = tensors(&ws, "sft");
    assert_eq!(magnitudes(&sft).len(), 14);
    let config: serde_json::Value =
        serde_json::from_slice(&artifact_file(&ws, "sft", "adapter_config.json")).unwrap();
    assert_eq!(config["use_dora"], true);
    let metrics = |stage: &str| {
        ws.runner(&["show", "recipe.toml", stage, "--json"])
            .ok()
            .json()["manifest"]["metrics"]
            .clone()
    };
    let m = metrics("sft");
    let (before, after) = (
        m["before/eval/loss"].as_f64().unwrap(),
        m["eval/loss"].as_f64().unwrap(),
    );
    assert!(
        after < before - 0.2,
        "SFT with DoRA: eval loss {before} → {after}"
    );
    // Both DPO stages start at their reference (the policy's DoRA forward
    // is the reference's) and end with a positive held-out margin.
    for stage in ["dpo_continued", "dpo_fresh"] {
        let m = metrics(stage);
        assert!(m["before/eval/rewards/margins"].as_f64().unwrap().abs() < 1e-6);
        assert!(
            m["eval/rewards/margins"].as_f64().unwrap() > 0.0,
            "{stage}: {m}"
        );
    }

    // Scheme one continues the same adapter, magnitudes included.
    let continued = tensors(&ws, "dpo_continued");
    let pairs: Vec<_> = magnitudes(&sft)
        .into_iter()
        .zip(magnitudes(&continued))
        .collect();
    assert_eq!(pairs.len(), 14);
    assert!(pairs.iter().all(|((a, _), (b, _))| a == b));
    assert!(
        pairs
            .iter()
            .any(|((_, a), (_, b))| max_abs_diff(a, b) > 0.0),
        "DPO moves the magnitudes it continues"
    );

    // Scheme two: a fresh DoRA adapter on the merge, on its three targets.
    let fresh = tensors(&ws, "dpo_fresh");
    assert_eq!(magnitudes(&fresh).len(), 6);

    // The merge holds m ∘ (W + sBA)/‖W + sBA‖: its row norms are the magnitudes.
    let show = ws
        .runner(&["show", "recipe.toml", "merged", "--json"])
        .ok()
        .json();
    let merged = std::path::PathBuf::from(show["path"].as_str().unwrap());
    let weights =
        candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, m) in magnitudes(&sft) {
        let module = name
            .trim_start_matches("base_model.model.")
            .trim_end_matches(".lora_magnitude_vector");
        let w = weights[&format!("{module}.weight")]
            .to_dtype(DType::F32)
            .unwrap();
        let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        let rel = max_abs_diff(&norms, m) / max_abs_diff(m, &m.zeros_like().unwrap());
        assert!(rel < 1e-5, "{module}: merged row norms off by {rel}");
    }
}

#[test]
fn dora_resumes_after_sigkill_to_the_same_bytes() {
    let (straight, resumed) = straight_and_resumed_sft(&dora_recipe(30, 5));
    assert!(
        straight == resumed,
        "a resumed DoRA run ends with the same adapter bytes"
    );
}

#[test]
fn dora_enters_the_key_only_when_on_and_llama_cpp_export_is_refused() {
    let ws = Workspace::new();
    let key = |text: &str| {
        ws.write("recipe.toml", text);
        let plan = ws.runner(&["plan", "recipe.toml", "--json"]).ok().json();
        plan_entry(&plan, "sft").2
    };
    let plain = recipe(30, 5, "");
    let off = plain.replace(SFT_LORA, &SFT_LORA.replace(" }", ", dora = false }"));
    assert_eq!(key(&plain), key(&off), "dora = false is the old key");
    assert_ne!(key(&plain), key(&dora_recipe(30, 5)));

    let export = format!(
        "{}\n[stages.gguf]\nkind = \"export\"\nfrom = \"dpo_continued\"\npath = \"out/x\"\ngguf = \"lora\"\n",
        dora_recipe(30, 5)
    );
    ws.write("recipe.toml", &export);
    let run = ws.runner(&["plan", "recipe.toml"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(
        run.stderr.contains("DoRA") && run.stderr.contains("recipe.toml:"),
        "{}",
        run.stderr
    );
}
