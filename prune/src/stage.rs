//! The unstructured and N:M pruning stage (`compress prune --sparsity/--nm`):
//! removes weights from every block linear of a model with magnitude, Wanda or
//! SparseGPT scores, walking the model block by block over calibration samples
//! ([`model::calib::walk`]) so each layer is pruned on the inputs the already
//! pruned layers before it produce. The result is a dense model whose removed
//! weights are exactly zero: an HF-style folder (safetensors, config.json,
//! tokenizer, optionally compressed-tensors' sparse layout) or a GGUF file.

use crate::{schedule, score, sparsegpt, Pattern};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::calib::factor::{output_error, output_error_of_rows, FactorOptions};
use model::calib::walk::{
    self, f32_tensor, finite_weights, ExpertCalibration, ExpertInput, LayerInput, Timings,
};
use model::dense::DenseWriter;
use model::hf_quant::{is_block_linear, write_order};
use model::progress::Progress;
use model::{names, Model, Tensor};
use serde::Serialize;
use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

/// How weights are scored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Method {
    /// OBS pruning with the calibration Hessian: removed weights' contributions
    /// are moved onto the remaining ones of the row.
    Sparsegpt,
    /// |W| times the norm of the input feature over the calibration tokens, per row.
    Wanda,
    /// |W| over the whole matrix (no calibration).
    Magnitude,
}

impl Method {
    /// The lower-case name reports use.
    pub fn label(self) -> &'static str {
        match self {
            Method::Sparsegpt => "sparsegpt",
            Method::Wanda => "wanda",
            Method::Magnitude => "magnitude",
        }
    }
}

/// Outlier-weighted layer sparsity (OWL): blocks with more activation outliers
/// keep more weights.
#[derive(Clone, Copy, Debug)]
pub struct Owl {
    /// The spread of the per-block sparsities (± this around the target).
    pub lambda: f64,
    /// A score counts as an outlier above this many times its layer's mean.
    pub m: f32,
}

/// What to prune and how.
#[derive(Clone, Copy, Debug)]
pub struct PruneOptions {
    /// Scoring method.
    pub method: Method,
    /// Unstructured sparsity or N:M.
    pub pattern: Pattern,
    /// OWL's per-block schedule (`None`: every layer at the target).
    pub owl: Option<Owl>,
    /// SparseGPT dampening: fraction of the mean Hessian diagonal added to it.
    pub damp: f64,
    /// Each group of layers pruned on the inputs the already pruned ones produce.
    pub true_sequential: bool,
    /// Element type of the written weights (GGUF keeps 1-D tensors in F32).
    pub dtype: GgmlType,
    /// Write compressed-tensors' sparse layout instead of dense tensors.
    pub compressed_tensors: bool,
    /// Where a mixture of experts' routed experts take their statistics from.
    pub experts: ExpertCalibration,
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
    /// For one routed expert of a stacked experts' tensor: which, its routed
    /// calibration tokens, and where its statistics came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert: Option<ExpertInput>,
    /// For one head of a per-head tensor (latent attention's `k_b`, `v_b`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<usize>,
    /// SparseGPT: inputs that were zero on every calibration token (their
    /// weights are zeroed, as the reference does).
    #[serde(skip_serializing_if = "is_zero")]
    pub dead_columns: usize,
    /// SparseGPT: the Hessian stayed singular after dampening up to 1.0, so the
    /// layer was pruned by Wanda scores instead.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fell_back_to_wanda: bool,
    /// Calibration tokens left out of the layer's statistics because their
    /// input row held NaN or Inf.
    #[serde(skip_serializing_if = "is_zero")]
    pub nonfinite_rows: u64,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Prunes one layer's weights for `target` sparsity (the layer's share under the
/// schedule; N:M patterns ignore it).
fn prune_layer(
    method: Method,
    pattern: Pattern,
    target: f64,
    mut w: Vec<f32>,
    cols: usize,
    input: Option<&LayerInput>,
) -> Result<(Vec<f32>, bool)> {
    let pattern = match pattern {
        Pattern::Unstructured(_) => Pattern::Unstructured(target),
        nm => nm,
    };
    match (method, input) {
        (Method::Magnitude, _) => {
            let pruned = score::mask(&score::magnitude_scores(&w), cols, pattern, false);
            score::apply(&mut w, &pruned);
        }
        (Method::Wanda, Some(input)) => {
            let norms: Vec<f32> = input.diagonal().iter().map(|d| d.max(0.0).sqrt()).collect();
            score::wanda_prune(&mut w, &norms, pattern);
        }
        (Method::Sparsegpt, Some(input)) => {
            let f = input.factored();
            for &j in f.dead() {
                for row in w.chunks_mut(cols) {
                    row[j] = 0.0;
                }
            }
            match f.upper() {
                Some(u) => sparsegpt::sparsegpt(&mut w, cols, u, pattern, 128),
                None => {
                    eprintln!("the Hessian stayed singular after dampening up to 1.0: pruned by Wanda scores instead");
                    let (w, _) = prune_layer(Method::Wanda, pattern, target, w, cols, Some(input))?;
                    return Ok((w, true));
                }
            }
        }
        (_, None) => bail!("{method:?} needs calibration statistics"),
    }
    Ok((w, false))
}

/// What the stage did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneOutcome {
    /// Zeros over all block linears.
    pub sparsity: f64,
    /// Where the time went.
    pub timings: Timings,
    /// Per layer.
    pub layers: Vec<LayerPrune>,
}

