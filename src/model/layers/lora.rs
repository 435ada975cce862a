//! LoRA configuration, target resolution (PEFT's rules) and the adapter
//! weights attached to one linear layer.

use crate::model::config::{linear_module_names, ModelConfig};
use crate::model::error::{ModelError, Result};
use crate::model::kernels::rng::SplitMix64;
use candle_core::{DType, Device, Tensor, Var};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `target_modules` as PEFT accepts it.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Each entry matches a module whose full name equals it or ends in `.entry`.
    List(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// Every linear layer of the decoder except the LM head.
    AllLinear,
}

impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            TargetModules::List(v) => v.serialize(s),
            TargetModules::Regex(r) => r.serialize(s),
            TargetModules::AllLinear => "all-linear".serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(s) if s == "all-linear" => TargetModules::AllLinear,
            Raw::One(s) => TargetModules::Regex(s),
            Raw::Many(v) => TargetModules::List(v),
        })
    }
}

/// An ordered `{pattern: value}` map. PEFT takes the first pattern (in file
/// order) that matches, so order matters and a sorted map would be wrong.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatternMap<V>(pub Vec<(String, V)>);

impl<V: Serialize> Serialize for PatternMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for PatternMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct OrderedVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = PatternMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from module-name pattern to value")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(PatternMap(out))
            }
            fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap(Vec::new()))
            }
        }
        d.deserialize_any(OrderedVisitor(std::marker::PhantomData))
    }
}

impl<V> PatternMap<V> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The LoRA hyper-parameters, with PEFT's meaning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    #[serde(alias = "lora_alpha")]
    pub alpha: f64,
    #[serde(default, alias = "lora_dropout")]
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row over the normalised W + s·B·A.
    #[serde(default)]
    pub use_dora: bool,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub rank_pattern: PatternMap<usize>,
    #[serde(default)]
    pub alpha_pattern: PatternMap<f64>,
}

/// Where LoRA goes and with which rank and scale, for one module.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedTarget {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub r: usize,
    pub alpha: f64,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scale: f64,
    /// A DoRA adapter (a magnitude vector too).
    pub dora: bool,
}

fn full_match(pattern: &str, text: &str) -> Result<bool> {
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        ModelError::LoraConfig(format!("invalid regular expression {pattern:?}: {e}"))
    })?;
    Ok(re.is_match(text))
}

