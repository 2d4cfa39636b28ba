//! The calibrated quantizers over the shared calibration walk
//! ([`model::calib::walk`]): GPTQ quantizes each block linear as soon as its
//! input Hessian is complete (true-sequential by default: see the walk), AWQ
//! searches and folds its scales per block and rounds; both write GGUF grids
//! ([`calibrated_to_gguf`]) or integer grids for HF folders.

use crate::awq;
use crate::gguf_quantize::{
    files_bytes, quantize_tensor, PlannedTensor, QuantizeReport, TensorReport,
};
use crate::gptq::{self, GptqOptions, GptqStats, Grid, QuantizedMatrix, Stored};
use anyhow::{bail, Context, Result};
use model::arch::{Role, Slot};
use model::calib::factor::{output_error, output_error_of_rows};
use model::calib::walk::{
    embed_samples, f32_tensor, finite_weights, sequential_blocks, ExpertInput, LayerInput, Timings,
};
use model::calib::{finite_rows, Hessian, Imatrix};
use model::gguf::GgufWriter;
use model::gguf_export::{self, GgufOutput};
pub use model::hf_quant::write_order;
use model::hf_quant::{is_block_linear, HfQuantFormat, HfQuantWriter, IntLinear, IntQuantConfig};
use model::llama::{EXPERT_SLOTS, LINEAR_GROUPS};
use model::progress::Progress;
use model::{names, Model, Tensor};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// How one linear layer went.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Canonical name.
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The grid, e.g. `int4 g128 sym` or `Q4_0`.
    pub grid: String,
    /// `‖(W − Ŵ)X‖² / ‖WX‖²` on the calibration inputs with round-to-nearest on
    /// the same grid (importance-weighted by `diag H` for GGUF grids).
    pub rtn_rel_error: f64,
    /// The same with GPTQ.
    pub rel_error: f64,
    /// For one routed expert of a stacked experts' tensor: which, the
    /// calibration tokens routed to it, and where its statistics came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<ExpertInput>,
    /// For one head of a per-head tensor (latent attention's `k_b`, `v_b`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<usize>,
    /// Dampening, dead inputs, fallback and timings.
    #[serde(flatten)]
    pub stats: GptqStats,
}

/// A short name for a grid, for reports.
pub fn grid_label(grid: &Grid) -> String {
    match *grid {
        Grid::Int {
            bits,
            group,
            sym,
            clip,
        } => format!(
            "int{bits} g{group} {}{}",
            if sym { "sym" } else { "asym" },
            if clip { " clip" } else { "" }
        ),
        Grid::Gguf(ty) => ty.name().to_owned(),
    }
}

/// One line on how a mixture of experts' routed experts were calibrated: how
/// many took their statistics from their routed tokens, and which took them
/// from every token (starved, with their token counts, or all by request);
/// None for a model without experts.
pub fn expert_coverage(layers: &[LayerReport]) -> Option<String> {
    use model::calib::walk::ExpertStatistics as S;
    // Gate, up and down of an expert share its routing: one entry per expert.
    let mut experts: Vec<(usize, ExpertInput)> = layers
        .iter()
        .filter_map(|r| Some((names::block_index(&r.name)?, r.expert?)))
        .collect();
    experts.sort_by_key(|(l, e)| (*l, e.expert));
    experts.dedup_by_key(|(l, e)| (*l, e.expert));
    if experts.is_empty() {
        return None;
    }
    let count = |s: S| experts.iter().filter(|(_, e)| e.statistics == s).count();
    let starved: Vec<String> = experts
        .iter()
        .filter(|(_, e)| e.statistics == S::AllTokensStarved)
        .map(|(l, e)| format!("block {l} expert {} ({} tokens)", e.expert, e.routed_tokens))
        .collect();
    let pooled: Vec<String> = experts
        .iter()
        .filter(|(_, e)| e.statistics == S::PooledStarved)
        .map(|(l, e)| format!("block {l} expert {}", e.expert))
        .collect();
    let mut line = format!(
        "experts: {} calibrated on their routed tokens",
        count(S::Routed)
    );
    if count(S::AllTokensRequested) > 0 {
        line += &format!(
            ", {} on every token (--calibrate-all-experts)",
            count(S::AllTokensRequested)
        );
    }
    if !starved.is_empty() {
        line += &format!(
            "; {} routed too few tokens took every token's statistics instead: {}",
            starved.len(),
            starved.join(", ")
        );
    }
    if !pooled.is_empty() {
        line += &format!(
            "; {} reached by no token took the pooled statistics of their block's experts: {}",
            pooled.len(),
            pooled.join(", ")
        );
    }
    Some(line)
}