/// Prunes `model` on `samples` (unused by magnitude) as `opts` says and writes
/// the result to `output` (a folder, a .safetensors or a .gguf file).
pub fn prune_model(
    model: &Model,
    samples: &[Vec<u32>],
    opts: &PruneOptions,
    output: &Path,
) -> Result<PruneOutcome> {
    let pattern = opts.pattern;
    let method = opts.method;
    let blocks = model.config.num_hidden_layers;
    for l in 0..blocks {
        for s in model.config.arch.layer_linears(&model.config, l) {
            let name = names::block(l, s);
            pattern.check(*model.tensor_meta(&name)?.1.last().unwrap_or(&0), &name)?;
        }
    }
    if opts.compressed_tensors {
        model
            .config
            .refuse_moe("writing a compressed-tensors sparse folder")?;
    }
    let factor = FactorOptions {
        damp_percent: opts.damp,
        ..FactorOptions::default()
    };
    let dtype = opts.dtype;

    // OWL: a first pass over the unpruned model measures each block's outliers.
    let mut targets = vec![pattern.sparsity(); blocks];
    if let Some(owl) = opts.owl {
        let mut counts = vec![(0u64, 0u64); blocks];
        let mut bar = Progress::new(blocks as u64, "owl outliers");
        walk::sequential_blocks(
            model,
            samples,
            &factor,
            opts.true_sequential,
            true,
            &opts.experts,
            &mut |name: &str, w: &Tensor, input: &LayerInput, _t: &mut Timings| {
                let values = finite_weights(model, name, w)?;
                let norms: Vec<f32> = input.diagonal().iter().map(|d| d.max(0.0).sqrt()).collect();
                let (o, n) = schedule::outliers(&score::wanda_scores(&values, &norms), owl.m);
                let l = names::block_index(name).unwrap_or(0);
                counts[l].0 += o;
                counts[l].1 += n;
                Ok(f32_tensor(name, w.shape[0], w.shape[1], values))
            },
            &mut |d, _| bar.set(d as u64, &format!("block {d}")),
        )?;
        bar.finish();
        let ratios: Vec<f64> = counts
            .iter()
            .map(|&(o, n)| o as f64 / n.max(1) as f64)
            .collect();
        targets = schedule::owl(&ratios, pattern.sparsity(), owl.lambda);
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
    let staging = if opts.compressed_tensors {
        std::fs::create_dir_all(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        // Named `.staging.tmp-<pid>` so that a rerun after a kill removes it.
        let staging = output.join(".staging");
        model::io::remove_stale_temporaries(&staging);
        Some(
            tempfile::Builder::new()
                .prefix(&format!(".staging.tmp-{}", std::process::id()))
                .rand_bytes(0)
                .tempdir_in(output)
                .with_context(|| format!("cannot stage in {}", output.display()))?,
        )
    } else {
        None
    };
    let dense_out = staging
        .as_ref()
        .map_or(output.to_path_buf(), |d| d.path().to_path_buf());
    let mut writer = DenseWriter::create(model, &model.config, &declared, &dense_out, dtype)?;
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
            if !is_block_linear(model.config.arch, name) {
                writer.copy(name, &t)?;
                *next += 1;
                continue;
            }
            let values = finite_weights(model, name, &t)?;
            let target = targets[names::block_index(name).unwrap_or(0)];
            // One matrix, or expert by expert of a stacked experts' tensor.
            let (rows, cols) = (t.shape[t.shape.len() - 2], t.shape[t.shape.len() - 1]);
            let pruned = if values.len() == rows * cols {
                prune_layer(method, pattern, target, values, cols, None)?.0
            } else {
                let mut pruned = Vec::with_capacity(values.len());
                for m in values.chunks(rows * cols) {
                    pruned.extend(prune_layer(method, pattern, target, m.to_vec(), cols, None)?.0);
                }
                pruned
            };
            layers.push(LayerPrune {
                name: name.clone(),
                target,
                sparsity: score::zero_fraction(&pruned),
                rel_error: None,
                expert: None,
                head: None,
                dead_columns: 0,
                fell_back_to_wanda: false,
                nonfinite_rows: 0,
            });
            writer.write(name, &t.shape, &pruned)?;
            *next += 1;
        }
        Ok(())
    };
    let label = method.label();
    let timings = if samples.is_empty() {
        let mut bar = Progress::new(order.len() as u64, label);
        write_upto(None, &mut writer, &mut layers, &mut next)?;
        bar.set(order.len() as u64, "done");
        bar.finish();
        Timings::default()
    } else {
        let mut bar = Progress::new(blocks as u64, label);
        // Stacked experts' tensors being gathered, expert by expert.
        let mut stacked: std::collections::HashMap<String, Vec<f32>> = Default::default();
        let mut step = |name: &str,
                        w: &Tensor,
                        input: &LayerInput,
                        t: &mut Timings|
         -> Result<Tensor<'static>> {
            // While experts are gathered, the stacked tensors are not yet due.
            if stacked.is_empty() {
                write_upto(Some(name), &mut writer, &mut layers, &mut next)?;
            }
            let (rows, cols) = (w.shape[0], w.shape[1]);
            let values = finite_weights(model, name, w)?;
            let target = targets[names::block_index(name).unwrap_or(0)];
            // SparseGPT's report compares with the original: its output energy
            // now, its error after pruning in place with the original rows read
            // again from the tensor (the layer is not held twice).
            let energy = (method == Method::Sparsegpt).then(|| {
                let clock = Instant::now();
                let e = output_error(&values, None, input.hessian(), cols);
                t.report_seconds += clock.elapsed().as_secs_f64();
                e.max(f64::MIN_POSITIVE)
            });
            let clock = Instant::now();
            let (pruned, fell_back_to_wanda) =
                prune_layer(method, pattern, target, values, cols, Some(input))?;
            t.loop_seconds += clock.elapsed().as_secs_f64();
            let rel_error = match energy {
                Some(energy) => {
                    let clock = Instant::now();
                    let e = output_error_of_rows(
                        &|r0, n| Ok(Cow::Owned(w.rows_f32(r0, r0 + n)?)),
                        rows,
                        Some(&pruned),
                        input.hessian(),
                        cols,
                    )? / energy;
                    t.report_seconds += clock.elapsed().as_secs_f64();
                    Some(e)
                }
                None => None,
            };
            layers.push(LayerPrune {
                name: name.to_owned(),
                target,
                sparsity: score::zero_fraction(&pruned),
                rel_error,
                expert: input.expert,
                head: input.head.map(|h| h.0),
                dead_columns: if method == Method::Sparsegpt {
                    input.factored().dead().len()
                } else {
                    0
                },
                fell_back_to_wanda,
                nonfinite_rows: input.nonfinite_rows,
            });
            // A stacked experts' (or per-head) tensor is written once its last
            // expert (head) is pruned.
            match input.part() {
                None => {
                    writer.write(name, &w.shape, &pruned)?;
                    next += 1;
                }
                Some((part, parts)) => {
                    let stack = stacked.entry(name.to_owned()).or_default();
                    stack.extend_from_slice(&pruned);
                    if part + 1 == parts {
                        let values = stacked.remove(name).unwrap_or_default();
                        writer.write(name, &[parts, rows, cols], &values)?;
                        next += 1;
                    }
                }
            }
            // Zeroing keeps every other weight as stored, so a float tensor
            // stays in its own type (half the memory of f32 for bf16); SparseGPT
            // changes the kept weights, which need f32.
            Ok(match w.ty {
                GgmlType::BF16 | GgmlType::F16 if method != Method::Sparsegpt => Tensor {
                    name: name.to_owned(),
                    ty: w.ty,
                    shape: vec![rows, cols],
                    data: std::borrow::Cow::Owned(model::dense::encode_floats(&pruned, w.ty)),
                    scale: None,
                },
                _ => f32_tensor(name, rows, cols, pruned),
            })
        };
        let t = walk::sequential_blocks(
            model,
            samples,
            &factor,
            opts.true_sequential,
            method == Method::Wanda,
            &opts.experts,
            &mut step,
            &mut |d, _| bar.set(d as u64, &format!("block {d}")),
        )?;
        write_upto(None, &mut writer, &mut layers, &mut next)?;
        bar.finish();
        t
    };
    writer.finish(model)?;
    let overall_sparsity = {
        let mut zeros = 0f64;
        let mut total = 0f64;
        for l in &layers {
            let shape = model.tensor_meta(&l.name)?.1;
            let whole = shape.iter().product::<usize>() as f64;
            // An expert's (head's) entry covers its share of the stacked tensor.
            let parts = match (l.expert, l.head) {
                (Some(e), _) => e.experts,
                (None, Some(_)) => shape[0],
                (None, None) => 1,
            };
            let n = whole / parts as f64;
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
            output,
            layout,
            dtype,
            overall_sparsity,
        )?;
    }

    Ok(PruneOutcome {
        sparsity: overall_sparsity,
        timings,
        layers,
    })
}
