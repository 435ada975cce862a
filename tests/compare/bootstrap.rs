//! The paired bootstrap against closed forms.

use lora_runner::compare::bootstrap::paired_difference;
use lora_runner::model::kernels::rng::SplitMix64;

fn bernoulli(rng: &mut SplitMix64, p: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| f64::from(u8::from(rng.next_f64() < p)))
        .collect()
}

#[test]
fn intervals_cover_the_true_difference_of_two_bernoulli_samples() {
    // Two independent Bernoulli(0.7) and Bernoulli(0.5) samples of 200,
    // paired by index: the true difference is 0.2, and the standard error
    // of the mean difference is sqrt((0.21 + 0.25)/200) ≈ 0.048.
    let (n, trials) = (200, 200);
    let mut covered = 0;
    let mut widths = Vec::new();
    for trial in 0..trials {
        let mut rng = SplitMix64::new(1000 + trial);
        let a = bernoulli(&mut rng, 0.7, n);
        let b = bernoulli(&mut rng, 0.5, n);
        let ci = paired_difference(&a, &b, 2000, trial).unwrap();
        covered += usize::from(ci.low <= 0.2 && 0.2 <= ci.high);
        widths.push(ci.high - ci.low);
        // The point estimate is the plain mean difference.
        let mean = a.iter().sum::<f64>() / n as f64 - b.iter().sum::<f64>() / n as f64;
        assert!((ci.mean - mean).abs() < 1e-12);
    }
    let coverage = covered as f64 / trials as f64;
    assert!((0.9..=0.99).contains(&coverage), "coverage {coverage}");
    // Width ≈ 2 · 1.96 · SE.
    let se = ((0.7 * 0.3 + 0.5 * 0.5) / n as f64).sqrt();
    let mean_width = widths.iter().sum::<f64>() / widths.len() as f64;
    assert!(
        (mean_width / (2.0 * 1.96 * se) - 1.0).abs() < 0.1,
        "width {mean_width} vs {}",
        2.0 * 1.96 * se
    );
}

#[test]
fn identical_and_constant_differences_give_degenerate_intervals() {
    let a = vec![1.0, 0.0, 1.0, 1.0];
    let same = paired_difference(&a, &a, 500, 1).unwrap();
    assert_eq!((same.mean, same.low, same.high), (0.0, 0.0, 0.0));
    assert!(!same.significant());
    // Every pair differs by exactly 0.5: no resample can say otherwise.
    let b: Vec<f64> = a.iter().map(|x| x - 0.5).collect();
    let shifted = paired_difference(&a, &b, 500, 1).unwrap();
    assert_eq!((shifted.low, shifted.high), (0.5, 0.5));
    assert!(shifted.significant());
    assert!(paired_difference(&[], &[], 10, 1).is_none());
    // Seeded: the same seed, the same interval.
    let x = [0.1, 0.9, 0.4, 0.3, 0.8];
    let y = [0.2, 0.1, 0.5, 0.0, 0.3];
    assert_eq!(
        paired_difference(&x, &y, 1000, 7),
        paired_difference(&x, &y, 1000, 7)
    );
}

#[test]
fn pairing_narrows_the_interval_when_examples_vary_together() {
    // b = a − 0.05 + small noise: unpaired the difference would drown in the
    // spread of a; paired it is clearly positive.
    let mut rng = SplitMix64::new(3);
    let a: Vec<f64> = (0..100).map(|_| rng.uniform(0.0, 10.0)).collect();
    let b: Vec<f64> = a
        .iter()
        .map(|x| x - 0.05 + rng.uniform(-0.01, 0.01))
        .collect();
    let ci = paired_difference(&a, &b, 2000, 0).unwrap();
    assert!(ci.low > 0.04 && ci.high < 0.06, "{ci:?}");
}

