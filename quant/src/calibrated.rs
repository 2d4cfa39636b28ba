//! The calibration runner: the model runs block by block over the calibration
//! samples, the input Hessian of every linear layer is accumulated, and each
//! layer is quantized by GPTQ as soon as its Hessian is complete. Only the
//! current block's weights and the samples' activations are in memory.
//!
//! Sequential, as GPTQ's reference: block `l` sees the outputs of the already
//! quantized blocks before it. True-sequential (the default) also goes inside the
//! block: q/k/v are quantized first, the attention output's Hessian is then taken
//! with the quantized q/k/v, the MLP's input after the quantized output
//! projection, and the down projection's input after the quantized gate/up.
//! Done in stages that each continue from the previous stage's activations, this
//! costs one forward pass of the block, not one per stage. Without it every
//! Hessian comes from the original block, and a second pass with the quantized
//! block produces the next block's inputs.

use crate::awq;
use crate::gguf_quantize::{quantize_tensor, PlannedTensor, QuantizeReport, TensorReport};
use crate::gptq::{self, Factored, GptqOptions, GptqStats, Grid, QuantizedMatrix, Stored};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::calib::Hessian;
use model::calib::Imatrix;
use model::gguf::GgufWriter;
use model::gguf_export;
pub use model::hf_quant::write_order;
use model::llama::{add_linear, rms_norm, swiglu, BlockWeights};
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
    /// Dampening, dead inputs, fallback and timings.
    #[serde(flatten)]
    pub stats: GptqStats,
}

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Forward passes of the blocks (and the embedding).
    pub forward_seconds: f64,
    /// Accumulating Hessians.
    pub hessian_seconds: f64,
    /// Cholesky factorisations and inverses.
    pub factor_seconds: f64,
    /// GPTQ column loops.
    pub loop_seconds: f64,
    /// Reconstruction-error reports (output error of RTN and GPTQ).
    pub report_seconds: f64,
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

/// What a runner hands its writer, in write order.
pub enum Item {
    /// A tensor changed in float (an RMSNorm gain with AWQ scales folded in).
    Dense(Vec<f32>),
    /// A quantized linear layer.
    Linear(QuantizedMatrix),
}

