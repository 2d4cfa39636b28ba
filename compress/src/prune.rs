//! `compress prune`: removes weights from every block linear of a model with
//! magnitude, Wanda or SparseGPT scores (unstructured or N:M), walking the model
//! block by block over calibration samples (`quant::calibrated::sequential_blocks`)
//! so each layer is pruned on the inputs the already pruned layers before it
//! produce. The result is a dense model whose removed weights are exactly zero:
//! an HF-style folder (safetensors, config.json, tokenizer) or a GGUF file, which
//! `compress quantize --method gptq` takes as it is (keeping the zeros).

use crate::structured::Cuts;
use crate::DtypeArg;
use anyhow::{bail, Context, Result};
use model::calib::calibration_samples;
use model::calib::factor::output_error;
use model::calib::factor::FactorOptions;
use model::calib::walk::{self, f32_tensor, finite_weights, LayerInput, Timings};
use model::dense::{output_file, DenseWriter};
use model::hf_quant::{is_block_linear, write_order};
use model::progress::Progress;
use model::{names, Model, Tensor};
use prune::{schedule, score, sparsegpt, Pattern};
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

/// How a pruned folder stores its block linears.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum SparseFormat {
    /// Dense tensors with exact zeros.
    Dense,
    /// compressed-tensors sparse bitmasks.
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

