//! Hostile and mistaken model inputs, seeded and bounded: mutated
//! config.json values, safetensors headers and tokenizer files of a model
//! folder, and `init` shapes, each run through `runner run` (a base, an
//! evaluation, one SFT step) under a 4 GB address-space limit. Every case
//! ends with exit 0, 1, 2 or 3, never a panic or an abort, and a failure
//! names the file or the stage.

use crate::support::Workspace;
use std::path::Path;

/// xorshift64*: the same cases on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

const VALUES: [&str; 12] = [
    "0",
    "-1",
    "1",
    "3",
    "2147483648",
    "1099511627776",
    "1e30",
    "\"text\"",
    "null",
    "3.5",
    "true",
    "[]",
];
const CONFIG_KEYS: [&str; 10] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
];
const DIMS: [&str; 8] = [
    "0",
    "1",
    "3",
    "64",
    "1000000",
    "1000000000",
    "1099511627776",
    "-4",
];

fn model(dir: &Path) {
    let mut spec = lora_runner::model::init::RandomModel::tiny(1);
    spec.architecture = lora_runner::model::config::Architecture::Llama;
    spec.vocab_size = 100;
    lora_runner::model::init::init_model(&spec, dir).unwrap();
}

/// One mutation of the folder at `dir`, described.
fn mutate(rng: &mut Rng, dir: &Path) -> String {
    match rng.next() % 3 {
        0 => {
            let path = dir.join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let (key, value) = (*rng.pick(&CONFIG_KEYS), *rng.pick(&VALUES));
            config[key] = serde_json::from_str(value).unwrap();
            std::fs::write(&path, config.to_string()).unwrap();
            format!("config.json {key} = {value}")
        }
        1 => {
            let path = dir.join("model.safetensors");
            let bytes = std::fs::read(&path).unwrap();
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
            let names: Vec<String> = header
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let name = rng.pick(&names).clone();
            let what = match rng.next() % 5 {
                0 => {
                    header[&name]["shape"][0] =
                        serde_json::json!(rng.pick(&[0u64, 1, 1 << 20, 1 << 40]));
                    "shape"
                }
                1 => {
                    header[&name]["dtype"] =
                        serde_json::json!(rng.pick(&["F64", "I8", "BOOL", "XX"]));
                    "dtype"
                }
                2 => {
                    header[&name]["data_offsets"] =
                        serde_json::json!([1u64 << 40, (1u64 << 40) + 16]);
                    "offsets past the end"
                }
                3 => {
                    let keep = (rng.next() as usize) % bytes.len();
                    std::fs::write(&path, &bytes[..keep]).unwrap();
                    return format!("model.safetensors cut to {keep} bytes");
                }
                _ => {
                    header.as_object_mut().unwrap().remove(&name);
                    "missing"
                }
            };
            let text = header.to_string();
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text.as_bytes());
            out.extend(&bytes[8 + n..]);
            std::fs::write(&path, out).unwrap();
            format!("model.safetensors {name}: {what}")
        }
        _ => {
            let path = dir.join("tokenizer.json");
            let bytes = std::fs::read(&path).unwrap();
            match rng.next() % 3 {
                0 => {
                    let keep = (rng.next() as usize) % bytes.len();
                    std::fs::write(&path, &bytes[..keep]).unwrap();
                    format!("tokenizer.json cut to {keep} bytes")
                }
                1 => {
                    let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                    json["model"]["type"] = serde_json::json!("Mystery");
                    std::fs::write(&path, json.to_string()).unwrap();
                    "tokenizer.json model type".into()
                }
                _ => {
                    std::fs::write(dir.join("tokenizer_config.json"), "{\"chat_template\": 42")
                        .unwrap();
                    "tokenizer_config.json garbled".into()
                }
            }
        }
    }
}

#[test]
fn hostile_model_inputs_end_with_an_exit_code_and_a_named_file_or_stage() {
    let ws = Workspace::new();
    let data = crate::support::recipe_data("sft_eval.jsonl");
    let mut rng = Rng(0x5eed_2026_1206);
    let mut seen = std::collections::BTreeMap::new();
    for case in 0..36 {
        let folder = ws.path(&format!("m{case}"));
        let (base, what) = if case % 4 == 3 {
            let dims: Vec<&str> = (0..6).map(|_| *rng.pick(&DIMS)).collect();
            let init = format!(
                "init = {{ arch = \"llama\", hidden = {}, layers = {}, heads = {}, kv_heads = {}, ffn = {}, vocab = {} }}",
                dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
            );
            (init.clone(), init)
        } else {
            model(&folder);
            let what = mutate(&mut rng, &folder);
            (format!("path = \"m{case}\""), what)
        };
        ws.write(
            "recipe.toml",
            &format!(
                "[recipe]\nname = \"fuzz\"\n\n[stages.base]\nkind = \"base\"\n{base}\n\n\
                 [stages.ev]\nkind = \"eval\"\nmodel = \"base\"\ndata = {{ sft = \"{d}\" }}\nseq_len = 32\nmax_new_tokens = 2\n\n\
                 [stages.sft]\nkind = \"sft\"\nmodel = \"base\"\ndata = {{ train = \"{d}\" }}\n\
                 train = {{ steps = 1, batch = 2, seq_len = 32 }}\n",
                d = data.display()
            ),
        );
        let run = ws.runner_limited("ulimit -v 4000000", &["run", "recipe.toml"], &[]);
        let (stderr, code) = (&run.stderr, Some(run.code));
        assert!(
            matches!(code, Some(0..=3)),
            "case {case} ({what}): {code:?}\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "case {case} ({what}): {stderr}"
        );
        if code != Some(0) {
            let named = [
                "recipe.toml",
                "config.json",
                "model.safetensors",
                "tokenizer",
                "`base`",
                "`ev`",
                "`sft`",
                "base:",
                "ev:",
                "sft:",
            ]
            .iter()
            .any(|n| stderr.contains(n));
            assert!(
                named,
                "case {case} ({what}): names no file or stage\n{stderr}"
            );
        }
        *seen.entry(code).or_insert(0) += 1;
    }
    eprintln!("exit codes: {seen:?}");
    // The cases reach both ends: some run, some are refused.
    assert!(seen.len() >= 2, "{seen:?}");
}