/// What a runner hands its writer, in write order.
pub enum Item {
    /// A tensor changed in float (an RMSNorm gain with AWQ scales folded in,
    /// a layer or stacked experts kept in a float type).
    Dense(Vec<f32>),
    /// A quantized linear layer. From GPTQ on an integer grid its `values` are
    /// empty (the walk took them; the writer reads the codes).
    Linear(QuantizedMatrix),
    /// A stacked experts' tensor, each expert quantized, in expert order.
    Experts(Vec<QuantizedMatrix>),
}

/// Gathers the stacked experts' tensors as the walk hands them over (expert
/// by expert, each expert's gate, up and down in turn), each into one [`Item`].
#[derive(Default)]
struct ExpertStack {
    items: HashMap<String, Vec<Item>>,
}

impl ExpertStack {
    /// `item` for layer `name` as `input` describes it: itself for a plain
    /// layer, the whole stack after its last expert, else `None` (still
    /// gathering).
    fn push(&mut self, name: &str, input: &LayerInput, item: Item) -> Option<Item> {
        let Some((part, parts)) = input.part() else {
            return Some(item);
        };
        let items = self.items.entry(name.to_owned()).or_default();
        items.push(item);
        if part + 1 < parts {
            return None;
        }
        let items = self.items.remove(name).unwrap_or_default();
        Some(if items.iter().all(|i| matches!(i, Item::Dense(_))) {
            Item::Dense(
                items
                    .into_iter()
                    .flat_map(|i| match i {
                        Item::Dense(v) => v,
                        _ => unreachable!(),
                    })
                    .collect(),
            )
        } else {
            Item::Experts(
                items
                    .into_iter()
                    .filter_map(|i| match i {
                        Item::Linear(q) => Some(q),
                        _ => None,
                    })
                    .collect(),
            )
        })
    }
}

/// Runs GPTQ over every linear layer of every block of `model` on `samples`
/// (equal-length token sequences). `grid_of(name)` gives each layer's grid;
/// where `tensor_scaled(name)` (NVFP4 layers stored with llama.cpp's
/// `NAME.scale`) the layer is divided by the factor
/// [`crate::gguf_quantize::choose_tensor_scales`] picks (by the Hessian's
/// diagonal) before GPTQ, which the factor does not change otherwise;
/// `sink(name, matrix)` receives the layers in order (per block q, k, v, o, gate,
/// up, down); `progress(block, blocks)` after each block.
#[allow(clippy::too_many_arguments)]
pub fn gptq_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    tensor_scaled: &dyn Fn(&str) -> bool,
    opts: &GptqOptions,
    true_sequential: bool,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    let mut reports = Vec::new();
    let mut stack = ExpertStack::default();
    let mut step = |name: &str, w: &Tensor, input: &LayerInput, t: &mut Timings| {
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let grid = grid_of(name);
        if let Grid::Gguf(ty) = grid {
            if ty.is_float() {
                // Planned in float (no block of the type fits its rows): stored
                // as that float, which the later layers see.
                let values = finite_weights(model, name, w)?;
                let bytes = crate::gguf_quantize::quantize_matrix(&values, cols, ty, None)?;
                let mut stored = vec![0f32; values.len()];
                kernels::quants::dequantize(ty, &bytes, &mut stored)?;
                if let Some(item) = stack.push(name, input, Item::Dense(values)) {
                    sink(name, item)?;
                }
                return Ok(f32_tensor(name, rows, cols, stored));
            }
        }
        grid.check(cols, name)?;
        // Factored before the layer is read in f32: the factorisation, in the
        // Hessian's `cols²` buffer, is the step's largest piece of work.
        let factored = input.factored();
        let mut values = finite_weights(model, name, w)?;
        let tensor_scale = match (grid, tensor_scaled(name)) {
            (Grid::Gguf(ty), true) => {
                let diag = input.diagonal();
                let read = |r0: usize, r1: usize| Ok(values[r0 * cols..r1 * cols].to_vec());
                let s = crate::gguf_quantize::choose_tensor_scales(
                    &read,
                    rows,
                    rows,
                    cols,
                    ty,
                    Some(&diag),
                )?[0];
                values.iter_mut().for_each(|v| *v /= s);
                s
            }
            _ => 1.0,
        };
        let clock = Instant::now();
        // In the scaled domain, like the RTN baseline and GPTQ below.
        let energy = output_error(&values, None, input.hessian(), cols).max(f64::MIN_POSITIVE);
        // Rows are rounded independently: a few at a time, not a second matrix.
        let rtn_rel_error = {
            let diag = input.diagonal();
            let mut error = 0.0;
            for part in values.chunks(gptq::rows_per_chunk(cols) * cols) {
                let r = gptq::rtn(part, cols, &grid, Some(&diag));
                error += output_error(part, Some(&r.values), input.hessian(), cols);
            }
            error / energy
        };
        t.report_seconds += clock.elapsed().as_secs_f64();
        // GPTQ replaces the weights in place; the report reads the original
        // rows again from the tensor (no second copy of the layer).
        let (mut q, stats) = gptq::gptq_factored(values, factored, &grid, opts)
            .with_context(|| format!("GPTQ on '{name}'"))?;
        if tensor_scale != 1.0 {
            q.values.iter_mut().for_each(|v| *v *= tensor_scale);
            q.tensor_scale = tensor_scale;
        }
        t.loop_seconds += stats.loop_seconds;
        let clock = Instant::now();
        let rel_error = output_error_of_rows(
            &|r0, n| Ok(Cow::Owned(w.rows_f32(r0, r0 + n)?)),
            rows,
            Some(&q.values),
            input.hessian(),
            cols,
        )? / (energy * (tensor_scale as f64).powi(2));
        let report = LayerReport {
            name: name.to_owned(),
            rows,
            cols,
            grid: grid_label(&grid),
            rtn_rel_error,
            rel_error,
            expert: input.expert,
            head: input.head.map(|h| h.0),
            stats: GptqStats {
                nonfinite_rows: input.nonfinite_rows,
                ..stats
            },
        };
        t.report_seconds += clock.elapsed().as_secs_f64();
        if report.stats.fell_back_to_rtn {
            eprintln!("{}: the Hessian stayed singular after dampening up to 1.0: rounded to nearest instead", w.name);
        }
        reports.push(report);
        // Integer layers are written from their codes: their values move into
        // the tensor the rest of the walk reads (the layer is not held twice).
        let values = match q.stored {
            Stored::Int { .. } => std::mem::take(&mut q.values),
            Stored::Gguf(..) => q.values.clone(),
        };
        let tensor = f32_tensor(name, rows, cols, values);
        if let Some(item) = stack.push(name, input, Item::Linear(q)) {
            sink(name, item)?;
        }
        Ok(tensor)
    };
    let t = sequential_blocks(
        model,
        samples,
        &opts.factor_options(),
        true_sequential,
        false,
        &opts.experts,
        &mut step,
        progress,
    )?;
    Ok((reports, t))
}

