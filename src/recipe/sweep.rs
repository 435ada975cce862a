//! Expanding sweeps into stages: a stage with a `matrix` becomes one stage
//! per combination (`matrix` works out the combinations), and a stage
//! referring to a swept stage becomes one per variant of it.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{check_stage_name, matrix, parse_stage, Context};
use crate::diag::Problem;
use crate::stage::Stage;

/// A stage table as written, its matrix taken out, and the stages it refers to.
struct Entry<'a, 'i> {
    name: &'a Spanned<std::borrow::Cow<'i, str>>,
    span: Range<usize>,
    table: DeTable<'i>,
    matrix: matrix::Matrix<'i>,
    /// (field, target) of each reference, read off a trial parse.
    refs: Vec<(&'static str, String)>,
}

/// Parse every stage, expanding sweeps: a stage with a `matrix` becomes one
/// stage per combination, and a stage referring to a swept stage becomes one
/// per variant of it (joined on shared axes). Stages come back in written order.
pub(super) fn expand_stages<'i>(
    table: &DeTable<'i>,
    cx: &Context<'_, 'i>,
    problems: &mut Vec<Problem>,
) -> Vec<Stage> {
    let entries = read_entries(table, cx, problems);
    let mut variants: Variants = BTreeMap::new();
    let mut stages = Vec::new();
    for i in dependency_order(&entries) {
        let entry = &entries[i];
        let base = entry.name.get_ref().to_string();
        match expand_one(entry, &variants, cx) {
            Ok(made) => {
                let mut list = Vec::new();
                for (stage, coordinates) in made {
                    if !coordinates.is_empty() {
                        list.push((stage.name.value.clone(), coordinates));
                    }
                    stages.push(stage);
                }
                if !list.is_empty() {
                    variants.insert(base, list);
                }
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    // Written order; a sweep's variants stay in the order they were made.
    stages.sort_by_key(|s| s.span.start);
    stages
}

/// Each swept stage's variants so far: (variant name, its coordinates).
type Variants = BTreeMap<String, Vec<(String, Vec<matrix::Coordinate>)>>;

/// The stage tables as written, in written order, their matrices taken out.
fn read_entries<'a, 'i>(
    table: &'a DeTable<'i>,
    cx: &Context<'_, 'i>,
    problems: &mut Vec<Problem>,
) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<Entry<'_, 'i>> = Vec::new();
    for (name, value) in table.iter() {
        let stage_name = name.get_ref().to_string();
        let DeValue::Table(t) = value.get_ref() else {
            problems.push(
                Problem::new(format!("stage `{stage_name}` must be a table"))
                    .at(value.span(), "expected a table with `kind = \"...\"`"),
            );
            continue;
        };
        if let Err(p) = check_stage_name(&stage_name, name.span()) {
            problems.push(p);
            continue;
        }
        let mut t = t.clone();
        let matrix = match matrix::take(&mut t) {
            Ok(m) => m,
            Err(mut p) => {
                problems.append(&mut p);
                continue;
            }
        };
        // The references decide what fans out; a trial parse of the first
        // combination finds them (its problems are reported by the real parse).
        let mut trial = t.clone();
        if let Some(first) = matrix.combinations().first() {
            let _ = matrix.apply(&mut trial, first);
        }
        let refs = parse_stage(&stage_name, name.span(), value.span(), &trial, cx)
            .map(|s| {
                s.refs()
                    .into_iter()
                    .map(|r| (r.field, r.target.value))
                    .collect()
            })
            .unwrap_or_default();
        entries.push(Entry {
            name,
            span: value.span(),
            table: t,
            matrix,
            refs,
        });
    }
    entries.sort_by_key(|e| e.span.start);
    entries
}

/// Referenced stages first, so their variants are known; a cycle is the graph's to report.
fn dependency_order(entries: &[Entry<'_, '_>]) -> Vec<usize> {
    let index: BTreeMap<String, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.get_ref().to_string(), i))
        .collect();
    let mut order = Vec::new();
    let mut state = vec![0u8; entries.len()];
    fn visit(
        i: usize,
        entries: &[Entry<'_, '_>],
        index: &BTreeMap<String, usize>,
        state: &mut [u8],
        order: &mut Vec<usize>,
    ) {
        if state[i] != 0 {
            return;
        }
        state[i] = 1;
        for (_, target) in &entries[i].refs {
            if let Some(&j) = index.get(target) {
                visit(j, entries, index, state, order);
            }
        }
        state[i] = 2;
        order.push(i);
    }
    for i in 0..entries.len() {
        visit(i, entries, &index, &mut state, &mut order);
    }
    order
}

/// One variant of a stage being worked out: (its coordinates, field ->
/// the variant that field now names, its own matrix combination).
type Partial = (
    Vec<matrix::Coordinate>,
    BTreeMap<&'static str, String>,
    Option<Vec<usize>>,
);

/// The stages one written stage becomes, with each one's coordinates (none when not swept).
fn expand_one<'i>(
    entry: &Entry<'_, 'i>,
    variants: &Variants,
    cx: &Context<'_, 'i>,
) -> Result<Vec<(Stage, Vec<matrix::Coordinate>)>, Vec<Problem>> {
    let partial = inherited(entry, variants).map_err(|p| vec![p])?;
    let partial = own_matrix(entry, partial).map_err(|p| vec![p])?;
    check_export(entry, &partial, cx).map_err(|p| vec![p])?;
    make_variants(entry, partial, cx)
}

impl Entry<'_, '_> {
    fn base(&self) -> String {
        self.name.get_ref().to_string()
    }

    /// Where `field` is written in the table (the stage's name when it is not).
    fn field_span(&self, field: &str) -> Range<usize> {
        self.table
            .get(field)
            .map(|v| v.span())
            .unwrap_or_else(|| self.name.span())
    }
}

