//! AdamW (decoupled weight decay, PyTorch's update rule) over candle Vars,
//! with its state exposed so checkpoints can save and restore it exactly.
//! candle's own AdamW keeps its moments private, which makes resuming impossible.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};

/// Hyper-parameters of AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over named parameters. Moments are f32 like the LoRA master weights.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (bias correction uses step + 1).
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with the given gradients (in `params` order) at learning rate `lr`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * weight_decay))?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments by name (`<param>.exp_avg`, `<param>.exp_avg_sq`), for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.m[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by `state` and the step count.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> anyhow::Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{name}.{suffix}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("checkpoint has no optimizer state `{key}`"))?;
                anyhow::ensure!(
                    t.dims() == p.dims(),
                    "optimizer state `{key}` has shape {:?}, expected {:?}",
                    t.dims(),
                    p.dims()
                );
                *slot = t.to_device(p.device())?.to_dtype(DType::F32)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of gradients, and the factor that clips it to `max_norm`
/// (PyTorch's clip_grad_norm_: max_norm / (norm + 1e-6), at most 1; no clipping when max_norm is 0).
pub fn clip_factor(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sum = 0.0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = sum.sqrt();
    let factor = if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    Ok((norm, factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// An independent scalar AdamW in f64, written from the PyTorch docs.
    fn reference(p0: &[f64], grads: &[Vec<f64>], lr: f64, c: AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] -= lr * c.weight_decay * p[i];
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
                v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
                let mh = m[i] / (1.0 - c.beta1.powi(t));
                let vh = v[i] / (1.0 - c.beta2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + c.eps);
            }
        }
        p
    }

    #[test]
    fn updates_match_an_independent_scalar_adamw() {
        let c = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let p0 = [0.5, -1.0, 2.0];
        let grads = vec![
            vec![0.1, -0.2, 0.3],
            vec![-0.4, 0.5, 0.05],
            vec![0.2, 0.2, -0.7],
        ];
        let var = Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], c).unwrap();
        for g in &grads {
            let g: Vec<f32> = g.iter().map(|x| *x as f32).collect();
            opt.apply(&[Tensor::new(g.as_slice(), &Device::Cpu).unwrap()], 0.01)
                .unwrap();
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        let want = reference(&p0, &grads, 0.01, c);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn restoring_state_continues_exactly() {
        let c = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let g = |x: f32| Tensor::new(&[x, -x], &Device::Cpu).unwrap();
        let a = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let mut straight = AdamW::new(vec![("w".into(), a.clone())], c).unwrap();
        for x in [0.3, 0.1, -0.2] {
            straight.apply(&[g(x)], 0.1).unwrap();
        }
        let b = Var::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let mut first = AdamW::new(vec![("w".into(), b.clone())], c).unwrap();
        first.apply(&[g(0.3)], 0.1).unwrap();
        let (state, step) = (first.state(), first.step);
        let c2 = Var::from_tensor(b.as_tensor()).unwrap();
        let mut resumed = AdamW::new(vec![("w".into(), c2.clone())], c).unwrap();
        resumed.load_state(&state, step).unwrap();
        for x in [0.1, -0.2] {
            resumed.apply(&[g(x)], 0.1).unwrap();
        }
        let want: Vec<f32> = a.as_tensor().to_vec1().unwrap();
        let got: Vec<f32> = c2.as_tensor().to_vec1().unwrap();
        assert_eq!(got, want, "bit-identical after restore");
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = [
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
            Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
        ];
        let (norm, factor) = clip_factor(&g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((factor - 1.0 / (5.0 + 1e-6)).abs() < 1e-9);
        assert_eq!(clip_factor(&g, 10.0).unwrap().1, 1.0);
        assert_eq!(clip_factor(&g, 0.0).unwrap().1, 1.0);
    }
}
