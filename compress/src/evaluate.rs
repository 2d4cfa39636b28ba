//! `compress eval`: perplexity of one or more models on a text, and with a base
//! model their KL divergence and top-1 agreement against it (the base runs once
//! per chunk however many models are compared), compression ratio, bits per
//! weight overall and per tensor, and per-layer fidelity: each weight's relative
//! error against the base's, and with `--calib` each linear's output error and
//! cosine on the base's activations.

use anyhow::{Context, Result};
use eval::fidelity::LayerFidelity;
use eval::{PerplexityOptions, PerplexityReport};
use model::io::model_sha256;
use model::progress::{peak_rss_bytes, Progress};
use model::Model;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// What `compress eval` was asked.
pub struct EvalArgs<'a> {
    /// Models to evaluate.
    pub models: &'a [std::path::PathBuf],
    /// Base to compare against.
    pub base: Option<&'a Path>,
    /// Evaluation text.
    pub text: &'a Path,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks (None: all).
    pub chunks: Option<usize>,
    /// JSON on stdout instead of the table.
    pub json: bool,
    /// Calibration text for per-layer output fidelity.
    pub calib: Option<&'a Path>,
    /// Calibration tokens for it.
    pub calib_tokens: usize,
}

/// One tensor of an artifact: storage and fidelity against the base.
#[derive(Serialize)]
struct TensorRow {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    shape: Vec<usize>,
    bytes: u64,
    bits_per_weight: f64,
    /// `‖W_a − W_b‖_F / ‖W_b‖_F`; None when the base has no tensor of this shape.
    weight_rel_error: Option<f64>,
    /// Relative error of the layer's output on the base's calibration activations.
    output_rel_error: Option<f64>,
    /// Cosine of the layer's output with the base's.
    output_cosine: Option<f64>,
    /// For a stacked experts' tensor: each expert's output fidelity on the
    /// calibration tokens the base routed to it, with their count.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    output_experts: Vec<eval::fidelity::ExpertFidelity>,
}

