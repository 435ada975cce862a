//! LoRA gradients against central finite differences (model in f64), and no
//! gradient at all for the frozen base weights.

use crate::support::model::*;
use candle_core::{DType, Device, Tensor};
use lora_runner::model::config::Architecture;
use lora_runner::model::decoder::{Decoder, Input, LoadOptions, Mode, Rows};
use lora_runner::model::layers::lora::{LoraConfig, TargetModules};

/// Weighted sum of next-token log-probs over a padded batch.
fn loss(model: &Decoder, ids: &Tensor, mask: &Tensor, targets: &[(usize, usize, u32)]) -> Tensor {
    let hidden = model
        .forward(Input::padded(ids, Some(mask)), Rows::All, Mode::Eval)
        .unwrap();
    let lp = model.token_logprobs(&hidden, targets).unwrap();
    let w: Vec<f64> = (0..targets.len())
        .map(|i| 0.5 + 0.25 * (i % 3) as f64)
        .collect();
    let w = Tensor::from_vec(w, targets.len(), &Device::Cpu).unwrap();
    lp.mul(&w)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

#[test]
fn lora_gradients_match_finite_differences_and_base_gets_none() {
    with_big_stack(|| {
        let dir = init_dir_amplified("lora-fd", &spec(Architecture::Qwen2, false, 21));
        let opts = LoadOptions {
            dtype: Some(DType::F64),
            device: Device::Cpu,
        };
        let mut model = Decoder::load(&dir, &opts).unwrap();
        let lora = LoraConfig::new(2, 4.0, TargetModules::AllLinear);
        model.apply_lora(&lora, 7).unwrap();
        // B starts at zero (so A's gradient would be zero): give it values.
        for (i, (name, var)) in model.lora_parameters().into_iter().enumerate() {
            if name.contains("lora_B") {
                let t = (Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu).unwrap()
                    * (0.3 + 0.01 * i as f64))
                    .unwrap();
                var.set(&t).unwrap();
            }
        }
        let raw = random_ids(2, 7, 128, 3);
        let mut ids = raw.clone();
        ids[1][0] = 0;
        ids[1][1] = 0;
        let mask = ids_tensor(&[vec![1; 7], [vec![0, 0], vec![1; 5]].concat()]);
        let targets: Vec<(usize, usize, u32)> = (0..6)
            .map(|t| (0, t, raw[0][t + 1]))
            .chain((2..6).map(|t| (1, t, raw[1][t + 1])))
            .collect();
        let ids = ids_tensor(&ids);

        let grads = loss(&model, &ids, &mask, &targets).backward().unwrap();
        // Frozen base weights: no gradient anywhere.
        for lin in model.linears() {
            assert!(
                grads.get(lin.weight.as_dense().unwrap()).is_none(),
                "{} got a gradient",
                lin.name
            );
            if let Some(b) = &lin.bias {
                assert!(grads.get(b).is_none(), "{} bias got a gradient", lin.name);
            }
        }
        assert!(grads.get(&model.embed_tokens).is_none());
        assert!(grads.get(&model.norm.weight).is_none());

        let params = model.lora_parameters();
        let checked = [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight",
        ];
        let mut worst = 0f64;
        for name in checked {
            let var = &params
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .1;
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            let g = g
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for idx in [0, base.len() / 3, base.len() - 1] {
                let eps = 1e-4f32;
                let eval = |v: f32| {
                    let mut vals = base.clone();
                    vals[idx] = v;
                    var.set(&Tensor::from_vec(vals, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&model, &ids, &mask, &targets)
                        .to_scalar::<f64>()
                        .unwrap()
                };
                let (hi, lo) = (base[idx] + eps, base[idx] - eps);
                let fd = (eval(hi) - eval(lo)) / (hi as f64 - lo as f64);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let err = (g[idx] - fd).abs() / (1e-3 + fd.abs());
                worst = worst.max(err);
                assert!(
                    err < 1e-4,
                    "{name}[{idx}]: backward {} vs finite difference {fd}",
                    g[idx]
                );
            }
        }
        assert!(worst.is_finite());
    });
}

#[test]
fn sequence_sums_of_next_token_logprobs() {
    use lora_runner::model::decoder::{next_token_targets, sum_by_sequence};
    with_big_stack(|| {
        let dir = init_dir_amplified("seq-sums", &spec(Architecture::Llama, false, 22));
        let mut model = Decoder::load(&dir, &LoadOptions::default()).unwrap();
        model
            .apply_lora(
                &LoraConfig::new(2, 4.0, TargetModules::List(vec!["v_proj".into()])),
                1,
            )
            .unwrap();
        let ids = random_ids(2, 6, 128, 8);
        let loss_mask = vec![
            vec![false, false, true, true, true, false],
            vec![false, true, true, true, true, true],
        ];
        let targets = next_token_targets(&ids, &loss_mask).unwrap();
        assert_eq!(targets.len(), 3 + 5);
        assert_eq!(targets[0], (0, 1, ids[0][2]));
        let hidden = model
            .forward(
                Input::padded(&ids_tensor(&ids), None),
                Rows::All,
                Mode::Eval,
            )
            .unwrap();
        let lp = model.token_logprobs(&hidden, &targets).unwrap();
        let sums = sum_by_sequence(&lp, &targets, 2)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Independently: full logits, log-softmax by hand, summed per row.
        let logits = model.logits(&hidden).unwrap().to_vec3::<f32>().unwrap();
        for b in 0..2 {
            let mut expected = 0f64;
            for t in 0..5 {
                if loss_mask[b][t + 1] {
                    let row = &logits[b][t];
                    let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let lse = max
                        + row
                            .iter()
                            .map(|&x| (x as f64 - max).exp())
                            .sum::<f64>()
                            .ln();
                    expected += row[ids[b][t + 1] as usize] as f64 - lse;
                }
            }
            assert!(
                (sums[b] as f64 - expected).abs() < 1e-4,
                "row {b}: {} vs {expected}",
                sums[b]
            );
        }
        // Differentiable down to the LoRA Vars.
        let grads = sum_by_sequence(&lp, &targets, 2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in model.lora_parameters() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{name} has no gradient"
            );
        }
    });
}