/// How one layer went.
#[derive(Debug, Clone, Serialize)]
pub struct LayerPrune {
    /// Canonical name.
    pub name: String,
    /// The sparsity asked for this layer.
    pub target: f64,
    /// Fraction of its weights that are exactly zero afterwards.
    pub sparsity: f64,
    /// `‖(W − Ŵ)X‖² / ‖WX‖²` on the calibration inputs (SparseGPT only: it has
    /// the full Hessian).
    pub rel_error: Option<f64>,
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
    let new = crate::structured::plan_config(&model.config, &cuts)?;
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
    let report = crate::structured::run(
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

/// Prunes one layer's weights for `target` sparsity (the layer's share under the
/// schedule; N:M patterns ignore it).
fn prune_layer(
    method: Method,
    pattern: Pattern,
    target: f64,
    values: &[f32],
    cols: usize,
    input: Option<&LayerInput>,
) -> Result<Vec<f32>> {
    let pattern = match pattern {
        Pattern::Unstructured(_) => Pattern::Unstructured(target),
        nm => nm,
    };
    let mut w = values.to_vec();
    match (method, input) {
        (Method::Magnitude, _) => {
            let pruned = score::mask(&score::magnitude_scores(&w), cols, pattern, false);
            score::apply(&mut w, &pruned);
        }
        (Method::Wanda, Some(input)) => {
            let norms: Vec<f32> = input.diagonal().iter().map(|d| d.max(0.0).sqrt()).collect();
            let pruned = score::mask(&score::wanda_scores(&w, &norms), cols, pattern, true);
            score::apply(&mut w, &pruned);
        }
        (Method::Sparsegpt, Some(input)) => {
            let f = input.factored();
            for &j in f.dead() {
                for row in w.chunks_mut(cols) {
                    row[j] = 0.0;
                }
            }
            match f.upper() {
                Some(u) => w = sparsegpt::sparsegpt(&w, cols, u, pattern, 128),
                None => {
                    eprintln!("the Hessian stayed singular after dampening up to 1.0: pruned by Wanda scores instead");
                    return prune_layer(Method::Wanda, pattern, target, values, cols, Some(input));
                }
            }
        }
        (_, None) => bail!("{method:?} needs calibration statistics"),
    }
    Ok(w)
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
    if cuts.heads > 0 || cuts.ffn != 0.0 || cuts.layers > 0 || cuts.width != 0.0 {
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
    Ok(())
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    let start = Instant::now();
    check_args(&a)?;
    let cuts = cuts_of(&a);
    if cuts.heads > 0 || cuts.ffn != 0.0 || cuts.layers > 0 || cuts.width != 0.0 {
        return run_structured(&a, start);
    }
    let pattern = pattern_of(&a)?;
    let compressed = a.format == SparseFormat::CompressedTensors;
    let model = Model::open(&crate::resolve(&a.input)?)?;
    if a.output.canonicalize().ok() == model.path.canonicalize().ok() {
        bail!(
            "output {} is the input; inputs are never modified",
            a.output.display()
        );
    }
    let blocks = model.config.num_hidden_layers;
    for l in 0..blocks {
        for s in model.config.arch.linears() {
            let name = names::block(l, s);
            pattern.check(model.tensor_meta(&name)?.1[1], &name)?;
        }
    }
    let samples = if a.method == Method::Magnitude {
        Vec::new()
    } else {
        samples_of(&a, &model)?
    };
    let opts = FactorOptions {
        damp_percent: a.damp,
        ..FactorOptions::default()
    };
    let dtype = a.dtype.ggml();

    // OWL: a first pass over the unpruned model measures each block's outliers.
    let mut targets = vec![pattern.sparsity(); blocks];
    if a.schedule == Schedule::Owl {
        let mut counts = vec![(0u64, 0u64); blocks];
        let mut bar = Progress::new(blocks as u64, "owl outliers");
        walk::sequential_blocks(
            &model,
            &samples,
            &opts,
            a.true_sequential,
            true,
            &mut |name: &str, w: &Tensor, input: &LayerInput, _t: &mut Timings| {
                let values = finite_weights(&model, name, w)?;
                let norms: Vec<f32> = input.diagonal().iter().map(|d| d.max(0.0).sqrt()).collect();
                let (o, n) = schedule::outliers(&score::wanda_scores(&values, &norms), a.owl_m);
                let l = names::block_index(name).unwrap_or(0);
                counts[l].0 += o;
                counts[l].1 += n;
                Ok(f32_tensor(name, w.shape[0], w.shape[1], &values))
            },
            &mut |d, _| bar.set(d as u64, &format!("block {d}")),
        )?;
        bar.finish();
        let ratios: Vec<f64> = counts
            .iter()
            .map(|&(o, n)| o as f64 / n.max(1) as f64)
            .collect();
        targets = schedule::owl(&ratios, pattern.sparsity(), a.owl_lambda);
        eprintln!(
            "OWL sparsities per block: {}",
            targets
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }

    let order = write_order(&model.config);
    let declared = order
        .iter()
        .map(|n| Ok((n.clone(), model.tensor_meta(n)?.1)))
        .collect::<Result<Vec<_>>>()?;
    // compressed-tensors: the dense result goes to a temporary folder first (the
    // compressed sizes depend on every matrix's non-zeros), then is compressed.
    let staging = if compressed {
        std::fs::create_dir_all(&a.output)
            .with_context(|| format!("cannot create {}", a.output.display()))?;
        Some(
            tempfile::tempdir_in(&a.output)
                .with_context(|| format!("cannot stage in {}", a.output.display()))?,
        )
    } else {
        None
    };
    let dense_out = staging
        .as_ref()
        .map_or(a.output.clone(), |d| d.path().to_path_buf());
    let mut writer = DenseWriter::create(&model, &model.config, &declared, &dense_out, dtype)?;
    let mut next = 0usize;
    let mut layers: Vec<LayerPrune> = Vec::new();
    // Copies the tensors due before `upto` in the write order (block linears
    // among them only when pruning without calibration).
    let write_upto = |upto: Option<&str>,
                      writer: &mut DenseWriter,
                      layers: &mut Vec<LayerPrune>,
                      next: &mut usize|
     -> Result<()> {
        while *next < order.len() && Some(order[*next].as_str()) != upto {
            let name = &order[*next];
            let t = model.tensor(name)?;
            let mut values = finite_weights(&model, name, &t)?;
            if is_block_linear(model.config.arch, name) {
                let target = targets[names::block_index(name).unwrap_or(0)];
                values = prune_layer(a.method, pattern, target, &values, t.shape[1], None)?;
                layers.push(LayerPrune {
                    name: name.clone(),
                    target,
                    sparsity: score::zero_fraction(&values),
                    rel_error: None,
                });
            }
            writer.write(name, &t.shape, &values)?;
            *next += 1;
        }
        Ok(())
    };
    let label = format!("{:?}", a.method).to_lowercase();
    let timings = if samples.is_empty() {
        let mut bar = Progress::new(order.len() as u64, &label);
        write_upto(None, &mut writer, &mut layers, &mut next)?;
        bar.set(order.len() as u64, "done");
        bar.finish();
        Timings::default()
    } else {
        eprintln!(
            "{label} {pattern}: {} samples × {} tokens of {}",
            samples.len(),
            a.seq,
            a.calib
        );
        let mut bar = Progress::new(blocks as u64, &label);
        let mut step = |name: &str,
                        w: &Tensor,
                        input: &LayerInput,
                        t: &mut Timings|
         -> Result<Tensor<'static>> {
            write_upto(Some(name), &mut writer, &mut layers, &mut next)?;
            let (rows, cols) = (w.shape[0], w.shape[1]);
            let values = finite_weights(&model, name, w)?;
            let target = targets[names::block_index(name).unwrap_or(0)];
            let clock = Instant::now();
            let pruned = prune_layer(a.method, pattern, target, &values, cols, Some(input))?;
            t.loop_seconds += clock.elapsed().as_secs_f64();
            let rel_error = (a.method == Method::Sparsegpt).then(|| {
                let clock = Instant::now();
                let hf: Vec<f32> = input.hessian.iter().map(|&v| v as f32).collect();
                let energy = output_error(&values, None, &hf, cols).max(f64::MIN_POSITIVE);
                let e = output_error(&values, Some(&pruned), &hf, cols) / energy;
                t.report_seconds += clock.elapsed().as_secs_f64();
                e
            });
            layers.push(LayerPrune {
                name: name.to_owned(),
                target,
                sparsity: score::zero_fraction(&pruned),
                rel_error,
            });
            writer.write(name, &w.shape, &pruned)?;
            next += 1;
            Ok(f32_tensor(name, rows, cols, &pruned))
        };
        let t = walk::sequential_blocks(
            &model,
            &samples,
            &opts,
            a.true_sequential,
            a.method == Method::Wanda,
            &mut step,
            &mut |d, _| bar.set(d as u64, &format!("block {d}")),
        )?;
        write_upto(None, &mut writer, &mut layers, &mut next)?;
        bar.finish();
        t
    };
    writer.finish(&model)?;
    let overall_sparsity = {
        let mut zeros = 0f64;
        let mut total = 0f64;
        for l in &layers {
            let n = model.tensor_meta(&l.name)?.1.iter().product::<usize>() as f64;
            zeros += l.sparsity * n;
            total += n;
        }
        zeros / total.max(1.0)
    };
    if let Some(staging) = staging {
        let layout = match pattern {
            Pattern::NM { n: 2, m: 4 } => model::sparse_ct::SparseFormat::TwoFour,
            _ => model::sparse_ct::SparseFormat::Bitmask,
        };
        model::sparse_ct::write(
            &Model::open(staging.path())?,
            &a.output,
            layout,
            dtype,
            overall_sparsity,
        )?;
    }

    let file = if a.output.extension().is_some_and(|e| e == "gguf") {
        a.output.clone()
    } else {
        output_file(&a.output)?
    };
    let file_bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let report = PruneReport {
        method: label.clone(),
        pattern: pattern.to_string(),
        schedule: format!("{:?}", a.schedule).to_lowercase(),
        output: a.output.clone(),
        file_bytes,
        sparsity: overall_sparsity,
        samples: samples.len(),
        seq: a.seq,
        seed: a.seed,
        seconds: start.elapsed().as_secs_f64(),
        timings,
        layers,
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