/// The variants a stage fans out to from the swept stages it refers to,
/// joined on shared axes.
fn inherited(entry: &Entry<'_, '_>, variants: &Variants) -> Result<Vec<Partial>, Problem> {
    let base = entry.base();
    let mut partial: Vec<Partial> = vec![(Vec::new(), BTreeMap::new(), None)];
    let mut fanned: Vec<&str> = Vec::new();
    for (field, target) in &entry.refs {
        let Some(of_target) = variants.get(target) else {
            continue;
        };
        if fanned.contains(&target.as_str()) {
            continue;
        }
        fanned.push(target);
        let fields: Vec<&'static str> = entry
            .refs
            .iter()
            .filter(|(_, t)| t == target)
            .map(|(f, _)| *f)
            .collect();
        let mut next = Vec::new();
        for (coordinates, subst, _) in &partial {
            for (name, theirs) in of_target {
                if let Some(joined) = matrix::join(coordinates, theirs) {
                    let mut subst = subst.clone();
                    for f in &fields {
                        subst.insert(*f, name.clone());
                    }
                    next.push((joined, subst, None));
                }
            }
        }
        if next.is_empty() {
            return Err(Problem::new(format!(
                "stage `{base}`: no variant of `{target}` agrees with the other swept stages it refers to"
            ))
            .at(entry.field_span(field), "fans out over the variants of this stage")
            .help("swept stages are joined on the parameter paths they share; give them common values, or name one variant (`stage@...`)"));
        }
        partial = next;
    }
    Ok(partial)
}

/// The inherited variants crossed with the stage's own matrix, joined on shared axes.
fn own_matrix(entry: &Entry<'_, '_>, mut partial: Vec<Partial>) -> Result<Vec<Partial>, Problem> {
    let base = entry.base();
    if !entry.matrix.axes.is_empty() {
        let combinations = entry.matrix.combinations();
        let mut next = Vec::new();
        for (coordinates, subst, _) in &partial {
            for combination in &combinations {
                let own = entry.matrix.coordinates(&base, combination);
                if let Some(joined) = matrix::join(coordinates, &own) {
                    next.push((joined, subst.clone(), Some(combination.clone())));
                }
            }
        }
        if next.is_empty() {
            return Err(Problem::new(format!(
                "stage `{base}`: no value of its matrix agrees with the swept stages it refers to"
            ))
            .at(entry.matrix.axes[0].key_span.clone(), "joined with the inherited axis of this path")
            .help("write `fan_out = \"cross\"` in the stage to cross the axes instead of joining them"));
        }
        partial = next;
    }
    Ok(partial)
}

/// An export of a swept stage would write every variant to one folder.
fn check_export(
    entry: &Entry<'_, '_>,
    partial: &[Partial],
    cx: &Context<'_, '_>,
) -> Result<(), Problem> {
    let swept = partial.iter().any(|(c, _, _)| !c.is_empty());
    if swept && entry.matrix.axes.is_empty() {
        if let Some(kind) = entry
            .table
            .get("kind")
            .and_then(|k| k.get_ref().as_str())
            .and_then(|k| cx.registry.get(k))
        {
            if kind.role() == crate::stage::Role::Export {
                return Err(Problem::new(format!(
                    "stage `{}` would export every variant of a swept stage to the same folder",
                    entry.base()
                ))
                .at(entry.name.span(), "this export")
                .help("refer to one variant (`from = \"stage@...\"`)"));
            }
        }
    }
    Ok(())
}

/// Each variant's table (its matrix values and the variants it refers to
/// written in) parsed as a stage of its own.
fn make_variants<'i>(
    entry: &Entry<'_, 'i>,
    partial: Vec<Partial>,
    cx: &Context<'_, 'i>,
) -> Result<Vec<(Stage, Vec<matrix::Coordinate>)>, Vec<Problem>> {
    let base = entry.base();
    let mut problems = Vec::new();
    let mut made: Vec<(Stage, Vec<matrix::Coordinate>)> = Vec::new();
    for (coordinates, subst, combination) in partial {
        let name = if coordinates.is_empty() {
            base.clone()
        } else {
            matrix::variant_name(&base, &coordinates)
        };
        if made.iter().any(|(s, _)| s.name.value == name) {
            problems.push(
                Problem::new(format!(
                    "two variants of `{base}` would both be named `{name}`"
                ))
                .at(entry.name.span(), "this stage")
                .help("values that differ only in punctuation read the same in stage names"),
            );
            continue;
        }
        let mut table = entry.table.clone();
        if let Some(combination) = &combination {
            if let Err(p) = entry.matrix.apply(&mut table, combination) {
                problems.push(p);
                continue;
            }
        }
        for (field, target) in &subst {
            let span = entry.field_span(field);
            table.remove(*field);
            table.insert(
                Spanned::new(span.clone(), std::borrow::Cow::Borrowed(*field)),
                Spanned::new(
                    span,
                    DeValue::String(std::borrow::Cow::Owned(target.clone())),
                ),
            );
        }
        match parse_stage(&name, entry.name.span(), entry.span.clone(), &table, cx) {
            Ok(mut stage) => {
                if !coordinates.is_empty() {
                    stage.variant = Some(crate::stage::Variant {
                        of: base.clone(),
                        values: coordinates
                            .iter()
                            .map(|c| (c.path.clone(), c.text.clone()))
                            .collect(),
                    });
                }
                made.push((stage, coordinates));
            }
            // Said once for the stage, not once per variant (a swept value's
            // problem points at its place in the matrix).
            Err(found) => problems.extend(found.into_iter().map(|p| p.renamed(&name, &base))),
        }
    }
    if problems.is_empty() {
        Ok(made)
    } else {
        Err(problems)
    }
}
