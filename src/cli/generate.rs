//! `runner generate`: what a finished stage's model says to prompts of
//! one's own, one stage or several side by side. The model is loaded as
//! the stage saw it (its base, quantized or not, with its adapter); nothing
//! is written to the cache.

use std::io::Read;
use std::path::PathBuf;

use super::{Context, Error};
use crate::cache::{Cache, MANIFEST};
use crate::metrics::samples::encode_prompt;
use crate::model::generate::{GenerateOptions, Sampling};
use crate::stage::{ArtifactKind, InputArtifact};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The recipe (a TOML file).
    recipe: PathBuf,
    /// Prompts ("-": one per line from standard input).
    prompts: Vec<String>,
    /// The stages that answer, comma-separated (a model stage: a base or a
    /// merge; or an adapter stage, on the model it was trained on). Each
    /// must be cached. A swept stage's own name stands for all its
    /// variants; `*` and `?` match names (`dpo_*`: every stage making a
    /// model or an adapter whose name matches).
    #[arg(long, value_delimiter = ',', required = true)]
    stages: Vec<String>,
    /// Prompts from a file, one per line.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Send each prompt as plain text, not as a user message through the
    /// model's chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens generated for each prompt (generation stops earlier at
    /// the model's end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample at this temperature instead of the greedy choice (seeded by
    /// --seed); 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only from the most likely tokens whose probabilities add up
    /// to this (nucleus sampling; with --temperature).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling (default: the recipe's).
    #[arg(long)]
    seed: Option<u64>,
    /// One JSON object per stage and prompt.
    #[arg(long)]
    json: bool,
}

/// A cached stage's artifact as a stage input, named as the recipe names it.
fn input(
    ctx: &Context,
    cache: &Cache,
    stage: &str,
    artifact: &str,
) -> Result<InputArtifact, Error> {
    let dir = cache.artifact_dir(artifact);
    let manifest: serde_json::Value = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Error::Usage(format!("the manifest of `{stage}` cannot be read")))?;
    let output = manifest["kind"]
        .as_str()
        .and_then(|k| ctx.registry.get(k))
        .map_or(ArtifactKind::Export, |k| k.output());
    Ok(InputArtifact {
        stage: stage.to_string(),
        kind: manifest["kind"].as_str().unwrap_or_default().to_string(),
        output,
        key: manifest["key"].as_str().unwrap_or_default().to_string(),
        dir,
        manifest,
    })
}

