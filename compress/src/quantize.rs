//! `compress quantize`: a model into a GGUF file, with one of llama.cpp's mixes or
//! a per-tensor allocation for a target bits-per-weight, importance-weighted when
//! an imatrix is given; or, with `--method gptq|rtn`, calibrated GPTQ (or plain
//! rounding) into GPTQ / compressed-tensors safetensors folders or onto the grids
//! of the GGUF types.

use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::calib::walk::{ExpertCalibration, Timings};
use model::calib::{calibration_samples, Imatrix};
use model::checkpoint::Checkpoint;
use model::gguf::{split_prefix, GgufSplit};
use model::gguf_export::{parse_kv_override, GgufOutput};
use model::hf_quant::{HfQuantFormat, IntQuantConfig};
use model::progress::Progress;
use model::Model;
use quant::calibrated::{self, Calibrated, LayerReport};
use quant::gguf_quantize::{self, PlannedTensor};
use quant::gptq::{GptqOptions, Grid};
use quant::{bit_alloc, gguf_mix, Mix, Override};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Quantization method.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// GPTQ: calibrated, each column's rounding error compensated by the later ones.
    Gptq,
    /// AWQ: activation-aware per-channel scales folded into the preceding norm
    /// or linear, then rounding with a clip search.
    Awq,
    /// Round to nearest on the same grid (the baseline).
    Rtn,
}

/// Safetensors layout for `--method` without `--type`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// GPTQ v1 (`qweight`, `qzeros`, `scales`, `g_idx`), as HF transformers and vLLM load it.
    Gptq,
    /// compressed-tensors `pack-quantized`.
    CompressedTensors,
}

