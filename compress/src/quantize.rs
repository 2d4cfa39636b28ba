//! `compress quantize`: a model into a GGUF file, with one of llama.cpp's mixes or
//! a per-tensor allocation for a target bits-per-weight, importance-weighted when
//! an imatrix is given.

use crate::progress::Progress;
use anyhow::{bail, Result};
use model::calib::Imatrix;
use model::Model;
use quant::gguf_quantize::{self, PlannedTensor};
use quant::{bit_alloc, gguf_mix, Mix, Override};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The command's arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Input model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
    input: String,
    /// Mix: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_0, Q4_1, Q4_K_S, Q4_K_M, Q5_0, Q5_1,
    /// Q5_K_S, Q5_K_M, Q6_K, Q8_0, IQ4_NL, IQ4_XS, F16, BF16, F32. Optional with
    /// --target-bpw (the output is then labelled by its most common type).
    #[arg(long = "type", required_unless_present = "target_bpw")]
    mix: Option<String>,
    /// Choose a type per tensor minimising the summed importance-weighted error at
    /// this many bits per weight (measures every candidate type).
    #[arg(long)]
    target_bpw: Option<f64>,
    /// Importance matrix (from `compress imatrix` or llama-imatrix).
    #[arg(long)]
    imatrix: Option<String>,
    /// Per-tensor type override REGEX=TYPE (repeatable; first match wins).
    #[arg(long = "tensor-type")]
    tensor_type: Vec<String>,
    /// Output GGUF file.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the per-tensor report (type, bytes, relative error) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    // Everything that can be wrong with the arguments is reported before any work.
    let mix = a.mix.as_deref().map(Mix::from_name).transpose()?;
    let overrides = a
        .tensor_type
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let imatrix = a
        .imatrix
        .as_deref()
        .map(|p| crate::resolve(p).and_then(|p| Imatrix::load(&p)))
        .transpose()?;
    let model = Model::open(&crate::resolve(&a.input)?)?;
    if a.output.canonicalize().ok() == model.path.canonicalize().ok() {
        bail!(
            "output {} is the input; inputs are never modified",
            a.output.display()
        );
    }
    let plan: Vec<PlannedTensor> = match (a.target_bpw, mix) {
        (Some(bpw), _) => {
            let mut bar = Progress::new(model.tensor_names().len() as u64, "measure");
            let mut plan =
                bit_alloc::plan_for_target(&model, bpw, imatrix.as_ref(), &mut |d, _, n| {
                    bar.set(d as u64, n)
                })?;
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
    for t in &plan {
        *counts.entry(t.ty).or_insert(0usize) += 1;
        if let Some(note) = t.note.as_ref().filter(|n| n.contains("falls back")) {
            eprintln!("{}: {note}", t.name);
        }
    }
    let summary: Vec<String> = counts.iter().map(|(t, n)| format!("{n} × {t}")).collect();
    eprintln!("{label}: {} tensors: {}", plan.len(), summary.join(", "));
    let mut bar = Progress::new(plan.len() as u64, "quantize");
    let r = gguf_quantize::quantize_to_gguf(
        &model,
        &plan,
        imatrix.as_ref(),
        file_type,
        &a.output,
        &mut |d, _, n| bar.set(d as u64, n),
    )?;
    bar.finish();
    if let Some(path) = a.report {
        model::io::write_atomic(&path, serde_json::to_string_pretty(&r)?.as_bytes())?;
    }
    println!(
        "wrote {}: {:.1} MB, {:.3} bits per weight, {} ({:.1}s)",
        a.output.display(),
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
