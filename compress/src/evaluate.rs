//! `compress eval`: perplexity of one or more models on a text, and with a base
//! model their KL divergence and top-1 agreement against it (the base runs once
//! per chunk however many models are compared).

use crate::progress::Progress;
use anyhow::{Context, Result};
use eval::{PerplexityOptions, PerplexityReport};
use model::Model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Peak resident memory of this process (Linux `VmHWM`), mapped weight pages included.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn ppl_line(name: &str, path: &Path, r: &PerplexityReport) -> String {
    format!(
        "{name:<6} {}: {} chunks of {} tokens ({} scored), PPL = {:.4} +/- {:.5}  [{:.1} tokens/s]",
        path.display(),
        r.chunks,
        r.ctx,
        r.scored_tokens,
        r.perplexity,
        r.perplexity_stderr,
        r.tokens_per_second
    )
}

/// Evaluates `models` on `text`; prints a table, or JSON (one object, or an array
/// for several models).
pub fn run(
    models: &[PathBuf],
    base: Option<&Path>,
    text_path: &Path,
    ctx: usize,
    chunks: Option<usize>,
    json_out: bool,
) -> Result<()> {
    let text = eval::text::read_text(text_path)?;
    let opened = models
        .iter()
        .map(|p| Model::open(p))
        .collect::<Result<Vec<_>>>()?;
    let base_model = base.map(Model::open).transpose()?;
    // The base's tokenizer defines the tokens every model is scored on.
    let tokenizer = &base_model.as_ref().unwrap_or(&opened[0]).tokenizer;
    let tokens = tokenizer
        .encode(&text)
        .with_context(|| format!("cannot tokenize {}", text_path.display()))?;
    let opts = PerplexityOptions { ctx, chunks };
    let n_chunks = chunks.unwrap_or(tokens.len() / ctx.max(1));
    let mut bar = Progress::new(n_chunks as u64, "eval");
    let mut on_chunk =
        |done: usize, _total: usize, ppl: f64| bar.set(done as u64, &format!("ppl {ppl:.4}"));
    let mut outputs = Vec::new();
    let mut lines = Vec::new();
    match (&base_model, base) {
        (Some(b), Some(base_path)) => {
            let refs: Vec<&Model> = opened.iter().collect();
            let reports = eval::compare_many(&refs, b, &tokens, &opts, &mut on_chunk)?;
            lines.push(ppl_line("base", base_path, &reports[0].base_perplexity));
            for ((m, path), r) in opened.iter().zip(models).zip(&reports) {
                let k = &r.kld;
                lines.push(ppl_line("model", path, &r.perplexity));
                lines.push(format!(
                    "       KLD mean {:.6} +/- {:.6}, median {:.6}, p90 {:.6}, p99 {:.6}, max {:.6}; same top-1 {:.2}%; {:.1} MB ({:.2}x smaller than the base)",
                    k.mean,
                    k.mean_stderr,
                    k.median,
                    k.p90,
                    k.p99,
                    k.max,
                    100.0 * r.top1_agreement,
                    m.file_size() as f64 / 1e6,
                    b.file_size() as f64 / m.file_size() as f64
                ));
                outputs.push(json!({
                    "model": path, "text": text_path, "model_bytes": m.file_size(),
                    "model_params": m.n_params()?, "base": base_path, "base_bytes": b.file_size(),
                    "perplexity": r.perplexity, "base_perplexity": r.base_perplexity,
                    "kld": r.kld, "top1_agreement": r.top1_agreement,
                }));
            }
        }
        _ => {
            for (m, path) in opened.iter().zip(models) {
                let r = eval::perplexity(m, &tokens, &opts, &mut on_chunk)?;
                lines.push(ppl_line("model", path, &r));
                outputs.push(json!({
                    "model": path, "text": text_path, "model_bytes": m.file_size(),
                    "model_params": m.n_params()?, "perplexity": r,
                }));
            }
        }
    }
    bar.finish();
    for o in &mut outputs {
        o["peak_rss_bytes"] = json!(peak_rss_bytes());
    }
    if json_out {
        let v = if outputs.len() == 1 {
            outputs.remove(0)
        } else {
            Value::Array(outputs)
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", lines.join("\n"));
    }
    Ok(())
}
