//! The `runner` command line: a thin layer over the engine. It parses the
//! arguments, calls one engine entry point per command (a file each below),
//! and renders typed errors with their exit codes (`error`).

mod compare;
mod context;
mod error;
mod export;
mod generate;
mod inspect;
mod pins;
mod plan;
mod process;
mod run;
mod schema;
mod selftest;
mod share;
mod slurm;

pub use error::{exit, Error};

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::stage::{DeviceSpec, Registry};
use context::Context;

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "Declarative, cached, resumable two-stage LoRA fine-tuning (SFT, then DPO)",
    long_about = "Declarative, cached, resumable two-stage LoRA fine-tuning (SFT, then DPO).\n\n\
        A TOML recipe declares stages (see the stage kinds below) that refer to \
        each other by name. `runner plan` shows what would run and why; `runner run` runs it, \
        skipping every stage whose inputs have not changed since it last ran."
)]
pub struct Cli {
    /// Cache folder (artifacts, keys, checkpoints).
    #[arg(long, global = true, env = "RUNNER_CACHE", default_value = "cache")]
    pub cache: PathBuf,
    /// Compute threads (default: RAYON_NUM_THREADS, else every core). Results are
    /// bit-identical for the same seed, device and thread count.
    #[arg(long, global = true, env = "RUNNER_THREADS", value_name = "N")]
    pub threads: Option<usize>,
    /// Compute device: auto (a GPU when this binary has CUDA and one is present), cpu or
    /// cuda:N. Overrides the recipe's `device`; the device kind enters the keys of stages
    /// that compute.
    #[arg(long, global = true, env = "RUNNER_DEVICE", value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    /// A shared cache on S3-compatible storage (s3://bucket/prefix): stages not
    /// in the local cache are downloaded from it, finished ones uploaded.
    /// Overrides the recipe's `[cache] remote`. Endpoint, region and
    /// credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...
    /// or ~/.aws (README, "Sharing results").
    #[arg(long, global = true, env = "RUNNER_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Use the local cache only, whatever the recipe or RUNNER_REMOTE say.
    #[arg(long, global = true, env = "RUNNER_NO_REMOTE")]
    pub no_remote: bool,
    #[command(subcommand)]
    pub command: Command,
}

// Each command's arguments live in its own file; the doc comment here is its `--help` line.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Dry run: every stage in execution order, cached or to run, and why,
    /// with each stage's estimated peak memory (refused when it exceeds the
    /// machine's).
    Plan(plan::PlanArgs),
    /// Run the recipe: stages whose inputs are unchanged are skipped.
    Run(run::RunArgs),
    /// Cancel the recipe's queued and running Slurm jobs (a cancelled training
    /// stage resumes from its last checkpoint when submitted again).
    Cancel(slurm::CancelArgs),
    /// Each stage's state: cached artifact, when it finished, its headline metrics.
    Status(inspect::StatusArgs),
    /// A stage's manifest, metrics, lineage and artifact path.
    Show(inspect::ShowArgs),
    /// Compare finished training stages side by side (default: the leaf ones,
    /// i.e. scheme one and scheme two), with curves as SVG and a Markdown report.
    Compare(compare::CompareArgs),
    /// Copy a stage's cached artifact to DIR (PEFT or Hugging Face layout).
    Export(export::ExportArgs),
    /// What finished stages' models say to your prompts, side by side
    /// (`--stages sft,dpo_continued,dpo_fresh "prompt"`); nothing is cached.
    Generate(generate::GenerateArgs),
    /// Print the JSON schema of recipes.
    Schema(schema::SchemaArgs),
    /// Keep a stage's current artifact through `gc`, whatever recipes are given.
    Pin(pins::PinArgs),
    /// Remove a pin (`runner unpin NAME`; `runner unpin` lists them).
    Unpin(pins::UnpinArgs),
    /// Check the compute device: logits of a small seeded model on the chosen device
    /// against the CPU (f32, tolerance 1e-3). Used by scripts/gpu-check.sh.
    #[command(hide = true)]
    Selftest,
    /// Remove artifacts no given recipe or pin reaches (dry run unless --delete).
    Gc(pins::GcArgs),
    /// Upload the recipe's cached stages (default: all) to the remote cache.
    Push(share::ShareArgs),
    /// Download the recipe's stages (default: all) from the remote cache,
    /// each checked against its recorded hashes.
    Pull(share::ShareArgs),
}

/// The command line, with the stage kinds of `registry` and the exit codes in `--help`.
fn command(registry: &Registry) -> clap::Command {
    let width = registry.names().map(str::len).max().unwrap_or(0);
    let mut help = String::from("Stage kinds:\n");
    for kind in registry.kinds() {
        help.push_str(&format!("  {:width$}  {}\n", kind.name(), kind.summary()));
    }
    help.push_str(&format!(
        "\nExit codes:\n  {:<3}  done\n  {:<3}  a stage failed (finished stages stay cached)\n  \
         {:<3}  bad recipe or usage; nothing ran\n  {:<3}  the cache, a file or the device failed\n  \
         {:<3}  interrupted (Ctrl-C); running stages checkpointed",
        exit::OK,
        exit::STAGE_FAILED,
        exit::USAGE,
        exit::ENVIRONMENT,
        exit::INTERRUPTED
    ));
    Cli::command().after_long_help(help)
}

/// The program's entry point with the built-in stage kinds.
pub fn main() -> i32 {
    run_with(std::env::args_os(), &crate::kinds::builtin())
}

/// Parse `args` and run, with the given stage kinds. Returns the exit code.
pub fn run_with<I, T>(args: I, registry: &Registry) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = command(registry)
        .try_get_matches_from(args)
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    process::set_threads(cli.threads);
    process::keep_freed_memory();
    let ctx = Context {
        registry,
        cache: cli.cache,
        threads: cli.threads,
        device: cli.device,
        remote: cli.remote,
        no_remote: cli.no_remote,
    };
    match dispatch(&ctx, &cli.command) {
        Ok(()) => exit::OK,
        Err(e) => {
            if let Some(text) = e.render(process::color()) {
                eprint!("{text}");
            }
            e.exit_code()
        }
    }
}

fn dispatch(ctx: &Context, command: &Command) -> Result<(), Error> {
    match command {
        Command::Plan(args) => plan::plan(ctx, args),
        Command::Run(args) => run::run(ctx, args),
        Command::Cancel(args) => slurm::cancel(ctx, args),
        Command::Status(args) => inspect::status(ctx, args),
        Command::Show(args) => inspect::show(ctx, args),
        Command::Compare(args) => compare::compare(ctx, args),
        Command::Export(args) => export::export(ctx, args),
        Command::Generate(args) => generate::generate(ctx, args),
        Command::Schema(args) => schema::schema(ctx, args),
        Command::Pin(args) => pins::pin(ctx, args),
        Command::Unpin(args) => pins::unpin(ctx, args),
        Command::Selftest => selftest::selftest(ctx),
        Command::Gc(args) => pins::gc(ctx, args),
        Command::Push(args) => share::push(ctx, args),
        Command::Pull(args) => share::pull(ctx, args),
    }
}
