//! `runner compare`: finished training stages of one or more recipes side
//! by side, with paired intervals, a ranking and the written report.

use std::path::Path;

use super::context::Checked;
use super::{Context, Error};
use crate::compare::evaluation::Bootstrap;
use crate::compare::{report, select, CompareError, StageSummary};

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// One or more recipes (files ending in .toml), then the stages to
    /// compare: names or globs (`dpo_*`), `recipe:stage` to pick from one
    /// recipe (its [recipe] name). Default: each recipe's leaf training
    /// stages. With several recipes, stages are shown as `recipe:stage`.
    #[arg(required = true, value_name = "RECIPE.toml... [STAGE-OR-GLOB]")]
    targets: Vec<String>,
    /// Rank the stages by this per-example metric of their eval stages
    /// (e.g. sft/exact_match, preference/accuracy, sft/loss).
    #[arg(long, value_name = "METRIC")]
    sort: Option<String>,
    /// Machine-readable output instead of the table.
    #[arg(long)]
    json: bool,
    /// Bootstrap resamples for the paired 95% intervals (seeded by the recipe's seed).
    #[arg(long, default_value_t = crate::compare::bootstrap::DEFAULT_RESAMPLES)]
    resamples: usize,
}

/// The stages picked from every recipe, in order.
struct Gathered {
    summaries: Vec<StageSummary>,
    /// The recipes' names, for the report's folder.
    names: Vec<String>,
    /// The first recipe that gave a stage, and its bootstrap settings.
    first: Checked,
    bootstrap: Bootstrap,
}

pub fn compare(ctx: &Context, args: &CompareArgs) -> Result<(), Error> {
    let (recipes, selectors): (Vec<&String>, Vec<&String>) =
        args.targets.iter().partition(|t| t.ends_with(".toml"));
    let selectors: Vec<String> = selectors.into_iter().cloned().collect();
    if recipes.is_empty() {
        return Err(Error::Usage(
            "name at least one recipe (a file ending in .toml) before the stages".into(),
        ));
    }
    let cache = ctx.open_cache()?;
    let mut found = gather(ctx, &cache, &recipes, &selectors, args.resamples)?;
    let ranking = match &args.sort {
        Some(metric) => Some(select::rank(&mut found.summaries, metric, found.bootstrap)?),
        None => None,
    };
    let written = report::write(
        &found.first.recipe,
        &found.names.join("+"),
        &cache,
        &found.summaries,
        found.bootstrap,
    )?;
    if args.json {
        let mut value = crate::compare::compare_json(&found.summaries, found.bootstrap);
        value.report = Some(written.markdown.display().to_string());
        value.report_html = Some(written.html().display().to_string());
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializes")
        );
    } else {
        print!("{}", crate::compare::text_table(&found.summaries));
        print!("{}", ranking.unwrap_or_default());
        print!("{}", written.verdict);
        println!("report: {}", written.markdown.display());
    }
    Ok(())
}

/// The summaries of the stages the selectors pick (each recipe's leaf
/// training stages when there are none), recipe by recipe.
fn gather(
    ctx: &Context,
    cache: &crate::cache::Cache,
    recipes: &[&String],
    selectors: &[String],
    resamples: usize,
) -> Result<Gathered, Error> {
    let mut summaries = Vec::new();
    let mut names = Vec::new();
    let mut searched = Vec::new();
    let mut matched = vec![false; selectors.len()];
    let mut first: Option<(Checked, Bootstrap)> = None;
    for path in recipes {
        let checked = ctx.check(Path::new(path))?;
        let plan = ctx.plan(&checked, cache, &[])?;
        let name = checked.recipe.header.name.value.clone();
        searched.push(name.clone());
        // No selector: `collect` takes the leaf training stages.
        let chosen = if selectors.is_empty() {
            Vec::new()
        } else {
            let picked = pick(&checked, selectors, recipes.len() > 1, &mut matched);
            if picked.is_empty() {
                continue;
            }
            picked
        };
        let bootstrap = match &first {
            Some((_, b)) => *b,
            None => report::bootstrap_of(&checked.recipe, Some(resamples)),
        };
        let mut found = crate::compare::collect(
            &checked.recipe,
            &checked.dag,
            &plan,
            cache,
            &chosen,
            bootstrap,
        )?;
        if recipes.len() > 1 {
            for s in &mut found {
                s.name = format!("{name}:{}", s.name);
            }
        }
        names.push(name);
        summaries.extend(found);
        first.get_or_insert((checked, bootstrap));
    }
    if let Some((s, _)) = selectors.iter().zip(&matched).find(|(_, m)| !**m) {
        return Err(CompareError::NoMatch {
            selector: s.clone(),
            searched,
        }
        .into());
    }
    let Some((first, bootstrap)) = first else {
        return Err(CompareError::Nothing.into());
    };
    Ok(Gathered {
        summaries,
        names,
        first,
        bootstrap,
    })
}

/// The stages of one recipe the selectors pick; `matched` records which
/// selectors picked anything (over all recipes).
fn pick(
    checked: &Checked,
    selectors: &[String],
    several_recipes: bool,
    matched: &mut [bool],
) -> Vec<String> {
    let picked = select::select(
        &checked.recipe.header.name.value,
        &crate::compare::training_stages(&checked.recipe, &checked.dag),
        &|stage| checked.recipe.stage(stage).is_some(),
        selectors,
        several_recipes,
    );
    for (m, here) in matched.iter_mut().zip(&picked.matched) {
        *m |= here;
    }
    picked.stages
}