/// The command's arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Input model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
    input: String,
    /// Mix: TQ1_0, Q1_0, TQ2_0, Q2_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_1, Q4_K_S, Q4_K_M,
    /// Q5_0, Q5_1, Q5_K_S, Q5_K_M, Q6_K, Q8_0, IQ4_NL, IQ4_XS, NVFP4, MXFP4_MOE
    /// (stacked experts in MXFP4, the rest Q8_0), F16, BF16, F32. Optional with
    /// --target-bpw (the output is then labelled by its most common type).
    #[arg(long = "type", required_unless_present_any = ["target_bpw", "method"])]
    mix: Option<String>,
    /// Choose a type per tensor minimising the summed importance-weighted error at
    /// this many bits per weight (measures every candidate type).
    #[arg(long)]
    target_bpw: Option<f64>,
    /// With --target-bpw: allocate on the KL divergence measured per tensor and
    /// type by `compress sensitivity` (this report, made on this same model)
    /// instead of the weight-error proxy. Pass the same --imatrix the report used.
    #[arg(long, requires = "target_bpw")]
    sensitivity: Option<PathBuf>,
    /// With --target-bpw (without --sensitivity): the types the allocator may
    /// choose, comma-separated; a type that does not fit a tensor's rows is
    /// replaced by llama.cpp's fallback. Default: every block type that fits.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "target_bpw",
        conflicts_with = "sensitivity"
    )]
    candidates: Vec<String>,
    /// Importance matrix (from `compress imatrix` or llama-imatrix).
    #[arg(long)]
    imatrix: Option<String>,
    /// Per-tensor type override REGEX=TYPE (repeatable; first match wins).
    #[arg(long = "tensor-type")]
    tensor_type: Vec<String>,
    /// A file of REGEX=TYPE overrides separated by spaces or newlines, as
    /// llama-quantize reads it (after any --tensor-type).
    #[arg(long, value_name = "FILE")]
    tensor_type_file: Option<PathBuf>,
    /// Type of output.weight (llama-quantize's option; ignored, with a note,
    /// when the head is the token embedding).
    #[arg(long, value_name = "TYPE")]
    output_tensor_type: Option<String>,
    /// Type of token_embd.weight (llama-quantize's option).
    #[arg(long, value_name = "TYPE")]
    token_embedding_type: Option<String>,
    /// Use the importance matrix only for tensors whose name contains this
    /// (repeatable; llama-quantize's option).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "exclude_weights",
        requires = "imatrix"
    )]
    include_weights: Vec<String>,
    /// Do not use the importance matrix for tensors whose name contains this
    /// (repeatable; llama-quantize's option).
    #[arg(long, value_name = "NAME", requires = "imatrix")]
    exclude_weights: Vec<String>,
    /// Set a metadata key of the output GGUF: KEY=int:N (written as u32, as
    /// llama-quantize does), KEY=float:X, KEY=bool:true|false or KEY=str:TEXT
    /// (repeatable). A key the model has must keep its kind of value.
    #[arg(long, value_name = "KEY=TYPE:VALUE")]
    override_kv: Vec<String>,
    /// Print every tensor's planned type and size and the output's size in
    /// bytes (each file's when split), then stop without quantizing or writing.
    #[arg(long)]
    dry_run: bool,
    /// Remove these blocks (numbers as in the input, comma-separated), as
    /// llama-quantize does: the rest are renumbered from 0, `block_count` and the
    /// per-block metadata arrays follow, and the imatrix is re-indexed (the
    /// pruned blocks' entries dropped).
    #[arg(long, value_name = "L0,L1,…", value_delimiter = ',')]
    prune_layers: Vec<usize>,
    /// Output: a GGUF file, or with --method and no --type an HF-style folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the per-tensor report (type, bytes, relative error; with
    /// --method the per-layer reconstruction errors and timings) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Calibrated quantization: gptq, awq or rtn. With --type the result is a GGUF
    /// file on that mix's grids; without, an HF folder (--format, --bits, --group).
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// Bits per weight of the GPTQ / compressed-tensors formats: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Columns per scale group; -1 (or 0) for one scale per output channel.
    /// Default 128; for compressed-tensors, which needs a group that divides
    /// every layer's input columns, the default drops to 64 or 32 where 128
    /// does not (said on stderr and in the report).
    #[arg(long, allow_negative_numbers = true)]
    group: Option<i64>,
    /// Asymmetric grid (a zero point per group) instead of symmetric.
    #[arg(long)]
    asym: bool,
    /// GPTQ act-order (desc_act): columns in decreasing order of input energy.
    #[arg(long)]
    act_order: bool,
    /// With --act-order, keep groups as contiguous column ranges (g_idx = i / group).
    /// Always the case on GGUF grids.
    #[arg(long)]
    static_groups: bool,
    /// GPTQ dampening: fraction of the mean Hessian diagonal added to it (raised
    /// automatically while the Hessian does not factor).
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Quantize q/k/v, then o, then gate/up, then down, each seeing the already
    /// quantized layers before it (`--true-sequential false`: all Hessians from the
    /// original block).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    true_sequential: bool,
    /// Mixture of experts: gather every routed expert's GPTQ statistics from
    /// every calibration token run through it (the block output still uses the
    /// true routing), not only from the tokens routed to it.
    #[arg(long)]
    calibrate_all_experts: bool,
    /// Mixture of experts: an expert routed fewer calibration tokens than this
    /// takes its GPTQ statistics from every calibration token (named in the
    /// report and on the terminal).
    #[arg(long, default_value_t = ExpertCalibration::default().min_tokens)]
    min_expert_tokens: usize,
    /// Calibration text for --method gptq.
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
    /// Search a clipped range per group of the integer grid (AWQ's auto-clip:
    /// the range shrinks in 5% steps while the importance-weighted error falls).
    /// Default: on for gptq and awq, off for rtn (the plain baseline).
    #[arg(long, action = clap::ArgAction::Set)]
    clip: Option<bool>,
    /// Folder layout with --method and no --type.
    #[arg(long, value_enum, default_value_t = Format::Gptq)]
    format: Format,
    /// Write a split GGUF as llama-gguf-split does: a new file whenever the next
    /// tensor would take the current one past SIZE (M = 10^6, G = 10^9 bytes,
    /// e.g. 2G), files named OUTPUT without .gguf plus -00001-of-0000N.gguf.
    #[arg(long, value_name = "SIZE")]
    split_max_size: Option<String>,
    /// Split the output GGUF as the input GGUF is split (llama-quantize
    /// --keep-split), files named as with --split-max-size.
    #[arg(long, conflicts_with = "split_max_size")]
    keep_split: bool,
}

/// The output GGUF: where, divided how, with which metadata overrides.
fn gguf_output(a: &Args, model: &Model) -> Result<GgufOutput> {
    Ok(GgufOutput {
        path: a.output.clone(),
        split: gguf_split(a, model)?,
        kv_overrides: a
            .override_kv
            .iter()
            .map(|o| parse_kv_override(o))
            .collect::<Result<_>>()?,
    })
}