/// The stages `selectors` name, in order, each once: a name as it is
/// (unknown names are reported when looked up), a swept stage's name as its
/// variants, a glob as the stages making a model or an adapter that it
/// matches (none is a usage error).
fn stage_names(recipe: &crate::recipe::Recipe, selectors: &[String]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::new();
    for selector in selectors {
        let names: Vec<String> = if selector.contains(['*', '?']) {
            let found: Vec<String> = recipe
                .stages
                .iter()
                .filter(|s| {
                    matches!(s.kind.output(), ArtifactKind::Model | ArtifactKind::Adapter)
                        && crate::compare::select::wildcard(selector, &s.name.value)
                })
                .map(|s| s.name.value.clone())
                .collect();
            if found.is_empty() {
                return Err(Error::Usage(format!(
                    "`{selector}` matches no stage that makes a model or an adapter"
                )));
            }
            found
        } else {
            match recipe.stages_named(selector) {
                named if named.is_empty() => vec![selector.clone()],
                named => named.into_iter().map(String::from).collect(),
            }
        };
        for name in names {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// One stage ready to answer: its model as the stage saw it (a clone of a
/// loaded base shares its weights), tokenizer and chat template.
struct Speaker {
    stage: String,
    model: crate::model::decoder::Decoder,
    tokenizer: crate::data::ModelTokenizer,
    template: Option<crate::data::ChatTemplate>,
}

fn prompts_of(args: &GenerateArgs) -> Result<Vec<String>, Error> {
    let mut prompts = args.prompts.clone();
    let from_stdin = prompts.iter().any(|p| p == "-");
    prompts.retain(|p| p != "-");
    let mut extra = String::new();
    if from_stdin {
        std::io::stdin()
            .read_to_string(&mut extra)
            .map_err(Error::io("reading prompts from standard input"))?;
    }
    if let Some(file) = &args.file {
        extra.push_str(
            &std::fs::read_to_string(file).map_err(Error::io(file.display().to_string()))?,
        );
    }
    prompts.extend(
        extra
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string),
    );
    if prompts.is_empty() {
        return Err(Error::Usage(
            "no prompts: give them as arguments, with --file, or \"-\" for standard input".into(),
        ));
    }
    Ok(prompts)
}

fn sampling_of(args: &GenerateArgs, seed: u64) -> Result<(String, Sampling), Error> {
    if args.temperature == 0.0 {
        return Ok(("greedy".into(), Sampling::Greedy));
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        return Err(Error::Usage(format!(
            "--temperature must be 0 (greedy) or positive, got {}",
            args.temperature
        )));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(Error::Usage(format!(
            "--top-p must be in (0, 1], got {}",
            args.top_p
        )));
    }
    Ok((
        crate::metrics::samples::sampled_mode(args.temperature, args.top_p),
        Sampling::Sample {
            temperature: args.temperature,
            top_p: args.top_p,
            seed,
        },
    ))
}

/// Loads every named stage's model, each distinct base or merge once.
fn speakers(
    ctx: &Context,
    args: &GenerateArgs,
    checked: &super::context::Checked,
    cache: &Cache,
    plan: &crate::plan::Plan,
) -> Result<Vec<Speaker>, Error> {
    let device =
        crate::device::candle(&ctx.resolve_device(checked)?).map_err(|e| Error::Environment {
            context: "opening the compute device".into(),
            source: e,
        })?;
    let mut bases: std::collections::HashMap<String, crate::model::decoder::Decoder> =
        std::collections::HashMap::new();
    let mut out = Vec::new();
    for stage in &stage_names(&checked.recipe, &args.stages)? {
        let artifact = super::context::cached_in(plan, &args.recipe, stage)?;
        let own = input(ctx, cache, stage, &artifact)?;
        let (model_input, adapter) = match own.output {
            ArtifactKind::Model => (own, None),
            ArtifactKind::Adapter => {
                let parent = cache.parent(&artifact, "model").ok_or_else(|| {
                    Error::Usage(format!(
                        "`{stage}` has no `model` input: nothing to generate with"
                    ))
                })?;
                (
                    input(ctx, cache, &parent.stage, &parent.artifact)?,
                    Some(own),
                )
            }
            _ => {
                return Err(Error::Usage(format!(
                    "`{stage}` makes neither a model nor an adapter: nothing to generate with"
                )))
            }
        };
        let failed = |e: anyhow::Error| Error::Environment {
            context: format!("loading `{stage}`"),
            source: e,
        };
        let source = crate::kinds::inputs::model_source(&model_input).map_err(failed)?;
        let mut model = match bases.get(&model_input.key) {
            Some(base) => base.clone(),
            None => {
                eprintln!("[runner] {stage}: loading `{}`", model_input.stage);
                let base =
                    crate::kinds::inputs::load_model(&source, candle_core::DType::F32, &device)
                        .map_err(failed)?;
                bases.insert(model_input.key.clone(), base.clone());
                base
            }
        };
        if let Some(adapter) = &adapter {
            crate::kinds::inputs::load_adapter(&mut model, adapter).map_err(failed)?;
        }
        let tokenizer = crate::kinds::inputs::load_tokenizer(&source.dir).map_err(failed)?;
        let template = match args.raw {
            true => None,
            false => crate::data::ChatTemplate::resolve(None, &tokenizer)
                .map_err(|e| Error::Usage(format!("`{stage}`'s chat template: {e}")))?,
        };
        if !args.raw && template.is_none() {
            eprintln!("note: `{stage}`'s model has no chat template: prompts go as plain text");
        }
        out.push(Speaker {
            stage: stage.clone(),
            model,
            tokenizer,
            template,
        });
    }
    Ok(out)
}

pub fn generate(ctx: &Context, args: &GenerateArgs) -> Result<(), Error> {
    use std::io::Write;
    let prompts = prompts_of(args)?;
    let (checked, cache, plan) = ctx.check_and_plan(&args.recipe)?;
    let (mode, sampling) =
        sampling_of(args, args.seed.unwrap_or(checked.recipe.header.seed.value))?;
    let speakers = speakers(ctx, args, &checked, &cache, &plan)?;
    let interrupt = super::process::install_interrupt();
    let mut stdout = std::io::stdout().lock();
    let write = |out: &mut std::io::StdoutLock, text: &str| {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(Error::io("writing to standard output"))
    };
    // Prompt by prompt, each stage under the previous one, tokens printed
    // as they come (lines of JSON once a completion is whole).
    for (i, prompt) in prompts.iter().enumerate() {
        if !args.json {
            write(&mut stdout, &format!("── {prompt}\n"))?;
        }
        for s in &speakers {
            let failed = |e: anyhow::Error| Error::Environment {
                context: format!("generating with `{}`", s.stage),
                source: e,
            };
            let ids = encode_prompt(&s.tokenizer, s.template.as_ref(), prompt).map_err(failed)?;
            let stop: Vec<u32> = s.tokenizer.eos().map(|e| e.id).into_iter().collect();
            let options = GenerateOptions {
                max_new_tokens: args.max_new_tokens,
                stop_tokens: stop.clone(),
                sampling: sampling.clone(),
            };
            if !args.json {
                write(&mut stdout, &format!("{} ({mode}): ", s.stage))?;
            }
            let mut stream = crate::data::tokenizer::StreamDecoder::new(&s.tokenizer, &stop);
            let mut broken: Option<Error> = None;
            let mut on_token = |_row: usize, token: u32| {
                if !args.json {
                    if let Some(piece) = stream.push(token) {
                        if let Err(e) = write(&mut stdout, &piece) {
                            broken = Some(e);
                        }
                    }
                }
                broken.is_none() && !interrupt.load(std::sync::atomic::Ordering::SeqCst)
            };
            let generated =
                crate::model::generate::generate_with(&s.model, &[ids], &options, &mut on_token)
                    .map_err(|e| failed(e.into()))?;
            if let Some(e) = broken {
                return Err(e);
            }
            let completion = s
                .tokenizer
                .decode_completion(&generated[0], &stop)
                .map_err(|e| failed(e.into()))?;
            let line = match args.json {
                true => serde_json::json!({"stage": s.stage, "prompt": prompt, "prompt_index": i,
                                           "mode": mode, "completion": completion})
                .to_string(),
                false => stream.rest(&completion),
            };
            write(&mut stdout, &format!("{line}\n"))?;
            if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
        }
    }
    Ok(())
}
