//! The markdown report, terminal table and JSON agree and format as documented.

const BOOT: lora_runner::compare::evaluation::Bootstrap =
    lora_runner::compare::evaluation::Bootstrap {
        resamples: 100,
        seed: 0,
    };

use lora_runner::compare::{json, markdown_report, text_table, MISSING};
use lora_runner::stage::Objective;

use crate::fixtures::{empty_stage, realistic_stages};

/// Cells of the markdown table rows (lines starting with '|'), pipes unescaped.
fn markdown_rows(md: &str) -> Vec<Vec<String>> {
    md.lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            let inner = l.trim().trim_start_matches('|').trim_end_matches('|');
            let mut cells = Vec::new();
            let mut cell = String::new();
            let mut chars = inner.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\\' if chars.peek() == Some(&'|') => {
                        cell.push('|');
                        chars.next();
                    }
                    '|' => cells.push(std::mem::take(&mut cell).trim().to_string()),
                    other => cell.push(other),
                }
            }
            cells.push(cell.trim().to_string());
            cells
        })
        .collect()
}

fn row<'a>(rows: &'a [Vec<String>], label: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == label)
        .unwrap_or_else(|| panic!("no row {label:?} in {rows:?}"))
}

#[test]
fn markdown_has_one_column_per_stage_with_formatted_numbers() {
    let stages = realistic_stages();
    let md = markdown_report(&stages, &[], "", None);
    let rows = markdown_rows(&md);
    assert_eq!(rows[0], ["metric", "sft", "dpo-one", "dpo-two"]);
    assert!(rows.iter().all(|r| r.len() == stages.len() + 1), "{rows:?}");

    assert_eq!(
        row(&rows, "final training loss")[1..],
        ["1.2346", "0.5012", "0.4801"]
    );
    assert_eq!(row(&rows, "eval loss")[1..], ["1.3567", "0.5215", "0.5003"]);
    assert_eq!(
        row(&rows, "eval rewards/accuracies")[1..],
        [MISSING, "87.5%", "90.0%"]
    );
    assert_eq!(
        row(&rows, "eval rewards/margins")[1..],
        [MISSING, "0.4123", "0.4500"]
    );
    assert_eq!(row(&rows, "trainable parameters")[1..], ["4,587,520"; 3]);
    assert_eq!(
        row(&rows, "bytes on disk")[1..],
        ["17.5 MiB", "17.5 MiB", "275 MiB"]
    );
    assert_eq!(
        row(&rows, "peak memory")[1..],
        ["3.00 GiB", "4.00 GiB", MISSING]
    );
    assert_eq!(
        row(&rows, "wall time")[1..],
        ["12 min 34 s", "7 min 01 s", "1 h 02 min"]
    );
    assert_eq!(row(&rows, "steps")[1..], ["300", "150", "150"]);
    assert_eq!(row(&rows, "LoRA")[1], "r=8 alpha=16 targets=all-linear");
    assert_eq!(row(&rows, "reference")[2], "SFT model (base + SFT adapter)");
    assert_eq!(
        row(&rows, "scheme")[2],
        "scheme one: continue the SFT adapter"
    );
}

#[test]
fn markdown_embeds_charts_after_the_table() {
    let charts = vec![
        ("Training loss".to_string(), "charts/loss.svg".to_string()),
        ("DPO rewards".to_string(), "charts/dpo.svg".to_string()),
    ];
    let md = markdown_report(&realistic_stages(), &charts, "", None);
    let table_end = md.rfind("| reference |").unwrap();
    let loss = md.find("![Training loss](charts/loss.svg)").unwrap();
    let dpo = md.find("![DPO rewards](charts/dpo.svg)").unwrap();
    assert!(table_end < loss && loss < dpo);
}

