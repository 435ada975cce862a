//! Every recipe and DAG check, each with the position it reports.

use crate::support;
use crate::support::Workspace;
use lora_runner::cli::exit;
use lora_runner::diag::RecipeError;

/// Load and type-check `text` as `<ws>/recipe.toml`; return the error.
fn error_of(ws: &Workspace, text: &str) -> RecipeError {
    let path = ws.write("recipe.toml", text);
    let registry = support::kinds::registry();
    match lora_runner::recipe::load(&path, &registry) {
        Err(lora_runner::recipe::LoadError::Invalid(e)) => e,
        Err(e) => panic!("unexpected error {e}"),
        Ok(recipe) => lora_runner::graph::build(&recipe).expect_err("expected a recipe error"),
    }
}

/// The (line, col, message, help) of every problem.
fn problems(e: &RecipeError) -> Vec<(String, String, String)> {
    e.problems
        .iter()
        .map(|p| {
            let loc = e.location(p);
            let loc = loc
                .rsplit_once("recipe.toml:")
                .map(|(_, l)| l.to_string())
                .unwrap_or_default();
            (loc, p.message.clone(), p.help.clone().unwrap_or_default())
        })
        .collect()
}

fn one(e: &RecipeError) -> (String, String, String) {
    let all = problems(e);
    assert_eq!(all.len(), 1, "expected one problem, got {all:#?}");
    all.into_iter().next().unwrap()
}

const HEADER: &str = "[recipe]\nname = \"t\"\n";

fn with_base(ws: &Workspace, rest: &str) -> String {
    ws.model_folder("models/m", 2);
    ws.write("data/sft.jsonl", "{}\n");
    format!("{HEADER}\n[stages.base]\nkind = \"base\"\npath = \"models/m\"\n\n{rest}")
}

const SFT: &str =
    "[stages.sft]\nkind = \"sft\"\nmodel = \"base\"\ndata = { train = \"data/sft.jsonl\" }\n";

#[test]
fn invalid_toml_points_at_the_syntax_error() {
    let ws = Workspace::new();
    let (loc, msg, _) = one(&error_of(&ws, "[recipe]\nname = \"t\"\nseed = = 3\n"));
    assert_eq!(loc, "3:8");
    assert!(!msg.is_empty());
}

#[test]
fn non_utf8_is_a_clean_error_at_the_bad_byte() {
    let ws = Workspace::new();
    let path = ws.write_bytes("recipe.toml", b"[recipe]\nname = \"\xff\"\n");
    let e = match lora_runner::recipe::load(&path, &support::kinds::registry()) {
        Err(lora_runner::recipe::LoadError::Invalid(e)) => e,
        other => panic!("{other:?}"),
    };
    let (loc, msg, _) = one(&e);
    assert_eq!(loc, "2:9");
    assert!(msg.contains("UTF-8"));
}

#[test]
fn unknown_key_suggests_the_closest() {
    let ws = Workspace::new();
    let text = with_base(&ws, &format!("{SFT}train = {{ stpes = 3 }}\n"));
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "12:11");
    assert_eq!(msg, "unknown key `stpes`");
    assert_eq!(help, "did you mean `steps`?");
}

#[test]
fn unknown_key_in_defaults_points_into_defaults() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!("[defaults.sft]\nlora = {{ alfa = 3 }}\n\n{SFT}"),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "9:10");
    assert_eq!(msg, "unknown key `alfa`");
    assert_eq!(help, "did you mean `alpha`?");
}

#[test]
fn unknown_top_level_table_and_stage_kind() {
    let ws = Workspace::new();
    let e = error_of(
        &ws,
        "[recipe]\nname = \"t\"\n[stage.x]\nkind = \"base\"\n[stages.y]\nkind = \"sfft\"\n",
    );
    let all = problems(&e);
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(all[0].0, "3:2");
    assert!(all[0].2.contains("`stages`"), "{all:#?}");
    assert_eq!(all[1].0, "6:8");
    assert_eq!(all[1].1, "unknown stage kind `sfft`");
    assert_eq!(all[1].2, "did you mean `sft`?");
}

#[test]
fn missing_recipe_table() {
    let ws = Workspace::new();
    let e = error_of(&ws, "[stages.a]\nkind = \"emit\"\nmessage = \"x\"\n");
    assert!(one(&e).1.contains("no [recipe] table"));
}

