//! Rotary position embeddings as transformers computes them
//! (`modeling_rope_utils.py`): the inverse frequencies of each rope type
//! and the factor that scales cos and sin (YaRN, LongRoPE).

use serde_json::{json, Map, Value};
use std::f64::consts::PI;

/// How the frequencies are scaled beyond the base ones.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once a pass is longer than
    /// `max_position_embeddings` (equal to no scaling below that).
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// Llama 3.x's piecewise rule.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Yarn {
        factor: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: usize,
        truncate: bool,
    },
    /// Phi-3's LongRoPE: per-frequency factors, the long ones once a pass is
    /// longer than the original context.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        attention_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// llama.cpp's per-frequency factors for `rope` (its `rope_freqs` tensor):
/// each unscaled frequency over the scaled one, for Llama 3.x's rule.
pub fn llama_cpp_factors(rope: &Rope, head_dim: usize) -> Vec<f64> {
    let plain = Rope {
        theta: rope.theta,
        scaling: RopeScaling::None,
    };
    plain
        .table(head_dim, 0)
        .inv_freq
        .iter()
        .zip(rope.table(head_dim, 0).inv_freq)
        .map(|(base, scaled)| base / scaled)
        .collect()
}

/// One rope: its base and scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// What a pass's attention needs: the inverse frequencies (head_dim / 2)
/// and the factor on cos and sin.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    pub inv_freq: Vec<f64>,
    pub attention_factor: f64,
}

/// A rope setting that cannot be used: the key and why.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeError {
    pub key: String,
    pub message: String,
}

type Parsed<T> = std::result::Result<T, RopeError>;

fn error(key: &str, message: impl Into<String>) -> RopeError {
    RopeError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Keys a rope dict may hold; anything else changes the rope in a way this
/// program does not know.
const ROPE_KEYS: [&str; 16] = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "short_factor",
    "long_factor",
    "partial_rotary_factor",
];

