//! The engine's tests, one binary: recipes and their diagnostics, keys, the
//! cache and the executor, schemas, robustness, and the layering of `src/`.

#[path = "../support/mod.rs"]
mod support;

mod cache_and_exec;
mod diagnostics;
mod keys;
mod layering;
mod one_file_kind;
mod recipe_errors;
mod robustness;
mod schemas;

/// Entry point of the child processes `Workspace::child` starts: the test
/// kinds, and the one-file kind registered in one line.
#[test]
fn child_entry() {
    support::child_entry_with(support::kinds::registry().with(one_file_kind::Probe));
}
