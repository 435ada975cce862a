//! Sweeps: `matrix = { "dpo.beta" = [0.1, 0.5], "lora.r" = [8, 16] }` in a
//! stage table. The stage expands into one stage per combination, named
//! `stage@beta=0.1-r=8`; stages that refer to a swept stage fan out with it.
//! Axes are identified by their parameter path, so two swept stages that
//! sweep the same path are joined on it (one variant per shared value),
//! not crossed, unless the stage says `fan_out = "cross"`.
//!
//! Everything here works on the TOML table as written, before a kind parses
//! it: a swept value keeps the span of its place in the matrix, so a kind's
//! own check of that value (out of range, unknown key) points there.

use std::borrow::Cow;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::Problem;

/// Keys a stage table may carry besides its kind's parameters.
pub const MATRIX: &str = "matrix";
pub const FAN_OUT: &str = "fan_out";

/// One swept parameter.
#[derive(Clone, Debug)]
pub struct Axis<'i> {
    /// Dotted path as written (`dpo.beta`).
    pub path: String,
    pub segments: Vec<String>,
    /// Span of the path key in the matrix.
    pub key_span: Range<usize>,
    pub values: Vec<Spanned<DeValue<'i>>>,
}

/// A stage's `matrix` (axes in written order) and how it meets swept inputs.
#[derive(Clone, Debug, Default)]
pub struct Matrix<'i> {
    pub axes: Vec<Axis<'i>>,
    /// `fan_out = "cross"`: the stage's own axes are not joined with axes of
    /// the same path inherited from the stages it refers to.
    pub cross: bool,
}

/// One coordinate of a variant: which axis, and which value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coordinate {
    /// What joins axes: the parameter path, or `stage:path` for a crossed axis.
    pub id: String,
    pub path: String,
    /// The value as written, for names and display.
    pub text: String,
    /// The value in a canonical form, for joining (`0.1` and `1e-1` agree).
    pub canonical: String,
}

/// Remove `matrix` and `fan_out` from a stage table and check them.
pub fn take<'i>(table: &mut DeTable<'i>) -> Result<Matrix<'i>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut matrix = Matrix::default();
    if let Some(mode) = table.remove(FAN_OUT) {
        match mode.get_ref().as_str() {
            Some("join") => {}
            Some("cross") => matrix.cross = true,
            _ => problems.push(
                Problem::new("`fan_out` must be \"join\" or \"cross\"")
                    .at(mode.span(), "expected \"join\" or \"cross\"")
                    .help("\"join\" (the default) pairs axes of the same parameter path with the swept stages this one refers to; \"cross\" crosses them"),
            ),
        }
    }
    let Some(value) = table.remove(MATRIX) else {
        return if problems.is_empty() {
            Ok(matrix)
        } else {
            Err(problems)
        };
    };
    let DeValue::Table(axes) = value.get_ref() else {
        problems.push(
            Problem::new("`matrix` must be a table of parameter paths to lists of values")
                .at(value.span(), "expected a table")
                .help("for example: matrix = { \"dpo.beta\" = [0.1, 0.5], \"lora.r\" = [8, 16] }"),
        );
        return Err(problems);
    };
    if axes.is_empty() {
        problems.push(
            Problem::new("`matrix` is empty")
                .at(value.span(), "no parameter to sweep")
                .help("name at least one parameter path, or remove `matrix`"),
        );
    }
    for (key, values) in axes.iter() {
        let path = key.get_ref().to_string();
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(|s| s.is_empty()) || path.contains(['@', '=']) {
            problems.push(
                Problem::new(format!("`{path}` is not a parameter path"))
                    .at(key.span(), "expected keys joined by dots, like `dpo.beta`"),
            );
            continue;
        }
        if matches!(segments[0].as_str(), "kind" | MATRIX | FAN_OUT) {
            problems.push(
                Problem::new(format!("`{}` cannot be swept", segments[0]))
                    .at(key.span(), "not a parameter"),
            );
            continue;
        }
        match values.get_ref() {
            DeValue::Array(list) if list.is_empty() => problems.push(
                Problem::new(format!("matrix axis `{path}` has no values"))
                    .at(values.span(), "empty list")
                    .help("give at least one value, or remove the axis"),
            ),
            DeValue::Array(list) => {
                let mut seen: Vec<String> = Vec::new();
                for v in list.iter() {
                    let c = canonical(v.get_ref());
                    if seen.contains(&c) {
                        problems.push(
                            Problem::new(format!("matrix axis `{path}` lists a value twice"))
                                .at(v.span(), "repeated value"),
                        );
                    }
                    seen.push(c);
                }
                matrix.axes.push(Axis {
                    path,
                    segments,
                    key_span: key.span(),
                    values: list.iter().cloned().collect(),
                });
            }
            other => problems.push(
                Problem::new(format!(
                    "matrix axis `{path}` must be a list of values, found {}",
                    other.type_str()
                ))
                .at(values.span(), "expected a list, like [0.1, 0.5]"),
            ),
        }
    }
    // Tables are stored sorted; spans keep the file's order.
    matrix.axes.sort_by_key(|a| a.key_span.start);
    if problems.is_empty() {
        Ok(matrix)
    } else {
        Err(problems)
    }
}