/// A calibrated method and its settings.
#[derive(Debug, Clone, Copy)]
pub enum Calibrated {
    /// GPTQ, true-sequential or not.
    Gptq(GptqOptions, bool),
    /// AWQ scales, then rounding (with the grid's clip search).
    Awq,
}

/// Runs `method` over every block linear of `model`: [`gptq_model`] or
/// [`awq_model`] (which stores no per-tensor scales: `tensor_scaled` is GPTQ's).
pub fn run_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    tensor_scaled: &dyn Fn(&str) -> bool,
    method: Calibrated,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    match method {
        Calibrated::Gptq(opts, true_sequential) => gptq_model(
            model,
            samples,
            grid_of,
            tensor_scaled,
            &opts,
            true_sequential,
            sink,
            progress,
        ),
        Calibrated::Awq => awq_model(model, samples, grid_of, sink, progress),
    }
}

/// AWQ over every block of `model`: each block runs in float on its (already
/// quantized-model) inputs to collect the Hessians and mean |x| of its linear
/// inputs, scales are searched for every fold the architecture's description
/// lists ([`awq::search_scales`]) and folded ([`awq::fold`]), every linear is
/// rounded on its grid, and the quantized block produces the next block's
/// inputs. `sink` receives per block the folded norms, then the linears in the
/// description's order.
pub fn awq_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    let c = &model.config;
    let arch = c.arch;
    // Each fold's consumers must share one input: one linear group.
    let group_of = |slot: Slot| LINEAR_GROUPS.iter().position(|g| g.contains(&slot));
    let folds = arch.scale_folds;
    if folds.is_empty() {
        bail!(
            "AWQ: the '{}' description lists no exact scale folds",
            arch.gguf_name
        );
    }
    eprintln!("{}", awq::folds_said(arch));
    for &(from, to) in folds {
        let groups: Vec<_> = to.iter().map(|&s| group_of(s)).collect();
        if groups.iter().any(|g| g.is_none() || *g != groups[0]) {
            bail!(
                "AWQ: the '{}' description folds {from:?} into {to:?}, which do not share one input",
                arch.gguf_name
            );
        }
    }
    let n = samples.first().map_or(0, Vec::len);
    let mut t = Timings::default();
    let mut reports = Vec::new();
    let mut xs = embed_samples(model, samples, &mut t)?;
    let blocks = c.num_hidden_layers;
    for l in 0..blocks {
        let w = model.block_weights(l)?;
        let name = |s: &str| names::block(l, s);
        // A routed expert's linears are rounded one expert at a time, each on
        // the inputs of the tokens routed to it; the other linears by group.
        let routed = |slot: Slot| w.router.is_some() && EXPERT_SLOTS.contains(&slot);
        let linears: Vec<(Slot, &str)> = arch
            .block
            .iter()
            .filter(|s| s.role == Role::Linear && c.block_has(l, s))
            .filter_map(|s| Some((s.slot?, s.gguf)))
            .collect();
        // The suffix that stands for each group's input when the forward shows it.
        let group_suffix: Vec<Option<&str>> = LINEAR_GROUPS
            .iter()
            .map(|g| {
                g.iter()
                    .filter(|&&s| !routed(s))
                    .find_map(|&s| arch.layer_slot(c, l, s))
                    .map(|spec| spec.gguf)
            })
            .collect();
        // Checked before the forward, so a NaN weight is named as such rather
        // than as the NaN activations it causes.
        let originals: Vec<Vec<f32>> = linears
            .iter()
            .map(|&(slot, suffix)| {
                finite_weights(model, &name(suffix), w.linear(slot).expect("a linear slot"))
            })
            .collect::<Result<_>>()?;
        let mut hessians: Vec<Option<Hessian>> = LINEAR_GROUPS
            .iter()
            .map(|g| {
                let slot = g
                    .iter()
                    .find(|&&s| !routed(s) && arch.layer_slot(c, l, s).is_some())?;
                Some(Hessian::new(w.linear(*slot)?.shape[1]))
            })
            .collect();
        // Per routed expert and linear suffix: Σx² per column and tokens.
        let mut expert_sq: HashMap<(&'static str, usize), (Vec<f64>, u64)> = HashMap::new();
        for x in &xs {
            let mut y = x.clone();
            let clock = Instant::now();
            let mut hessian_seconds = 0.0;
            model.forward_block_observed(&w, &mut y, n, &mut |suffix, expert, input| {
                let clock = Instant::now();
                match expert {
                    Some(e) => {
                        let entry = expert_sq.entry((suffix, e)).or_default();
                        let width = model
                            .config
                            .arch
                            .block_tensor(suffix)
                            .and_then(|spec| spec.shape.last())
                            .map_or(1, |d| d.size(&model.config));
                        if entry.0.is_empty() {
                            entry.0 = vec![0f64; width];
                        }
                        // Rows with NaN or Inf are left out (the expert then
                        // counts as starved if none is left).
                        let (input, _) = finite_rows(input, width);
                        for row in input.chunks(width) {
                            for (acc, &v) in entry.0.iter_mut().zip(row) {
                                *acc += (v as f64) * (v as f64);
                            }
                        }
                        entry.1 += (input.len() / width.max(1)) as u64;
                    }
                    None => {
                        if let Some(g) = group_suffix.iter().position(|s| *s == Some(suffix)) {
                            if let Some(h) = &mut hessians[g] {
                                h.add(input);
                            }
                        }
                    }
                }
                hessian_seconds += clock.elapsed().as_secs_f64();
            })?;
            t.hessian_seconds += hessian_seconds;
            t.forward_seconds += clock.elapsed().as_secs_f64() - hessian_seconds;
        }
        // Per group: the Hessian in f32 and mean |x|.
        let stats: Vec<Option<(Vec<f32>, Vec<f32>)>> = hessians
            .iter()
            .map(|h| h.as_ref().map(|h| (h.matrix(), h.mean_abs())))
            .collect();
        for (g, h) in hessians.iter().enumerate() {
            if let Some(h) = h
                .as_ref()
                .filter(|h| h.tokens() == 0 && h.nonfinite_rows() > 0)
            {
                bail!(
                    "block {l}: every calibration token reaching {} has NaN or Inf activations ({} tokens): the model overflows on this text",
                    group_suffix[g].map_or_else(|| format!("group {g}"), &name),
                    h.nonfinite_rows()
                );
            }
        }
        let nonfinite_of = |slot: Slot| {
            group_of(slot)
                .and_then(|g| hessians[g].as_ref())
                .map_or(0, Hessian::nonfinite_rows)
        };
        let stats_of = |slot: Slot| -> Result<&(Vec<f32>, Vec<f32>)> {
            group_of(slot)
                .and_then(|g| stats[g].as_ref())
                .with_context(|| format!("block {l}: no input statistics for {slot:?}"))
        };
        let index_of = |slot: Slot| linears.iter().position(|&(s, _)| s == slot);
        let grids: Vec<Grid> = linears.iter().map(|(_, s)| grid_of(&name(s))).collect();
        let clock = Instant::now();
        let mut fold_scales = Vec::with_capacity(folds.len());
        for &(_, to) in folds {
            let members: Vec<usize> = to.iter().filter_map(|&s| index_of(s)).collect();
            let (h, mean_abs) = stats_of(to[0])?;
            let ws: Vec<&[f32]> = members.iter().map(|&i| originals[i].as_slice()).collect();
            let found = awq::search_scales(&ws, h, mean_abs, &|i| grids[members[i]]);
            fold_scales.push(found.scales);
        }
        t.loop_seconds += clock.elapsed().as_secs_f64();
        let plan: Vec<awq::Fold> = folds
            .iter()
            .zip(&fold_scales)
            .map(|(&(from, to), scales)| awq::Fold { from, to, scales })
            .collect();
        let mut folded = awq::fold(&w, &plan)?;
        for f in &plan {
            if let (Some(gain), Some(spec)) = (folded.gain_mut(f.from), arch.slot(f.from)) {
                sink(&name(spec.gguf), Item::Dense(gain.clone()))?;
            }
        }
        // Per linear: its folded weight, the Hessian of its original input, and
        // the column scale and row scale that map the folded weight back.
        for (i, &(slot, suffix)) in linears.iter().enumerate() {
            let lname = name(suffix);
            let ft = folded.linear(slot).expect("a linear slot");
            if routed(slot) {
                let clock = Instant::now();
                let (qs, stacked) =
                    round_experts(ft, suffix, &expert_sq, &grids[i], &lname, &mut reports)?;
                t.loop_seconds += clock.elapsed().as_secs_f64();
                sink(&lname, Item::Experts(qs))?;
                folded.replace(slot, stacked)?;
                continue;
            }
            let (rows, cols) = (ft.shape[0], ft.shape[1]);
            let ones_cols = vec![1f32; cols];
            let ones_rows = vec![1f32; rows];
            let col_s = plan
                .iter()
                .find(|f| f.to.contains(&slot))
                .map_or(ones_cols.as_slice(), |f| f.scales);
            let row_s = plan
                .iter()
                .find(|f| f.from == slot)
                .map_or(ones_rows.as_slice(), |f| f.scales);
            let h = &stats_of(slot)?.0;
            let grid = grids[i];
            grid.check(cols, &lname)?;
            let clock = Instant::now();
            let values = ft.to_f32()?;
            let diag: Vec<f32> = (0..cols)
                .map(|j| h[j * cols + j] / (col_s[j] * col_s[j]))
                .collect();
            let q = gptq::rtn(&values, cols, &grid, Some(&diag));
            t.loop_seconds += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            // Errors in the original input space: Ŵ = row_s ⊙ Q diag(1/col_s).
            let effective: Vec<f32> = q
                .values
                .chunks(cols)
                .zip(row_s)
                .flat_map(|(row, &r)| row.iter().zip(col_s).map(move |(x, s)| x * r / s))
                .collect();
            let original = &originals[i];
            let orig_diag: Vec<f32> = (0..cols).map(|j| h[j * cols + j]).collect();
            let plain = gptq::rtn(original, cols, &grid, Some(&orig_diag));
            let energy = output_error(original, None, h, cols).max(f64::MIN_POSITIVE);
            reports.push(LayerReport {
                name: lname.clone(),
                rows,
                cols,
                grid: grid_label(&grid),
                rtn_rel_error: output_error(original, Some(&plain.values), h, cols) / energy,
                rel_error: output_error(original, Some(&effective), h, cols) / energy,
                expert: None,
                head: None,
                stats: GptqStats {
                    nonfinite_rows: nonfinite_of(slot),
                    ..GptqStats::default()
                },
            });
            t.report_seconds += clock.elapsed().as_secs_f64();
            let quantized = f32_tensor(&lname, rows, cols, q.values.clone());
            sink(&lname, Item::Linear(q))?;
            folded.replace(slot, quantized)?;
        }
        let clock = Instant::now();
        for x in xs.iter_mut() {
            model.forward_block(&folded, x, n)?;
        }
        t.forward_seconds += clock.elapsed().as_secs_f64();
        progress(l + 1, blocks);
    }
    Ok((reports, t))
}

