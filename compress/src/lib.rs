//! `compress`: the command-line front of the pipeline (a library so that the
//! tests reach its parsers in-process; `main.rs` only calls [`main`]). Subcommands fetch the
//! real assets, convert checkpoints between formats, and evaluate models.
//!
//! Any path argument may be `asset:NAME` (`asset:smollm2`, `asset:qwen2.5-0.5b`,
//! `asset:eval`, `asset:calib`, `asset:brown`): the asset is fetched into the
//! cache if needed.

pub mod assets;
pub mod distill;
pub mod evaluate;
pub mod gate;
pub mod lease;
pub mod prune;
pub mod quantize;
pub mod recipe;
pub mod runner;
pub mod sensitivity;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "compress",
    version,
    about = "Compress language models and prove what was lost"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify the real models and text into the cache folder
    /// ($COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress).
    Fetch {
        /// Print the cached paths as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert a checkpoint (GGUF or safetensors) to HF-layout safetensors with
    /// config.json and tokenizer.json beside it.
    Convert {
        /// Input model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
        input: String,
        /// Output .safetensors file (or a folder, which gets model.safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// Element type of the written weights.
        #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
        dtype: DtypeArg,
    },
    /// Quantize a model into a GGUF file with one of llama.cpp's type mixes, or a
    /// per-tensor allocation for a target bits-per-weight; importance-weighted
    /// when an imatrix is given.
    Quantize(quantize::Args),
    /// Prune a model: magnitude, Wanda or SparseGPT, unstructured or N:M, with a
    /// uniform or outlier-weighted (OWL) per-layer schedule; writes a dense
    /// HF-style folder or a GGUF file whose removed weights are exactly zero.
    Prune(prune::Args),
    /// Importance matrix: run the model on calibration text and store, per linear
    /// layer, the mean squared input activation per column (llama.cpp's imatrix
    /// GGUF format).
    Imatrix {
        /// Model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
        model: String,
        /// UTF-8 calibration text.
        #[arg(long)]
        text: String,
        /// Output imatrix file (.gguf).
        #[arg(short, long)]
        output: PathBuf,
        /// Tokens per chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Number of chunks (default: every whole chunk of the text).
        #[arg(long)]
        chunks: Option<usize>,
    },
    /// Perplexity of models on a text, with llama-perplexity's protocol; with
    /// --base, also KL divergence and top-1 agreement against the base.
    Eval {
        /// Models: .gguf, .safetensors, model.safetensors.index.json, or folders.
        #[arg(required = true)]
        models: Vec<String>,
        /// UTF-8 text file to evaluate on.
        #[arg(long)]
        text: String,
        /// Tokens per chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Number of chunks (default: every whole chunk of the text).
        #[arg(long)]
        chunks: Option<usize>,
        /// Base model to compare against on the same tokens: adds KL divergence
        /// (mean, median, p90, p99, max) and top-1 agreement.
        #[arg(long)]
        base: Option<String>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Calibration text for the per-layer output fidelity (each linear's
        /// output on the base's own activations, artifact vs base weights).
        #[arg(long)]
        calib: Option<String>,
        /// Calibration tokens for the per-layer output fidelity.
        #[arg(long, default_value_t = 1024)]
        calib_tokens: usize,
    },
    /// Per-layer sensitivity: quantize or prune one tensor (or block) at a time,
    /// the rest at base, and measure the KL divergence it adds; JSON, Markdown
    /// and HTML reports that `quantize --sensitivity` allocates bits from.
    Sensitivity(sensitivity::Args),
    /// Check an evaluation report against quality thresholds: exit code 0 when
    /// all hold, 1 when one fails, 2 on bad input.
    Gate(gate::Args),
    /// Train a pruned model to match its original on calibration text
    /// (knowledge distillation): forward KL on the teacher's top-k logits, AdamW,
    /// checkpoints and resume; pruned weights stay zero.
    Distill(distill::Args),
    /// Run a recipe: every job (model × variant) through its stages, evaluated
    /// and gated, resumable, with a manifest per job; exit code 0 when every job
    /// passed, 1 when a gate failed, 2 when a job could not run.
    Run(runner::RunArgs),
    /// Check a recipe (every key, type, range, file and stage order) without
    /// running it; all problems at once, with line numbers.
    Validate(runner::ValidateArgs),
    /// Merge the job manifests under an output folder (every shard's) into one
    /// table; exit code 0 when every job finished and passed.
    Status(runner::StatusArgs),
}

/// Element types `convert` and `prune` write.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    /// The storage type.
    pub(crate) fn ggml(self) -> kernels::GgmlType {
        match self {
            DtypeArg::F32 => kernels::GgmlType::F32,
            DtypeArg::F16 => kernels::GgmlType::F16,
            DtypeArg::Bf16 => kernels::GgmlType::BF16,
        }
    }
}

