//! The comparison written down: charts, report.md and report.html in
//! `cache/reports/<name>/`, and what a finished run prints about its schemes.

use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::compare::evaluation::{self, Bootstrap, METRICS};
use crate::compare::{
    bootstrap, chart, collect, forest, html, markdown, select, text, CompareError, StageSummary,
};
use crate::graph::Dag;
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::stage::Objective;

/// Paired-bootstrap settings: `resamples` (or the default), seeded by the recipe's seed.
pub fn bootstrap_of(recipe: &Recipe, resamples: Option<usize>) -> Bootstrap {
    Bootstrap {
        resamples: resamples.unwrap_or(bootstrap::DEFAULT_RESAMPLES),
        seed: recipe.header.seed.value,
    }
}

/// A written report: report.md's path and the verdict text.
pub struct Written {
    pub markdown: PathBuf,
    pub verdict: String,
}

impl Written {
    /// report.html, beside report.md.
    pub fn html(&self) -> PathBuf {
        self.markdown.with_extension("html")
    }
}

/// Write the charts, report.md and report.html of a comparison into
/// `cache/reports/<name>/` (several recipes: their names joined by "+").
pub fn write(
    recipe: &Recipe,
    name: &str,
    cache: &Cache,
    summaries: &[StageSummary],
    bootstrap: Bootstrap,
) -> Result<Written, CompareError> {
    let dir = collect::report_dir(cache, recipe).with_file_name(name);
    std::fs::create_dir_all(&dir)
        .map_err(CompareError::io(format!("creating {}", dir.display())))?;
    let charts = write_charts(summaries, &dir)?;
    let verdicts = evaluation::verdicts_of(summaries, bootstrap);
    let verdict = evaluation::verdict_text(summaries, &verdicts, bootstrap);
    // The verdict as a picture, beside the files and inline in the HTML.
    let forest = forest::forest_svg(&verdicts);
    if let Some(svg) = &forest {
        write_file(&dir.join(FOREST_FILE), svg)?;
    }
    let markdown = format!(
        "# {} — comparison\n\nRecipe: `{}`\n\n{}",
        name,
        recipe.path.display(),
        markdown::markdown_report(
            summaries,
            &charts,
            &verdict,
            forest.as_ref().map(|_| FOREST_FILE)
        )
    );
    let path = dir.join("report.md");
    write_file(&path, &markdown)?;
    let svgs: Vec<(String, String)> = charts
        .iter()
        .filter_map(|(title, file)| {
            Some((title.clone(), std::fs::read_to_string(dir.join(file)).ok()?))
        })
        .collect();
    let html = html::html_report(
        &format!("{name} — comparison"),
        summaries,
        &verdicts,
        bootstrap,
        &svgs,
        forest.as_deref(),
    );
    write_file(&dir.join("report.html"), &html)?;
    Ok(Written {
        markdown: path,
        verdict,
    })
}

/// The forest plot of the verdicts, beside report.md.
const FOREST_FILE: &str = "verdict.svg";

/// The loss chart, and the DPO chart when a DPO stage is compared: (title, file name) each.
fn write_charts(
    summaries: &[StageSummary],
    dir: &Path,
) -> Result<Vec<(String, String)>, CompareError> {
    chart::loss_chart(summaries, dir.join("loss.svg")).map_err(CompareError::Chart)?;
    let mut charts = vec![(chart::LOSS_CHART_TITLE.to_string(), "loss.svg".to_string())];
    if summaries.iter().any(|s| s.objective == Objective::Dpo) {
        chart::dpo_chart(summaries, dir.join("dpo.svg")).map_err(CompareError::Chart)?;
        charts.push((chart::DPO_CHART_TITLE.to_string(), "dpo.svg".to_string()));
    }
    Ok(charts)
}

fn write_file(path: &Path, text: &str) -> Result<(), CompareError> {
    crate::fsutil::write_atomic(path, text.as_bytes())
        .map_err(CompareError::io(format!("writing {}", path.display())))
}

/// After a whole run of a recipe with two or more leaf training stages (the
/// two schemes, or a sweep): its comparison written as `runner compare`
/// would, and the text to print. None when there is nothing to compare.
pub fn after_run(
    recipe: &Recipe,
    dag: &Dag,
    plan: &Plan,
    cache: &Cache,
) -> Result<Option<String>, CompareError> {
    if collect::leaf_training_stages(recipe, dag).len() < 2 {
        return Ok(None);
    }
    let bootstrap = bootstrap_of(recipe, None);
    let mut summaries = collect::collect(recipe, dag, plan, cache, &[], bootstrap)?;
    let written = write(
        recipe,
        &recipe.header.name.value,
        cache,
        &summaries,
        bootstrap,
    )?;
    let mut out = text::text_table(&summaries);
    if summaries.len() > 2 {
        // A sweep: a ranking says more than every pair's verdict (those are in the report).
        if let Some((metric, _)) = METRICS.iter().find(|(m, _)| {
            summaries.iter().all(|s| {
                s.evaluated
                    .evaluation
                    .as_ref()
                    .is_some_and(|e| e.metrics.contains_key(*m))
            })
        }) {
            out.push_str(&select::rank(&mut summaries, metric, bootstrap)?);
        }
        out.push_str(&format!(
            "every pair's verdict, and the ranking by other metrics (`runner compare --sort`): {}\n",
            written.markdown.display()
        ));
    } else {
        out.push_str(&written.verdict);
        out.push_str(&format!("report: {}\n", written.markdown.display()));
    }
    Ok(Some(out))
}
