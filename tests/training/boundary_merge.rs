//! A prompt ending in a space before a byte-level BPE word: the tokenizer
//! merges the space into the completion's first token (`Ġblue`), so the
//! prompt's tokens are not a prefix of prompt + completion. As TRL 1.16,
//! the model sees exactly the full tokenization and the completion starts
//! at the common token prefix. Expected ids are worked out by hand from the
//! fixture's vocabulary (byte b → 1 + b; `Ġblue` = 260; EOS = 0).

use candle_core::{DType, Device};
use lora_runner::data::{load_dpo, load_sft, DpoExample, ModelTokenizer, SftExample};
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::init::{init_model, RandomModel};
use lora_runner::train::dpo::pair_logprobs;
use lora_runner::train::sft::mean_completion_loss;

use crate::support::fixtures::{
    bytes_ids, settings, write_byte_level_bpe, write_jsonl, ENDOFTEXT, SPACE_BLUE,
};
use crate::support::Workspace;

fn tokenizer(dir: &std::path::Path) -> ModelTokenizer {
    write_byte_level_bpe(dir);
    ModelTokenizer::load(&dir.join("tokenizer.json")).unwrap()
}

fn cat(parts: &[&[u32]]) -> Vec<u32> {
    parts.concat()
}

#[test]
fn fixture_merges_the_space_into_the_completion() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    assert_eq!(tok.encode("Say hi: ", true).unwrap(), bytes_ids("Say hi: "));
    assert_eq!(
        tok.encode("Say hi: blue", true).unwrap(),
        cat(&[&bytes_ids("Say hi:"), &[SPACE_BLUE]])
    );
}

#[test]
fn sft_text_row_trains_on_the_merged_token() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": "Say hi: ", "completion": "blue"}"#,
            r#"{"prompt": "Say hi:", "completion": " blue"}"#,
        ],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    // Both rows are the same text, so the same tokens and the same start;
    // only the first one's prompt tokens are not a prefix.
    let want = SftExample {
        input_ids: cat(&[&bytes_ids("Say hi:"), &[SPACE_BLUE, ENDOFTEXT]]),
        completion_start: 7,
    };
    assert_eq!(data.examples, vec![want.clone(), want]);
    assert_eq!(data.report.prompt_boundary_mismatches, 1);
}

#[test]
fn sft_chat_row_whose_generation_prompt_ends_in_a_space() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = write_jsonl(
        dir.path(),
        "sft.jsonl",
        &[
            r#"{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "blue"}]}"#,
        ],
    );
    let data = load_sft(&path, &tok, &settings(64)).unwrap();
    // "User: hi\nAssistant: " + "blue\n": the generation prompt's space joins "blue".
    let prompt = bytes_ids("User: hi\nAssistant:");
    assert_eq!(
        data.examples,
        vec![SftExample {
            input_ids: cat(&[&prompt, &[SPACE_BLUE], &bytes_ids("\n")]),
            completion_start: prompt.len(),
        }]
    );
    assert_eq!(data.report.prompt_boundary_mismatches, 1);
}

#[test]
fn dpo_pair_shares_the_shorter_common_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = write_jsonl(
        dir.path(),
        "dpo.jsonl",
        &[r#"{"prompt": "Say hi: ", "chosen": "blue", "rejected": "7"}"#],
    );
    let data = load_dpo(&path, &tok, &settings(64)).unwrap();
    // Chosen merges (common prefix 7), rejected does not (8): the shared
    // prompt is 7 tokens, so each row is exactly its full tokenization and
    // the rejected completion keeps the space token.
    assert_eq!(
        data.examples,
        vec![DpoExample {
            prompt_ids: bytes_ids("Say hi:"),
            chosen_ids: vec![SPACE_BLUE, ENDOFTEXT],
            rejected_ids: cat(&[&bytes_ids(" 7"), &[ENDOFTEXT]]),
        }]
    );
    assert_eq!(data.report.prompt_boundary_mismatches, 1);
}

#[test]
fn eval_scores_the_merged_token_too() {
    let ws = Workspace::new();
    let model_dir = ws.path("models/m");
    let mut spec = RandomModel::tiny(21);
    spec.vocab_size = 272;
    init_model(&spec, &model_dir).unwrap();
    write_byte_level_bpe(&model_dir);
    ws.write(
        "data/sft.jsonl",
        "{\"prompt\": \"Say hi: \", \"completion\": \"blue\"}\n",
    );
    ws.write(
        "data/dpo.jsonl",
        "{\"prompt\": \"Say hi: \", \"chosen\": \"blue\", \"rejected\": \"7\"}\n",
    );
    ws.write(
        "recipe.toml",
        r#"
[recipe]
name = "merge"

[stages.base]
kind = "base"
path = "models/m"

[stages.eval]
kind = "eval"
model = "base"
data = { sft = "data/sft.jsonl", dpo = "data/dpo.jsonl" }
"#,
    );
    ws.runner(&["run", "recipe.toml"]).ok();
    let show = ws
        .runner(&["show", "recipe.toml", "eval", "--json"])
        .ok()
        .json();
    let metrics = &show["manifest"]["metrics"];

    let model = Decoder::load(
        &model_dir,
        &LoadOptions {
            dtype: Some(DType::F32),
            device: Device::Cpu,
        },
    )
    .unwrap();
    let row = SftExample {
        input_ids: cat(&[&bytes_ids("Say hi:"), &[SPACE_BLUE, ENDOFTEXT]]),
        completion_start: 7,
    };
    let loss = mean_completion_loss(&model, &[row], ENDOFTEXT, &Device::Cpu).unwrap();
    let got = metrics["sft/loss"].as_f64().unwrap();
    assert!((got - loss).abs() < 1e-6, "eval sft/loss {got} vs {loss}");

    let pair = DpoExample {
        prompt_ids: bytes_ids("Say hi:"),
        chosen_ids: vec![SPACE_BLUE, ENDOFTEXT],
        rejected_ids: cat(&[&bytes_ids(" 7"), &[ENDOFTEXT]]),
    };
    let (sums, _) =
        pair_logprobs(&model, &[&pair], ENDOFTEXT, &Device::Cpu, Mode::Inference).unwrap();
    let sums: Vec<f32> = sums.to_vec1().unwrap();
    let margin = f64::from(sums[0] - sums[1]);
    let got = metrics["preference/logp_margin"].as_f64().unwrap();
    assert!((got - margin).abs() < 1e-5, "eval margin {got} vs {margin}");
    assert_eq!(metrics["data/sft.jsonl"]["prompt_boundary_mismatches"], 1);
    assert_eq!(metrics["data/dpo.jsonl"]["prompt_boundary_mismatches"], 1);
}
