//! `compress prune`: the flags of the pruning stages, their checks, and the
//! report. The work is in the prune crate: `prune::stage` (magnitude, Wanda or
//! SparseGPT, unstructured or N:M, block by block over calibration samples) and
//! `prune::cut` (structured cuts). The result is a dense model whose removed
//! weights are exactly zero: an HF-style folder (safetensors, config.json,
//! tokenizer) or a GGUF file, which `compress quantize --method gptq` takes as
//! it is (keeping the zeros).

use crate::DtypeArg;
use anyhow::{bail, Context, Result};
use model::calib::calibration_samples;
use model::calib::walk::{ExpertCalibration, Timings};
use model::dense::output_file;
use model::progress::Progress;
use model::{names, Model};
use prune::cut::{self, Cuts};
use prune::stage::{self, LayerPrune, Owl, PruneOptions};
use prune::Pattern;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// How weights are scored.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Method {
    /// OBS pruning with the calibration Hessian: removed weights' contributions
    /// are moved onto the remaining ones of the row.
    Sparsegpt,
    /// |W| times the norm of the input feature over the calibration tokens, per row.
    Wanda,
    /// |W| over the whole matrix (no calibration).
    Magnitude,
}

impl From<Method> for stage::Method {
    fn from(m: Method) -> Self {
        match m {
            Method::Sparsegpt => stage::Method::Sparsegpt,
            Method::Wanda => stage::Method::Wanda,
            Method::Magnitude => stage::Method::Magnitude,
        }
    }
}

/// How a pruned folder stores its block linears.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum SparseFormat {
    /// Dense tensors with exact zeros.
    Dense,
    /// compressed-tensors sparse bitmasks (read by compressed-tensors ≤ 0.14 and
    /// `compress eval`; later versions no longer decompress them).
    CompressedTensors,
}

/// How the overall sparsity is spread over the blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Schedule {
    /// Every layer at the target.
    Uniform,
    /// Outlier-weighted (OWL): blocks with more activation outliers keep more.
    Owl,
}

/// The command's arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Input model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
    input: String,
    /// Scoring method.
    #[arg(long, value_enum, default_value_t = Method::Sparsegpt)]
    method: Method,
    /// Unstructured sparsity: the fraction of each layer's weights removed, in [0, 1).
    #[arg(long, conflicts_with = "nm", allow_negative_numbers = true)]
    sparsity: Option<f64>,
    /// Semi-structured N:M: N of every M consecutive weights of a row removed (2:4, 4:8).
    #[arg(long)]
    nm: Option<String>,
    /// Structured: query heads removed from every block (a multiple of the
    /// key/value heads, so each K/V group keeps as many query heads), scored by
    /// the energy each head puts through the output projection.
    #[arg(long, default_value_t = 0)]
    heads: usize,
    /// Structured: fraction of every block's FFN channels removed (gate/up rows
    /// and down columns together), scored by activation times weight energy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    ffn: f64,
    /// Structured: decoder blocks removed, those whose output is most similar to
    /// their input (ShortGPT's block influence).
    #[arg(long, default_value_t = 0)]
    layers: usize,
    /// Structured: fraction of the hidden (embedding) channels removed across every
    /// layer and norm, scored by the normed activations' magnitude.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    width: f64,
    /// Structured, mixtures of experts: routed experts removed from every block,
    /// those with the lowest REAP saliency on the calibration samples (mean
    /// router weight × output norm over the tokens routed to each); the router
    /// loses their rows, so it renormalises over the survivors.
    #[arg(long, default_value_t = 0)]
    experts: usize,
    /// Per-layer sparsity schedule (unstructured only).
    #[arg(long, value_enum, default_value_t = Schedule::Uniform)]
    schedule: Schedule,
    /// OWL: the spread of the per-block sparsities (± this around the target).
    #[arg(long, default_value_t = 0.08)]
    owl_lambda: f64,
    /// OWL: a score counts as an outlier above this many times its layer's mean.
    #[arg(long, default_value_t = 5.0)]
    owl_m: f32,
    /// Calibration text (Wanda, SparseGPT).
    #[arg(long, default_value = "asset:calib")]
    calib: String,
    /// Calibration samples.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Seed of the calibration sample choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// SparseGPT dampening: fraction of the mean Hessian diagonal added to it.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Prune q/k/v, then o, then gate/up, then down, each on the inputs the
    /// already pruned layers produce (`false`: every input from the original block).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    true_sequential: bool,
    /// Mixture of experts: gather every routed expert's statistics from every
    /// calibration token run through it (the block output still uses the true
    /// routing), not only from the tokens routed to it.
    #[arg(long)]
    calibrate_all_experts: bool,
    /// Mixture of experts: an expert routed fewer calibration tokens than this
    /// takes its statistics from every calibration token.
    #[arg(long, default_value_t = ExpertCalibration::default().min_tokens)]
    min_expert_tokens: usize,
    /// Output: an HF-style folder (or a .safetensors file), or a .gguf file.
    #[arg(short, long)]
    output: PathBuf,
    /// Element type of the written weights (GGUF keeps 1-D tensors in F32).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Folder layout: plain dense safetensors, or compressed-tensors'
    /// `sparse-bitmask` (`sparse-24-bitmask` for 2:4) with its sparsity config.
    #[arg(long, value_enum, default_value_t = SparseFormat::Dense)]
    format: SparseFormat,
    /// Also write the per-layer report (sparsity, output error) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// What `--report` writes.