/// The type overrides in llama-quantize's order of strength: --output-tensor-type
/// and --token-embedding-type, then --tensor-type, then --tensor-type-file.
fn overrides(a: &Args, model: &Model) -> Result<Vec<Override>> {
    let names = model.tensor_names();
    let mut out = Vec::new();
    for (flag, ty, name) in [
        (
            "--output-tensor-type",
            &a.output_tensor_type,
            "output.weight",
        ),
        (
            "--token-embedding-type",
            &a.token_embedding_type,
            "token_embd.weight",
        ),
    ] {
        let Some(ty) = ty else { continue };
        if !names.iter().any(|n| n == name) {
            eprintln!(
                "note: {flag} {ty}: {} has no {name}; ignored",
                model.path.display()
            );
            continue;
        }
        let mut o = Override::parse(&format!("^{}$={ty}", regex::escape(name)))
            .with_context(|| format!("{flag} {ty}"))?;
        o.text = format!("{flag} {ty}");
        out.push(o);
    }
    for t in &a.tensor_type {
        out.push(Override::parse(t)?);
    }
    if let Some(path) = &a.tensor_type_file {
        let text = model::io::read_text(path)?;
        for item in text.split_whitespace() {
            out.push(
                Override::parse(item)
                    .with_context(|| format!("--tensor-type-file {}", path.display()))?,
            );
        }
    }
    Ok(out)
}