/// Exit codes: 0 success, 1 a quality gate failed, 2 the command could not do
/// its work (bad input, unreadable files, …; clap's usage errors are 2 as well).
pub fn main() -> ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Blocks of 4 MiB and more come from their own mappings, given back to the
/// system when freed. glibc otherwise raises that threshold to 32 MiB once
/// the first large block is freed, after which the stages' per-layer buffers
/// of a few MB reuse and fragment the heap: 100 MB more peak memory for an
/// 8B-shaped GPTQ block (README, "Larger than memory"). A threshold set in the
/// environment (`MALLOC_MMAP_THRESHOLD_`) is left alone.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        }
    }
}

/// A path argument, with `asset:NAME` fetched into the cache and resolved.
pub(crate) fn resolve(arg: &str) -> Result<PathBuf> {
    assets::resolve_with(arg, &assets::cache_dir(), &|line| eprintln!("{line}"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Gate(args) => Ok(if gate::run(args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }),
        Command::Run(args) => runner::run(args),
        Command::Status(args) => runner::status(args),
        other => run_stage(other).map(|()| ExitCode::SUCCESS),
    }
}

/// Runs every command but `gate` (whose exit code carries its verdict).
fn run_stage(command: Command) -> Result<()> {
    match command {
        Command::Fetch { json } => {
            let cache = assets::cache_dir();
            let paths = assets::ensure(&cache, &|line| eprintln!("{line}"))?;
            if json {
                let v = serde_json::json!({
                    "cache": cache, "model": paths.model, "brown": paths.brown,
                    "calib": paths.calib, "eval": paths.eval, "qwen": paths.qwen,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("model  {}", paths.model.display());
                println!("brown  {}", paths.brown.display());
                println!("calib  {}", paths.calib.display());
                println!("eval   {}", paths.eval.display());
                println!("qwen   {}", paths.qwen.display());
            }
            Ok(())
        }
        Command::Convert {
            input,
            output,
            dtype,
        } => {
            if output.extension().is_some_and(|e| e == "gguf") {
                bail!(
                    "convert writes HF safetensors, not {}: for a float GGUF run `compress quantize {} --type F32 -o {}`",
                    output.display(),
                    input,
                    output.display()
                );
            }
            model::io::prepare_output(&output)?;
            let input = resolve(&input)?;
            model::dense::convert(&input, &output, dtype.ggml())
        }
        Command::Quantize(args) => quantize::run(args),
        Command::Prune(args) => prune::run(args),
        Command::Distill(args) => distill::run(args),
        Command::Sensitivity(args) => sensitivity::run(args),
        Command::Validate(args) => runner::validate(args),
        Command::Gate(_) | Command::Run(_) | Command::Status(_) => {
            bail!("this command has its own exit codes; run it through run()")
        }
        Command::Imatrix {
            model,
            text,
            output,
            ctx,
            chunks,
        } => {
            model::io::prepare_output(&output)?;
            let model_path = resolve(&model)?;
            let text_path = resolve(&text)?;
            let text = eval::text::read_text(&text_path)?;
            let model = model::Model::open(&model_path)?;
            let tokens = model
                .tokenizer
                .encode(&text)
                .with_context(|| format!("cannot tokenize {}", text_path.display()))?;
            let total = chunks.unwrap_or(tokens.len() / ctx.max(1));
            let mut bar = model::progress::Progress::new(total as u64, "imatrix");
            let start = std::time::Instant::now();
            let m = model::calib::Imatrix::collect(
                &model,
                &tokens,
                ctx,
                chunks,
                &text_path.display().to_string(),
                &mut |done, _| bar.set(done as u64, ""),
            )?;
            bar.finish();
            m.save(&output)?;
            // Calibration coverage of a mixture of experts, block by block.
            let suffix = ".ffn_gate_exps.weight";
            for (name, e) in m.entries.iter().filter(|(n, _)| n.ends_with(suffix)) {
                let block = name.trim_end_matches(suffix);
                let counts: Vec<String> = e.counts.iter().map(u64::to_string).collect();
                eprintln!("{block} tokens per expert: {}", counts.join(" "));
                let starved = e.starved();
                if !starved.is_empty() {
                    eprintln!(
                        "note: {block} experts {starved:?} saw no calibration token; quantizing with this imatrix gives them the pooled statistics of the block's experts"
                    );
                }
            }
            eprintln!(
                "wrote {} ({} weights, {} chunks of {} tokens, {:.1}s)",
                output.display(),
                m.entries.len(),
                m.chunks,
                m.chunk_size,
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Eval {
            models,
            text,
            ctx,
            chunks,
            base,
            json,
            calib,
            calib_tokens,
        } => {
            let models = models
                .iter()
                .map(|m| resolve(m))
                .collect::<Result<Vec<_>>>()?;
            let base = base.as_deref().map(resolve).transpose()?;
            let calib = calib.as_deref().map(resolve).transpose()?;
            evaluate::run(&evaluate::EvalArgs {
                models: &models,
                base: base.as_deref(),
                text: &resolve(&text)?,
                ctx,
                chunks,
                json,
                calib: calib.as_deref(),
                calib_tokens,
            })
        }
    }
}