#[test]
fn markdown_escapes_pipes_and_newlines_in_cells() {
    let mut stage = empty_stage("odd|name", Objective::Sft);
    stage.lora = "r=8 | alpha=16\ntargets=q,v".into();
    let md = markdown_report(&[stage], &[], "", None);
    let rows = markdown_rows(&md);
    assert!(rows.iter().all(|r| r.len() == 2), "{rows:?}");
    assert_eq!(rows[0][1], "odd|name");
    assert_eq!(row(&rows, "LoRA")[1], "r=8 | alpha=16 targets=q,v");
}

#[test]
fn final_metrics_fall_back_to_the_last_logged_rows() {
    let mut stages = realistic_stages();
    for stage in &mut stages {
        stage.final_metrics.clear();
    }
    let rows = markdown_rows(&markdown_report(&stages, &[], "", None));
    // The fixture's last SFT eval row is at step 300: 1.35 + 5.8 e^-5.
    let expected = format!("{:.4}", 1.35 + 5.8 * (-5.0f64).exp());
    assert_eq!(row(&rows, "eval loss")[1], expected);
    let final_loss = &row(&rows, "final training loss")[1];
    assert_ne!(final_loss, MISSING);
    assert_ne!(row(&rows, "eval rewards/accuracies")[2], MISSING);
}

#[test]
fn empty_stage_list_is_handled() {
    assert!(markdown_report(&[], &[], "", None).contains("No stages"));
    assert!(text_table(&[]).contains("No stages"));
    assert_eq!(json(&[], BOOT)["stages"].as_array().map(Vec::len), Some(0));
}

#[test]
fn text_table_columns_are_aligned() {
    let stages = realistic_stages();
    let table = text_table(&stages);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2 + 24, "{table}");
    assert!(!table.contains('\x1b'), "no colour codes");
    // Every cell of column k starts at the same character offset on every line.
    let header = lines[0];
    let starts: Vec<usize> = ["sft", "dpo-one", "dpo-two"]
        .iter()
        .map(|name| header.chars().count() - header[header.find(name).unwrap()..].chars().count())
        .collect();
    let eval_loss = lines.iter().find(|l| l.starts_with("eval loss")).unwrap();
    for (start, value) in starts.iter().zip(["1.3567", "0.5215", "0.5003"]) {
        let at: String = eval_loss.chars().skip(*start).take(value.len()).collect();
        assert_eq!(at, value, "{table}");
    }
    // "—" is one character but three bytes: it must not shift the next column.
    let accuracies = lines
        .iter()
        .find(|l| l.starts_with("eval rewards/accuracies"))
        .unwrap();
    let at: String = accuracies.chars().skip(starts[1]).take(5).collect();
    assert_eq!(at, "87.5%", "{table}");
    assert!(lines[1].chars().all(|c| c == '-' || c == ' '));
    assert!(lines.iter().all(|l| !l.ends_with(' ')));
}

#[test]
fn json_has_raw_numbers_and_display_strings() {
    let stages = realistic_stages();
    let value = json(&stages, BOOT);
    let entries = value["stages"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let two = &entries[2];
    assert_eq!(two["name"], "dpo-two");
    assert_eq!(two["kind"], "dpo");
    assert_eq!(two["bytes_on_disk"], 288_358_400u64);
    assert_eq!(two["peak_memory_bytes"], serde_json::Value::Null);
    assert_eq!(two["eval_rewards_accuracies"], 0.9);
    assert_eq!(two["display"]["bytes_on_disk"], "275 MiB");
    assert_eq!(two["display"]["wall_time"], "1 h 02 min");
    assert_eq!(two["rows"], stages[2].rows.len());
    // NaN has no JSON form.
    let mut nan = stages[0].clone();
    nan.final_metrics.insert("loss".into(), f64::NAN);
    nan.wall_seconds = f64::NAN;
    let value = json(&[nan], BOOT);
    assert!(value["stages"][0]["final_metrics"]["loss"].is_null());
    assert!(value["stages"][0]["wall_seconds"].is_null());
    assert!(serde_json::to_string(&value).is_ok());
}