impl Rope {
    pub fn plain(theta: f64) -> Self {
        Rope {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// A rope dict (transformers ≥ 5's `rope_parameters`, or an older
    /// `rope_scaling` with `theta` from the top level). `max_positions` is
    /// config.json's `max_position_embeddings`, the default original
    /// context of the scaled types.
    pub fn from_json(dict: &Value, theta: f64, max_positions: usize) -> Parsed<Self> {
        let Some(map) = dict.as_object() else {
            return Err(error("", format!("must be a table, got {dict}")));
        };
        if let Some(bad) = map.keys().find(|k| !ROPE_KEYS.contains(&k.as_str())) {
            return Err(error(
                bad,
                format!("is not a rope setting this program knows (= {})", map[bad]),
            ));
        }
        let num = |key: &str| -> Parsed<Option<f64>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| error(key, format!("must be a number, got {v}"))),
            }
        };
        let need = |key: &str, kind: &str| -> Parsed<f64> {
            num(key)?.ok_or_else(|| error(key, format!("is required for rope type {kind:?}")))
        };
        let factors = |key: &str| -> Parsed<Vec<f64>> {
            map.get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| error(key, "must be a list of numbers"))
        };
        if let Some(p) = num("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(error(
                    "partial_rotary_factor",
                    format!("{p} is not supported (rope on the whole head only)"),
                ));
            }
        }
        let theta = num("rope_theta")?.unwrap_or(theta);
        if !(theta > 1.0 && theta.is_finite()) {
            return Err(error("rope_theta", format!("must be above 1, got {theta}")));
        }
        let original = match num("original_max_position_embeddings")? {
            Some(o) if o >= 1.0 => o as usize,
            Some(o) => {
                return Err(error(
                    "original_max_position_embeddings",
                    format!("must be positive, got {o}"),
                ))
            }
            None => max_positions,
        };
        let kind = map
            .get("rope_type")
            .or_else(|| map.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: positive(need("factor", kind)?, "factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: positive(need("factor", kind)?, "factor")?,
                max_position_embeddings: max_positions,
            },
            "llama3" => {
                let (low, high) = (
                    need("low_freq_factor", kind)?,
                    need("high_freq_factor", kind)?,
                );
                if high <= low {
                    return Err(error(
                        "high_freq_factor",
                        format!("{high} must exceed low_freq_factor {low}"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: positive(need("factor", kind)?, "factor")?,
                    low_freq_factor: positive(low, "low_freq_factor")?,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                }
            }
            "yarn" => {
                let factor = match num("factor")? {
                    Some(f) => positive(f, "factor")?,
                    None => max_positions as f64 / original as f64,
                };
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match (
                    num("attention_factor")?,
                    num("mscale")?,
                    num("mscale_all_dim")?,
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale(factor, m) / mscale(factor, all)
                    }
                    _ => mscale(factor, 1.0),
                };
                let truncate = match map.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(v) => v
                        .as_bool()
                        .ok_or_else(|| error("truncate", "must be true or false"))?,
                };
                RopeScaling::Yarn {
                    factor,
                    attention_factor,
                    beta_fast: num("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                    original_max_position_embeddings: original,
                    truncate,
                }
            }
            "longrope" => {
                let factor = num("factor")?.unwrap_or(max_positions as f64 / original as f64);
                let attention_factor = match num("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    attention_factor,
                    original_max_position_embeddings: original,
                }
            }
            other => {
                return Err(error(
                    "rope_type",
                    format!(
                    "{other:?} is not supported (default, linear, dynamic, llama3, yarn, longrope)"
                ),
                ))
            }
        };
        Ok(Rope { theta, scaling })
    }

    /// The dict transformers ≥ 5 writes as `rope_parameters`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("rope_theta", json!(self.theta));
        match &self.scaling {
            RopeScaling::None => put("rope_type", json!("default")),
            RopeScaling::Linear { factor } => {
                put("rope_type", json!("linear"));
                put("factor", json!(factor));
            }
            RopeScaling::Dynamic { factor, .. } => {
                put("rope_type", json!("dynamic"));
                put("factor", json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                put("rope_type", json!("llama3"));
                put("factor", json!(factor));
                put("low_freq_factor", json!(low_freq_factor));
                put("high_freq_factor", json!(high_freq_factor));
                put(
                    "original_max_position_embeddings",
                    json!(original_max_position_embeddings),
                );
            }
            RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                truncate,
            } => {
                put("rope_type", json!("yarn"));
                put("factor", json!(factor));
                put("attention_factor", json!(attention_factor));
                put("beta_fast", json!(beta_fast));
                put("beta_slow", json!(beta_slow));
                put(
                    "original_max_position_embeddings",
                    json!(original_max_position_embeddings),
                );
                put("truncate", json!(truncate));
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                original_max_position_embeddings,
            } => {
                put("rope_type", json!("longrope"));
                put("short_factor", json!(short_factor));
                put("long_factor", json!(long_factor));
                put("attention_factor", json!(attention_factor));
                put(
                    "original_max_position_embeddings",
                    json!(original_max_position_embeddings),
                );
            }
        }
        Value::Object(m)
    }

    /// Checks what depends on the head size (LongRoPE's factor lists).
    pub fn check(&self, head_dim: usize) -> Parsed<()> {
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &self.scaling
        {
            for (key, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if f.len() != head_dim / 2 {
                    return Err(error(
                        key,
                        format!("has {} entries, head_dim / 2 is {}", f.len(), head_dim / 2),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The frequencies of a pass whose longest row has `seq_len` positions
    /// (transformers' `dynamic_rope_update`: dynamic and LongRoPE depend on
    /// it; the others do not).
    pub fn table(&self, head_dim: usize, seq_len: usize) -> RopeTable {
        let d = head_dim as f64;
        let base = |theta: f64| -> Vec<f64> {
            (0..head_dim / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f64 / d))
                .collect()
        };
        let plain = |inv_freq| RopeTable {
            inv_freq,
            attention_factor: 1.0,
        };
        match &self.scaling {
            RopeScaling::None => plain(base(self.theta)),
            RopeScaling::Linear { factor } => {
                plain(base(self.theta).into_iter().map(|f| f / factor).collect())
            }
            RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            } => {
                let max = *max_position_embeddings as f64;
                let len = (seq_len as f64).max(max);
                let theta =
                    self.theta * ((factor * len / max) - (factor - 1.0)).powf(d / (d - 2.0));
                plain(base(theta))
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                plain(
                    base(self.theta)
                        .into_iter()
                        .map(|f| {
                            let wavelen = 2.0 * PI / f;
                            if wavelen < high_wavelen {
                                f
                            } else if wavelen > low_wavelen {
                                f / factor
                            } else {
                                let smooth = (old / wavelen - low_freq_factor)
                                    / (high_freq_factor - low_freq_factor);
                                (1.0 - smooth) * f / factor + smooth * f
                            }
                        })
                        .collect(),
                )
            }
            RopeScaling::Yarn {
                factor,
                attention_factor,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                truncate,
            } => {
                let original = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (d * (original / (rotations * 2.0 * PI)).ln()) / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv_freq = base(self.theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (f / factor) * (1.0 - extrapolation) + f * extrapolation
                    })
                    .collect();
                RopeTable {
                    inv_freq,
                    attention_factor: *attention_factor,
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                original_max_position_embeddings,
            } => {
                let ext = if seq_len > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                RopeTable {
                    inv_freq: base(self.theta)
                        .iter()
                        .zip(ext)
                        .map(|(f, e)| f / e)
                        .collect(),
                    attention_factor: *attention_factor,
                }
            }
        }
    }
}

fn positive(v: f64, key: &str) -> Parsed<f64> {
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(error(key, format!("must be positive, got {v}")))
    }
}
