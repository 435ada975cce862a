//! How quantities are written for people. A leaf module, so that engine
//! commands (`gc`) and the reporting side (`compare`) share one formatter
//! without either importing the other.

/// How many digits `human_bytes` shows; each command keeps the style it has always printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteDigits {
    /// One decimal in every unit, up to TiB ("1.5 MiB", "1024.0 KiB"): `runner gc`.
    OneDecimal,
    /// Three significant figures, up to EiB, rounding up into the next unit
    /// ("1.50 MiB", "17.5 MiB", "275 MiB"): `runner compare`.
    ThreeSignificant,
}

const BYTE_UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// Bytes in binary units; below 1 KiB the exact count ("512 B").
pub fn human_bytes(bytes: u64, digits: ByteDigits) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let top = match digits {
        ByteDigits::OneDecimal => 4,
        ByteDigits::ThreeSignificant => BYTE_UNITS.len() - 1,
    };
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < top {
        value /= 1024.0;
        unit += 1;
    }
    let text = match digits {
        ByteDigits::OneDecimal => format!("{value:.1}"),
        ByteDigits::ThreeSignificant => {
            // Rounding can carry into the next unit (1023.9 KiB would print as "1024 KiB").
            if value >= 999.5 && unit < top && value.round() >= 1024.0 {
                value /= 1024.0;
                unit += 1;
            }
            if value < 9.995 {
                format!("{value:.2}")
            } else if value < 99.95 {
                format!("{value:.1}")
            } else {
                format!("{value:.0}")
            }
        }
    };
    format!("{text} {}", BYTE_UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::{human_bytes, ByteDigits::OneDecimal};

    // `runner gc`'s style; `compare`'s is pinned in tests/compare/format.rs.
    #[test]
    fn one_decimal_bytes_as_gc_prints_them() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1024 * 1024 - 1, "1024.0 KiB"),
            (18_350_080, "17.5 MiB"),
            (288_358_400, "275.0 MiB"),
            (3 << 30, "3.0 GiB"),
            (5 << 40, "5.0 TiB"),
            (2048 << 40, "2048.0 TiB"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(human_bytes(bytes, OneDecimal), expected, "{bytes}");
        }
    }
}

/// The bytes a training step is estimated to hold, by what holds them: made
/// by `model::memory`, shown by `plan` and recorded by `run`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    /// The adapter in f32 with its gradient, summed gradient and AdamW moments.
    pub adapter_bytes: u64,
    pub activations_bytes: u64,
    /// Second copies a stage holds beside the weights: a merge's merged
    /// model, a model serialized for writing.
    #[serde(default)]
    pub copies_bytes: u64,
    /// The process itself: code, allocator, threads, tokenizer and data.
    pub runtime_bytes: u64,
    /// The peak: runtime + weights + adapter + activations, or two copies
    /// of the weights during a reference pass when that is more.
    pub estimate_bytes: u64,
}

impl MemoryEstimate {
    /// One line for `plan`.
    pub fn describe(&self) -> String {
        let b = |n: u64| human_bytes(n, ByteDigits::ThreeSignificant);
        let mut terms = vec![format!("weights {}", b(self.weights_bytes))];
        for (what, bytes) in [
            ("adapter + AdamW", self.adapter_bytes),
            ("second copies", self.copies_bytes),
            ("activations", self.activations_bytes),
        ] {
            if bytes > 0 {
                terms.push(format!("{what} {}", b(bytes)));
            }
        }
        format!("~{} peak ({})", b(self.estimate_bytes), terms.join(", "))
    }
}

/// The metric a stage's peak-memory estimate is recorded under, beside the
/// manifest's measured `peak_rss_bytes`.
pub const ESTIMATE_METRIC: &str = "memory/estimate_gib";

/// `bytes` in GiB, to the MiB (three decimals), as the metric holds it.
pub fn gib_metric(bytes: u64) -> f64 {
    (bytes as f64 / (1u64 << 30) as f64 * 1000.0).round() / 1000.0
}
