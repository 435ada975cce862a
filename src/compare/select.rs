//! Which stages a comparison shows, and in what order: stage names or
//! globs (`dpo_*`, `a:dpo_*` for recipe `a`), and ranking by a metric.

use crate::compare::evaluation::METRICS;
use crate::compare::stage::StageSummary;

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

/// The stages of `candidates` (in their order) that any selector for
/// `recipe` matches; errors name a selector that matched nothing anywhere
/// (the caller checks across recipes).
pub fn select(recipe: &str, candidates: &[String], selectors: &[String]) -> Vec<String> {
    candidates
        .iter()
        .filter(|name| {
            selectors.iter().any(|s| {
                let (r, pattern) = split_selector(s);
                r.is_none_or(|r| r == recipe) && wildcard(pattern, name)
            })
        })
        .cloned()
        .collect()
}

/// Sorts `stages` best first by their evaluation's `metric` (stages without
/// it last, in their order) and returns the ranking as text lines.
pub fn rank(stages: &mut [StageSummary], metric: &str) -> Result<String, String> {
    let Some(&(_, higher_is_better)) = METRICS.iter().find(|(m, _)| *m == metric) else {
        let known: Vec<&str> = METRICS.iter().map(|(m, _)| *m).collect();
        return Err(format!(
            "cannot rank by `{metric}`: expected one of {}",
            known.join(", ")
        ));
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
    for (i, s) in stages.iter().enumerate() {
        match value(s) {
            Some(v) => out.push_str(&format!("  {}. {} {v:.4}\n", i + 1, s.name)),
            None => out.push_str(&format!("  -. {} (not evaluated)\n", s.name)),
        }
    }
    Ok(out)
}