#[test]
fn numbers_are_range_checked() {
    let ws = Workspace::new();
    let cases = [
        ("lora = { r = 0 }", "`lora.r` must be >= 1, got 0", "12:14"),
        (
            "lora = { dropout = 1.0 }",
            "`lora.dropout` must be in [0, 1), got 1",
            "12:20",
        ),
        (
            "lora = { alpha = -2.0 }",
            "`lora.alpha` must be > 0, got -2",
            "12:18",
        ),
        (
            "train = { lr = 0.0 }",
            "`train.lr` must be > 0, got 0",
            "12:16",
        ),
        (
            "train = { steps = 0 }",
            "`train.steps` must be >= 1, got 0",
            "12:19",
        ),
        (
            "train = { batch = 0 }",
            "`train.batch` must be >= 1, got 0",
            "12:19",
        ),
        (
            "train = { warmup = 5, steps = 5 }",
            "`train.warmup` (5) must be smaller than `train.steps` (5)",
            "12:20",
        ),
        (
            "train = { betas = [0.9, 1.5] }",
            "`train.betas[1]` must be in [0, 1), got 1.5",
            "12:19",
        ),
    ];
    for (line, message, loc) in cases {
        let text = with_base(&ws, &format!("{SFT}{line}\n"));
        let got = one(&error_of(&ws, &text));
        assert_eq!(
            (got.0.as_str(), got.1.as_str()),
            (loc, message),
            "for `{line}`"
        );
    }
    let dpo =
        "[stages.d]\nkind = \"dpo\"\nmodel = \"base\"\ndata = { train = \"data/sft.jsonl\" }\n";
    let text = with_base(&ws, &format!("{dpo}dpo = {{ beta = 0.0 }}\n"));
    assert_eq!(
        one(&error_of(&ws, &text)).1,
        "`dpo.beta` must be > 0, got 0"
    );
}

#[test]
fn wrong_types_are_reported_at_the_value() {
    let ws = Workspace::new();
    let text = with_base(&ws, &format!("{SFT}train = {{ steps = \"ten\" }}\n"));
    let (loc, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(loc, "12:19");
    assert!(msg.contains("invalid type"), "{msg}");
}

#[test]
fn reference_to_an_unknown_stage_suggests() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        "[stages.sft]\nkind = \"sft\"\nmodel = \"bsae\"\ndata = { train = \"data/sft.jsonl\" }\n",
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "10:9");
    assert_eq!(msg, "unknown stage `bsae` in `model` of stage `sft`");
    assert_eq!(help, "did you mean `base`?");
}

#[test]
fn a_stage_referring_to_itself() {
    let ws = Workspace::new();
    let e = error_of(
        &ws,
        &format!("{HEADER}[stages.a]\nkind = \"emit\"\nmessage = \"x\"\ninput = \"a\"\n"),
    );
    let (loc, msg, _) = one(&e);
    assert_eq!(loc, "6:9");
    assert_eq!(msg, "stage `a` refers to itself in `input`");
}

#[test]
fn a_cycle_is_printed_as_a_path() {
    let ws = Workspace::new();
    let text = format!(
        "{HEADER}[stages.a]\nkind = \"emit\"\nmessage = \"x\"\ninput = \"c\"\n\
         [stages.b]\nkind = \"emit\"\nmessage = \"x\"\ninput = \"a\"\n\
         [stages.c]\nkind = \"emit\"\nmessage = \"x\"\ninput = \"b\"\n\
         [stages.d]\nkind = \"emit\"\nmessage = \"x\"\n"
    );
    let e = error_of(&ws, &text);
    let (loc, msg, _) = one(&e);
    assert_eq!(msg, "the stages form a cycle: a → c → b → a");
    assert_eq!(loc, "6:9");
    assert_eq!(
        e.problems[0].others.len(),
        2,
        "every edge of the cycle is labelled"
    );
}

#[test]
fn an_adapter_where_a_model_is_expected_and_the_reverse() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!("{SFT}\n[stages.m]\nkind = \"merge\"\nmodel = \"sft\"\nadapter = \"base\"\n"),
    );
    let all = problems(&error_of(&ws, &text));
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(all[0].0, "15:9");
    assert_eq!(
        all[0].1,
        "`model` of stage `m` expects a model, but stage `sft` (sft) makes an adapter"
    );
    assert!(all[0].2.contains("adapter = \"sft\""));
    assert_eq!(all[1].0, "16:11");
    assert_eq!(
        all[1].1,
        "`adapter` of stage `m` expects an adapter, but stage `base` (base) makes a model"
    );
}

#[test]
fn adapter_and_lora_on_one_stage_are_exclusive() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!("{SFT}\n[stages.d]\nkind = \"dpo\"\nmodel = \"base\"\nadapter = \"sft\"\nlora = {{ r = 4 }}\ndata = {{ train = \"data/sft.jsonl\" }}\n"),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "17:8");
    assert!(msg.contains("sets both `adapter`"), "{msg}");
    assert!(help.contains("scheme one"), "{help}");
}

