//! How numbers are written in the tables. One place, so markdown, terminal and JSON agree.
//!
//! - Missing values: "—".
//! - Losses and margins: 4 decimals ("1.2346", "-0.0310").
//! - Accuracies (a share of pairs, 0..1): percent with one decimal ("87.5%").
//! - Counts (parameters, steps): thousands separated by commas ("1,234,567").
//! - Bytes: binary units, three significant figures ("512 B", "1.50 KiB", "12.3 MiB", "140 GiB").
//! - Durations: "42.0 s", "3 min 07 s", "2 h 05 min".

/// Placeholder for a value a stage does not have.
pub const MISSING: &str = "—";

/// A loss, margin or other real-valued metric.
pub fn format_metric(value: Option<f64>) -> String {
    match value.filter(|v| v.is_finite()) {
        Some(v) => format!("{v:.4}"),
        None => MISSING.to_string(),
    }
}

/// A share in 0..1 shown as a percentage.
pub fn format_percent(value: Option<f64>) -> String {
    match value.filter(|v| v.is_finite()) {
        Some(v) => format!("{:.1}%", v * 100.0),
        None => MISSING.to_string(),
    }
}

/// An integer with comma thousands separators.
pub fn format_count(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in binary units with three significant figures (the shared formatter in `units`).
pub fn human_bytes(bytes: u64) -> String {
    crate::units::human_bytes(bytes, crate::units::ByteDigits::ThreeSignificant)
}

/// Optional bytes (e.g. peak memory that was not measured).
pub fn human_bytes_opt(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| MISSING.to_string(), human_bytes)
}

/// Wall-clock seconds, coarser as they grow.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return MISSING.to_string();
    }
    if seconds < 59.95 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    if total < 3600 {
        format!("{} min {:02} s", total / 60, total % 60)
    } else {
        let minutes = (total + 30) / 60;
        format!("{} h {:02} min", minutes / 60, minutes % 60)
    }
}
