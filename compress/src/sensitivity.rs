//! `compress sensitivity`: quantize or prune one tensor (or one block) at a time
//! while the rest stays at base, and measure how far the next-token distribution
//! moves (KL divergence against the base on the same tokens). The base runs once;
//! each candidate reruns only the blocks from the one it changed. The report
//! (JSON, Markdown, HTML) ranks the units and feeds `compress quantize
//! --sensitivity R.json --target-bpw X`.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use eval::sensitivity::{
    BaseRun, Changed, MixPoint, SensitivityReport, Setting, SettingKind, Unit,
};
use eval::PerplexityOptions;
use kernels::GgmlType;
use model::calib::Imatrix;
use model::io::model_sha256;
use model::progress::Progress;
use model::{Model, Tensor};
use prune::pattern::Pattern;
use quant::bit_alloc::{self, Candidate};
use quant::gguf_mix;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Whether rows of the report are tensors or whole blocks.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Granularity {
    /// Every 2-D tensor on its own (the embedding / tied head included).
    Tensor,
    /// Every linear of a block together.
    Block,
}

/// Arguments of `compress sensitivity`.
#[derive(Parser)]
pub struct Args {
    /// Model: .gguf, .safetensors, model.safetensors.index.json, or a folder.
    model: String,
    /// UTF-8 calibration text: the importance weights of the quantizers and the
    /// activation norms of the pruner come from it.
    #[arg(long)]
    calib: String,
    /// UTF-8 evaluation text the KL divergence is measured on.
    #[arg(long)]
    text: String,
    /// GGUF block types to try, comma-separated. A type whose blocks do not fit
    /// a tensor's rows is replaced by llama.cpp's fallback (said in the report).
    #[arg(long, value_delimiter = ',', default_value = "Q2_K,Q3_K,Q4_K,Q6_K")]
    types: Vec<String>,
    /// Sparsities to try on block linears (Wanda scores, kept dense),
    /// comma-separated: fractions like 0.5 or N:M patterns like 2:4. Empty: none.
    #[arg(long, value_delimiter = ',')]
    sparsity: Vec<String>,
    /// Rows of the report: tensors, or whole blocks.
    #[arg(long, value_enum, default_value_t = Granularity::Tensor)]
    granularity: Granularity,
    /// Tokens per evaluation chunk.
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Evaluation chunks (each candidate is scored on chunks × (ctx/2 − 1)
    /// tokens; the run's time grows in proportion).
    #[arg(long, default_value_t = 1)]
    chunks: usize,
    /// Chunks of 512 calibration tokens for the importance weights.
    #[arg(long, default_value_t = 16)]
    calib_chunks: usize,
    /// Use this imatrix instead of collecting one from --calib.
    #[arg(long)]
    imatrix: Option<String>,
    /// Output report (.json); the Markdown (.md), HTML (.html) and the imatrix
    /// collected from --calib (.imatrix.gguf) go beside it.
    #[arg(short, long)]
    output: PathBuf,
    /// Measure only the units whose name matches this regular expression
    /// (e.g. `ffn_down|attn_v`, `^blk\.1[0-9]\.`).
    #[arg(long)]
    only: Option<String>,
    /// Units listed in the Markdown table and printed.
    #[arg(long, default_value_t = 20)]
    top: usize,
}

/// A parsed setting.
#[derive(Clone, Copy)]
enum Change {
    Quant(GgmlType),
    Prune(Pattern),
}

fn parse_settings(types: &[String], sparsity: &[String]) -> Result<Vec<(Setting, Change)>> {
    let mut out = Vec::new();
    for t in types.iter().filter(|t| !t.is_empty()) {
        let ty = GgmlType::from_name(t).ok_or_else(|| {
            anyhow::anyhow!(
                "--types: '{t}' is not a GGUF type (e.g. Q2_K, Q4_0, Q4_K, IQ4_NL, Q8_0)"
            )
        })?;
        if matches!(ty, GgmlType::F32) {
            bail!("--types: F32 is the unchanged model; choose a smaller type");
        }
        out.push((
            Setting {
                name: ty.to_string(),
                kind: SettingKind::Quant,
            },
            Change::Quant(ty),
        ));
    }
    for s in sparsity.iter().filter(|s| !s.is_empty()) {
        let pattern = if s.contains(':') {
            Pattern::parse_nm(s)
        } else {
            let f: f64 = s.parse().map_err(|_| {
                anyhow::anyhow!("--sparsity: '{s}' is neither a fraction like 0.5 nor N:M like 2:4")
            })?;
            Pattern::unstructured(f)
        }
        .with_context(|| format!("--sparsity {s}"))?;
        out.push((
            Setting {
                name: s.clone(),
                kind: SettingKind::Sparsity,
            },
            Change::Prune(pattern),
        ));
    }
    if out.is_empty() {
        bail!("nothing to measure: give --types and/or --sparsity");
    }
    Ok(out)
}

/// Whether a tensor of `model` is measured: a matrix (or a mixture of
/// experts' stacked matrices, measured as one unit per block and kind) that
/// stages may change; norms, biases and routers stay as they are.
fn measured(model: &Model, name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2
        && model
            .config
            .arch
            .role(name)
            .is_none_or(|r| r.kept_float().is_none())
}

/// The tensors a unit changes.
fn unit_tensors(model: &Model, granularity: Granularity) -> Result<Vec<(String, Vec<String>)>> {
    let mut matrices = Vec::new();
    for name in model.tensor_names() {
        if measured(model, &name, &model.tensor_meta(&name)?.1) {
            matrices.push(name);
        }
    }
    Ok(match granularity {
        Granularity::Tensor => matrices.into_iter().map(|n| (n.clone(), vec![n])).collect(),
        Granularity::Block => (0..model.config.num_hidden_layers)
            .map(|b| {
                let names = matrices
                    .iter()
                    .filter(|n| model::names::block_index(n) == Some(b))
                    .cloned()
                    .collect();
                (model::names::block_unit(b), names)
            })
            .collect(),
    })
}

/// One tensor changed by one setting (quant's and prune's one-matrix
/// operations): pruned weights as F32 with the base's stored bytes (pruning
/// keeps the model dense); None when the setting does not apply (pruning the
/// embedding).
fn change_tensor(
    model: &Model,
    name: &str,
    change: Change,
    imatrix: Option<&Imatrix>,
) -> Result<Option<Changed>> {
    let t = model.tensor(name)?;
    let shape = t.shape.clone();
    let cols = *shape.last().unwrap_or(&1);
    let values = t.to_f32()?;
    // One importance row per matrix: per expert of a stacked experts' tensor.
    let importance = quant::gguf_quantize::importance_of(imatrix, name, &shape)?;
    let (tensor, applied, restored) = match change {
        Change::Quant(ty) => {
            let ty = gguf_mix::fallback(ty, cols);
            let bytes =
                quant::gguf_quantize::quantize_stacked(&values, &shape, ty, importance.as_deref())
                    .with_context(|| format!("quantizing '{name}' to {ty}"))?;
            let mut restored = vec![0f32; values.len()];
            kernels::quants::dequantize(ty, &bytes, &mut restored)?;
            let tensor = Tensor {
                name: name.to_owned(),
                ty,
                shape,
                data: Cow::Owned(bytes),
                scale: None,
            };
            (tensor, ty.to_string(), restored)
        }
        Change::Prune(pattern) => {
            if model::names::block_index(name).is_none() {
                return Ok(None); // the pruners leave the embedding and head alone
            }
            pattern.check(cols, name)?;
            // Matrix by matrix (expert by expert), each with its own importance.
            let matrices = (importance.as_ref().map_or(cols, Vec::len) / cols).max(1);
            let per = values.len() / matrices;
            let mut pruned = values.clone();
            for (m, part) in pruned.chunks_mut(per).enumerate() {
                let scores = match &importance {
                    Some(imp) => {
                        let norms: Vec<f32> = imp[m * cols..(m + 1) * cols]
                            .iter()
                            .map(|v| v.sqrt())
                            .collect();
                        prune::score::wanda_scores(part, &norms)
                    }
                    None => prune::score::magnitude_scores(part),
                };
                let mask = prune::score::mask(&scores, cols, pattern, true);
                prune::score::apply(part, &mask);
            }
            (
                Tensor::from_f32(name, shape, &pruned),
                String::new(),
                pruned,
            )
        }
    };
    let bytes = match change {
        Change::Quant(_) => tensor.data.len() as u64,
        Change::Prune(_) => t.data.len() as u64,
    };
    Ok(Some(Changed {
        weight_error: bit_alloc::weighted_rel_error(&values, &restored, cols, None),
        tensor,
        applied,
        bytes,
    }))
}

/// Runs the command.
pub fn run(a: Args) -> Result<()> {
    let start = Instant::now();
    let settings = parse_settings(&a.types, &a.sparsity)?;
    if a.output.extension().and_then(|e| e.to_str()) != Some("json") {
        bail!(
            "-o {}: the report is JSON; name it *.json (the .md and .html go beside it)",
            a.output.display()
        );
    }
    model::io::prepare_output(&a.output)?;
    let model_path = crate::resolve(&a.model)?;
    let calib_path = crate::resolve(&a.calib)?;
    let text_path = crate::resolve(&a.text)?;
    let model = Model::open(&model_path)?;
    let text = eval::text::read_text(&text_path)?;
    let tokens = model
        .tokenizer
        .encode(&text)
        .with_context(|| format!("cannot tokenize {}", text_path.display()))?;
    let opts = PerplexityOptions {
        ctx: a.ctx,
        chunks: Some(a.chunks),
    };
    // Checks the text is long enough before the calibration pass.
    eval::perplexity::ChunkPlan::for_model(&model, tokens.len(), &opts)
        .with_context(|| format!("--text {}", text_path.display()))?;

    let mut units_spec = unit_tensors(&model, a.granularity)?;
    if let Some(re) = &a.only {
        let re = regex::Regex::new(re).with_context(|| format!("--only '{re}'"))?;
        units_spec.retain(|(name, _)| re.is_match(name));
        if units_spec.is_empty() {
            bail!("--only '{re}' matches no unit of {}", model_path.display());
        }
    }
    let (imatrix, imatrix_label) = match &a.imatrix {
        Some(p) => {
            let p = crate::resolve(p)?;
            (Imatrix::load(&p)?, p.display().to_string())
        }
        None => {
            let calib = eval::text::read_text(&calib_path)?;
            let ctokens = model
                .tokenizer
                .encode(&calib)
                .with_context(|| format!("cannot tokenize {}", calib_path.display()))?;
            let available = ctokens.len() / 512;
            if available == 0 {
                bail!(
                    "--calib {}: {} tokens, fewer than one chunk of 512",
                    calib_path.display(),
                    ctokens.len()
                );
            }
            let chunks = a.calib_chunks.min(available).max(1);
            let mut bar = Progress::new(chunks as u64, "imatrix");
            let m = Imatrix::collect(
                &model,
                &ctokens,
                512,
                Some(chunks),
                &calib_path.display().to_string(),
                &mut |d, _| bar.set(d as u64, ""),
            )?;
            bar.finish();
            let saved = a.output.with_extension("imatrix.gguf");
            let label = format!(
                "{} (from {}, {chunks} × 512 tokens)",
                saved.display(),
                calib_path.display()
            );
            (m, label)
        }
    };

    let sha = model_sha256(&model)?;
    let t0 = Instant::now();
    let base = BaseRun::capture(&model, &tokens, &opts)?;
    let base_seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "base run: {} chunks of {} tokens, {} scored tokens per candidate ({base_seconds:.1}s)",
        a.chunks,
        a.ctx,
        base.scored_tokens()
    );

