//! Reading metric rows and smoothing them.

use lora_runner::compare::{is_eval_row, moving_average, smoothing_window, StageSummary};
use lora_runner::stage::Objective;
use serde_json::json;

use crate::fixtures::empty_stage;

#[test]
fn rows_without_loss_are_eval_rows() {
    assert!(!is_eval_row(&json!({"step": 1, "loss": 0.5})));
    assert!(is_eval_row(&json!({"step": 1, "eval/loss": 0.5})));
    assert!(!is_eval_row(&json!("not an object")));
}

#[test]
fn points_skip_bad_values_and_are_sorted_by_step() {
    let mut stage = empty_stage("s", Objective::Dpo);
    stage.rows = vec![
        json!({"step": 3, "loss": 0.3, "rewards/margins": 0.3}),
        json!({"step": 1, "loss": 0.1, "rewards/margins": 0.1}),
        json!({"step": 2, "loss": 0.2, "rewards/margins": "n/a"}),
        json!({"loss": 0.9}),
        json!({"step": 2, "eval/loss": 0.25}),
        json!([1, 2]),
    ];
    assert_eq!(
        stage.training_points("loss"),
        vec![(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]
    );
    assert_eq!(
        stage.training_points("rewards/margins"),
        vec![(1.0, 0.1), (3.0, 0.3)]
    );
    assert_eq!(stage.eval_points("eval/loss"), vec![(2.0, 0.25)]);
    assert!(stage.eval_points("loss").is_empty());
    assert_eq!(stage.final_metric("loss"), Some(0.3));
    assert_eq!(stage.final_metric("eval/loss"), Some(0.25));
    assert_eq!(stage.final_metric("eval/rewards/margins"), None);
}

#[test]
fn smoothing_window_is_about_five_percent_and_odd() {
    assert_eq!(smoothing_window(0), 1);
    assert_eq!(smoothing_window(1), 1);
    assert_eq!(smoothing_window(20), 1);
    assert_eq!(smoothing_window(150), 9);
    assert_eq!(smoothing_window(300), 15);
    assert!((1..5000).all(|n| smoothing_window(n) % 2 == 1));
}

#[test]
fn moving_average_is_centred_and_keeps_the_ends() {
    let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, (i * i) as f64)).collect();
    let smoothed = moving_average(&points, 3);
    assert_eq!(smoothed.len(), 5);
    assert_eq!(smoothed[0], (0.0, 0.5)); // (0 + 1) / 2: the window shrinks at the edge
    assert_eq!(smoothed[2], (2.0, (1.0 + 4.0 + 9.0) / 3.0));
    assert_eq!(smoothed[4], (4.0, (9.0 + 16.0) / 2.0));
    assert_eq!(moving_average(&points, 1), points);
    assert!(moving_average(&[], 9).is_empty());
}

#[test]
fn objective_parses_and_serializes_lowercase() {
    assert_eq!("sft".parse::<Objective>().unwrap(), Objective::Sft);
    assert_eq!(" DPO ".parse::<Objective>().unwrap(), Objective::Dpo);
    assert!("ppo".parse::<Objective>().is_err());
    let stage = empty_stage("x", Objective::Dpo);
    let value = serde_json::to_value(&stage).unwrap();
    assert_eq!(value["kind"], "dpo");
    let back: StageSummary = serde_json::from_value(value).unwrap();
    assert_eq!(back, stage);
}