/// A matrix of f32 values as a tensor the forward pass can use.
pub fn f32_tensor(name: &str, rows: usize, cols: usize, values: &[f32]) -> Tensor<'static> {
    Tensor {
        name: name.to_owned(),
        ty: GgmlType::F32,
        shape: vec![rows, cols],
        data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// The embeddings of every sample: the first block's inputs.
fn embed_samples(model: &Model, samples: &[Vec<u32>], t: &mut Timings) -> Result<Vec<Vec<f32>>> {
    let clock = Instant::now();
    let xs = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    t.forward_seconds += clock.elapsed().as_secs_f64();
    Ok(xs)
}

/// `f(x)` for every sample (timed as forward), each added to `hess` (timed as
/// Hessians): a layer input computed and observed; the inputs are returned.
fn observe_each(
    xs: &[Vec<f32>],
    hess: &mut Hessian,
    t: &mut Timings,
    f: &dyn Fn(&[f32]) -> Result<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(xs.len());
    for x in xs {
        let clock = Instant::now();
        let a = f(x)?;
        t.forward_seconds += clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        hess.add(&a);
        t.hessian_seconds += clock.elapsed().as_secs_f64();
        out.push(a);
    }
    Ok(out)
}

/// The input statistics of one linear layer, handed to the per-layer step of
/// [`sequential_blocks`]: the Hessian `2XᵀX/n` (only its diagonal when the walk
/// was asked for diagonals), mean |x|, and the damped inverse factor that GPTQ
/// and SparseGPT need, computed on first use and shared by the layers reading
/// the same input.
pub struct LayerInput {
    /// `2XᵀX / n`, `cols × cols`, row-major.
    pub hessian: Vec<f64>,
    /// Input features.
    pub cols: usize,
    /// Mean |x| per input feature.
    pub mean_abs: Vec<f32>,
    opts: GptqOptions,
    factored: std::cell::OnceCell<Factored>,
}

impl LayerInput {
    /// The Hessian factored for the walk's options (dead inputs, order, dampening).
    pub fn factored(&self) -> &Factored {
        self.factored
            .get_or_init(|| Factored::new(&self.hessian, self.cols, &self.opts))
    }

    /// `diag H`.
    pub fn diagonal(&self) -> Vec<f32> {
        (0..self.cols)
            .map(|j| self.hessian[j * self.cols + j] as f32)
            .collect()
    }

    /// Seconds spent factoring, if it was factored.
    fn factor_seconds(&self) -> f64 {
        self.factored.get().map_or(0.0, Factored::seconds)
    }
}

/// The per-layer step of [`sequential_blocks`]: given a layer's canonical name,
/// its weight and its input statistics, returns the layer's new weight (which the
/// rest of the walk runs with).
pub type LayerStep<'a> =
    dyn FnMut(&str, &Tensor, &LayerInput, &mut Timings) -> Result<Tensor<'static>> + 'a;

/// Walks `model` block by block over `samples` (equal-length token sequences),
/// handing every block linear to `step` as soon as its input statistics are
/// complete (per block q, k, v, o, gate, up, down). Sequential: block `l` sees
/// the outputs of the blocks before it as `step` changed them; true-sequential
/// also inside the block (see the module comment). With `diagonal_only` only
/// `diag H` is accumulated (Wanda's column norms), which skips the `XᵀX` GEMMs.
/// `progress(block, blocks)` after each block.
#[allow(clippy::too_many_arguments)]
pub fn sequential_blocks(
    model: &Model,
    samples: &[Vec<u32>],
    opts: &GptqOptions,
    true_sequential: bool,
    diagonal_only: bool,
    step: &mut LayerStep,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Timings> {
    let c = &model.config;
    let n = samples.first().map_or(0, Vec::len);
    let mut t = Timings::default();
    let mut xs = embed_samples(model, samples, &mut t)?;
    let eps = c.rms_norm_eps;
    let new_hessian = |cols: usize| {
        if diagonal_only {
            Hessian::diagonal(cols)
        } else {
            Hessian::new(cols)
        }
    };
    let finish = |h: Hessian, t: &mut Timings| {
        let clock = Instant::now();
        let input = LayerInput {
            hessian: h.matrix(),
            cols: h.cols(),
            mean_abs: h.mean_abs(),
            opts: *opts,
            factored: std::cell::OnceCell::new(),
        };
        t.hessian_seconds += clock.elapsed().as_secs_f64();
        input
    };
    let blocks = c.num_hidden_layers;
    for l in 0..blocks {
        let w = model.block_weights(l)?;
        let name = |s: &str| names::block(l, s);
        let saved_inputs = (!true_sequential).then(|| xs.clone());
        let timed = |t: &mut f64, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            let clock = Instant::now();
            f()?;
            *t += clock.elapsed().as_secs_f64();
            Ok(())
        };
        let norm = |x: &[f32], gain: &[f32]| {
            let mut h = vec![0f32; x.len()];
            rms_norm(x, gain, eps, &mut h);
            h
        };
        let mut run = |suffix: &str, wt: &Tensor, input: &LayerInput, t: &mut Timings| {
            step(&name(suffix), wt, input, t)
        };

        // Stage 1: q, k, v from the attention norm's output.
        let mut h_attn = new_hessian(c.hidden_size);
        for x in &xs {
            let h = norm(x, &w.attn_norm);
            timed(&mut t.hessian_seconds, &mut || {
                h_attn.add(&h);
                Ok(())
            })?;
        }
        let h_attn = finish(h_attn, &mut t);
        let mut qkv = Vec::new();
        for (suffix, wt) in [
            ("attn_q.weight", &w.q),
            ("attn_k.weight", &w.k),
            ("attn_v.weight", &w.v),
        ] {
            qkv.push(run(suffix, wt, &h_attn, &mut t)?);
        }
        t.factor_seconds += h_attn.factor_seconds();
        drop(h_attn);
        let (wq, wk, wv) = if true_sequential {
            (&qkv[0], &qkv[1], &qkv[2])
        } else {
            (&w.q, &w.k, &w.v)
        };

        // Stage 2: the output projection's input, the attention mix.
        let mut h_o = new_hessian(c.q_dim());
        let mut mixes = observe_each(&xs, &mut h_o, &mut t, &|x| {
            model.attention_mix(wq, wk, wv, &w.extras, &norm(x, &w.attn_norm), n)
        })?;
        let h_o = finish(h_o, &mut t);
        let o = run("attn_output.weight", &w.o, &h_o, &mut t)?;
        t.factor_seconds += h_o.factor_seconds();
        drop(h_o);
        let wo = if true_sequential { &o } else { &w.o };

        // Stage 3: gate and up from the MLP norm's output.
        let mut h_ffn = new_hessian(c.hidden_size);
        for (x, a) in xs.iter_mut().zip(mixes.drain(..)) {
            timed(&mut t.forward_seconds, &mut || add_linear(x, &a, n, wo))?;
            let h = norm(x, &w.ffn_norm);
            timed(&mut t.hessian_seconds, &mut || {
                h_ffn.add(&h);
                Ok(())
            })?;
        }
        let h_ffn = finish(h_ffn, &mut t);
        let gate = run("ffn_gate.weight", &w.gate, &h_ffn, &mut t)?;
        let up = run("ffn_up.weight", &w.up, &h_ffn, &mut t)?;
        t.factor_seconds += h_ffn.factor_seconds();
        drop(h_ffn);
        let (wg, wu) = if true_sequential {
            (&gate, &up)
        } else {
            (&w.gate, &w.up)
        };

        // Stage 4: down from the SwiGLU hidden.
        let mut h_down = new_hessian(c.intermediate_size);
        let mut hidden = observe_each(&xs, &mut h_down, &mut t, &|x| {
            swiglu(&norm(x, &w.ffn_norm), n, wg, wu)
        })?;
        let h_down = finish(h_down, &mut t);
        let down = run("ffn_down.weight", &w.down, &h_down, &mut t)?;
        t.factor_seconds += h_down.factor_seconds();
        drop(h_down);

        // The block's output with every layer changed: the next block's input.
        match saved_inputs {
            None => {
                for (x, g) in xs.iter_mut().zip(hidden.drain(..)) {
                    timed(&mut t.forward_seconds, &mut || add_linear(x, &g, n, &down))?;
                }
            }
            Some(inputs) => {
                drop(hidden);
                xs = inputs;
                let qw = BlockWeights {
                    attn_norm: w.attn_norm.clone(),
                    q: qkv.remove(0),
                    k: qkv.remove(0),
                    v: qkv.remove(0),
                    o,
                    ffn_norm: w.ffn_norm.clone(),
                    gate,
                    up,
                    down,
                    extras: w.extras.clone(),
                };
                for x in xs.iter_mut() {
                    timed(&mut t.forward_seconds, &mut || {
                        model.forward_block(&qw, x, n)
                    })?;
                }
            }
        }
        progress(l + 1, blocks);
    }
    Ok(t)
}

/// The weights of `w` as f32, refusing non-finite values (named with the file).
pub fn finite_weights(model: &Model, name: &str, w: &Tensor) -> Result<Vec<f32>> {
    let values = w.to_f32()?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "tensor '{name}' of {} holds {} at element {bad}: refusing to change it",
            model.path.display(),
            values[bad]
        );
    }
    Ok(values)
}