#[test]
fn continuing_an_adapter_may_not_change_its_shape() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!(
            "[defaults.dpo]\nlora = {{ r = 16, alpha = 16 }}\n\n{SFT}lora = {{ r = 8 }}\n\n\
             [stages.d]\nkind = \"dpo\"\nmodel = \"base\"\nadapter = \"sft\"\ndata = {{ train = \"data/sft.jsonl\" }}\n"
        ),
    );
    let (loc, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(loc, "9:14", "points at the default that changes r");
    assert_eq!(
        msg,
        "stage `d` continues adapter `sft` but sets lora.r = 16 (the adapter has 8)"
    );

    // The same defaults agree with an adapter of r = 16: no error.
    let text = with_base(
        &ws,
        &format!(
            "[defaults.dpo]\nlora = {{ r = 16, alpha = 16 }}\n\n{SFT}lora = {{ r = 16 }}\n\n\
             [stages.d]\nkind = \"dpo\"\nmodel = \"base\"\nadapter = \"sft\"\ndata = {{ train = \"data/sft.jsonl\" }}\n"
        ),
    );
    let path = ws.write("recipe.toml", &text);
    let recipe = lora_runner::recipe::load(&path, &support::kinds::registry()).unwrap();
    lora_runner::graph::build(&recipe).expect("matching shape is fine");

    // DoRA is part of the shape: a default turning it off is refused.
    let text = with_base(
        &ws,
        &format!(
            "[defaults.dpo]\nlora = {{ dora = false }}\n\n{SFT}lora = {{ r = 8, dora = true }}\n\n\
             [stages.d]\nkind = \"dpo\"\nmodel = \"base\"\nadapter = \"sft\"\ndata = {{ train = \"data/sft.jsonl\" }}\n"
        ),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "9:17", "points at the default that changes dora");
    assert_eq!(
        msg,
        "stage `d` continues adapter `sft` but sets lora.dora = false (the adapter has true)"
    );
    assert!(help.contains("rslora and dora"), "{help}");
}

#[test]
fn an_adapter_applies_only_to_its_own_model() {
    let ws = Workspace::new();
    ws.model_folder("models/other", 2);
    let text = with_base(
        &ws,
        &format!("[stages.other]\nkind = \"base\"\npath = \"models/other\"\n\n{SFT}\n[stages.e]\nkind = \"eval\"\nmodel = \"other\"\nadapter = \"sft\"\nprompts = [\"hi\"]\n"),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "20:11");
    assert_eq!(
        msg,
        "stage `e` applies adapter `sft` to `other`, but `sft` was trained on `base`"
    );
    assert_eq!(help, "use `model = \"base\"`");
}

#[test]
fn an_adapter_on_the_model_it_was_merged_into_would_apply_twice() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!(
            "{SFT}\n[stages.merged]\nkind = \"merge\"\nmodel = \"base\"\nadapter = \"sft\"\n\n\
             [stages.d]\nkind = \"dpo\"\nmodel = \"merged\"\nadapter = \"sft\"\ndata = {{ train = \"data/sft.jsonl\" }}\n"
        ),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "21:11");
    assert!(
        msg.contains(
            "which already contains it (merged by stage `merged`): it would be applied twice"
        ),
        "{msg}"
    );
    assert!(help.contains("scheme two"));
}