#[derive(Serialize)]
struct PruneReport {
    method: String,
    pattern: String,
    schedule: String,
    output: PathBuf,
    file_bytes: u64,
    /// Zeros over all block linears.
    sparsity: f64,
    samples: usize,
    seq: usize,
    seed: u64,
    seconds: f64,
    timings: Timings,
    layers: Vec<LayerPrune>,
}

/// The structured cuts the arguments ask for.
fn cuts_of(a: &Args) -> Cuts {
    Cuts {
        heads: a.heads,
        ffn: a.ffn,
        layers: a.layers,
        width: a.width,
        experts: a.experts,
    }
}

/// Reads the calibration samples.
fn samples_of(a: &Args, model: &Model) -> Result<Vec<Vec<u32>>> {
    let path = crate::resolve(&a.calib)?;
    let text = eval::text::read_text(&path)?;
    let tokens = model.tokenizer.encode(&text)?;
    let bos = model
        .tokenizer
        .add_bos()
        .then(|| model.tokenizer.bos())
        .flatten();
    calibration_samples(&tokens, a.samples, a.seq, a.seed, bos)
        .with_context(|| format!("calibration text {}", path.display()))
}

/// The structured path of the command.
fn run_structured(a: &Args, start: Instant) -> Result<()> {
    let cuts = cuts_of(a);
    let model = Model::open(&crate::resolve(&a.input)?)?;
    if a.output.canonicalize().ok() == model.path.canonicalize().ok() {
        bail!(
            "output {} is the input; inputs are never modified",
            a.output.display()
        );
    }
    let new = cut::plan_config(&model.config, &cuts)?;
    let samples = samples_of(a, &model)?;
    eprintln!(
        "structured: {} samples × {} tokens of {}; hidden {} → {}, FFN {} → {}, blocks {} → {}, query heads {} → {}",
        samples.len(),
        a.seq,
        a.calib,
        model.config.hidden_size,
        new.hidden_size,
        model.config.intermediate_size,
        new.intermediate_size,
        model.config.num_hidden_layers,
        new.num_hidden_layers,
        model.config.num_attention_heads,
        new.num_attention_heads
    );
    let mut bars: BTreeMap<String, Progress> = BTreeMap::new();
    let report = cut::run(
        &model,
        &cuts,
        &samples,
        &a.output,
        a.dtype.ggml(),
        &mut |what, d, n| {
            let bar = bars
                .entry(what.to_owned())
                .or_insert_with(|| Progress::new(n as u64, what));
            bar.set(d as u64, "");
            if d == n {
                if let Some(b) = bars.remove(what) {
                    b.finish();
                }
            }
        },
    )?;
    if let Some(path) = &a.report {
        model::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if !report.removed_blocks.is_empty() {
        eprintln!("removed blocks {:?}", report.removed_blocks);
    }
    for (l, kept) in report.kept_experts.iter().enumerate() {
        if report.expert_scores[l].is_empty() {
            continue; // a dense block
        }
        let removed: Vec<String> = (0..report.expert_scores[l].len())
            .filter(|e| !kept.contains(e))
            .map(|e| {
                format!(
                    "{e} (saliency {:.4}, {} tokens)",
                    report.expert_scores[l][e], report.expert_tokens[l][e]
                )
            })
            .collect();
        eprintln!("blk.{l}: removed experts {}", removed.join(", "));
    }
    println!(
        "wrote {}: {:.1}M parameters (was {:.1}M, {:.1}% fewer) in {:.1}s",
        a.output.display(),
        report.params_after as f64 / 1e6,
        report.params_before as f64 / 1e6,
        100.0 * (1.0 - report.params_after as f64 / report.params_before.max(1) as f64),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The pattern the arguments ask for, checked.
fn pattern_of(a: &Args) -> Result<Pattern> {
    match (&a.nm, a.sparsity) {
        (Some(nm), None) => Pattern::parse_nm(nm),
        (None, Some(s)) => Pattern::unstructured(s).with_context(|| "--sparsity"),
        (None, None) => bail!("say what to prune: --sparsity S, --nm N:M, or structured --heads/--ffn/--layers/--width"),
        _ => bail!("give one of --sparsity and --nm"),
    }
}

/// Checks the arguments alone, reading no file: ranges and combinations (what
/// `compress validate` can say about a recipe's stage).
pub fn check_args(a: &Args) -> Result<()> {
    let cuts = cuts_of(a);
    if !(a.damp.is_finite() && (0.0..=1.0).contains(&a.damp)) {
        bail!("--damp {} must be between 0 and 1", a.damp);
    }
    if a.samples == 0 || a.seq == 0 {
        bail!("--samples and --seq must be at least 1");
    }
    if cuts.any() {
        if a.sparsity.is_some() || a.nm.is_some() {
            bail!("structured cuts (--heads/--ffn/--layers/--width) and --sparsity/--nm are separate runs: prune the smaller model again");
        }
        if a.format == SparseFormat::CompressedTensors {
            bail!("--format compressed-tensors stores sparse weights; a structured cut is dense: leave --format out");
        }
        if a.schedule == Schedule::Owl {
            bail!("--schedule owl spreads an unstructured sparsity; structured cuts take their sizes as given");
        }
        for (flag, f) in [("--ffn", cuts.ffn), ("--width", cuts.width)] {
            if !(f.is_finite() && (0.0..1.0).contains(&f)) {
                bail!("{flag} {f} is outside [0, 1)");
            }
        }
        return Ok(());
    }
    let pattern = pattern_of(a)?;
    if a.schedule == Schedule::Owl {
        if !matches!(pattern, Pattern::Unstructured(_)) {
            bail!("--schedule owl spreads an unstructured sparsity; {pattern} fixes every group");
        }
        if a.method == Method::Magnitude {
            bail!("--schedule owl needs activation statistics: use --method wanda or sparsegpt");
        }
        if !(a.owl_lambda.is_finite() && (0.0..0.5).contains(&a.owl_lambda)) {
            bail!("--owl-lambda {} must be in [0, 0.5)", a.owl_lambda);
        }
    }
    if a.format == SparseFormat::CompressedTensors
        && a.output
            .extension()
            .is_some_and(|e| e == "gguf" || e == "safetensors")
    {
        bail!(
            "--format compressed-tensors writes a folder; {} is a file name",
            a.output.display()
        );
    }
    if a.format == SparseFormat::CompressedTensors {
        eprintln!(
            "warning: compressed-tensors 0.15 and later no longer decompress sparse-bitmask folders: transformers \
             with compressed-tensors 0.20 loads this folder with its block linears uninitialised, without an error \
             (scripts/check-engines.sh), and vLLM dropped 2:4 sparse kernels; `compress eval` and compressed-tensors \
             0.14 and older read it. For an engine, write --format dense (the zeros stay exact)"
        );
    }
    Ok(())
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    let start = Instant::now();
    check_args(&a)?;
    for out in std::iter::once(&a.output).chain(&a.report) {
        model::io::prepare_output(out)?;
    }
    let cuts = cuts_of(&a);
    if cuts.any() {
        return run_structured(&a, start);
    }
    let pattern = pattern_of(&a)?;
    let model = Model::open(&crate::resolve(&a.input)?)?;
    if a.output.canonicalize().ok() == model.path.canonicalize().ok() {
        bail!(
            "output {} is the input; inputs are never modified",
            a.output.display()
        );
    }
    let blocks = model.config.num_hidden_layers;
    for l in 0..blocks {
        for s in model.config.arch.layer_linears(&model.config, l) {
            let name = names::block(l, s);
            pattern.check(*model.tensor_meta(&name)?.1.last().unwrap_or(&0), &name)?;
        }
    }
    let samples = if a.method == Method::Magnitude {
        Vec::new()
    } else {
        samples_of(&a, &model)?
    };
    let opts = PruneOptions {
        method: a.method.into(),
        pattern,
        owl: (a.schedule == Schedule::Owl).then_some(Owl {
            lambda: a.owl_lambda,
            m: a.owl_m,
        }),
        damp: a.damp,
        true_sequential: a.true_sequential,
        dtype: a.dtype.ggml(),
        compressed_tensors: a.format == SparseFormat::CompressedTensors,
        experts: ExpertCalibration {
            all_experts: a.calibrate_all_experts,
            min_tokens: a.min_expert_tokens,
        },
    };
    let label = opts.method.label();
    if !samples.is_empty() {
        eprintln!(
            "{label} {pattern}: {} samples × {} tokens of {}",
            samples.len(),
            a.seq,
            a.calib
        );
    }
    let outcome = stage::prune_model(&model, &samples, &opts, &a.output)?;
    let file = if a.output.extension().is_some_and(|e| e == "gguf") {
        a.output.clone()
    } else {
        output_file(&a.output)?
    };
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let report = PruneReport {
        method: label.to_owned(),
        pattern: pattern.to_string(),
        schedule: format!("{:?}", a.schedule).to_lowercase(),
        output: a.output.clone(),
        file_bytes,
        sparsity: outcome.sparsity,
        samples: samples.len(),
        seq: a.seq,
        seed: a.seed,
        seconds: start.elapsed().as_secs_f64(),
        timings: outcome.timings,
        layers: outcome.layers,
    };
    if let Some(path) = &a.report {
        model::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    let errs: Vec<f64> = report.layers.iter().filter_map(|l| l.rel_error).collect();
    if !errs.is_empty() {
        eprintln!(
            "mean relative output error of the pruned layers: {:.5}",
            errs.iter().sum::<f64>() / errs.len() as f64
        );
    }
    let t = &report.timings;
    println!(
        "wrote {}: {:.1} MB, {:.2}% of the block linears' weights zero ({}, {}), {label} in {:.1}s (forward {:.1}s, statistics {:.1}s, Cholesky {:.1}s, pruning {:.1}s)",
        a.output.display(),
        file_bytes as f64 / 1e6,
        100.0 * report.sparsity,
        report.pattern,
        report.schedule,
        report.seconds,
        t.forward_seconds,
        t.hessian_seconds,
        t.factor_seconds,
        t.loop_seconds,
    );
    Ok(())
}
