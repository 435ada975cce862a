//! What every command starts from: the global options, a recipe loaded and
//! type-checked, the cache opened and a plan made.

use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::diag::Problem;
use crate::executor::ExecError;
use crate::graph::{self, Dag};
use crate::plan::{self, Overrides, Plan};
use crate::recipe::{self, LoadError, Recipe};
use crate::stage::{DeviceSpec, Registry};

use super::Error;

/// The options every command shares, and the stage kinds it knows.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub cache: PathBuf,
    pub threads: Option<usize>,
    /// `--device`, overriding the recipe's.
    pub device: Option<DeviceSpec>,
    /// `--remote`, overriding the recipe's `[cache] remote`.
    pub remote: Option<String>,
    /// `--no-remote`.
    pub no_remote: bool,
}

/// A recipe loaded and type-checked.
pub struct Checked {
    pub recipe: Recipe,
    pub dag: Dag,
}

impl Context<'_> {
    /// The cache, with the remote of `--remote` (or RUNNER_REMOTE) if any.
    pub fn open_cache(&self) -> Result<Cache, Error> {
        self.open_cache_for(None)
    }

    /// The cache, with the remote of `--remote`, else of the recipe's
    /// `[cache] remote`; none with `--no-remote`.
    pub fn open_cache_for(&self, recipe: Option<&Recipe>) -> Result<Cache, Error> {
        let mut cache = Cache::open(&self.cache)
            .map_err(Error::io(format!("cache {}", self.cache.display())))?;
        let url = match self.no_remote {
            true => None,
            false => self
                .remote
                .as_ref()
                .or_else(|| recipe.and_then(|r| r.remote.as_ref())),
        };
        if let Some(url) = url {
            let remote = crate::remote::Remote::open(url)
                .map_err(Error::remote(format!("remote cache {url}")))?;
            cache.remote = Some(std::sync::Arc::new(remote));
        }
        Ok(cache)
    }

    pub fn check(&self, path: &Path) -> Result<Checked, Error> {
        let recipe = recipe::load(path, self.registry).map_err(|e| match e {
            LoadError::Io { path, source } => Error::RecipeUnreadable { path, source },
            LoadError::Invalid(e) => Error::Recipe(e),
        })?;
        let dag = graph::build(&recipe)?;
        Ok(Checked { recipe, dag })
    }

    /// The device the recipe's stages compute on: `--device`, else the recipe's
    /// `device`, with `auto` decided and a GPU checked to be there.
    pub(super) fn resolve_device(&self, checked: &Checked) -> Result<DeviceSpec, Error> {
        let header = &checked.recipe.header.device;
        let (wanted, span) = match &self.device {
            Some(d) => (d, 0..0),
            None => (&header.value, header.span.clone()),
        };
        crate::device::resolve(wanted).map_err(|e| {
            Error::Recipe(
                checked
                    .recipe
                    .error(vec![Problem::new(e.to_string()).at(span, "device")]),
            )
        })
    }

    /// The plan of `checked` with the stages in `force` rerun whatever their cache says.
    pub fn plan(&self, checked: &Checked, cache: &Cache, force: &[String]) -> Result<Plan, Error> {
        let overrides = Overrides {
            force: force.to_vec(),
            device: self.resolve_device(checked)?,
        };
        plan::plan(&checked.recipe, &checked.dag, cache, &overrides).map_err(|e| match e {
            plan::PlanError::Recipe(e) => Error::Recipe(e),
            plan::PlanError::Io(e) => Error::io(format!("cache {}", cache.root.display()))(e),
            plan::PlanError::Remote(e) => Error::remote("looking stages up in the remote cache")(e),
        })
    }

    /// The stages of `plan` that will run (those of `only`) against this
    /// machine's memory: warnings printed, stages that cannot fit refused
    /// at their lines (exit 2), or only warned of with `ignore`.
    pub fn check_memory(
        &self,
        checked: &Checked,
        plan: &Plan,
        only: Option<&[usize]>,
        ignore: bool,
    ) -> Result<(), Error> {
        let offered = crate::plan::memory_check::Offered {
            host: crate::machine::memory().map_err(Error::Usage)?,
            gpu: match plan.device {
                crate::stage::DeviceSpec::Cuda(n) => {
                    crate::machine::gpu_memory(n).map_err(Error::Usage)?
                }
                _ => None,
            },
        };
        let found = crate::plan::memory_check::check(&checked.recipe, plan, only, &offered);
        for warning in &found.warnings {
            eprintln!("warning: {warning}");
        }
        if found.refused.is_empty() {
            return Ok(());
        }
        if ignore {
            for problem in &found.refused {
                eprintln!("warning (--ignore-memory-check): {}", problem.message);
            }
            return Ok(());
        }
        Err(Error::Recipe(checked.recipe.error(found.refused)))
    }

    /// `recipe` checked, the cache opened, and the plan made with no stage forced.
    pub fn check_and_plan(&self, recipe: &Path) -> Result<(Checked, Cache, Plan), Error> {
        let checked = self.check(recipe)?;
        let cache = self.open_cache_for(Some(&checked.recipe))?;
        let plan = self.plan(&checked, &cache, &[])?;
        Ok((checked, cache, plan))
    }

    /// The cached artifact of `stage` in `recipe`, or a usage error saying how to make it.
    pub fn cached_artifact(
        &self,
        recipe: &Path,
        stage: &str,
    ) -> Result<(Checked, Cache, String), Error> {
        let (checked, cache, plan) = self.check_and_plan(recipe)?;
        let artifact = cached_in(&plan, recipe, stage)?;
        Ok((checked, cache, artifact))
    }
}

/// The cached artifact of `stage` in an already made `plan`, or a usage
/// error saying how to make it.
pub fn cached_in(plan: &Plan, recipe: &Path, stage: &str) -> Result<String, Error> {
    let planned = plan
        .by_name(stage)
        .ok_or_else(|| Error::no_stage(stage, recipe))?;
    match &planned.status {
        plan::Status::Cached { artifact } => Ok(artifact.clone()),
        _ => Err(Error::NotCached {
            stage: stage.to_string(),
            reason: planned.reason(),
            recipe: recipe.to_path_buf(),
        }),
    }
}

/// The stages named on the command line (`--force`, `push`, `pull`), a
/// swept stage's own name standing for all its variants.
pub fn named_stages(
    checked: &Checked,
    recipe: &Path,
    names: &[String],
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for name in names {
        let named = checked.recipe.stages_named(name);
        if named.is_empty() {
            return Err(Error::no_stage(name, recipe));
        }
        out.extend(named.into_iter().map(str::to_string));
    }
    Ok(out)
}

/// Errors of selecting and running stages: a name or an order the user got wrong, or I/O.
pub fn exec_error(e: ExecError) -> Error {
    match e {
        ExecError::Io(e) => Error::io("running stages")(e),
        ExecError::Remote(why) => Error::Environment {
            context: "the remote cache".into(),
            source: anyhow::anyhow!(why),
        },
        other => Error::Select(other),
    }
}