impl<'i> Matrix<'i> {
    /// Every combination of the axes' values, first axis slowest: indices into `values`.
    pub fn combinations(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new()];
        for axis in &self.axes {
            out = out
                .into_iter()
                .flat_map(|prefix| {
                    (0..axis.values.len()).map(move |i| {
                        let mut c = prefix.clone();
                        c.push(i);
                        c
                    })
                })
                .collect();
        }
        out
    }

    /// The coordinates of one combination, for stage `stage`.
    pub fn coordinates(&self, stage: &str, combination: &[usize]) -> Vec<Coordinate> {
        self.axes
            .iter()
            .zip(combination)
            .map(|(axis, &i)| {
                let v = axis.values[i].get_ref();
                Coordinate {
                    id: if self.cross {
                        format!("{stage}:{}", axis.path)
                    } else {
                        axis.path.clone()
                    },
                    path: axis.path.clone(),
                    text: written(v),
                    canonical: canonical(v),
                }
            })
            .collect()
    }

    /// Write one combination's values into a stage table.
    pub fn apply(&self, table: &mut DeTable<'i>, combination: &[usize]) -> Result<(), Problem> {
        for (axis, &i) in self.axes.iter().zip(combination) {
            set_path(table, axis, &axis.values[i])?;
        }
        Ok(())
    }
}

/// Set `axis.path` in `table` to `value`, creating tables on the way.
fn set_path<'i>(
    table: &mut DeTable<'i>,
    axis: &Axis<'i>,
    value: &Spanned<DeValue<'i>>,
) -> Result<(), Problem> {
    let mut here = table;
    let (last, parents) = axis.segments.split_last().expect("a path has segments");
    for (depth, segment) in parents.iter().enumerate() {
        if here.get(segment.as_str()).is_none() {
            here.insert(
                Spanned::new(axis.key_span.clone(), Cow::Owned(segment.clone())),
                Spanned::new(axis.key_span.clone(), DeValue::Table(DeTable::new())),
            );
        }
        let entry = here.get_mut(segment.as_str()).expect("just inserted");
        let span = entry.span();
        match entry.get_mut() {
            DeValue::Table(t) => here = t,
            other => {
                let prefix = axis.segments[..=depth].join(".");
                return Err(Problem::new(format!(
                    "matrix axis `{}`: `{prefix}` is {}, not a table",
                    axis.path,
                    other.type_str()
                ))
                .at(axis.key_span.clone(), "this path")
                .also(span, "set here"));
            }
        }
    }
    here.remove(last.as_str());
    here.insert(
        Spanned::new(axis.key_span.clone(), Cow::Owned(last.clone())),
        value.clone(),
    );
    Ok(())
}

/// Join coordinate lists: `None` when they disagree on a shared axis.
pub fn join(a: &[Coordinate], b: &[Coordinate]) -> Option<Vec<Coordinate>> {
    let mut out = a.to_vec();
    for c in b {
        match a.iter().find(|x| x.id == c.id) {
            Some(x) if x.canonical != c.canonical => return None,
            Some(_) => {}
            None => out.push(c.clone()),
        }
    }
    Some(out)
}

/// `stage@beta=0.1-r=8`: each axis by its last path segment, or by its
/// whole path where two axes would otherwise read the same.
pub fn variant_name(stage: &str, coordinates: &[Coordinate]) -> String {
    let short = |c: &Coordinate| c.path.rsplit('.').next().unwrap_or(&c.path).to_string();
    let parts: Vec<String> = coordinates
        .iter()
        .map(|c| {
            let clash = coordinates
                .iter()
                .filter(|o| o.id != c.id && short(o) == short(c))
                .count()
                > 0;
            let label = if clash { c.path.clone() } else { short(c) };
            format!("{label}={}", name_safe(&c.text))
        })
        .collect();
    format!("{stage}@{}", parts.join("-"))
}

/// Characters that stay readable in file names, job names and shells.
fn name_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A value as the user wrote it (strings unquoted, lists joined by `+`).
fn written(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(f) => f.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(a) => a
            .iter()
            .map(|v| written(v.get_ref()))
            .collect::<Vec<_>>()
            .join("+"),
        DeValue::Table(_) => canonical(v),
    }
}

/// A value in one spelling per meaning: what joins compare.
fn canonical(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{s:?}"),
        DeValue::Integer(i) => i
            .as_str()
            .replace('_', "")
            .parse::<i64>()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| i.to_string()),
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .map(|x| format!("{x:?}"))
            .unwrap_or_else(|_| f.to_string()),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        DeValue::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|v| canonical(v.get_ref()))
                .collect::<Vec<_>>()
                .join(",")
        ),
        DeValue::Table(t) => {
            let mut entries: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{}={}", k.get_ref(), canonical(v.get_ref())))
                .collect();
            entries.sort();
            format!("{{{}}}", entries.join(","))
        }
    }
}