    let mut units = Vec::new();
    for (name, tensors) in &units_spec {
        let mut params = 0u64;
        let mut bytes = 0u64;
        for t in tensors {
            let (ty, shape) = model.tensor_meta(t)?;
            let n: usize = shape.iter().product();
            params += n as u64;
            bytes += ty.bytes_for(n).unwrap_or(n * 4) as u64;
        }
        units.push(Unit {
            name: name.clone(),
            block: model::names::block_index(name),
            params,
            base_bytes: bytes,
            score: 0.0,
            rank: 0,
        });
    }

    let total = (units_spec.len() * settings.len()) as u64;
    let bar = Mutex::new((Progress::new(total, "sensitivity"), 0u64));
    let tick = |msg: &str| {
        let mut b = bar.lock().unwrap_or_else(|e| e.into_inner());
        b.1 += 1;
        let done = b.1;
        b.0.set(done, msg);
    };
    let changes: Vec<Change> = settings.iter().map(|(_, c)| *c).collect();
    let change = |name: &str, s: usize| change_tensor(&model, name, changes[s], Some(&imatrix));
    let setting_list: Vec<Setting> = settings.iter().map(|(s, _)| s.clone()).collect();
    let cells =
        eval::sensitivity::measure(&units_spec, &setting_list, &change, &model, &base, &tick)?;
    let (bar, _) = bar.into_inner().unwrap_or_else(|e| e.into_inner());
    bar.finish();

