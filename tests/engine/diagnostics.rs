//! Whole rendered diagnostics, as a user sees them on a terminal without
//! colour: the message, the file:line:col, the source line with its carets
//! and labels, the help, and the summary line.

use crate::support::Workspace;

/// Render the problems of `text` (written to `<ws>/recipe.toml`) as `runner` prints them.
fn rendered(text: &str) -> String {
    let ws = Workspace::new();
    let path = ws.write("recipe.toml", text);
    let registry = crate::support::kinds::registry();
    let error = match lora_runner::recipe::load(&path, &registry) {
        Err(lora_runner::recipe::LoadError::Invalid(e)) => e,
        Err(e) => panic!("{e}"),
        Ok(recipe) => lora_runner::graph::build(&recipe).expect_err("the recipe has a problem"),
    };
    error
        .render(false)
        .replace(&ws.dir.path().display().to_string(), "<ws>")
}

const TWICE: &str = r#"[recipe]
name = "twice"

[stages.base]
kind = "base"
init = { hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 512 }

[stages.sft]
kind = "sft"
model = "base"
data = { train = "sft.jsonl" }

[stages.merged]
kind = "merge"
model = "base"
adapter = "sft"

[stages.dpo]
kind = "dpo"
model = "merged"
adapter = "sft"
data = { train = "dpo.jsonl" }
"#;

const RANGE: &str = r#"[recipe]
name = "range"

[stages.base]
kind = "base"
init = { hidden = 64, layers = 2, heads = 4, kv_heads = 2, ffn = 128, vocab = 512 }

[stages.sft]
kind = "sft"
model = "base"
data = { train = "sft.jsonl" }
train = { steps = 0, lr = 1e-3 }
lora = { r = 8, targets = ["q_prj"] }
"#;

const TYPO: &str = "[recipe]\nname = \"x\"\n\n[stages.base]\nkind = \"bsae\"\n";

#[test]
fn an_unknown_kind_points_at_it_and_suggests_the_closest() {
    assert_eq!(
        rendered(TYPO),
        r#"  × unknown stage kind `bsae`
   ╭─[<ws>/recipe.toml:5:8]
 4 │ [stages.base]
 5 │ kind = "bsae"
   ·        ───┬──
   ·           ╰── not a stage kind
   ╰────
  help: did you mean `base`?

1 problem in <ws>/recipe.toml
"#
    );
}

#[test]
fn an_adapter_applied_twice_names_both_references_and_both_ways_out() {
    assert_eq!(
        rendered(TWICE),
        r#"  × stage `dpo` applies adapter `sft` to `merged`, which already contains it (merged by stage `merged`): it would be applied twice
    ╭─[<ws>/recipe.toml:21:11]
 19 │ kind = "dpo"
 20 │ model = "merged"
    ·         ────┬───
    ·             ╰── `merged` includes `sft`
 21 │ adapter = "sft"
    ·           ──┬──
    ·             ╰── already merged into the model
 22 │ data = { train = "dpo.jsonl" }
    ╰────
  help: to train further on the merged model, drop `adapter` and declare a new `lora` (scheme two); to continue `sft` itself, use `model = "base"` (scheme one)

1 problem in <ws>/recipe.toml
"#
    );
}

#[test]
fn an_out_of_range_value_points_at_the_value() {
    assert_eq!(
        rendered(RANGE),
        r#"  × `train.steps` must be >= 1, got 0
    ╭─[<ws>/recipe.toml:12:19]
 11 │ data = { train = "sft.jsonl" }
 12 │ train = { steps = 0, lr = 1e-3 }
    ·                   ┬
    ·                   ╰── out of range
 13 │ lora = { r = 8, targets = ["q_prj"] }
    ╰────

1 problem in <ws>/recipe.toml
"#
    );
}