/// Storage of every tensor of `m` and, with a base, each weight's relative error.
fn tensor_rows(m: &Model, base: Option<&Model>) -> Result<Vec<TensorRow>> {
    let mut rows = Vec::new();
    for name in m.tensor_names() {
        let (ty, shape) = m.tensor_meta(&name)?;
        let n: usize = shape.iter().product();
        let bytes = m.stored_bytes(&name)?;
        let quantized = m
            .quantized
            .as_ref()
            .is_some_and(|q| q.prefixes(&name).is_some());
        let sparse = m.sparse.as_ref().filter(|s| s.prefix(&name).is_some());
        let ty = match (&m.quantized, sparse) {
            (Some(q), _) if quantized => format!("{:?} int{}", q.format(), q.bits()),
            (_, Some(s)) => format!("{:?} sparse", s.format()),
            _ => ty.to_string(),
        };
        let weight_rel_error = match base {
            Some(b) if b.tensor_meta(&name).is_ok_and(|(_, s)| s == shape) => {
                let a = m.tensor(&name)?.to_f32()?;
                let w = b.tensor(&name)?.to_f32()?;
                Some(quant::gguf_quantize::rel_frobenius_error(&w, &a))
            }
            _ => None,
        };
        rows.push(TensorRow {
            name,
            ty,
            shape,
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / n.max(1) as f64,
            weight_rel_error,
            output_rel_error: None,
            output_cosine: None,
            output_experts: Vec::new(),
        });
    }
    Ok(rows)
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

/// The size line: artifact bytes and bits per weight against the base.
fn size_line(model_bytes: u64, base_bytes: u64, params: u64, base_params: u64, bpw: f64) -> String {
    let ratio = base_bytes as f64 / model_bytes as f64;
    let relation = if ratio >= 1.0 {
        format!("{ratio:.2}x smaller than the base")
    } else {
        format!("{:.2}x larger than the base", 1.0 / ratio)
    };
    format!(
        "       size {:.1} MB vs base {:.1} MB: compression ratio {ratio:.3} ({relation}); parameters {} vs {} (ratio {:.3}); {bpw:.3} bits per weight",
        model_bytes as f64 / 1e6,
        base_bytes as f64 / 1e6,
        params,
        base_params,
        base_params as f64 / params as f64,
    )
}

/// The worst layers by output error (or weight error without --calib), as lines.
fn worst_lines(rows: &[TensorRow], n: usize) -> Vec<String> {
    let key = |r: &TensorRow| r.output_rel_error.or(r.weight_rel_error);
    let mut v: Vec<&TensorRow> = rows.iter().filter(|r| key(r).is_some()).collect();
    v.sort_by(|a, b| key(b).unwrap_or(0.0).total_cmp(&key(a).unwrap_or(0.0)));
    let mut out = vec![format!(
        "       {:<28} {:<10} {:>7} {:>12} {:>12} {:>10}",
        "tensor (worst first)", "type", "bpw", "weight err", "output err", "cosine"
    )];
    let opt = |x: Option<f64>, p: usize| x.map_or("—".to_owned(), |v| format!("{v:.p$}"));
    for r in v.into_iter().take(n) {
        out.push(format!(
            "       {:<28} {:<10} {:>7.3} {:>12} {:>12} {:>10}",
            r.name,
            r.ty,
            r.bits_per_weight,
            opt(r.weight_rel_error, 5),
            opt(r.output_rel_error, 5),
            opt(r.output_cosine, 6)
        ));
    }
    out
}

/// Refuses an artifact that cannot be a compressed form of `base`: another
/// vocabulary or head size, or any dimension larger than the base's (pruning and
/// structured cuts only ever shrink them).
fn check_comparable(artifact: &Model, base: &Model) -> Result<()> {
    let (a, b) = (&artifact.config, &base.config);
    let fail = |what: &str, x: usize, y: usize, rule: &str| {
        anyhow::bail!(
            "{}: {what} is {x} but the base {} has {y}; {rule}, so it is not a compressed form of the base",
            artifact.path.display(),
            base.path.display()
        )
    };
    for (what, x, y) in [
        ("the vocabulary", a.vocab_size, b.vocab_size),
        ("the head size", a.head_dim, b.head_dim),
    ] {
        if x != y {
            return fail(what, x, y, "compression keeps it");
        }
    }
    for (what, x, y) in [
        ("the hidden size", a.hidden_size, b.hidden_size),
        ("the FFN size", a.intermediate_size, b.intermediate_size),
        (
            "the number of blocks",
            a.num_hidden_layers,
            b.num_hidden_layers,
        ),
        (
            "the number of query heads",
            a.num_attention_heads,
            b.num_attention_heads,
        ),
        (
            "the number of K/V heads",
            a.num_key_value_heads,
            b.num_key_value_heads,
        ),
    ] {
        if x > y {
            return fail(what, x, y, "compression only shrinks it");
        }
    }
    Ok(())
}

/// Evaluates the models; prints a table, or JSON (one object, or an array for
/// several models).
pub fn run(a: &EvalArgs) -> Result<()> {
    let text = eval::text::read_text(a.text)?;
    let opened = a
        .models
        .iter()
        .map(|p| Model::open(p))
        .collect::<Result<Vec<_>>>()?;
    let base_model = a.base.map(Model::open).transpose()?;
    // The base's tokenizer defines the tokens every model is scored on.
    let tokenizer = &base_model.as_ref().unwrap_or(&opened[0]).tokenizer;
    let tokens = tokenizer
        .encode(&text)
        .with_context(|| format!("cannot tokenize {}", a.text.display()))?;
    let opts = PerplexityOptions {
        ctx: a.ctx,
        chunks: a.chunks,
    };
    let n_chunks = a.chunks.unwrap_or(tokens.len() / a.ctx.max(1));
    let mut bar = Progress::new(n_chunks as u64, "eval");
    let mut on_chunk =
        |done: usize, _total: usize, ppl: f64| bar.set(done as u64, &format!("ppl {ppl:.4}"));
    let mut outputs = Vec::new();
    let mut lines = Vec::new();
    match (&base_model, a.base) {
        (Some(b), Some(base_path)) => {
            for m in &opened {
                check_comparable(m, b)?;
            }
            let refs: Vec<&Model> = opened.iter().collect();
            let reports = eval::compare_many(&refs, b, &tokens, &opts, &mut on_chunk)?;
            bar.finish();
            let base_params = b.n_params()?;
            let base_sha = model_sha256(b)?;
            lines.push(ppl_line("base", base_path, &reports[0].base_perplexity));
            for ((m, path), r) in opened.iter().zip(a.models).zip(&reports) {
                let k = &r.kld;
                let mut rows = tensor_rows(m, Some(b))?;
                if let Some(calib) = a.calib {
                    add_output_fidelity(&mut rows, b, m, calib, a.calib_tokens)?;
                }
                let params = m.n_params()?;
                let tensor_bytes: u64 = rows.iter().map(|t| t.bytes).sum();
                let bpw = tensor_bytes as f64 * 8.0 / params as f64;
                lines.push(ppl_line("model", path, &r.perplexity));
                lines.push(format!(
                    "       KLD mean {:.6} +/- {:.6}, median {:.6}, p90 {:.6}, p99 {:.6}, max {:.6}; same top-1 {:.2}%; PPL {:+.2}% vs base",
                    k.mean,
                    k.mean_stderr,
                    k.median,
                    k.p90,
                    k.p99,
                    k.max,
                    100.0 * r.top1_agreement,
                    100.0 * (r.perplexity.perplexity / r.base_perplexity.perplexity - 1.0)
                ));
                lines.push(size_line(
                    m.file_size(),
                    b.file_size(),
                    params,
                    base_params,
                    bpw,
                ));
                lines.extend(worst_lines(&rows, 8));
                outputs.push(json!({
                    "model": path, "model_sha256": model_sha256(m)?, "text": a.text,
                    "model_bytes": m.file_size(), "model_params": params,
                    "base": base_path, "base_sha256": base_sha,
                    "base_bytes": b.file_size(), "base_params": base_params,
                    "compression_ratio": b.file_size() as f64 / m.file_size() as f64,
                    "param_ratio": base_params as f64 / params as f64,
                    "bits_per_weight": bpw,
                    "perplexity": r.perplexity, "base_perplexity": r.base_perplexity,
                    "ppl_increase": r.perplexity.perplexity / r.base_perplexity.perplexity - 1.0,
                    "kld": r.kld, "top1_agreement": r.top1_agreement,
                    "tensors": rows,
                }));
            }
        }
        _ => {
            for (m, path) in opened.iter().zip(a.models) {
                let r = eval::perplexity(m, &tokens, &opts, &mut on_chunk)?;
                let rows = tensor_rows(m, None)?;
                let params = m.n_params()?;
                let tensor_bytes: u64 = rows.iter().map(|t| t.bytes).sum();
                lines.push(ppl_line("model", path, &r));
                outputs.push(json!({
                    "model": path, "model_sha256": model_sha256(m)?, "text": a.text,
                    "model_bytes": m.file_size(), "model_params": params,
                    "bits_per_weight": tensor_bytes as f64 * 8.0 / params as f64,
                    "perplexity": r, "tensors": rows,
                }));
            }
            bar.finish();
        }
    }
    for o in &mut outputs {
        o["peak_rss_bytes"] = json!(peak_rss_bytes());
    }
    if a.json {
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

/// Fills each row's output error and cosine from a fidelity pass on `calib`.
fn add_output_fidelity(
    rows: &mut [TensorRow],
    base: &Model,
    artifact: &Model,
    calib: &Path,
    n_tokens: usize,
) -> Result<()> {
    let text = eval::text::read_text(calib)?;
    let tokens = base
        .tokenizer
        .encode(&text)
        .with_context(|| format!("cannot tokenize {}", calib.display()))?;
    if tokens.len() < 2 {
        anyhow::bail!("--calib {}: fewer than 2 tokens", calib.display());
    }
    let tokens = &tokens[..n_tokens.clamp(2, tokens.len())];
    let ctx = 512.min(tokens.len());
    let mut bar = Progress::new(tokens.len().div_ceil(ctx) as u64, "fidelity");
    let layers: Vec<LayerFidelity> =
        eval::fidelity::output_fidelity(base, artifact, tokens, ctx, &mut |d, _| {
            bar.set(d as u64, "")
        })?;
    bar.finish();
    let by_name: HashMap<&str, &LayerFidelity> =
        layers.iter().map(|l| (l.name.as_str(), l)).collect();
    for r in rows {
        if let Some(l) = by_name.get(r.name.as_str()) {
            r.output_rel_error = Some(l.rel_error);
            r.output_cosine = Some(l.cosine);
            r.output_experts = l.experts.clone();
        }
    }
    Ok(())
}
