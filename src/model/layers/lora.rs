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
        })
    }

    /// ΔW = scale · B A in f32, shape [out, in].
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}
