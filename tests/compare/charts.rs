//! The SVG charts: written, well-formed, labelled, one line per stage, no panics.

use std::path::PathBuf;

use lora_runner::compare::{
    dpo_chart, loss_chart, stage_colour_hex, DPO_CHART_TITLE, LOSS_CHART_TITLE,
};
use lora_runner::stage::Objective;
use serde_json::json;

use crate::fixtures::{dpo_stage, empty_stage, realistic_stages};
use crate::svg_check::{parse_svg, polylines_in, texts};

fn out_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("compare")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn contains_text(texts: &[String], needle: &str) -> bool {
    texts.iter().any(|t| t.contains(needle))
}

#[test]
fn loss_chart_is_valid_svg_with_labels_legend_and_a_line_per_stage() {
    let stages = realistic_stages();
    // A folder that does not exist yet: the chart creates it.
    let path = out_dir("loss").join("nested").join("loss.svg");
    loss_chart(&stages, &path).unwrap();
    let elements = parse_svg(&read(&path)).unwrap();
    assert_eq!(elements[0].name, "svg");

    let texts = texts(&elements);
    assert!(
        contains_text(&texts, LOSS_CHART_TITLE),
        "title missing: {texts:?}"
    );
    assert!(contains_text(&texts, "optimizer step"));
    assert!(contains_text(&texts, "loss (cross-entropy)"));
    assert!(contains_text(&texts, "loss (DPO)"));
    for stage in &stages {
        assert!(
            texts.iter().any(|t| t == &stage.display_name()),
            "legend entry for {} missing",
            stage.name
        );
    }

    // Each stage appears in exactly one panel (its kind's): one smoothed line, and
    // its raw values as one faint line behind it.
    for index in 0..stages.len() {
        let colour = stage_colour_hex(index);
        assert_eq!(
            polylines_in(&elements, &colour),
            (1, 1),
            "stage {index} {colour}"
        );
    }
}

#[test]
fn stage_colours_are_distinct() {
    let colours: std::collections::BTreeSet<String> = (0..6).map(stage_colour_hex).collect();
    assert_eq!(colours.len(), 6);
}

#[test]
fn dpo_chart_has_both_panels_eval_markers_and_only_dpo_stages() {
    let stages = realistic_stages();
    let path = out_dir("dpo").join("dpo.svg");
    dpo_chart(&stages, &path).unwrap();
    let elements = parse_svg(&read(&path)).unwrap();
    let texts = texts(&elements);
    assert!(contains_text(&texts, DPO_CHART_TITLE));
    assert!(contains_text(&texts, "rewards/margins"));
    assert!(contains_text(&texts, "rewards/accuracies"));
    assert!(contains_text(&texts, "optimizer step"));
    assert!(
        !texts.iter().any(|t| t == &stages[0].display_name()),
        "SFT is not a DPO stage"
    );

    // SFT (index 0) draws nothing; each DPO stage has a line in both panels.
    assert_eq!(polylines_in(&elements, &stage_colour_hex(0)), (0, 0));
    for index in 1..3 {
        assert_eq!(polylines_in(&elements, &stage_colour_hex(index)), (2, 2));
    }
    // dpo-one's eval markers are triangles (polygons): 6 evals x 2 panels + 1 in
    // the legend; dpo-two's are squares (rects), likewise.
    let filled = |name: &str, index: usize| {
        elements
            .iter()
            .filter(|e| e.name == name && e.attr("fill") == Some(stage_colour_hex(index).as_str()))
            .count()
    };
    assert_eq!(filled("polygon", 1), 6 * 2 + 1);
    // The legend's line sample is a rect too.
    assert_eq!(filled("rect", 2), 6 * 2 + 1 + 1);
}

#[test]
fn empty_and_single_point_series_do_not_panic() {
    let dir = out_dir("degenerate");
    let mut single = dpo_stage("single", "one step", 3, 0.5, 0.4);
    single.rows =
        vec![json!({"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0})];
    let mut bad = empty_stage("bad rows", Objective::Dpo);
    bad.rows = vec![
        json!("not an object"),
        json!({"step": "three", "loss": 1.0}),
        json!({"step": 4, "loss": null}),
        json!({"step": 5}),
        json!(42),
    ];
    let flat = {
        let mut s = empty_stage("flat", Objective::Sft);
        s.rows = (1..=5).map(|i| json!({"step": i, "loss": 2.0})).collect();
        s
    };
    let cases = [
        vec![],
        vec![empty_stage("empty-sft", Objective::Sft)],
        vec![empty_stage("empty-dpo", Objective::Dpo)],
        vec![single.clone()],
        vec![bad.clone(), single.clone()],
        vec![flat],
    ];
    for (i, stages) in cases.iter().enumerate() {
        let loss = dir.join(format!("loss-{i}.svg"));
        let dpo = dir.join(format!("dpo-{i}.svg"));
        loss_chart(stages, &loss).unwrap();
        dpo_chart(stages, &dpo).unwrap();
        parse_svg(&read(&loss)).unwrap_or_else(|e| panic!("case {i} loss: {e}"));
        parse_svg(&read(&dpo)).unwrap_or_else(|e| panic!("case {i} dpo: {e}"));
    }
    // Five points are too few to smooth: one line, no faint raw copy.
    let flat = parse_svg(&read(&dir.join("loss-5.svg"))).unwrap();
    assert_eq!(polylines_in(&flat, &stage_colour_hex(0)), (1, 0));
    let elements = parse_svg(&read(&dir.join("dpo-0.svg"))).unwrap();
    assert!(contains_text(&texts(&elements), "no data"));
}

#[test]
fn unwritable_path_is_an_error_not_a_panic() {
    let dir = out_dir("unwritable");
    std::fs::create_dir_all(&dir).unwrap();
    let blocker = dir.join("file");
    std::fs::write(&blocker, "x").unwrap();
    let err = loss_chart(&realistic_stages(), blocker.join("loss.svg")).unwrap_err();
    assert!(format!("{err:#}").contains("loss.svg") || format!("{err:#}").contains("file"));
}

/// Writes the charts from realistic data where a person can rasterize and look at
/// them: target/tmp/compare/demo/{loss,dpo}.svg.
#[test]
fn realistic_demo_charts() {
    let dir = out_dir("demo");
    let stages = realistic_stages();
    loss_chart(&stages, dir.join("loss.svg")).unwrap();
    dpo_chart(&stages, dir.join("dpo.svg")).unwrap();
    let md = lora_runner::compare::markdown_report(
        &stages,
        &[
            ("Training loss".into(), "loss.svg".into()),
            ("DPO rewards".into(), "dpo.svg".into()),
        ],
        "",
        None,
    );
    std::fs::write(dir.join("report.md"), md).unwrap();
}

/// The checker the tests above rely on must itself reject broken SVG.
#[test]
fn svg_checker_rejects_malformed_documents() {
    let good = r#"<svg width="1" xmlns="http://www.w3.org/2000/svg"><text x="1">a &amp; b</text><rect x="0"/></svg>"#;
    let elements = parse_svg(good).unwrap();
    assert_eq!(texts(&elements), ["a & b"]);
    for bad in [
        "",
        "<g></g>",
        "<svg><text>unclosed</svg>",
        "<svg><text></g></svg>",
        r#"<svg width=1></svg>"#,
        r#"<svg width="1></svg>"#,
        "<svg>a & b</svg>",
        "<svg></svg><svg></svg>",
        "<svg>",
    ] {
        assert!(parse_svg(bad).is_err(), "accepted {bad:?}");
    }
}