#[test]
fn a_merge_needs_an_adapter() {
    let ws = Workspace::new();
    let text = with_base(&ws, "[stages.m]\nkind = \"merge\"\nmodel = \"base\"\n");
    let (loc, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(loc, "8:1");
    assert_eq!(msg, "merge stage `m` has no `adapter` to merge");
}

#[test]
fn a_training_stage_needs_data() {
    let ws = Workspace::new();
    let text = with_base(&ws, "[stages.sft]\nkind = \"sft\"\nmodel = \"base\"\n");
    let (loc, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(loc, "8:1");
    assert_eq!(msg, "training stage `sft` has no `data`");
}

#[test]
fn lora_targets_must_match_a_module_of_the_architecture() {
    let ws = Workspace::new();
    let text = with_base(
        &ws,
        &format!("{SFT}lora = {{ targets = [\"q_proj\", \"v_prj\"] }}\n"),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "12:20");
    assert_eq!(msg, "LoRA target `v_prj` matches no module of model `base`");
    assert_eq!(help, "did you mean `v_proj`?");

    let text = with_base(
        &ws,
        &format!("{SFT}lora = {{ targets = \"model\\\\.layers\\\\.9\\\\..*\" }}\n"),
    );
    let (_, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(
        msg, "LoRA targets pattern matches no module of model `base`",
        "only 2 layers"
    );

    // Through a merge, against an `init` model's shape.
    let text = format!(
        "{HEADER}[stages.base]\nkind = \"base\"\ninit = {{ hidden = 16, layers = 1, heads = 2, kv_heads = 1, ffn = 32, vocab = 128 }}\n\
         {SFT}\n[stages.m]\nkind = \"merge\"\nmodel = \"base\"\nadapter = \"sft\"\n\
         [stages.d]\nkind = \"dpo\"\nmodel = \"m\"\nlora = {{ targets = [\"gate\"] }}\ndata = {{ train = \"data/sft.jsonl\" }}\n"
    );
    let (_, msg, _) = one(&error_of(&ws, &text));
    assert_eq!(msg, "LoRA target `gate` matches no module of model `m`");
}

#[test]
fn an_init_vocabulary_must_hold_the_builtin_tokenizer() {
    let ws = Workspace::new();
    let e = error_of(
        &ws,
        &format!("{HEADER}[stages.base]\nkind = \"base\"\ninit = {{ hidden = 16, layers = 1, heads = 2, kv_heads = 1, ffn = 32, vocab = 64 }}\n"),
    );
    let (loc, msg, _) = one(&e);
    assert_eq!(loc, "5:78");
    assert_eq!(
        msg,
        "`init.vocab` must be at least 100 (the built-in tokenizer's size), got 64"
    );
}

#[test]
fn a_base_folder_must_exist_and_have_a_known_architecture() {
    let ws = Workspace::new();
    let e = error_of(
        &ws,
        &format!("{HEADER}[stages.base]\nkind = \"base\"\npath = \"nowhere\"\n"),
    );
    let (loc, msg, _) = one(&e);
    assert_eq!(loc, "5:8");
    assert!(msg.starts_with("no model folder at"), "{msg}");

    ws.write(
        "models/gpt/config.json",
        r#"{"model_type": "gpt2", "num_hidden_layers": 2}"#,
    );
    ws.write("data/sft.jsonl", "{}\n");
    let e = error_of(
        &ws,
        &format!("{HEADER}[stages.base]\nkind = \"base\"\npath = \"models/gpt\"\n{SFT}"),
    );
    let (_, msg, _) = one(&e);
    assert!(
        msg.contains(r#"unknown architecture: model_type "gpt2""#),
        "{msg}"
    );
}

#[test]
fn the_cli_renders_problems_with_the_line_and_exits_2() {
    let ws = Workspace::new();
    let text = with_base(&ws, &format!("{SFT}train = {{ stpes = 3 }}\n"));
    ws.write("recipe.toml", &text);
    let run = ws.runner(&["plan", "recipe.toml"]);
    assert_eq!(run.code, exit::USAGE, "{}", run.stderr);
    assert!(run.stderr.contains("[recipe.toml:12:11]"), "{}", run.stderr);
    assert!(
        run.stderr.contains("train = { stpes = 3 }"),
        "shows the line:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("did you mean `steps`?"));
    assert!(!run.stderr.contains('\u{1b}'), "NO_COLOR is respected");
}

#[test]
fn preference_loss_settings_are_checked_where_written() {
    let ws = Workspace::new();
    // Line 12 holds the `dpo = { ... }` table.
    let dpo =
        "[stages.d]\nkind = \"dpo\"\nmodel = \"base\"\ndata = { train = \"data/sft.jsonl\" }\n";
    let cases = [
        (
            r#"dpo = { loss = "sigmod" }"#,
            "12:16",
            "unknown loss `sigmod`",
            "did you mean `sigmoid`?",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "sfft"] }"#,
            "12:28",
            "unknown loss `sfft`",
            "did you mean `sft`?",
        ),
        (
            r#"dpo = { loss = [] }"#,
            "12:16",
            "`dpo.loss` is an empty list",
            "",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "sft"], loss_weights = [1.0] }"#,
            "12:51",
            "`dpo.loss_weights` has 1 weights for 2 losses",
            "",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "sft"], loss_weights = [1.0, -0.5] }"#,
            "12:51",
            "`dpo.loss_weights` must all be >= 0",
            "",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "sft"], loss_weights = [0.0, 0.0] }"#,
            "12:51",
            "`dpo.loss_weights` are all 0: nothing would be trained",
            "",
        ),
        (
            r#"dpo = { loss = "exo_pair" }"#,
            "12:16",
            "loss `exo_pair` needs `dpo.label_smoothing` in (0, 0.5), got 0",
            "the EXO paper suggests `label_smoothing = 1e-3`",
        ),
        (
            r#"dpo = { loss = "exo_pair", label_smoothing = 0.5 }"#,
            "12:46",
            "loss `exo_pair` needs `dpo.label_smoothing` in (0, 0.5), got 0.5",
            "",
        ),
        (
            r#"dpo = { loss = "robust", label_smoothing = 0.5 }"#,
            "12:44",
            "`dpo.label_smoothing` must be in [0, 0.5), got 0.5",
            "",
        ),
        (
            r#"dpo = { loss = "hinge", label_smoothing = 0.1 }"#,
            "12:43",
            "`dpo.label_smoothing` has no effect on the chosen loss",
            "it applies to sigmoid, robust, exo_pair, aot, aot_unpaired and simpo",
        ),
        (
            r#"dpo = { loss = "simpo", simpo_gamma = -1.0 }"#,
            "12:39",
            "`dpo.simpo_gamma` must be >= 0, got -1",
            "",
        ),
        (
            r#"dpo = { loss = "discopop", discopop_tau = 0.0 }"#,
            "12:43",
            "`dpo.discopop_tau` must be > 0, got 0",
            "",
        ),
        (
            r#"dpo = { ld_alpha = 1.5 }"#,
            "12:20",
            "`dpo.ld_alpha` must be in [0, 1], got 1.5",
            "",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "sft"], ld_alpha = 0.5 }"#,
            "12:28",
            "`dpo.ld_alpha` does not apply to loss `sft`",
            "LD-DPO weighs the reward terms' log-probs; use it without sft, simpo and orpo",
        ),
        (
            r#"dpo = { f_divergence_type = "js" }"#,
            "12:29",
            "unknown `dpo.f_divergence_type` `js`",
            "expected one of: reverse_kl, forward_kl, js_divergence, alpha_divergence",
        ),
        (
            r#"dpo = { loss = "bco_pair", f_divergence_type = "forward_kl" }"#,
            "12:16",
            "`dpo.f_divergence_type = \"forward_kl\"` does not apply to loss `bco_pair`",
            "only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (and sft) read the reward difference an f-divergence reshapes",
        ),
        (
            r#"dpo = { f_divergence_type = "forward_kl", f_alpha_divergence_coef = 0.3 }"#,
            "12:69",
            "`dpo.f_alpha_divergence_coef` has no effect without `f_divergence_type = \"alpha_divergence\"`",
            "",
        ),
        (
            r#"dpo = { loss = ["sigmoid", "aot"], use_weighting = true }"#,
            "12:28",
            "`dpo.use_weighting` (WPO) does not apply to loss `aot`",
            "the AOT losses sort pairs, which would misalign per-pair weights; TRL's sft term fails under WPO; simpo and orpo are not TRL's DPO losses",
        ),
        (
            r#"dpo = { loss = 3 }"#,
            "12:16",
            "invalid type: integer `3`, expected a loss name or a list of loss names",
            "",
        ),
    ];
    for (line, loc, message, help) in cases {
        let text = with_base(&ws, &format!("{dpo}{line}\n"));
        let got = one(&error_of(&ws, &text));
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2.as_str()),
            (loc, message, help),
            "for `{line}`"
        );
    }
    // A reference-free loss with a reference set.
    let text = with_base(
        &ws,
        &format!(
            "{SFT}\n{dpo}adapter = \"sft\"\nreference = \"base\"\ndpo = {{ loss = \"orpo\" }}\n"
        ),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(loc, "18:13");
    assert_eq!(
        msg,
        "stage `d`: loss orpo uses no reference model, but `reference` is set"
    );
    assert_eq!(
        help,
        "remove `reference`, or add a loss that compares with it"
    );
}

#[test]
fn a_bad_default_is_reported_once_for_all_the_stages_that_inherit_it() {
    let ws = Workspace::new();
    let dpo = |name: &str| {
        format!("[stages.{name}]\nkind = \"dpo\"\nmodel = \"base\"\ndata = {{ train = \"data/sft.jsonl\" }}\n")
    };
    let text = with_base(
        &ws,
        &format!(
            "[defaults.dpo]\ndpo = {{ loss = \"sigmod\" }}\n\n{}\n{}",
            dpo("a"),
            dpo("b")
        ),
    );
    let (loc, msg, help) = one(&error_of(&ws, &text));
    assert_eq!(
        (loc.as_str(), msg.as_str(), help.as_str()),
        ("9:16", "unknown loss `sigmod`", "did you mean `sigmoid`?")
    );
}