    let mut report = SensitivityReport {
        model: model_path.display().to_string(),
        model_sha256: sha,
        model_params: model.n_params()?,
        calib: calib_path.display().to_string(),
        text: text_path.display().to_string(),
        ctx: a.ctx,
        chunks: a.chunks,
        scored_tokens: base.scored_tokens(),
        granularity: match a.granularity {
            Granularity::Tensor => "tensor",
            Granularity::Block => "block",
        }
        .into(),
        imatrix: Some(imatrix_label),
        settings: settings.into_iter().map(|(s, _)| s).collect(),
        units,
        cells,
        pareto: vec![],
        uniform: vec![],
        seconds: 0.0,
        base_seconds,
    };
    report.rank_units();
    if a.granularity == Granularity::Tensor && a.only.is_none() {
        (report.pareto, report.uniform) = mix_points(&report, &model)?;
    }
    report.seconds = start.elapsed().as_secs_f64();
    write_reports(&report, &a.output, a.top)?;
    if a.imatrix.is_none() {
        // Saved so that `quantize --sensitivity` can use the same weights.
        imatrix.save(&a.output.with_extension("imatrix.gguf"))?;
    }
    println!("{}", eval::report::markdown(&report, a.top));
    eprintln!(
        "wrote {} (+ .md, .html): {} units × {} settings in {:.1}s",
        a.output.display(),
        report.units.len(),
        report.settings.len(),
        report.seconds
    );
    Ok(())
}

