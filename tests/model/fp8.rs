//! FP8 checkpoints in transformers' fine-grained layout
//! (scripts/fp8_reference.py → tests/fixtures/fp8/): torch's own
//! float8_e4m3fn codes of edge values (zeros, every subnormal, ties, ±448
//! and beyond, NaN), transformers' quantizer reproduced bit for bit, the
//! checkpoint's logits against a model of its dequantised weights, LoRA
//! gradients on FP8 codes against the same weights held dense, partial
//! blocks, and every unsupported `quantization_config` refused by name.
//! The same for float8_e5m2 codes (fixtures/fp8/llama3-e5m2): torch's value
//! of each of the 256 bytes, logits, and gradients.

use crate::support::model::{
    max_abs_diff_f64 as max_abs_diff, passes_on_the_generic_path, row_logits, row_logprob_sum,
    with_big_stack,
};
use candle_core::{DType, Device, Tensor};
use lora_runner::model::decoder::{Decoder, LoadOptions, Mode};
use lora_runner::model::formats::peft::load_adapter;
use lora_runner::model::kernels::fp8::{self, Fp8Weight};
use lora_runner::model::kernels::quantized::FrozenWeight;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn load(dir: &std::path::Path, dtype: DType) -> Decoder {
    let opts = LoadOptions {
        dtype: Some(dtype),
        device: Device::Cpu,
    };
    Decoder::load(dir, &opts).unwrap()
}

#[test]
fn fp8_codes_are_torchs_bit_for_bit() {
    let fixture = json(fixtures().join("fp8/codes.json"));
    let values = fixture["values"].as_array().unwrap();
    let expected = fixture["clamped_codes"].as_array().unwrap();
    assert!(values.len() > 600);
    for (v, want) in values.iter().zip(expected) {
        let x = match v {
            serde_json::Value::String(s) => s.parse::<f32>().unwrap(),
            n => n.as_f64().unwrap() as f32,
        };
        assert_eq!(
            fp8::code(x) as u64,
            want.as_u64().unwrap(),
            "{x:e} ({:#010x})",
            x.to_bits()
        );
    }
    // Every finite code decodes to a value that encodes back to it; the two
    // NaN codes decode to NaN.
    for b in 0..=255u8 {
        let v = float8::F8E4M3::from_bits(b).to_f32();
        match b & 0x7f {
            0x7f => assert!(v.is_nan()),
            _ if b == 0x80 => assert_eq!(fp8::code(v), 0x80, "-0"),
            _ => assert_eq!(fp8::code(v), b, "{b:#x} = {v}"),
        }
    }
}