/// Rounds a stacked experts' tensor `w` (`[experts, rows, cols]`, GGUF suffix
/// `suffix`) on `grid` expert by expert, each weighted by the mean x² of the
/// inputs routed to it (`sq`: per (suffix, expert) Σx² per column and tokens);
/// an expert no token reached takes the pooled statistics of its block's
/// experts. Reports each expert; returns the quantized experts and the stacked
/// f32 result.
fn round_experts(
    w: &Tensor,
    suffix: &str,
    sq: &HashMap<(&'static str, usize), (Vec<f64>, u64)>,
    grid: &Grid,
    name: &str,
    reports: &mut Vec<LayerReport>,
) -> Result<(Vec<QuantizedMatrix>, Tensor<'static>)> {
    use model::calib::walk::ExpertStatistics;
    let &[experts, rows, cols] = w.shape.as_slice() else {
        bail!(
            "'{name}' has shape {:?}, expected [experts, rows, cols]",
            w.shape
        );
    };
    grid.check(cols, name)?;
    let mut pooled = (vec![0f64; cols], 0u64);
    for e in 0..experts {
        if let Some((s, n)) = sq.get(&(suffix, e)).filter(|(s, _)| s.len() == cols) {
            pooled.0.iter_mut().zip(s).for_each(|(p, v)| *p += v);
            pooled.1 += n;
        }
    }
    let mean = |(s, n): &(Vec<f64>, u64)| -> Vec<f32> {
        s.iter().map(|v| (v / (*n).max(1) as f64) as f32).collect()
    };
    let mut qs = Vec::with_capacity(experts);
    let mut bytes = Vec::with_capacity(experts * rows * cols * 4);
    for e in 0..experts {
        let values = w.expert(e)?.to_f32()?;
        let own = sq
            .get(&(suffix, e))
            .filter(|(s, n)| *n > 0 && s.len() == cols);
        let (importance, statistics, tokens) = match own {
            Some(stats) => (mean(stats), ExpertStatistics::Routed, stats.1),
            None if pooled.1 > 0 => (mean(&pooled), ExpertStatistics::PooledStarved, 0),
            None => (vec![1f32; cols], ExpertStatistics::PooledStarved, 0),
        };
        let q = gptq::rtn(&values, cols, grid, Some(&importance));
        let err = crate::bit_alloc::weighted_rel_error(&values, &q.values, cols, Some(&importance));
        reports.push(LayerReport {
            name: name.to_owned(),
            rows,
            cols,
            grid: grid_label(grid),
            rtn_rel_error: err,
            rel_error: err,
            expert: Some(ExpertInput {
                expert: e,
                experts,
                routed_tokens: tokens as usize,
                statistics,
            }),
            head: None,
            stats: GptqStats::default(),
        });
        bytes.extend_from_slice(&model::dense::encode_floats(
            &q.values,
            kernels::GgmlType::F32,
        ));
        qs.push(q);
    }
    let stacked = Tensor {
        name: name.to_owned(),
        ty: kernels::GgmlType::F32,
        shape: vec![experts, rows, cols],
        data: std::borrow::Cow::Owned(bytes),
        scale: None,
    };
    Ok((qs, stacked))
}

/// Writes `model` as a GGUF file whose block linears are quantized by `method`
/// (GPTQ or AWQ) on the grid of their planned type (the other tensors quantized
/// as `plan` says, with `imatrix` weights when given).
#[allow(clippy::too_many_arguments)]
pub fn calibrated_to_gguf(
    model: &Model,
    plan: &[PlannedTensor],
    imatrix: Option<&Imatrix>,
    samples: &[Vec<u32>],
    method: Calibrated,
    file_type: u32,
    out: &GgufOutput,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(QuantizeReport, Vec<LayerReport>, Timings)> {
    if matches!(method, Calibrated::Awq) {
        model::calib::walk::refuse_latent_attention(&model.config, "AWQ")?;
    }
    let start = Instant::now();
    let by_name: HashMap<&str, &PlannedTensor> =
        plan.iter().map(|t| (t.name.as_str(), t)).collect();
    let order = write_order(&model.config);
    let planned = |n: &str| -> Result<&PlannedTensor> {
        by_name
            .get(n)
            .copied()
            .with_context(|| format!("tensor '{n}' is missing from the plan"))
    };
    for l in 0..model.config.num_hidden_layers {
        for s in model.config.arch.layer_linears(&model.config, l) {
            let t = planned(&names::block(l, s))?;
            let cols = *t.shape.last().unwrap_or(&0);
            if t.ty.is_float() && matches!(method, Calibrated::Gptq(..)) {
                // GPTQ leaves it in float; the layers after it see that.
                eprintln!(
                    "'{}' stays {}: no block of the mix fits its {cols} columns",
                    t.name, t.ty
                );
            } else if gptq::Grid::Gguf(t.ty).check(cols, &t.name).is_err() {
                bail!(
                    "'{}' is planned as {}: {} needs a block-quantized type that fits its {} columns",
                    t.name,
                    t.ty,
                    match method {
                        Calibrated::Gptq(..) => "GPTQ",
                        Calibrated::Awq => "AWQ",
                    },
                    cols
                );
            }
        }
    }
    // Which tensors get llama.cpp's `NAME.scale`: NVFP4 matrices whose scale
    // llama.cpp applies, except the layers AWQ rounds and stacked experts
    // (those are encoded unscaled).
    let linears: std::collections::HashSet<String> = (0..model.config.num_hidden_layers)
        .flat_map(|l| {
            model
                .config
                .arch
                .layer_linears(&model.config, l)
                .map(move |s| names::block(l, s))
        })
        .collect();
    let scaled = |n: &str| -> bool {
        let Some(t) = by_name.get(n) else {
            return false;
        };
        let calibrated = linears.contains(n);
        crate::gguf_quantize::has_tensor_scale(model, t)
            && (!calibrated || (matches!(method, Calibrated::Gptq(..)) && t.shape.len() == 2))
    };
    let decls = order
        .iter()
        .map(|n| planned(n).map(|t| crate::gguf_quantize::tensor_decls(t, scaled(n))))
        .collect::<Result<Vec<_>>>()?
        .concat();
    let mut writer = out.create(model, file_type, &decls)?;
    let mut reports: Vec<TensorReport> = Vec::with_capacity(order.len());
    let mut next = 0usize;
    // Writes the non-linear tensors due before `upto` in the write order.
    let write_others = |upto: Option<&str>,
                        writer: &mut GgufWriter,
                        reports: &mut Vec<TensorReport>,
                        next: &mut usize|
     -> Result<()> {
        while *next < order.len() && Some(order[*next].as_str()) != upto {
            let name = order[*next].as_str();
            let q = quantize_tensor(model, planned(name)?, imatrix, scaled(name))?;
            q.write(writer)?;
            reports.push(q.report);
            *next += 1;
        }
        Ok(())
    };
    let grid_of = |n: &str| gptq::Grid::Gguf(by_name[n].ty);
    let (layers, timings) = run_model(
        model,
        samples,
        &grid_of,
        &scaled,
        method,
        &mut |name, item| {
            write_others(Some(name), &mut writer, &mut reports, &mut next)?;
            let t = planned(name)?;
            let original = model.tensor(name)?.to_f32()?;
            let mut tensor_scale = 1f32;
            let (values, ty, bytes, rows) = match item {
                Item::Linear(q) => {
                    let Stored::Gguf(ty, bytes) = q.stored else {
                        unreachable!("GGUF grids store GGUF blocks")
                    };
                    tensor_scale = q.tensor_scale;
                    (q.values, ty, bytes, q.rows)
                }
                // Expert-major rows: the stacked tensor is the experts' blocks in order.
                Item::Experts(qs) => {
                    let (mut values, mut bytes, mut rows) = (Vec::new(), Vec::new(), 0);
                    for q in qs {
                        let Stored::Gguf(_, b) = q.stored else {
                            unreachable!("GGUF grids store GGUF blocks")
                        };
                        values.extend(q.values);
                        bytes.extend(b);
                        rows += q.rows;
                    }
                    (values, t.ty, bytes, rows)
                }
                Item::Dense(values) => {
                    let cols = *t.shape.last().unwrap_or(&1);
                    let bytes = crate::gguf_quantize::quantize_matrix(&values, cols, t.ty, None)?;
                    (
                        values,
                        t.ty,
                        bytes,
                        t.shape.iter().product::<usize>() / cols,
                    )
                }
            };
            reports.push(TensorReport {
                name: name.to_owned(),
                ty,
                bytes: bytes.len() as u64,
                rel_error: crate::gguf_quantize::rel_frobenius_error(&original, &values),
                imatrix: true,
            });
            writer.write_tensor(name, &gguf_export::to_gguf_rows(model, name, rows, bytes))?;
            if scaled(name) {
                let scale_name = names::scale_of(name).expect("a weight");
                writer.write_tensor(&scale_name, &tensor_scale.to_le_bytes())?;
            }
            next += 1;
            Ok(())
        },
        progress,
    )?;
    write_others(None, &mut writer, &mut reports, &mut next)?;
    let files = writer.finish()?;
    let n_params: u64 = plan
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let data_bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    Ok((
        QuantizeReport {
            tensors: reports,
            file_bytes: files_bytes(&files),
            files,
            n_params,
            bits_per_weight: data_bytes as f64 * 8.0 / n_params.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
        },
        layers,
        timings,
    ))
}

/// The stored form of an integer-grid matrix as the HF writers take it.
fn int_linear(q: QuantizedMatrix, bits: u32, group: usize) -> IntLinear {
    let Stored::Int {
        codes,
        scales,
        zeros,
        g_idx,
    } = q.stored
    else {
        unreachable!("integer grids store integers")
    };
    IntLinear {
        out_features: q.rows,
        in_features: q.cols,
        bits,
        group_size: group,
        codes,
        scales,
        zeros,
        g_idx,
    }
}

/// Streams `model` into an HF folder (GPTQ or compressed-tensors layout): block
/// linears quantized on their integer grid by `method` when `samples` is
/// non-empty, else rounded to nearest; the rest f16.
#[allow(clippy::too_many_arguments)]
pub fn calibrated_to_hf(
    model: &Model,
    dir: &Path,
    format: HfQuantFormat,
    cfg: &IntQuantConfig,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    method: Calibrated,
) -> Result<(Vec<LayerReport>, Timings)> {
    if matches!(method, Calibrated::Awq) {
        model::calib::walk::refuse_latent_attention(&model.config, "AWQ")?;
    }
    let mut writer = HfQuantWriter::create(dir, model, format, cfg)?;
    let order = writer.order().to_vec();
    let mut next = 0usize;
    let group_of = |name: &str| match grid_of(name) {
        Grid::Int { group, .. } => group,
        Grid::Gguf(_) => unreachable!(),
    };
    // Writes the tensors due before `upto` in the write order: dense ones as they
    // are, block linears (only when not running GPTQ) rounded to nearest.
    let write_upto =
        |upto: Option<&str>, writer: &mut HfQuantWriter, next: &mut usize| -> Result<()> {
            while *next < order.len() && Some(order[*next].as_str()) != upto {
                let name = &order[*next];
                if is_block_linear(model.config.arch, name) {
                    let values = model.tensor(name)?.to_f32()?;
                    // One matrix, or one per expert of a stacked experts' tensor.
                    let shape = model.tensor_meta(name)?.1;
                    let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                    let qs: Vec<IntLinear> = values
                        .chunks(rows * cols)
                        .map(|m| {
                            let q = gptq::rtn(m, cols, &grid_of(name), None);
                            int_linear(q, cfg.bits, group_of(name))
                        })
                        .collect();
                    writer.write_experts(name, &qs)?;
                } else {
                    writer.copy_dense(name, &model.tensor(name)?)?;
                }
                *next += 1;
            }
            Ok(())
        };
    let result = if samples.is_empty() {
        let mut bar = Progress::new(order.len() as u64, "rtn");
        write_upto(None, &mut writer, &mut next)?;
        bar.set(order.len() as u64, "done");
        bar.finish();
        (Vec::new(), Timings::default())
    } else {
        let mut bar = Progress::new(model.config.num_hidden_layers as u64, &cfg.method);
        let r = run_model(
            model,
            samples,
            grid_of,
            &|_| false,
            method,
            &mut |name, item| {
                write_upto(Some(name), &mut writer, &mut next)?;
                match item {
                    Item::Linear(q) => {
                        writer.write_linear(name, &int_linear(q, cfg.bits, group_of(name)))?
                    }
                    Item::Experts(qs) => {
                        let qs: Vec<IntLinear> = qs
                            .into_iter()
                            .map(|q| int_linear(q, cfg.bits, group_of(name)))
                            .collect();
                        writer.write_experts(name, &qs)?
                    }
                    Item::Dense(values) => writer.write_dense(name, &values)?,
                }
                next += 1;
                Ok(())
            },
            &mut |d, _| bar.set(d as u64, &format!("block {d}")),
        )?;
        write_upto(None, &mut writer, &mut next)?;
        bar.finish();
        r
    };
    writer.finish()?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::GgmlType;

    #[test]
    fn grid_labels_name_bits_group_and_symmetry() {
        let g = Grid::Int {
            bits: 4,
            group: 128,
            sym: true,
            clip: false,
        };
        assert_eq!(grid_label(&g), "int4 g128 sym");
        assert_eq!(grid_label(&Grid::Gguf(GgmlType::Q4_K)), "Q4_K");
    }
}