/// Writes the JSON, Markdown and HTML reports (each atomically).
fn write_reports(report: &SensitivityReport, json: &Path, top: usize) -> Result<()> {
    model::io::write_atomic(json, serde_json::to_string_pretty(report)?.as_bytes())?;
    model::io::write_atomic(
        &json.with_extension("md"),
        eval::report::markdown(report, top).as_bytes(),
    )?;
    model::io::write_atomic(
        &json.with_extension("html"),
        eval::report::html(report).as_bytes(),
    )
}

/// Reads a sensitivity report and checks it was measured on `model`.
pub fn load_report(path: &Path, model: &Model) -> Result<SensitivityReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: SensitivityReport = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a sensitivity report", path.display()))?;
    let sha = model_sha256(model)?;
    if report.model_sha256 != sha {
        bail!(
            "{} was measured on another model ({}, sha256 {}); {} has sha256 {sha}",
            path.display(),
            report.model,
            report.model_sha256,
            model.path.display()
        );
    }
    // A hand-edited report may point past its own tables.
    if let Some((i, c)) = report
        .cells
        .iter()
        .enumerate()
        .find(|(_, c)| c.unit >= report.units.len() || c.setting >= report.settings.len())
    {
        bail!(
            "{}: cell {i} names unit {} and setting {}, but the report has {} units and {} settings",
            path.display(),
            c.unit,
            c.setting,
            report.units.len(),
            report.settings.len()
        );
    }
    if report.granularity != "tensor" {
        bail!(
            "{} has one row per {}; the allocator needs one per tensor (--granularity tensor)",
            path.display(),
            report.granularity
        );
    }
    Ok(report)
}