/// transformers' quantizer on the dense checkpoint gives the stored codes
/// and scales exactly; dequantising gives torch's values.
#[test]
fn fp8_quantize_matches_transformers_and_the_checkpoint_reads_as_stored() {
    let reference = json(fixtures().join("fp8/reference.json"));
    let block: Vec<usize> = serde_json::from_value(reference["block"].clone()).unwrap();
    let block = [block[0], block[1]];
    let dense = candle_core::safetensors::load(
        fixtures().join("families/llama3/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let stored = candle_core::safetensors::load(
        fixtures().join("fp8/llama3/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for (name, w) in &dense {
        let Some(codes) = stored.get(name).filter(|t| t.dtype() == DType::F8E4M3) else {
            continue;
        };
        let ours = Fp8Weight::quantize(w, block, &Device::Cpu).unwrap();
        let bytes = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<float8::F8E4M3>()
                .unwrap()
                .iter()
                .map(|c| c.to_bits())
                .collect::<Vec<u8>>()
        };
        assert_eq!(bytes(&ours.codes), bytes(codes), "{name}: codes");
        let scales = &stored[&format!("{name}_scale_inv")];
        assert_eq!(max_abs_diff(&ours.scale_inv, scales), 0.0, "{name}: scales");
        checked += 1;
    }
    assert_eq!(checked, 14, "seven projections in each of two layers");

    let model = load(&fixtures().join("fp8/llama3"), DType::F32);
    let name = "model.layers.1.mlp.down_proj";
    let linear = model.linear(name).unwrap();
    let FrozenWeight::Fp8(w) = &linear.weight else {
        panic!("{name} is not held as FP8 codes")
    };
    let (out, inp) = w.dims();
    assert_eq!(w.bytes(), out * inp + 4 * (out / 16) * (inp / 16));
    let want =
        candle_core::safetensors::load(fixtures().join("fp8/reference.safetensors"), &Device::Cpu)
            .unwrap()
            .remove(&format!("dequantised.{name}.weight"))
            .unwrap();
    let got = linear.weight.to_dense(DType::F32).unwrap();
    let spread = max_abs_diff(&want, &want.zeros_like().unwrap());
    // codes · scale in f32 against torch's f64 product: one f32 rounding.
    assert!(max_abs_diff(&got, &want) <= spread * 2f64.powi(-23));
    // Embeddings, norms and the head stay as stored.
    assert!(model
        .linears()
        .all(|l| matches!(l.weight, FrozenWeight::Fp8(_))));
}

#[test]
fn fp8_checkpoint_gives_the_logits_of_its_dequantised_weights() {
    with_big_stack(|| {
        let reference = json(fixtures().join("fp8/reference.json"));
        let rows: Vec<Vec<u32>> = serde_json::from_value(reference["rows"].clone()).unwrap();
        let tensors = candle_core::safetensors::load(
            fixtures().join("fp8/reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let model = load(&fixtures().join("fp8/llama3"), DType::F64);
        assert_reference_logits(&model, &rows, &tensors);
    });
}

/// `model`'s logits of `rows` are `tensors`' `logits.{i}` to 1e-5 of their
/// spread.
fn assert_reference_logits(
    model: &Decoder,
    rows: &[Vec<u32>],
    tensors: &std::collections::HashMap<String, Tensor>,
) {
    for (i, row) in rows.iter().enumerate() {
        let want = &tensors[&format!("logits.{i}")];
        let spread = max_abs_diff(want, &want.zeros_like().unwrap());
        let diff = max_abs_diff(&row_logits(model, row), want);
        assert!(diff < 1e-5 * spread, "row {i}: {diff} of {spread}");
    }
}

/// A PEFT adapter trained on an FP8 base: its loss and gradients equal
/// those on the same weights held dense (the FP8 model's own dequantised
/// projections written as a plain checkpoint).
#[test]
fn lora_on_fp8_codes_gives_the_gradients_of_the_dense_weights() {
    lora_on_codes_matches_dense("fp8/llama3");
}

#[test]
fn lora_on_e5m2_codes_gives_the_gradients_of_the_dense_weights() {
    lora_on_codes_matches_dense("fp8/llama3-e5m2");
}

fn lora_on_codes_matches_dense(folder: &'static str) {
    with_big_stack(move || {
        let fp8_model = load(&fixtures().join(folder), DType::F64);
        assert!(fp8_model
            .linears()
            .all(|l| matches!(l.weight, FrozenWeight::Fp8(_))));
        let dense_dir = tempfile::tempdir().unwrap();
        lora_runner::model::merge::save_model_folder(
            &fp8_model,
            dense_dir.path(),
            Some(&fixtures().join(folder)),
            u64::MAX,
        )
        .unwrap();
        let config = json(dense_dir.path().join("config.json"));
        assert!(config.get("quantization_config").is_none(), "{config}");
        let rows: Vec<Vec<u32>> =
            serde_json::from_value(json(fixtures().join("fp8/reference.json"))["rows"].clone())
                .unwrap();
        let adapter = fixtures().join("families/llama3");
        let run = |mut model: Decoder| {
            load_adapter(&mut model, &adapter).unwrap();
            let loss = row_logprob_sum(&model, &rows[0], Mode::Eval).neg().unwrap();
            let grads = model.backward(&loss).unwrap();
            let g: Vec<Tensor> = model
                .lora_parameters()
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (loss.to_scalar::<f64>().unwrap(), g)
        };
        let (loss_fp8, grads_fp8) = run(fp8_model);
        let dense = load(dense_dir.path(), DType::F64);
        assert!(dense.linears().all(|l| l.weight.as_dense().is_some()));
        let (loss_dense, grads_dense) = run(dense);
        assert!((loss_fp8 - loss_dense).abs() < 1e-9 * loss_dense.abs());
        assert_eq!(grads_fp8.len(), 28);
        for (a, b) in grads_fp8.iter().zip(&grads_dense) {
            let spread = max_abs_diff(b, &b.zeros_like().unwrap());
            assert!(max_abs_diff(a, b) < 1e-9 * spread);
        }
    });
}

/// The same on the compositions a GPU runs (the FP8 product dequantises
/// into candle's matmul there).
#[test]
fn lora_on_fp8_codes_on_the_gpu_code_path() {
    passes_on_the_generic_path("fp8::lora_on_fp8_codes_gives_the_gradients_of_the_dense_weights");
}

#[test]
fn lora_on_e5m2_codes_on_the_gpu_code_path() {
    passes_on_the_generic_path("fp8::lora_on_e5m2_codes_gives_the_gradients_of_the_dense_weights");
}

/// Each float8_e5m2 byte has torch's value, bit for bit: zeros, the three
/// subnormal steps of 2^-16, normals up to ±57344, ±inf and the NaNs.
#[test]
fn e5m2_bytes_have_torchs_values() {
    let fixture = json(fixtures().join("fp8/e5m2.json"));
    let decoded = fixture["decoded"].as_array().unwrap();
    assert_eq!(decoded.len(), 256);
    let (mut nans, mut infinities) = (0, 0);
    for (b, want) in decoded.iter().enumerate() {
        let got = fp8::e5m2_value(b as u8);
        match want.as_str() {
            Some("nan") => {
                nans += 1;
                assert!(got.is_nan(), "{b:#x}: {got}")
            }
            Some("inf") | Some("-inf") => {
                infinities += 1;
                assert_eq!(got.to_string(), want.as_str().unwrap(), "{b:#x}")
            }
            _ => {
                let want = want.as_f64().unwrap() as f32;
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{b:#x}: {got} against {want}"
                );
            }
        }
    }
    assert_eq!((nans, infinities), (6, 2));
    assert_eq!(fp8::e5m2_value(0x7b), 57344.0);
    assert_eq!(fp8::e5m2_value(0x01), 2f32.powi(-16));
}

/// An e5m2 checkpoint (24 × 16 blocks, partial along the rows): held as
/// its bytes, one dequantised projection as torch's, and its logits those
/// of its dequantised weights.
#[test]
fn e5m2_checkpoint_gives_the_logits_of_its_dequantised_weights() {
    with_big_stack(|| {
        let reference = json(fixtures().join("fp8/reference.json"));
        let rows: Vec<Vec<u32>> = serde_json::from_value(reference["rows"].clone()).unwrap();
        let tensors =
            candle_core::safetensors::load(fixtures().join("fp8/e5m2.safetensors"), &Device::Cpu)
                .unwrap();
        let model = load(&fixtures().join("fp8/llama3-e5m2"), DType::F64);
        let name = "model.layers.0.mlp.gate_proj";
        let FrozenWeight::Fp8(w) = &model.linear(name).unwrap().weight else {
            panic!("{name} is not held as FP8 codes")
        };
        assert_eq!(w.format, fp8::Fp8Format::E5M2);
        assert_eq!((w.codes.dtype(), w.block), (DType::U8, [24, 16]));
        let (out, inp) = w.dims();
        assert_eq!(
            w.bytes(),
            out * inp + 4 * out.div_ceil(24) * inp.div_ceil(16)
        );
        let want = &tensors[&format!("dequantised.{name}.weight")];
        let spread = max_abs_diff(want, &want.zeros_like().unwrap());
        let got = w.dequantize(DType::F64).unwrap();
        assert!(max_abs_diff(&got, want) <= spread * 2f64.powi(-23));
        assert_reference_logits(&model, &rows, &tensors);
    });
}

/// A checkpoint whose `fmt` and tensors disagree is refused, naming the
/// tensor, not read as the other format; FP8 codes are never read as a
/// dense weight.
#[test]
fn e5m2_codes_under_an_e4m3_config_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("fp8/llama3-e5m2");
    std::fs::copy(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config = json(source.join("config.json"));
    config["quantization_config"]["fmt"] = serde_json::json!("e4m3");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        device: Device::Cpu,
    };
    let err = Decoder::load(dir.path(), &opts).unwrap_err().to_string();
    assert!(
        err.contains("F8_E5M2") && err.contains("fmt \"e4m3\"") && err.contains("proj.weight"),
        "{err}"
    );
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = Decoder::load(dir.path(), &opts).unwrap_err().to_string();
    assert!(err.contains("FP8 codes (F8_E5M2)"), "{err}");
}

/// Blocks that do not divide the weight: the last row and column of blocks
/// are partial, each scaled by its own largest entry (which maps to ±448
/// exactly), and every value within FP8's rounding of the original.
#[test]
fn fp8_partial_blocks_scale_by_their_own_maximum() {
    let w = Tensor::randn(0f32, 1.0, (40, 24), &Device::Cpu).unwrap();
    let q = Fp8Weight::quantize(&w, [16, 16], &Device::Cpu).unwrap();
    assert_eq!(q.scale_inv.dims(), [3, 2]);
    let values = w.to_vec2::<f32>().unwrap();
    let codes = q.codes.to_vec2::<float8::F8E4M3>().unwrap();
    let scales = q.scale_inv.to_vec2::<f32>().unwrap();
    let back = q.dequantize(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    for (br, scale_row) in scales.iter().enumerate() {
        for (bc, &inv) in scale_row.iter().enumerate() {
            let cells: Vec<(usize, usize)> = (br * 16..(br * 16 + 16).min(40))
                .flat_map(|r| (bc * 16..(bc * 16 + 16).min(24)).map(move |c| (r, c)))
                .collect();
            let max = cells
                .iter()
                .map(|&(r, c)| values[r][c].abs())
                .fold(0f32, f32::max);
            // torch's `448 / max` is reciprocal(max) · 448.
            assert_eq!(inv, 1.0 / ((1.0 / max) * 448.0), "block ({br}, {bc})");
            let (r, c) = cells
                .iter()
                .copied()
                .find(|&(r, c)| values[r][c].abs() == max)
                .unwrap();
            assert_eq!(codes[r][c].to_f32().abs(), 448.0);
            for (r, c) in cells {
                // 3 mantissa bits: within 2^-4 relative for normal codes,
                // within half the smallest subnormal step (2^-10) otherwise.
                let x = values[r][c] as f64;
                let tol = (x.abs() * 2f64.powi(-4)).max(2f64.powi(-10) * inv as f64);
                assert!(
                    (back[r][c] - x).abs() <= tol,
                    "({r}, {c}): {x} -> {}",
                    back[r][c]
                );
            }
        }
    }
}

#[test]
fn unsupported_fp8_settings_are_refused_by_name() {
    let base = json(fixtures().join("fp8/llama3/config.json"));
    for (key, value, needle) in [
        (
            "quant_method",
            serde_json::json!("awq"),
            "quant_method \"awq\"",
        ),
        ("fmt", serde_json::json!("e3m4"), "fmt \"e3m4\""),
        (
            "activation_scheme",
            serde_json::json!("static"),
            "activation_scheme \"static\"",
        ),
        (
            "scale_fmt",
            serde_json::json!("ue8m0"),
            "scale_fmt \"ue8m0\"",
        ),
        (
            "weight_block_size",
            serde_json::json!(null),
            "weight_block_size",
        ),
        (
            "kv_cache_scheme",
            serde_json::json!("fp8"),
            "kv_cache_scheme",
        ),
    ] {
        let mut config = base.clone();
        config["quantization_config"][key] = value;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let err = lora_runner::model::config::ModelConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{key}: {err}"
        );
    }
    // What transformers itself writes for f32 scales, and a config without
    // `fmt` (e4m3, as transformers assumes), are read.
    for (key, value) in [
        ("scale_fmt", serde_json::json!("float")),
        ("scale_fmt", serde_json::json!("float32")),
        ("fmt", serde_json::json!(null)),
    ] {
        let mut config = base.clone();
        match value.is_null() {
            true => config["quantization_config"]
                .as_object_mut()
                .unwrap()
                .remove(key),
            false => config["quantization_config"]
                .as_object_mut()
                .unwrap()
                .insert(key.into(), value.clone()),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let read = lora_runner::model::config::ModelConfig::from_file(&path)
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        let scheme = read.fp8.unwrap();
        assert_eq!(
            (scheme.format, scheme.block),
            (fp8::Fp8Format::E4M3, [16, 16])
        );
    }
}

/// An FP8 checkpoint this program wrote (a merge with `quantize = "fp8"`,
/// fixtures/fp8/written) loads in transformers (which dequantises FP8 on a
/// CPU) with the logits this program computes from it; writing a model
/// again gives the same layout (tensor names, dtypes, shapes, config).
#[test]
fn fp8_checkpoints_written_here_load_in_transformers() {
    with_big_stack(|| {
        let dir = fixtures().join("fp8/written");
        let expected = json(fixtures().join("fp8/written.json"));
        let rows: Vec<Vec<u32>> =
            serde_json::from_value(json(fixtures().join("fp8/reference.json"))["rows"].clone())
                .unwrap();
        let model = load(&dir, DType::F32);
        assert!(model
            .linears()
            .all(|l| matches!(l.weight, FrozenWeight::Fp8(_))));
        for (i, row) in rows.iter().enumerate() {
            let want: Vec<Vec<f64>> =
                serde_json::from_value(expected["written_logits"][i].clone()).unwrap();
            let want = Tensor::new(want, &Device::Cpu).unwrap();
            let spread = max_abs_diff(&want, &want.zeros_like().unwrap());
            let diff = max_abs_diff(&row_logits(&model, row), &want);
            assert!(diff < 1e-5 * spread, "row {i}: {diff} of {spread}");
        }
        let again = tempfile::tempdir().unwrap();
        lora_runner::model::merge::save_fp8_model_folder(
            &model,
            again.path(),
            Some(&dir),
            u64::MAX,
            fp8::DEFAULT_BLOCK,
        )
        .unwrap();
        let layout = |dir: &std::path::Path| {
            let mut t: Vec<(String, DType, Vec<usize>)> =
                candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(n, t)| (n, t.dtype(), t.dims().to_vec()))
                    .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            (
                t,
                json(dir.join("config.json"))["quantization_config"].clone(),
            )
        };
        assert_eq!(layout(again.path()), layout(&dir));
    });
}

/// Scheme one's adapter, trained here on FP8 codes (fixtures/fp8/trained),
/// gives PEFT on transformers' load of the FP8 checkpoint, and on its dense
/// original, the loss this program computes on each.
#[test]
fn an_adapter_trained_on_fp8_codes_gives_peft_the_same_loss() {
    with_big_stack(|| {
        let expected = json(fixtures().join("fp8/written.json"));
        let rows: Vec<Vec<u32>> =
            serde_json::from_value(json(fixtures().join("fp8/reference.json"))["rows"].clone())
                .unwrap();
        let mean = |dir: PathBuf| {
            let mut model = load(&dir, DType::F64);
            load_adapter(&mut model, &fixtures().join("fp8/trained")).unwrap();
            let count: usize = rows.iter().map(|r| r.len() - 1).sum();
            let total: f64 = rows
                .iter()
                .map(|r| crate::support::model::mean_nll(&model, r) * (r.len() - 1) as f64)
                .sum();
            total / count as f64
        };
        for (base, key) in [
            (fixtures().join("fp8/llama3"), "trained_loss_on_fp8"),
            (
                crate::support::model::fixture_family("llama3"),
                "trained_loss_on_original",
            ),
        ] {
            // The families folder holds a plain adapter too; only its base is read.
            let ours = mean(base);
            let peft = expected[key].as_f64().unwrap();
            assert!(
                (ours - peft).abs() < 1e-5 * peft,
                "{key}: ours {ours}, PEFT {peft}"
            );
        }
    });
}