/// PEFT's `get_pattern_key` (peft/utils/other.py): the first key `k`, in
/// file order, for which `(.*\.)?(k)$` matches the module name from its
/// start (Python `re.match`). An exact name is a special case of that.
pub fn pattern_key_for<'a, V>(patterns: &'a PatternMap<V>, module: &str) -> Result<Option<&'a V>> {
    for (k, v) in &patterns.0 {
        if full_match(&format!("(?:.*\\.)?(?:{k})"), module)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f64, target_modules: TargetModules) -> Self {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            use_dora: false,
            target_modules,
            rank_pattern: PatternMap::default(),
            alpha_pattern: PatternMap::default(),
        }
    }

    /// Whether a module (full name) is a LoRA target, with PEFT's rule.
    pub fn targets(&self, module: &str) -> Result<bool> {
        Ok(match &self.target_modules {
            TargetModules::AllLinear => true,
            TargetModules::Regex(r) => full_match(r, module)?,
            TargetModules::List(list) => list
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        })
    }

    /// Scale for a given rank and alpha.
    pub fn scale_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Every targeted module of a model with this config, in layer order,
    /// with its rank and scale. Errors if nothing matches or a setting is invalid.
    pub fn resolve(&self, model: &ModelConfig) -> Result<Vec<ResolvedTarget>> {
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::LoraConfig(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        let mut out = Vec::new();
        for module in linear_module_names(model) {
            if !self.targets(&module)? {
                continue;
            }
            let r = pattern_key_for(&self.rank_pattern, &module)?
                .copied()
                .unwrap_or(self.r);
            let alpha = pattern_key_for(&self.alpha_pattern, &module)?
                .copied()
                .unwrap_or(self.alpha);
            if r == 0 {
                return Err(ModelError::LoraConfig(format!(
                    "rank for {module} must be positive"
                )));
            }
            out.push(ResolvedTarget {
                scale: self.scale_for(r, alpha),
                dora: self.use_dora,
                module,
                r,
                alpha,
            });
        }
        if out.is_empty() {
            return Err(ModelError::LoraConfig(format!(
                "target_modules {:?} matches no linear module of this {} model (its projections: {})",
                self.target_modules,
                model.model_type,
                model.projections().iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(out)
    }
}

/// PEFT's tensor name for a module's LoRA matrix ("A" or "B").
pub use crate::model::formats::names::peft_tensor as peft_tensor_name;

/// The trainable part of one LoRA linear layer. A is [r, in], B is [out, r],
/// both f32 Vars; they are cast to the compute dtype in the forward pass.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub r: usize,
    pub alpha: f64,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA's part, when the adapter is one.
    pub dora: Option<Dora>,
}

/// DoRA (Liu et al. 2024, as PEFT 0.21 computes it): the layer's weight is
/// m ∘ (W + s·B·A) / ‖W + s·B·A‖, row by row, with the norm treated as a
/// constant in backward (the paper's §4.3, PEFT's `weight_norm.detach()`).
#[derive(Clone, Debug)]
pub struct Dora {
    /// m [out], f32, trainable (PEFT's `lora_magnitude_vector`).
    pub magnitude: Var,
    /// ‖W_i‖² [out] (f64 for an f64 W, else f32), for the frozen W this adapter sits on: the norm
    /// of W + s·B·A is expanded around it so that no dense [out, in] copy
    /// is made per step (see `Linear::dora_norm`).
    pub base_norm_sq: Tensor,
}

impl Dora {
    /// Row norms ‖W_i‖² of a dense weight [out, in]: f64 for an f64 weight
    /// (the reference tests), else f32.
    pub fn base_norm_sq(weight: &Tensor) -> Result<Tensor> {
        let acc = if weight.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        Ok(weight.to_dtype(acc)?.sqr()?.sum(1)?)
    }

    /// DoRA's part for an adapter on `weight` [out, in], with PEFT's initial
    /// magnitude ‖W + s·B·A‖ per row when none is given.
    pub fn attach(
        weight: &Tensor,
        adapter: &LoraAdapter,
        magnitude: Option<Tensor>,
    ) -> Result<Dora> {
        let base_norm_sq = Dora::base_norm_sq(weight)?;
        let magnitude = match magnitude {
            Some(m) => m.to_dtype(DType::F32)?,
            None => {
                let w = (weight.to_dtype(DType::F32)? + adapter.delta_weight()?)?;
                w.sqr()?.sum(1)?.sqrt()?
            }
        };
        Ok(Dora {
            magnitude: Var::from_tensor(&magnitude)?,
            base_norm_sq,
        })
    }
}

impl LoraAdapter {
    /// PEFT's default init: A ~ kaiming_uniform(a = sqrt(5)), which for a
    /// [r, in] matrix is U(-1/sqrt(in), 1/sqrt(in)); B = 0. Seeded per module
    /// name so the bytes do not depend on creation order.
    pub fn init(
        target: &ResolvedTarget,
        in_features: usize,
        out_features: usize,
        dropout: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        // torch: gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
        let bound = 1.0 / (in_features as f64).sqrt();
        let mut rng = SplitMix64::for_stream(seed, &peft_tensor_name(&target.module, 'A'));
        let a: Vec<f32> = (0..target.r * in_features)
            .map(|_| rng.uniform(-bound, bound) as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (target.r, in_features), device)?)?;
        let b = Var::zeros((out_features, target.r), DType::F32, device)?;
        Ok(LoraAdapter {
            a,
            b,
            r: target.r,
            alpha: target.alpha,
            scale: target.scale,
            dropout,
            dora: None,
        })
    }

    /// The trainable Vars with their PEFT names: A, B, then DoRA's magnitude.
    pub fn named_vars(&self, module: &str) -> Vec<(String, Var)> {
        let mut out = vec![
            (peft_tensor_name(module, 'A'), self.a.clone()),
            (peft_tensor_name(module, 'B'), self.b.clone()),
        ];
        if let Some(d) = &self.dora {
            out.push((
                crate::model::formats::names::peft_magnitude(module),
                d.magnitude.clone(),
            ));
        }
        out
    }

    /// ΔW = scale · B A in f32, shape [out, in].
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}