/// Runs GPTQ over every linear layer of every block of `model` on `samples`
/// (equal-length token sequences). `grid_of(name)` gives each layer's grid;
/// `sink(name, matrix)` receives the layers in order (per block q, k, v, o, gate,
/// up, down); `progress(block, blocks)` after each block.
pub fn gptq_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    opts: &GptqOptions,
    true_sequential: bool,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    let mut reports = Vec::new();
    let mut step = |name: &str, w: &Tensor, input: &LayerInput, t: &mut Timings| {
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let grid = grid_of(name);
        grid.check(cols, name)?;
        let values = finite_weights(model, name, w)?;
        let (q, stats) = gptq::gptq_factored(&values, input.factored(), &grid, opts)
            .with_context(|| format!("GPTQ on '{name}'"))?;
        t.loop_seconds += stats.loop_seconds;
        let clock = Instant::now();
        let hf: Vec<f32> = input.hessian.iter().map(|&v| v as f32).collect();
        let r = gptq::rtn(&values, cols, &grid, Some(&input.diagonal()));
        let energy = gptq::output_error(&values, None, &hf, cols).max(f64::MIN_POSITIVE);
        let report = LayerReport {
            name: name.to_owned(),
            rows,
            cols,
            grid: grid_label(&grid),
            rtn_rel_error: gptq::output_error(&values, Some(&r.values), &hf, cols) / energy,
            rel_error: gptq::output_error(&values, Some(&q.values), &hf, cols) / energy,
            stats,
        };
        t.report_seconds += clock.elapsed().as_secs_f64();
        if report.stats.fell_back_to_rtn {
            eprintln!("{name}: the Hessian stayed singular after dampening up to 1.0: rounded to nearest instead");
        }
        reports.push(report);
        let tensor = f32_tensor(name, rows, cols, &q.values);
        sink(name, Item::Linear(q))?;
        Ok(tensor)
    };
    let t = sequential_blocks(
        model,
        samples,
        opts,
        true_sequential,
        false,
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
/// [`awq_model`].
pub fn run_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    method: Calibrated,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    match method {
        Calibrated::Gptq(opts, true_sequential) => gptq_model(
            model,
            samples,
            grid_of,
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
/// inputs, scales are searched for q/k/v, gate/up and down ([`awq::search_scales`])
/// and folded ([`awq::fold`]), every linear is rounded on its grid, and the
/// quantized block produces the next block's inputs. `sink` receives per block
/// the two folded norms, then the linears in the description's order.
pub fn awq_model(
    model: &Model,
    samples: &[Vec<u32>],
    grid_of: &dyn Fn(&str) -> Grid,
    sink: &mut dyn FnMut(&str, Item) -> Result<()>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerReport>, Timings)> {
    let c = &model.config;
    // The three folds this walk makes must be exact for the architecture.
    for (from, to) in awq::FOLDS {
        if !c.arch.scale_folds.contains(&(from, to)) {
            bail!(
                "AWQ: a '{}' model does not describe folding a scale from {from:?} into {to:?}; \
                 its description lists {:?}",
                c.arch.gguf_name,
                c.arch.scale_folds
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
        let mut h_attn = Hessian::new(c.hidden_size);
        let mut h_o = Hessian::new(c.q_dim());
        let mut h_ffn = Hessian::new(c.hidden_size);
        let mut h_down = Hessian::new(c.intermediate_size);
        for x in &xs {
            let mut y = x.clone();
            let clock = Instant::now();
            let mut hessian_seconds = 0.0;
            model.forward_block_observed(&w, &mut y, n, &mut |suffix, input| {
                let h = match suffix {
                    "attn_q.weight" => &mut h_attn,
                    "attn_output.weight" => &mut h_o,
                    "ffn_gate.weight" => &mut h_ffn,
                    "ffn_down.weight" => &mut h_down,
                    _ => return,
                };
                let clock = Instant::now();
                h.add(input);
                hessian_seconds += clock.elapsed().as_secs_f64();
            })?;
            t.hessian_seconds += hessian_seconds;
            t.forward_seconds += clock.elapsed().as_secs_f64() - hessian_seconds;
        }
        let f32_of = |h: &Hessian| -> Vec<f32> { h.matrix().iter().map(|&v| v as f32).collect() };
        let (ha, ho, hf, hd) = (
            f32_of(&h_attn),
            f32_of(&h_o),
            f32_of(&h_ffn),
            f32_of(&h_down),
        );
        let originals: Vec<Vec<f32>> = [&w.q, &w.k, &w.v, &w.o, &w.gate, &w.up, &w.down]
            .iter()
            .map(|t| t.to_f32())
            .collect::<Result<_>>()?;
        let linears: Vec<&str> = c.arch.linears().collect();
        let grids: Vec<Grid> = linears.iter().map(|s| grid_of(&name(s))).collect();
        let clock = Instant::now();
        let s_attn = awq::search_scales(
            &[&originals[0], &originals[1], &originals[2]],
            &ha,
            &h_attn.mean_abs(),
            &|i| grids[i],
        );
        let s_ffn = awq::search_scales(
            &[&originals[4], &originals[5]],
            &hf,
            &h_ffn.mean_abs(),
            &|i| grids[4 + i],
        );
        let s_down = awq::search_scales(&[&originals[6]], &hd, &h_down.mean_abs(), &|_| grids[6]);
        t.loop_seconds += clock.elapsed().as_secs_f64();
        let scales = awq::BlockScales {
            attn: s_attn.scales.clone(),
            ffn: s_ffn.scales.clone(),
            down: s_down.scales.clone(),
        };
        let folded = awq::fold(&w, &scales)?;
        sink(
            &name("attn_norm.weight"),
            Item::Dense(folded.attn_norm.clone()),
        )?;
        sink(
            &name("ffn_norm.weight"),
            Item::Dense(folded.ffn_norm.clone()),
        )?;
        // Per linear: its folded weight, the Hessian of its original input, and
        // the column scale and row scale that map the folded weight back.
        let ones_q = vec![1f32; c.q_dim()];
        let ones_rows = |r: usize| vec![1f32; r];
        type Layer<'a> = (&'a Tensor<'a>, &'a Vec<f32>, &'a [f32], Vec<f32>);
        let plan: [Layer; 7] = [
            (&folded.q, &ha, &scales.attn, ones_rows(w.q.shape[0])),
            (&folded.k, &ha, &scales.attn, ones_rows(w.k.shape[0])),
            (&folded.v, &ha, &scales.attn, ones_rows(w.v.shape[0])),
            (&folded.o, &ho, &ones_q, ones_rows(w.o.shape[0])),
            (&folded.gate, &hf, &scales.ffn, ones_rows(w.gate.shape[0])),
            (&folded.up, &hf, &scales.ffn, scales.down.clone()),
            (&folded.down, &hd, &scales.down, ones_rows(w.down.shape[0])),
        ];
        let mut quantized = Vec::with_capacity(7);
        for (i, (ft, h, col_s, row_s)) in plan.into_iter().enumerate() {
            let lname = name(linears[i]);
            let (rows, cols) = (ft.shape[0], ft.shape[1]);
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
                .zip(&row_s)
                .flat_map(|(row, &r)| row.iter().zip(col_s).map(move |(x, s)| x * r / s))
                .collect();
            let original = &originals[i];
            let orig_diag: Vec<f32> = (0..cols).map(|j| h[j * cols + j]).collect();
            let plain = gptq::rtn(original, cols, &grid, Some(&orig_diag));
            let energy = gptq::output_error(original, None, h, cols).max(f64::MIN_POSITIVE);
            reports.push(LayerReport {
                name: lname.clone(),
                rows,
                cols,
                grid: grid_label(&grid),
                rtn_rel_error: gptq::output_error(original, Some(&plain.values), h, cols) / energy,
                rel_error: gptq::output_error(original, Some(&effective), h, cols) / energy,
                stats: GptqStats::default(),
            });
            t.report_seconds += clock.elapsed().as_secs_f64();
            quantized.push(f32_tensor(&lname, rows, cols, &q.values));
            sink(&lname, Item::Linear(q))?;
        }
        let mut it = quantized.into_iter();
        let mut next = || it.next().expect("seven linears");
        let qw = BlockWeights {
            attn_norm: folded.attn_norm.clone(),
            q: next(),
            k: next(),
            v: next(),
            o: next(),
            ffn_norm: folded.ffn_norm.clone(),
            gate: next(),
            up: next(),
            down: next(),
            extras: folded.extras.clone(),
        };
        let clock = Instant::now();
        for x in xs.iter_mut() {
            model.forward_block(&qw, x, n)?;
        }
        t.forward_seconds += clock.elapsed().as_secs_f64();
        progress(l + 1, blocks);
    }
    Ok((reports, t))
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
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(QuantizeReport, Vec<LayerReport>, Timings)> {
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
        for s in model.config.arch.linears() {
            let t = planned(&names::block(l, s))?;
            if gptq::Grid::Gguf(t.ty).check(t.shape[1], &t.name).is_err() {
                bail!(
                    "'{}' is planned as {}: GPTQ needs a block-quantized type that fits its {} columns",
                    t.name,
                    t.ty,
                    t.shape[1]
                );
            }
        }
    }
    let metadata = gguf_export::metadata(model, file_type)?;
    let decls = order
        .iter()
        .map(|n| planned(n).map(|t| gguf_export::tensor_decl(n, &t.shape, t.ty)))
        .collect::<Result<Vec<_>>>()?;
    let mut writer = GgufWriter::create(out, &metadata, &decls)?;
    let mut reports: Vec<TensorReport> = Vec::with_capacity(order.len());
    let mut next = 0usize;
    // Writes the non-linear tensors due before `upto` in the write order.
    let write_others = |upto: Option<&str>,
                        writer: &mut GgufWriter,
                        reports: &mut Vec<TensorReport>,
                        next: &mut usize|
     -> Result<()> {
        while *next < order.len() && Some(order[*next].as_str()) != upto {
            let (bytes, report) = quantize_tensor(model, planned(&order[*next])?, imatrix)?;
            writer.write_tensor(&order[*next], &bytes)?;
            reports.push(report);
            *next += 1;
        }
        Ok(())
    };
    let grid_of = |n: &str| gptq::Grid::Gguf(by_name[n].ty);
    let (layers, timings) = run_model(
        model,
        samples,
        &grid_of,
        method,
        &mut |name, item| {
            write_others(Some(name), &mut writer, &mut reports, &mut next)?;
            let t = planned(name)?;
            let original = model.tensor(name)?.to_f32()?;
            let (values, ty, bytes, rows) = match item {
                Item::Linear(q) => {
                    let Stored::Gguf(ty, bytes) = q.stored else {
                        unreachable!("GGUF grids store GGUF blocks")
                    };
                    (q.values, ty, bytes, q.rows)
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
            next += 1;
            Ok(())
        },
        progress,
    )?;
    write_others(None, &mut writer, &mut reports, &mut next)?;
    writer.finish()?;
    let n_params: u64 = plan
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let data_bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    Ok((
        QuantizeReport {
            tensors: reports,
            file_bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
            n_params,
            bits_per_weight: data_bytes as f64 * 8.0 / n_params.max(1) as f64,
            seconds: start.elapsed().as_secs_f64(),
        },
        layers,
        timings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