/// --dry-run: every tensor's planned type and size, and each output file's
/// size, exactly as the real run would write them.
fn print_dry_run(
    model: &Model,
    plan: &[PlannedTensor],
    file_type: u32,
    out: &GgufOutput,
) -> Result<()> {
    let decls = quant::gguf_quantize::plan_decls(model, plan);
    let files = out.planned_sizes(model, file_type, &decls)?;
    for d in &decls {
        let n: u64 = d.dims.iter().product();
        let shape: Vec<u64> = d.dims.iter().rev().copied().collect();
        println!(
            "{:<40} {:>8} {:>14} {:>12} bytes",
            d.name,
            d.ty.name(),
            format!("{shape:?}"),
            d.ty.bytes_for(n as usize).unwrap_or(0)
        );
    }
    for (path, bytes) in &files {
        println!("would write {}: {bytes} bytes", path.display());
    }
    let total: u64 = files.iter().map(|f| f.1).sum();
    println!(
        "dry run: {} tensors, {total} bytes ({:.1} MB) in {} file{}; nothing written",
        decls.len(),
        total as f64 / 1e6,
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// How the output GGUF is divided into files (--split-max-size, --keep-split).
fn gguf_split(a: &Args, model: &Model) -> Result<GgufSplit> {
    if let Some(size) = &a.split_max_size {
        return Ok(GgufSplit::MaxBytes(GgufSplit::parse_max_size(size)?));
    }
    if !a.keep_split {
        return Ok(GgufSplit::Single);
    }
    match &model.checkpoint {
        Checkpoint::Gguf(g) => Ok(GgufSplit::ByName(
            g.tensors.iter().map(|t| (t.name.clone(), t.part)).collect(),
        )),
        Checkpoint::Safetensors(_) => bail!(
            "--keep-split keeps a GGUF input's split; {} is safetensors (use --split-max-size)",
            model.path.display()
        ),
    }
}

/// Refuses an output whose files would replace the input's: the same file, or
/// (split) a file named PREFIX-NNNNN-of-NNNNN.gguf from the output's prefix.
fn refuse_output_over_input(output: &Path, model: &Model) -> Result<()> {
    let canonical = |p: &Path| {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        parent
            .canonicalize()
            .ok()
            .map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    let Some(out) = canonical(output) else {
        return Ok(());
    };
    let out = out.display().to_string();
    let prefix = out.strip_suffix(".gguf").unwrap_or(&out);
    for input in model.weight_files() {
        let Some(input) = canonical(&input) else {
            continue;
        };
        let input = input.display().to_string();
        if input == out || split_prefix(&input) == Some(prefix) {
            bail!(
                "output {} would replace input {input}; inputs are never modified",
                output.display()
            );
        }
    }
    Ok(())
}

/// Reads the imatrix (if any) and opens the model, refusing an output that is
/// the input.
fn open_inputs(a: &Args) -> Result<(Option<Imatrix>, Model)> {
    let imatrix = a
        .imatrix
        .as_deref()
        .map(|p| crate::resolve(p).and_then(|p| Imatrix::load(&p)))
        .transpose()?
        .map(|mut m| {
            // llama-quantize's rule: a name matches when it contains the text.
            let matches =
                |name: &str, texts: &[String]| texts.iter().any(|t| name.contains(t.as_str()));
            if !a.include_weights.is_empty() {
                m.entries
                    .retain(|name, _| matches(name, &a.include_weights));
            }
            m.entries
                .retain(|name, _| !matches(name, &a.exclude_weights));
            m
        });
    let model = Model::open(&crate::resolve(&a.input)?)?;
    refuse_output_over_input(&a.output, &model)?;
    if a.prune_layers.is_empty() {
        return Ok((imatrix, model));
    }
    let model = model.prune_layers(&a.prune_layers)?;
    let imatrix = imatrix.map(|mut m| {
        m.entries = renumber_blocks(std::mem::take(&mut m.entries), &model);
        m
    });
    Ok((imatrix, model))
}

/// Entries keyed by the input's tensor names, keyed by a layer-pruned model's
/// names instead: a pruned block's entries are dropped, the others renumbered
/// (llama-quantize re-indexes its imatrix the same way).
fn renumber_blocks<V>(
    entries: std::collections::BTreeMap<String, V>,
    model: &Model,
) -> std::collections::BTreeMap<String, V> {
    let Some(map) = &model.layer_map else {
        return entries;
    };
    entries
        .into_iter()
        .filter_map(|(name, v)| match model::arch::split_block(&name) {
            Some((l, suffix)) => map
                .kept
                .iter()
                .position(|&k| k == l)
                .map(|new| (model::names::block(new, suffix), v)),
            None => Some((name, v)),
        })
        .collect()
}

/// Checks the arguments alone, reading no file: type names, ranges and
/// combinations (what `compress validate` can say about a recipe's stage).
pub fn check_args(a: &Args) -> Result<()> {
    a.mix.as_deref().map(Mix::from_name).transpose()?;
    for s in &a.tensor_type {
        Override::parse(s)?;
    }
    for t in &a.candidates {
        if GgmlType::from_name(t).is_none() {
            bail!("--candidates: '{t}' is not a GGUF type (e.g. Q4_0, Q4_K, Q8_0)");
        }
    }
    if let Some(bpw) = a.target_bpw {
        if !(bpw.is_finite() && bpw > 0.0) {
            bail!("--target-bpw {bpw} must be a positive number of bits per weight");
        }
    }
    let calibrated = match a.method {
        Some(Method::Gptq | Method::Awq) => true,
        Some(Method::Rtn) => a.mix.is_none(),
        None => false,
    };
    if calibrated {
        if !(a.damp.is_finite() && (0.0..=1.0).contains(&a.damp)) {
            bail!("--damp {} must be between 0 and 1", a.damp);
        }
        if a.target_bpw.is_some() {
            bail!("--target-bpw is not combined with --method in this version; use --type");
        }
        if a.mix.is_none() && ![2, 3, 4, 8].contains(&a.bits) {
            bail!(
                "--bits {}: the GPTQ and compressed-tensors formats take 2, 3, 4 or 8",
                a.bits
            );
        }
        if a.samples == 0 || a.seq == 0 {
            bail!("--samples and --seq must be at least 1");
        }
    }
    if let Some(size) = &a.split_max_size {
        GgufSplit::parse_max_size(size).context("--split-max-size")?;
    }
    for (flag, ty) in [
        ("--output-tensor-type", &a.output_tensor_type),
        ("--token-embedding-type", &a.token_embedding_type),
    ] {
        if let Some(ty) = ty {
            if GgmlType::from_name(ty).is_none() {
                bail!("{flag}: '{ty}' is not a GGUF type (e.g. Q8_0, Q6_K, F16)");
            }
        }
    }
    for o in &a.override_kv {
        parse_kv_override(o)?;
    }
    let gguf_only = [
        ("--tensor-type", !a.tensor_type.is_empty()),
        ("--split-max-size", a.split_max_size.is_some()),
        ("--keep-split", a.keep_split),
        ("--dry-run", a.dry_run),
        ("--override-kv", !a.override_kv.is_empty()),
        ("--prune-layers", !a.prune_layers.is_empty()),
        ("--output-tensor-type", a.output_tensor_type.is_some()),
        ("--token-embedding-type", a.token_embedding_type.is_some()),
        ("--tensor-type-file", a.tensor_type_file.is_some()),
    ];
    if a.method.is_some() && a.mix.is_none() {
        if let Some((flag, _)) = gguf_only.iter().find(|(_, given)| *given) {
            bail!("{flag} applies to GGUF output: give --type too");
        }
    }
    Ok(())
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    check_args(&a)?;
    for out in std::iter::once(&a.output).chain(&a.report) {
        model::io::prepare_output(out)?;
    }
    match a.method {
        Some(Method::Gptq | Method::Awq) => return run_calibrated(a),
        Some(Method::Rtn) if a.mix.is_none() => return run_calibrated(a),
        // RTN on a GGUF mix is the importance-weighted quantization below.
        Some(Method::Rtn) | None => {}
    }
    // Everything that can be wrong with the arguments is reported before any work.
    let mix = a.mix.as_deref().map(Mix::from_name).transpose()?;
    let allowed = (!a.candidates.is_empty())
        .then(|| {
            a.candidates
                .iter()
                .map(|t| {
                    GgmlType::from_name(t).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--candidates: '{t}' is not a GGUF type (e.g. Q4_0, Q4_K, Q8_0)"
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let (imatrix, model) = open_inputs(&a)?;
    let overrides = overrides(&a, &model)?;
    let plan: Vec<PlannedTensor> = match (a.target_bpw, mix) {
        (Some(bpw), _) if a.sensitivity.is_some() => {
            let path = a.sensitivity.as_deref().expect("checked");
            let report = crate::sensitivity::load_report(path, &model)?;
            if report.imatrix.is_some() && imatrix.is_none() {
                eprintln!(
                    "note: {} was measured with importance weights ({}); without --imatrix the file will not match its predictions",
                    path.display(),
                    report.imatrix.as_deref().unwrap_or("")
                );
            }
            let options = crate::sensitivity::candidates(&report, &model)?;
            let mut plan = bit_alloc::plan_from_options(&model, &options, bpw, "measured KLD")?;
            let predicted: f64 = plan
                .iter()
                .zip(&options)
                .map(|(t, o)| o.iter().find(|c| c.ty == t.ty).map_or(0.0, |c| c.err))
                .sum();
            eprintln!(
                "allocated from {}: predicted KLD {predicted:.4} (sum of the measured single-tensor shifts)",
                path.display()
            );
            gguf_quantize::apply_overrides(&mut plan, &overrides, &model)?;
            plan
        }
        (Some(bpw), _) => {
            let mut bar = Progress::new(model.tensor_names().len() as u64, "measure");
            let mut plan = bit_alloc::plan_for_target(
                &model,
                bpw,
                imatrix.as_ref(),
                allowed.as_deref(),
                &mut |d, _, n| bar.set(d as u64, n),
            )?;
            bar.finish();
            gguf_quantize::apply_overrides(&mut plan, &overrides, &model)?;
            plan
        }
        (None, Some(mix)) => gguf_quantize::plan(&model, mix, imatrix.is_some(), &overrides)?,
        (None, None) => bail!("give --type or --target-bpw"),
    };
    let file_type = match (mix, a.target_bpw) {
        (Some(m), None) => m.file_type(),
        _ => gguf_mix::file_type_of(&plan.iter().map(|t| t.ty).collect::<Vec<_>>()),
    };
    let label = match (mix, a.target_bpw) {
        (_, Some(bpw)) => format!("target {bpw} bpw"),
        (Some(m), None) => m.name().to_owned(),
        (None, None) => unreachable!(),
    };
    let mut counts = BTreeMap::new();
    let mut kept = BTreeMap::new();
    for t in &plan {
        *counts.entry(t.ty).or_insert(0usize) += 1;
        if let Some(note) = t.note.as_ref().filter(|n| n.contains("falls back")) {
            eprintln!("{}: {note}", t.name);
        }
        if let Some(why) = t
            .note
            .as_ref()
            .and_then(|n| n.strip_prefix("kept in F32: "))
        {
            *kept.entry(why.to_owned()).or_insert(0usize) += 1;
        }
    }
    let summary: Vec<String> = counts.iter().map(|(t, n)| format!("{n} × {t}")).collect();
    eprintln!("{label}: {} tensors: {}", plan.len(), summary.join(", "));
    if !kept.is_empty() {
        let kept: Vec<String> = kept.iter().map(|(why, n)| format!("{n} × {why}")).collect();
        eprintln!("kept in F32, never quantized: {}", kept.join(", "));
    }
    let out = gguf_output(&a, &model)?;
    if a.dry_run {
        return print_dry_run(&model, &plan, file_type, &out);
    }
    let mut bar = Progress::new(plan.len() as u64, "quantize");
    let r = gguf_quantize::quantize_to_gguf(
        &model,
        &plan,
        imatrix.as_ref(),
        file_type,
        &out,
        &mut |d, _, n| bar.set(d as u64, n),
    )?;
    bar.finish();
    if let Some(path) = a.report {
        model::io::write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    println!(
        "wrote {}: {:.1} MB, {:.3} bits per weight, {} ({:.1}s)",
        written(&r.files),
        r.file_bytes as f64 / 1e6,
        r.bits_per_weight,
        if imatrix.is_some() {
            "with imatrix"
        } else {
            "no imatrix"
        },
        r.seconds
    );
    Ok(())
}

/// The files of a GGUF output for a message: the file, or the first of a
/// split and how many there are.
fn written(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        _ => format!(
            "{} (+{} more split files)",
            files
                .first()
                .map_or(String::new(), |f| f.display().to_string()),
            files.len().saturating_sub(1)
        ),
    }
}

/// What `--report` holds for `--method`.
#[derive(Serialize)]
struct CalibratedReport {
    method: &'static str,
    output: PathBuf,
    /// What was written: the folder, the GGUF file, or each file of a split GGUF.
    files: Vec<PathBuf>,
    file_bytes: u64,
    bits_per_weight: f64,
    samples: usize,
    seq: usize,
    seed: u64,
    seconds: f64,
    timings: Timings,
    layers: Vec<LayerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors: Option<Vec<gguf_quantize::TensorReport>>,
}

/// The mean relative output error of RTN and the method over all layers, one line.
fn block_summary(layers: &[LayerReport], method: &str) -> String {
    let (rtn, gptq) = layers.iter().fold((0.0, 0.0), |(r, g), l| {
        (r + l.rtn_rel_error, g + l.rel_error)
    });
    format!(
        "mean relative output error: RTN {:.5}, {method} {:.5}",
        rtn / layers.len().max(1) as f64,
        gptq / layers.len().max(1) as f64
    )
}

/// Act-order into compressed-tensors keeps its groups contiguous (actorder
/// "weight"): compressed-tensors 0.20 removed actorder "group" (a permuted
/// `weight_g_idx`), so transformers and vLLM refuse a folder that has it.
fn ct_static_groups(a: &Args) -> bool {
    let adjust =
        a.act_order && !a.static_groups && a.mix.is_none() && a.format == Format::CompressedTensors;
    if adjust {
        eprintln!(
            "note: --act-order into compressed-tensors keeps groups contiguous (as --static-groups; actorder \"weight\"): \
             compressed-tensors 0.20 removed actorder \"group\", and its loaders refuse it; --format gptq keeps permuted groups"
        );
    }
    adjust
}

/// The group size when `--group` is not given.
const DEFAULT_GROUP: usize = 128;

/// The group of a compressed-tensors folder: its loaders (transformers with the
/// compressed-tensors package, vLLM) refuse a group that leaves a ragged last
/// group in any layer. A `--group` given that way is refused, naming a group
/// that fits; the default drops to the largest of 64 and 32 that divides every
/// layer's input columns, else to one scale per channel. `widths`: input
/// columns → the first layer with them.
fn ct_group(
    group: Option<usize>,
    given: bool,
    widths: &std::collections::BTreeMap<usize, String>,
) -> Result<Option<usize>> {
    let Some(g) = group else { return Ok(None) };
    let ragged: Vec<(&usize, &String)> = widths
        .iter()
        .filter(|(cols, _)| !cols.is_multiple_of(g))
        .collect();
    let Some(&(cols, name)) = ragged.first() else {
        return Ok(Some(g));
    };
    let fitting = [128, 64, 32]
        .into_iter()
        .filter(|&f| f <= g)
        .find(|f| widths.keys().all(|c| c.is_multiple_of(*f)));
    if given {
        let instead = match fitting {
            Some(f) => format!("--group {f} divides every layer's"),
            None => "no group of 32, 64 or 128 divides every layer's".to_owned(),
        };
        bail!(
            "--group {g} does not divide the {cols} input columns of {name}: compressed-tensors refuses a ragged \
             last group (transformers with the compressed-tensors package stops with \"tensor column shape must be \
             divisible by the given group_size\", and vLLM's kernels need it too); {instead}; --group -1 is one scale \
             per channel, and --format gptq keeps ragged groups"
        );
    }
    match fitting {
        Some(f) => eprintln!(
            "note: group {f} instead of the default {g}: compressed-tensors needs a group that divides every layer's \
             input columns ({cols} in {name})"
        ),
        None => eprintln!(
            "note: one scale per channel instead of the default group {g}: no group of 32, 64 or 128 divides every \
             layer's input columns ({cols} in {name}), which compressed-tensors needs"
        ),
    }
    Ok(fitting)
}

/// `--method gptq` (GGUF or HF output) and `--method rtn` (HF output).
fn run_calibrated(a: Args) -> Result<()> {
    let start = Instant::now();
    let method = a.method.expect("called with a method");
    let mut group = match a.group.unwrap_or(DEFAULT_GROUP as i64) {
        g if g <= 0 => None,
        g => Some(g as usize),
    };
    let opts = GptqOptions {
        damp_percent: a.damp,
        block_size: 128,
        act_order: a.act_order,
        static_groups: a.static_groups || a.mix.is_some() || ct_static_groups(&a),
        experts: ExpertCalibration {
            all_experts: a.calibrate_all_experts,
            min_tokens: a.min_expert_tokens,
        },
    };
    let mix = a.mix.as_deref().map(Mix::from_name).transpose()?;
    let (imatrix, model) = open_inputs(&a)?;
    let overrides = overrides(&a, &model)?;
    let blocks = model.config.num_hidden_layers;
    // Every block linear's grid is checked before any work.
    let int_grid = |cols: usize, group: Option<usize>| Grid::Int {
        bits: a.bits,
        group: group.unwrap_or(cols),
        sym: !a.asym,
        clip: a.clip.unwrap_or(a.method != Some(Method::Rtn)),
    };
    if mix.is_none() {
        // Input columns of every block linear, with the first layer having each.
        let mut widths: std::collections::BTreeMap<usize, String> = Default::default();
        for l in 0..blocks {
            for s in model.config.arch.layer_linears(&model.config, l) {
                let name = model::names::block(l, s);
                let cols = *model.tensor_meta(&name)?.1.last().unwrap_or(&0);
                widths.entry(cols).or_insert(name);
            }
        }
        if a.format == Format::CompressedTensors {
            group = ct_group(group, a.group.is_some(), &widths)?;
        }
        for (&cols, name) in &widths {
            int_grid(cols, group).check(cols, name)?;
            if let Some(g) = group.filter(|g| !cols.is_multiple_of(*g)) {
                eprintln!(
                    "note: group {g} does not divide the {cols} input columns of {name} and its like: their last \
                     group has {} columns (as GPTQ's reference does; vLLM's and exllama's kernels need a group \
                     that divides the input size)",
                    cols % g
                );
            }
        }
    }
    let samples = if method != Method::Rtn {
        let path = crate::resolve(&a.calib)?;
        let text = eval::text::read_text(&path)?;
        let tokens = model.tokenizer.encode(&text)?;
        let bos = if model.tokenizer.add_bos() {
            model.tokenizer.bos()
        } else {
            None
        };
        calibration_samples(&tokens, a.samples, a.seq, a.seed, bos)
            .with_context(|| format!("calibration text {}", path.display()))?
    } else {
        Vec::new()
    };
    let method_name = match method {
        Method::Gptq => "gptq",
        Method::Rtn => "rtn",
        Method::Awq => "awq",
    };
    let calibrated = match method {
        Method::Awq => Calibrated::Awq,
        _ => Calibrated::Gptq(opts, a.true_sequential),
    };
    let report = match mix {
        Some(mix) => {
            let plan = gguf_quantize::plan(&model, mix, true, &overrides)?;
            let out = gguf_output(&a, &model)?;
            if a.dry_run {
                return print_dry_run(&model, &plan, mix.file_type(), &out);
            }
            eprintln!(
                "{} onto the {} grids: {} samples × {} tokens of {}",
                method_name,
                mix.name(),
                samples.len(),
                a.seq,
                a.calib
            );
            let mut bar = Progress::new(blocks as u64, method_name);
            let (r, layers, timings) = calibrated::calibrated_to_gguf(
                &model,
                &plan,
                imatrix.as_ref(),
                &samples,
                calibrated,
                mix.file_type(),
                &out,
                &mut |d, _| bar.set(d as u64, &format!("block {d}")),
            )?;
            bar.finish();
            eprintln!("{}", block_summary(&layers, method_name));
            if let Some(line) = calibrated::expert_coverage(&layers) {
                eprintln!("{line}");
            }
            CalibratedReport {
                method: method_name,
                output: r.files.first().cloned().unwrap_or_else(|| a.output.clone()),
                files: r.files,
                file_bytes: r.file_bytes,
                bits_per_weight: r.bits_per_weight,
                samples: samples.len(),
                seq: a.seq,
                seed: a.seed,
                seconds: start.elapsed().as_secs_f64(),
                timings,
                layers,
                tensors: Some(r.tensors),
            }
        }
        None => {
            let cfg = IntQuantConfig {
                bits: a.bits,
                group_size: group.unwrap_or(0),
                per_channel: group.is_none(),
                sym: !a.asym,
                desc_act: a.act_order,
                static_groups: opts.static_groups,
                damp_percent: a.damp,
                true_sequential: a.true_sequential,
                method: method_name.to_owned(),
            };
            let format = match a.format {
                Format::Gptq => HfQuantFormat::Gptq,
                Format::CompressedTensors => HfQuantFormat::CompressedTensors,
            };
            let grid_of = |name: &str| -> Grid {
                int_grid(
                    model
                        .tensor_meta(name)
                        .map_or(0, |m| *m.1.last().unwrap_or(&0)),
                    group,
                )
            };
            let (layers, timings) = calibrated::calibrated_to_hf(
                &model, &a.output, format, &cfg, &samples, &grid_of, calibrated,
            )?;
            let file_bytes = std::fs::metadata(a.output.join("model.safetensors"))
                .map(|m| m.len())
                .unwrap_or(0);
            let n_params = model.n_params()?;
            if !layers.is_empty() {
                eprintln!("{}", block_summary(&layers, method_name));
            }
            if let Some(line) = calibrated::expert_coverage(&layers) {
                eprintln!("{line}");
            }
            CalibratedReport {
                method: method_name,
                output: a.output.clone(),
                files: vec![a.output.clone()],
                file_bytes,
                bits_per_weight: file_bytes as f64 * 8.0 / n_params.max(1) as f64,
                samples: samples.len(),
                seq: a.seq,
                seed: a.seed,
                seconds: start.elapsed().as_secs_f64(),
                timings,
                layers,
                tensors: None,
            }
        }
    };
    if let Some(path) = &a.report {
        model::io::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    let t = &report.timings;
    println!(
        "wrote {}: {:.1} MB, {:.3} bits per weight, {} in {:.1}s (forward {:.1}s, Hessians {:.1}s, Cholesky {:.1}s, column loop {:.1}s)",
        written(&report.files),
        report.file_bytes as f64 / 1e6,
        report.bits_per_weight,
        method_name,
        report.seconds,
        t.forward_seconds,
        t.hessian_seconds,
        t.factor_seconds,
        t.loop_seconds
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_tensors_groups_divide_every_layer_or_are_refused() {
        let widths = |cols: &[usize]| -> std::collections::BTreeMap<usize, String> {
            cols.iter().map(|&c| (c, format!("blk.0.w{c}"))).collect()
        };
        // SmolLM2: 576 and 1536 columns; 128 does not divide 576.
        let smol = widths(&[576, 1536]);
        assert_eq!(ct_group(Some(128), false, &smol).unwrap(), Some(64));
        let given = ct_group(Some(128), true, &smol).unwrap_err().to_string();
        assert!(
            given.contains("--group 128 does not divide the 576 input columns of blk.0.w576")
                && given.contains("--group 64 divides every layer's"),
            "{given}"
        );
        // A group that divides is kept; per-channel stays per-channel.
        assert_eq!(ct_group(Some(64), true, &smol).unwrap(), Some(64));
        assert_eq!(ct_group(None, true, &smol).unwrap(), None);
        assert_eq!(
            ct_group(Some(128), false, &widths(&[4096, 14336])).unwrap(),
            Some(128)
        );
        // Nothing of 32, 64, 128 divides 100: one scale per channel by default.
        assert_eq!(
            ct_group(Some(128), false, &widths(&[100, 512])).unwrap(),
            None
        );
        let odd = ct_group(Some(128), true, &widths(&[100]))
            .unwrap_err()
            .to_string();
        assert!(odd.contains("no group of 32, 64 or 128 divides"), "{odd}");
    }
}
