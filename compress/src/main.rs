//! `compress`: the command-line front of the pipeline. Subcommands fetch the
//! real assets, convert checkpoints between formats, and evaluate models.
//!
//! Any path argument may be `asset:NAME` (`asset:smollm2`, `asset:eval`,
//! `asset:calib`, `asset:brown`): the asset is fetched into the cache if needed.

mod assets;
mod convert;
mod progress;

use anyhow::{Context, Result};
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
    /// Download and verify the real model and text into the cache folder
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
    /// Perplexity of a model on a text, with llama-perplexity's protocol.
    Eval {
        /// Model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
        model: String,
        /// UTF-8 text file to evaluate on.
        #[arg(long)]
        text: String,
        /// Tokens per chunk.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Number of chunks (default: every whole chunk of the text).
        #[arg(long)]
        chunks: Option<usize>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Element types `convert` writes.
#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), mapped weight pages included.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn resolve(arg: &str) -> Result<PathBuf> {
    assets::resolve_with(arg, &assets::cache_dir(), &|line| eprintln!("{line}"))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch { json } => {
            let cache = assets::cache_dir();
            let paths = assets::ensure(&cache, &|line| eprintln!("{line}"))?;
            if json {
                let v = serde_json::json!({
                    "cache": cache, "model": paths.model, "brown": paths.brown,
                    "calib": paths.calib, "eval": paths.eval,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("model  {}", paths.model.display());
                println!("brown  {}", paths.brown.display());
                println!("calib  {}", paths.calib.display());
                println!("eval   {}", paths.eval.display());
            }
            Ok(())
        }
        Command::Convert {
            input,
            output,
            dtype,
        } => {
            let input = resolve(&input)?;
            let dtype = match dtype {
                DtypeArg::F32 => kernels::GgmlType::F32,
                DtypeArg::F16 => kernels::GgmlType::F16,
                DtypeArg::Bf16 => kernels::GgmlType::BF16,
            };
            convert::convert(&input, &output, dtype)
        }
        Command::Eval {
            model,
            text,
            ctx,
            chunks,
            json,
        } => {
            let model_path = resolve(&model)?;
            let text_path = resolve(&text)?;
            let text = eval::text::read_text(&text_path)?;
            let model = model::Model::open(&model_path)?;
            let tokens = model
                .tokenizer
                .encode(&text)
                .with_context(|| format!("cannot tokenize {}", text_path.display()))?;
            let opts = eval::PerplexityOptions { ctx, chunks };
            let n_chunks = chunks.unwrap_or(tokens.len() / ctx.max(1));
            let mut bar = progress::Progress::new(n_chunks as u64, "perplexity");
            let report = eval::perplexity(&model, &tokens, &opts, &mut |done, _total, ppl| {
                bar.set(done as u64, &format!("ppl {ppl:.4}"));
            })?;
            bar.finish();
            if json {
                let v = serde_json::json!({
                    "model": model_path, "text": text_path, "perplexity": report,
                    "model_bytes": model.file_size(), "peak_rss_bytes": peak_rss_bytes(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}: {} chunks of {} tokens ({} scored), PPL = {:.4} +/- {:.5}  [{:.1} tokens/s]",
                    model_path.display(),
                    report.chunks,
                    report.ctx,
                    report.scored_tokens,
                    report.perplexity,
                    report.perplexity_stderr,
                    report.tokens_per_second
                );
            }
            Ok(())
        }
    }
}
