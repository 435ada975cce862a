//! Human-readable numbers, as documented in `compare::format`.

use lora_runner::compare::format::{
    format_count, format_metric, format_percent, human_bytes, human_bytes_opt, human_duration,
    MISSING,
};

#[test]
fn bytes_use_binary_units_with_three_significant_figures() {
    let cases = [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024, "10.0 KiB"),
        (1023 * 1024, "1023 KiB"),
        // Rounds up into the next unit instead of printing "1024 KiB".
        (1024 * 1024 - 1, "1.00 MiB"),
        (18_350_080, "17.5 MiB"),
        (288_358_400, "275 MiB"),
        (3 << 30, "3.00 GiB"),
        (140 * (1u64 << 30), "140 GiB"),
        (5 << 40, "5.00 TiB"),
        (u64::MAX, "16.0 EiB"),
    ];
    for (bytes, expected) in cases {
        assert_eq!(human_bytes(bytes), expected, "{bytes}");
    }
    assert_eq!(human_bytes_opt(None), MISSING);
    assert_eq!(human_bytes_opt(Some(2048)), "2.00 KiB");
}

#[test]
fn durations_get_coarser_as_they_grow() {
    assert_eq!(human_duration(0.0), "0.0 s");
    assert_eq!(human_duration(42.04), "42.0 s");
    assert_eq!(human_duration(59.96), "1 min 00 s");
    assert_eq!(human_duration(187.0), "3 min 07 s");
    assert_eq!(human_duration(3599.4), "59 min 59 s");
    assert_eq!(human_duration(3600.0), "1 h 00 min");
    assert_eq!(human_duration(7500.0), "2 h 05 min");
    assert_eq!(human_duration(f64::NAN), MISSING);
    assert_eq!(human_duration(-1.0), MISSING);
    assert_eq!(human_duration(f64::INFINITY), MISSING);
}

#[test]
fn counts_metrics_and_percentages() {
    assert_eq!(format_count(0), "0");
    assert_eq!(format_count(999), "999");
    assert_eq!(format_count(1000), "1,000");
    assert_eq!(format_count(4_587_520), "4,587,520");
    assert_eq!(format_count(u64::MAX), "18,446,744,073,709,551,615");
    assert_eq!(format_metric(Some(1.234_56)), "1.2346");
    assert_eq!(format_metric(Some(-0.031)), "-0.0310");
    assert_eq!(format_metric(Some(f64::NAN)), MISSING);
    assert_eq!(format_metric(None), MISSING);
    assert_eq!(format_percent(Some(0.875)), "87.5%");
    assert_eq!(format_percent(Some(1.0)), "100.0%");
    assert_eq!(format_percent(None), MISSING);
}
