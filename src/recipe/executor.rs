//! The recipe's `[executor.slurm]` table: how stages are submitted when they
//! run as Slurm jobs. None of it enters a stage key: where a stage runs does
//! not change what it makes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::de::DeValue;
use toml::Spanned;

use crate::diag::{did_you_mean, toml_problem, Problem};

/// `[executor]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSection {
    /// Settings for `runner run --executor slurm`.
    #[serde(default)]
    pub slurm: SlurmSection,
}

/// `[executor.slurm]`: the settings of every job, then overrides per stage
/// kind (`[executor.slurm.kind.merge]`) and per stage
/// (`[executor.slurm.stage.dpo_fresh]`, which covers all its variants).
#[derive(Clone, Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time`, in any form sbatch reads ("30", "2:00:00", "1-00:00:00").
    pub time: Option<String>,
    /// `--cpus-per-task`; also the stage's compute threads (default 1).
    pub cpus: Option<u32>,
    /// `--mem` ("16G").
    pub memory: Option<String>,
    /// `--gres` ("gpu:1").
    pub gres: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// More `sbatch` arguments, passed as given (["--qos=short"]).
    pub extra: Option<Vec<String>>,
    /// Overrides by stage kind.
    #[serde(default)]
    pub kind: BTreeMap<String, SlurmSettings>,
    /// Overrides by stage name (a swept stage's name covers its variants; a variant's name wins).
    #[serde(default)]
    pub stage: BTreeMap<String, SlurmSettings>,
}

/// The settings of one job; unset fields fall back to the level above, and an
/// empty string passes no flag at all (`gres = ""`: no GPU for this kind).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub time: Option<String>,
    pub cpus: Option<u32>,
    pub memory: Option<String>,
    pub gres: Option<String>,
    pub account: Option<String>,
    pub extra: Option<Vec<String>>,
}

impl SlurmSettings {
    /// `self`, with unset fields taken from `under`.
    fn over(self, under: SlurmSettings) -> SlurmSettings {
        SlurmSettings {
            partition: self.partition.or(under.partition),
            time: self.time.or(under.time),
            cpus: self.cpus.or(under.cpus),
            memory: self.memory.or(under.memory),
            gres: self.gres.or(under.gres),
            account: self.account.or(under.account),
            extra: self.extra.or(under.extra),
        }
    }
}

impl SlurmSection {
    /// The settings of one stage's job: stage (variant, then the stage as
    /// written) over kind over the table's own.
    pub fn settings(&self, kind: &str, stage: &str, written_as: Option<&str>) -> SlurmSettings {
        let base = SlurmSettings {
            partition: self.partition.clone(),
            time: self.time.clone(),
            cpus: self.cpus,
            memory: self.memory.clone(),
            gres: self.gres.clone(),
            account: self.account.clone(),
            extra: self.extra.clone(),
        };
        let by_kind = self.kind.get(kind).cloned().unwrap_or_default();
        let by_written = written_as
            .and_then(|w| self.stage.get(w))
            .cloned()
            .unwrap_or_default();
        let by_stage = self.stage.get(stage).cloned().unwrap_or_default();
        by_stage.over(by_written.over(by_kind.over(base)))
    }
}

/// Parse `[executor]`; `kinds` and `stages` are the names overrides may use.
pub fn parse(
    value: &Spanned<DeValue<'_>>,
    kinds: &[&str],
    stages: &[String],
    problems: &mut Vec<Problem>,
) -> ExecutorSection {
    let section =
        match ExecutorSection::deserialize(toml::de::ValueDeserializer::from(value.clone())) {
            Ok(s) => s,
            Err(e) => {
                problems.push(toml_problem(&e, "in [executor]"));
                return ExecutorSection::default();
            }
        };
    // Names under `kind` and `stage` must exist; find their spans in the table.
    let slurm = match value.get_ref() {
        DeValue::Table(t) => t.get("slurm"),
        _ => None,
    };
    if let Some(DeValue::Table(slurm)) = slurm.map(|s| s.get_ref()) {
        for (table, known, what) in [
            (
                "kind",
                kinds.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "stage kind",
            ),
            ("stage", stages.to_vec(), "stage"),
        ] {
            let Some(DeValue::Table(named)) = slurm.get(table).map(|t| t.get_ref()) else {
                continue;
            };
            for (name, _) in named.iter() {
                let name_str = name.get_ref().as_ref();
                if !known.iter().any(|k| k == name_str) {
                    let mut p = Problem::new(format!(
                        "[executor.slurm.{table}.{name_str}]: no {what} `{name_str}`"
                    ))
                    .at(name.span(), format!("not a {what} of this recipe"));
                    if let Some(s) = did_you_mean(name_str, known.iter().map(String::as_str)) {
                        p = p.help(format!("did you mean `{s}`?"));
                    }
                    problems.push(p);
                }
            }
        }
    }
    section
}
