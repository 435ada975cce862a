//! Which stages a comparison shows, and in what order: stage names or
//! globs (`dpo_*`, `a:dpo_*` for recipe `a`), and ranking by a metric.

use crate::compare::evaluation::METRICS;
use crate::compare::summary::StageSummary;

/// `*` matches any run of characters, `?` any one; everything else itself.
pub fn wildcard(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic two-pointer match with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// A stage selector: `pattern`, or `recipe:pattern` for one recipe only.
pub fn split_selector(selector: &str) -> (Option<&str>, &str) {
    match selector.split_once(':') {
        Some((recipe, pattern)) => (Some(recipe), pattern),
        None => (None, selector),
    }
}

/// What the selectors pick from one recipe.
pub struct Picked {
    /// Stage names, in selector order (a glob's matches in `training` order).
    pub stages: Vec<String>,
    /// For each selector: whether it picked anything here.
    pub matched: Vec<bool>,
}

/// The stages of recipe `recipe` the selectors pick: a glob picks the
/// training stages it matches; a plain name is taken as asked, so a stage
/// that is not a finished training stage gets its own error from
/// `collect`. With several recipes a plain name without `recipe:` counts
/// only where the recipe has that stage (`has_stage`).
pub fn select(
    recipe: &str,
    training: &[String],
    has_stage: &dyn Fn(&str) -> bool,
    selectors: &[String],
    several_recipes: bool,
) -> Picked {
    let mut stages: Vec<String> = Vec::new();
    let mut matched = vec![false; selectors.len()];
    for (k, selector) in selectors.iter().enumerate() {
        let (r, pattern) = split_selector(selector);
        if r.is_some_and(|r| r != recipe) {
            continue;
        }
        let picked: Vec<&str> = if pattern.contains(['*', '?']) {
            training
                .iter()
                .filter(|n| wildcard(pattern, n))
                .map(String::as_str)
                .collect()
        } else if !several_recipes || r.is_some() || has_stage(pattern) {
            vec![pattern]
        } else {
            Vec::new()
        };
        matched[k] = !picked.is_empty();
        for name in picked {
            if !stages.iter().any(|s| s == name) {
                stages.push(name.to_string());
            }
        }
    }
    Picked { stages, matched }
}

/// Sorts `stages` best first by their evaluation's `metric` (stages without
/// it last, in their order) and returns the ranking as text lines.
pub fn rank(
    stages: &mut [StageSummary],
    metric: &str,
    bootstrap: crate::compare::evaluation::Bootstrap,
) -> Result<String, crate::compare::CompareError> {
    let Some(&(_, higher_is_better)) = METRICS.iter().find(|(m, _)| *m == metric) else {
        return Err(crate::compare::CompareError::UnknownMetric {
            metric: metric.to_string(),
            known: METRICS.iter().map(|(m, _)| m.to_string()).collect(),
        });
    };
    let value = |s: &StageSummary| {
        s.evaluated
            .evaluation
            .as_ref()
            .and_then(|e| e.metrics.get(metric).copied())
    };
    stages.sort_by(|a, b| match (value(a), value(b)) {
        (Some(x), Some(y)) if higher_is_better => y.total_cmp(&x),
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let mut out = format!(
        "ranking by {metric} ({} is better):\n",
        if higher_is_better { "higher" } else { "lower" }
    );
    fn examples(s: &StageSummary) -> Option<&crate::compare::evaluation::Examples> {
        s.evaluated.evaluation.as_ref().map(|e| &e.examples)
    }
    let leader = stages.first().and_then(examples);
    for (i, s) in stages.iter().enumerate() {
        // How far behind the first it is, paired by example, with its 95% interval.
        let behind = match (i, leader, examples(s)) {
            (1.., Some(lead), Some(own)) => {
                let (x, y) = crate::compare::evaluation::paired(own, lead, metric);
                crate::compare::bootstrap::paired_difference(
                    &x,
                    &y,
                    bootstrap.resamples,
                    bootstrap.seed,
                )
                .map(|d| {
                    let tie = if d.significant() {
                        "behind #1"
                    } else {
                        "tied with #1 within noise"
                    };
                    format!(
                        "  {:+.4} [{:+.4}, {:+.4}] vs #1, {tie}",
                        d.mean, d.low, d.high
                    )
                })
                .unwrap_or_default()
            }
            _ => String::new(),
        };
        match value(s) {
            Some(v) => out.push_str(&format!("  {}. {} {v:.4}{behind}\n", i + 1, s.name)),
            None => out.push_str(&format!("  -. {} (not evaluated)\n", s.name)),
        }
    }
    Ok(out)
}