#[test]
fn examples_pair_by_file_and_line_not_by_position() {
    use lora_runner::compare::evaluation::{deltas, Bootstrap, Evaluation, Examples};
    let rows = |skip: Option<usize>, offset: f64| -> Examples {
        (1..=10)
            .filter(|l| Some(*l) != skip)
            .map(|line| {
                (
                    ("sft".to_string(), "eval.jsonl".to_string(), line),
                    [("sft/exact_match".to_string(), line as f64 + offset)].into(),
                )
            })
            .collect()
    };
    // Line 3 was dropped from one stage's evaluation: the other nine still
    // pair line with line, so every difference is exactly −1.
    let (a, b) = (rows(Some(3), 0.0), rows(None, 1.0));
    let bootstrap = Bootstrap {
        resamples: 200,
        seed: 1,
    };
    let d = deltas(&a, &b, bootstrap)["sft/exact_match"];
    assert_eq!((d.mean, d.low, d.high), (-1.0, -1.0, -1.0));
    let eval = |stage: &str, examples: Examples| Evaluation {
        stage: stage.into(),
        examples,
        ..Default::default()
    };
    let (ea, eb) = (eval("ea", a), eval("eb", b));
    let v = lora_runner::compare::evaluation::verdicts(
        &[("a".to_string(), &ea), ("b".to_string(), &eb)],
        bootstrap,
    );
    assert_eq!(v.len(), 1, "only the metric both have");
    assert_eq!((v[0].paired, v[0].better.as_deref()), (9, Some("b")));
    // A metric where lower is better flips the winner.
    let loss = |examples: &Examples| -> Examples {
        examples
            .iter()
            .map(|(k, m)| {
                (
                    k.clone(),
                    [("sft/loss".to_string(), m["sft/exact_match"])].into(),
                )
            })
            .collect()
    };
    let (la, lb) = (
        eval("la", loss(&ea.examples)),
        eval("lb", loss(&eb.examples)),
    );
    let v = lora_runner::compare::evaluation::verdicts(
        &[("a".to_string(), &la), ("b".to_string(), &lb)],
        bootstrap,
    );
    assert_eq!(v[0].better.as_deref(), Some("a"));
    // Nothing in common: no verdict at all rather than a made-up one.
    let other: Examples = rows(None, 0.0)
        .into_iter()
        .map(|((d, _, l), m)| ((d, "other.jsonl".to_string(), l), m))
        .collect();
    assert!(deltas(&ea.examples, &other, bootstrap).is_empty());
}

#[test]
fn selectors_pick_globs_in_recipe_order_and_plain_names_as_asked() {
    use lora_runner::compare::select::{select, wildcard};
    assert!(wildcard("dpo_*", "dpo_fresh") && wildcard("*", "") && wildcard("d?o*h", "dpo_fresh"));
    assert!(!wildcard("dpo_*", "sft") && !wildcard("dpo_?", "dpo_ab") && !wildcard("a*b", "ab c"));
    let training: Vec<String> = ["sft", "dpo_continued", "dpo_fresh"]
        .map(String::from)
        .to_vec();
    let has = |s: &str| s == "sft" || s == "eval";
    let sel = |selectors: &[&str], several: bool| {
        let s: Vec<String> = selectors.iter().map(|x| x.to_string()).collect();
        let picked = select("tiny", &training, &has, &s, several);
        (picked.stages, picked.matched)
    };
    // A glob keeps the recipe's order; a plain name is taken as asked (even
    // one that is not a training stage: `collect` reports it); duplicates once.
    assert_eq!(
        sel(&["dpo_*", "eval", "dpo_fresh"], false),
        (
            vec!["dpo_continued".into(), "dpo_fresh".into(), "eval".into()],
            vec![true, true, true]
        )
    );
    // Another recipe's selectors pick nothing here; with several recipes a
    // bare name counts only where the recipe has it.
    assert_eq!(
        sel(&["other:dpo_*", "tiny:sft", "missing"], true),
        (vec!["sft".into()], vec![false, true, false])
    );
    assert_eq!(sel(&["nope*"], false), (vec![], vec![false]));
}