/// End to end: a few AdamW steps over `trainable_vars` lower the SFT loss,
/// and the frozen base weights do not move.
#[test]
fn adamw_steps_on_lora_vars_reduce_the_loss() {
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};
    with_big_stack(|| {
        let dir = init_dir_amplified("train", &spec(Architecture::Qwen2, true, 23));
        let mut model = Decoder::load(&dir, &LoadOptions::default()).unwrap();
        let mut lora = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        lora.dropout = 0.1;
        model.apply_lora(&lora, 2).unwrap();
        let q_before = model.layers[0].linears()[0]
            .weight
            .as_dense()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ids = random_ids(2, 8, 128, 4);
        let targets: Vec<(usize, usize, u32)> = (0..2)
            .flat_map(|b| (0..7).map(move |t| (b, t)))
            .map(|(b, t)| (b, t, ids[b][t + 1]))
            .collect();
        let input = ids_tensor(&ids);
        let loss_at = |mode| {
            let hidden = model
                .forward(Input::padded(&input, None), Rows::All, mode)
                .unwrap();
            model
                .token_logprobs(&hidden, &targets)
                .unwrap()
                .mean_all()
                .unwrap()
                .neg()
                .unwrap()
        };
        let initial = loss_at(Mode::Eval).to_scalar::<f32>().unwrap();
        let params = ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(model.trainable_vars(), params).unwrap();
        for step in 0..30 {
            let loss = loss_at(Mode::Train { dropout_seed: step });
            opt.backward_step(&loss).unwrap();
        }
        let last = loss_at(Mode::Eval).to_scalar::<f32>().unwrap();
        assert!(last < 0.5 * initial, "loss {initial} -> {last}");
        let q_after = model.layers[0].linears()[0]
            .weight
            .as_dense()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(q_before, q_after);
    });
}
