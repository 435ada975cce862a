//! Recipe diagnostics: every problem points at the file, line and column
//! of what the user wrote, and is rendered with the offending line shown.
//! A leaf: the engine and the stage kinds report through it.

pub mod checks;
pub mod span;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

/// One thing wrong with a recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub message: String,
    /// The primary span and its label. None when there is nothing to point at.
    pub span: Option<(Range<usize>, String)>,
    /// More places involved (the other end of a cycle, the default that set a value...).
    pub others: Vec<(Range<usize>, String)>,
    pub help: Option<String>,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Problem {
            message: message.into(),
            span: None,
            others: Vec::new(),
            help: None,
        }
    }

    /// Point at `span` with `label`. An empty span (a default value) is ignored.
    pub fn at(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        if !span.is_empty() || span.start > 0 {
            self.span = Some((span, label.into()));
        }
        self
    }

    /// The same problem with stage name `from` read as `to` (a sweep's
    /// variants report a problem they share once, under the stage's name).
    pub fn renamed(mut self, from: &str, to: &str) -> Self {
        if from != to {
            let swap = |t: &mut String| *t = t.replace(&format!("`{from}`"), &format!("`{to}`"));
            swap(&mut self.message);
            if let Some((_, label)) = &mut self.span {
                swap(label);
            }
            for (_, label) in &mut self.others {
                swap(label);
            }
            if let Some(help) = &mut self.help {
                swap(help);
            }
        }
        self
    }

    pub fn also(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        if !span.is_empty() {
            self.others.push((span, label.into()));
        }
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// All problems found in one recipe file, with its text for rendering.
#[derive(Clone, Debug)]
pub struct RecipeError {
    pub path: PathBuf,
    pub source: Arc<String>,
    pub problems: Vec<Problem>,
}

impl RecipeError {
    /// Identical problems are reported once: a bad value in
    /// `[defaults.<kind>]` is found again in every stage that inherits it.
    pub fn new(path: &Path, source: Arc<String>, mut problems: Vec<Problem>) -> Self {
        let mut seen: Vec<Problem> = Vec::new();
        problems.retain(|p| {
            let new = !seen.contains(p);
            if new {
                seen.push(p.clone());
            }
            new
        });
        RecipeError {
            path: path.to_path_buf(),
            source,
            problems,
        }
    }

    /// `file:line:col` of the first problem: what a terse message or a test checks.
    pub fn location(&self, problem: &Problem) -> String {
        match &problem.span {
            Some((span, _)) => {
                let (line, col) = line_col(&self.source, span.start);
                format!("{}:{line}:{col}", self.path.display())
            }
            None => self.path.display().to_string(),
        }
    }

    /// Render every problem as a miette report, followed by one
    /// `file:line:col: message` line each so that logs and editors can jump there.
    pub fn render(&self, color: bool) -> String {
        let handler = if color {
            miette::GraphicalReportHandler::new()
        } else {
            miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        };
        let mut out = String::new();
        for problem in &self.problems {
            let report = ProblemReport {
                problem,
                source: NamedSource::new(self.path.display().to_string(), self.source.clone()),
            };
            let _ = handler.render_report(&mut out, &report);
            out.push('\n');
        }
        let n = self.problems.len();
        out.push_str(&format!(
            "{} problem{} in {}\n",
            n,
            if n == 1 { "" } else { "s" },
            self.path.display()
        ));
        out
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            writeln!(f, "{}: {}", self.location(problem), problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for RecipeError {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

struct ProblemReport<'a> {
    problem: &'a Problem,
    source: NamedSource<Arc<String>>,
}

impl fmt::Debug for ProblemReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem.message)
    }
}

impl fmt::Display for ProblemReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problem.message)
    }
}

impl std::error::Error for ProblemReport<'_> {}

impl Diagnostic for ProblemReport<'_> {
    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let primary = self.problem.span.iter().map(|(span, label)| {
            LabeledSpan::new_primary_with_span(Some(label.clone()), span.clone())
        });
        let others = self
            .problem
            .others
            .iter()
            .map(|(span, label)| LabeledSpan::new_with_span(Some(label.clone()), span.clone()));
        Some(Box::new(primary.chain(others)))
    }

    fn help(&self) -> Option<Box<dyn fmt::Display + '_>> {
        self.problem
            .help
            .as_ref()
            .map(|h| Box::new(h.clone()) as Box<dyn fmt::Display>)
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A problem for a key nobody knows, with the closest known one as help.
pub fn unknown_key(
    key: &toml::Spanned<std::borrow::Cow<'_, str>>,
    known: &[&str],
    what: &str,
) -> Problem {
    let word = key.get_ref();
    let p =
        Problem::new(format!("unknown {what} `{word}`")).at(key.span(), format!("unknown {what}"));
    match did_you_mean(word, known.iter().copied()) {
        Some(s) => p.help(format!("did you mean `{s}`?")),
        None => p.help(format!("expected one of: {}", known.join(", "))),
    }
}

/// Turn a toml/serde error into a problem, adding "did you mean" to unknown keys.
pub fn toml_problem(e: &toml::de::Error, context: &str) -> Problem {
    let message = e.message().trim().to_string();
    let span = e.span().unwrap_or(0..0);
    let mut problem = Problem::new(message.clone()).at(span, context.to_string());
    if let Some((word, expected)) = parse_unknown_field(&message) {
        let candidates: Vec<&str> = expected.iter().map(String::as_str).collect();
        problem.message = format!("unknown key `{word}`");
        problem = match did_you_mean(&word, candidates.iter().copied()) {
            Some(s) => problem.help(format!("did you mean `{s}`?")),
            None => problem.help(format!("expected one of: {}", candidates.join(", "))),
        };
    }
    problem
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`").
fn parse_unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (word, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((word.to_string(), expected))
}