/// Per tensor of `model` (in `tensor_names` order), the allocator's options from
/// the report's quantization cells: stored bytes and measured KLD. Tensors the
/// report has no row for (norms) keep their stored type at zero cost.
pub fn candidates(report: &SensitivityReport, model: &Model) -> Result<Vec<Vec<Candidate>>> {
    let by_name: HashMap<&str, usize> = report
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    let mut out = Vec::new();
    for name in model.tensor_names() {
        let (ty, shape) = model.tensor_meta(&name)?;
        let n: usize = shape.iter().product();
        let keep = || Candidate {
            ty: if shape.len() < 2 { GgmlType::F32 } else { ty },
            bytes: if shape.len() < 2 {
                n as u64 * 4
            } else {
                ty.bytes_for(n).unwrap_or(n * 4) as u64
            },
            err: 0.0,
        };
        let Some(&u) = by_name.get(name.as_str()) else {
            if measured(model, &name, &shape) {
                bail!("the sensitivity report has no row for '{name}' (made with --only?)",);
            }
            out.push(vec![keep()]);
            continue;
        };
        let mut opts: Vec<Candidate> = Vec::new();
        for c in report.cells.iter().filter(|c| c.unit == u) {
            if report.settings[c.setting].kind != SettingKind::Quant {
                continue;
            }
            let ty = GgmlType::from_name(&c.applied).ok_or_else(|| {
                anyhow::anyhow!(
                    "report cell for '{name}' names an unknown type '{}'",
                    c.applied
                )
            })?;
            if !opts.iter().any(|o| o.ty == ty) {
                opts.push(Candidate {
                    ty,
                    bytes: c.bytes,
                    err: c.shift.kld,
                });
            }
        }
        if opts.is_empty() {
            bail!("the sensitivity report has no quantization measurement for '{name}'");
        }
        out.push(opts);
    }
    Ok(out)
}

/// The allocator's mixes over a range of budgets, and each quantization setting
/// applied everywhere, with KLD predicted as the sum of measured shifts.
fn mix_points(report: &SensitivityReport, model: &Model) -> Result<(Vec<MixPoint>, Vec<MixPoint>)> {
    let options = candidates(report, model)?;
    let params = model.n_params()? as f64;
    let point = |label: String, chosen: &[Candidate]| {
        let bytes: u64 = chosen.iter().map(|c| c.bytes).sum();
        MixPoint {
            label,
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / params,
            predicted_kld: chosen.iter().map(|c| c.err).sum(),
        }
    };
    let smallest: Vec<Candidate> = options
        .iter()
        .map(|o| *o.iter().min_by_key(|c| c.bytes).expect("not empty"))
        .collect();
    let largest: Vec<Candidate> = options
        .iter()
        .map(|o| *o.iter().max_by_key(|c| c.bytes).expect("not empty"))
        .collect();
    let lo = point(String::new(), &smallest).bits_per_weight;
    let hi = point(String::new(), &largest).bits_per_weight;
    let mut pareto = Vec::new();
    for i in 0..=16 {
        let bpw = lo + (hi - lo) * i as f64 / 16.0;
        if let Ok(chosen) = bit_alloc::allocate(&options, bpw + 1e-9) {
            let p = point(format!("alloc {bpw:.2} bpw"), &chosen);
            if pareto.last().is_none_or(|q: &MixPoint| q.bytes != p.bytes) {
                pareto.push(p);
            }
        }
    }
    let mut uniform = Vec::new();
    for (s, setting) in report.settings.iter().enumerate() {
        if setting.kind != SettingKind::Quant {
            continue;
        }
        let mut chosen = Vec::new();
        for (name, opts) in model.tensor_names().iter().zip(&options) {
            let cell = report
                .units
                .iter()
                .position(|u| &u.name == name)
                .and_then(|u| report.cell(u, s));
            match cell {
                Some(c) => chosen.push(Candidate {
                    ty: opts[0].ty,
                    bytes: c.bytes,
                    err: c.shift.kld,
                }),
                None => chosen.push(opts[0]),
            }
        }
        uniform.push(point(format!("all {}", setting.name), &chosen));
    }
    Ok((pareto, uniform))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_refuse_nonsense() {
        let s = parse_settings(
            &["Q4_K".into(), "q8_0".into()],
            &["0.5".into(), "2:4".into()],
        )
        .unwrap();
        let names: Vec<_> = s.iter().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names, ["Q4_K", "Q8_0", "0.5", "2:4"]);
        for (types, sp) in [
            (vec!["Q9_X".to_string()], vec![]),
            (vec![], vec!["1.5".to_string()]),
            (vec![], vec!["5:4".to_string()]),
            (vec![], vec!["half".to_string()]),
            (vec![], vec![]),
        ] {
            assert!(parse_settings(&types, &sp).is_err(), "{types:?} {sp:?}");
        }
    }
}
