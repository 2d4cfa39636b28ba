//! The calibration walk that quantization (GPTQ) and pruning (Wanda,
//! SparseGPT, structured cuts) share: the model runs block by block over the
//! calibration samples; within a block the linear layers are visited group by
//! group in forward order ([`LINEAR_GROUPS`]), each group's input Hessian is
//! accumulated over every sample, and the caller's step changes the group's
//! layers as soon as their statistics are complete. Only the current block's
//! weights and the samples' activations are in memory.
//!
//! Sequential, as GPTQ's reference: block `l` sees the outputs of the blocks
//! before it as the step changed them. True-sequential (the default) also goes
//! inside the block: each group's input is computed with the groups before it
//! already changed (the attention output projection's Hessian with the changed
//! q/k/v, the MLP's input after the changed output projection, …). The samples
//! advance together through one forward pass of the block ([`BlockCursor`]), so
//! this costs no more than one pass. Without it every Hessian comes from the
//! original block, and a second pass with the changed block produces the next
//! block's inputs.

use crate::calib::factor::{FactorOptions, Factored};
use crate::calib::Hessian;
use crate::llama::{BlockCursor, LINEAR_GROUPS};
use crate::{names, Model, Tensor};
use anyhow::{bail, Result};
use kernels::GgmlType;
use serde::Serialize;
use std::borrow::Cow;
use std::cell::OnceCell;
use std::time::Instant;

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Forward passes of the blocks (and the embedding).
    pub forward_seconds: f64,
    /// Accumulating Hessians.
    pub hessian_seconds: f64,
    /// Cholesky factorisations and inverses.
    pub factor_seconds: f64,
    /// The methods' own per-layer work (GPTQ column loops, scale searches).
    pub loop_seconds: f64,
    /// Reconstruction-error reports (output error of RTN and GPTQ).
    pub report_seconds: f64,
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
    opts: FactorOptions,
    factored: OnceCell<Factored>,
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

/// A matrix of f32 values as a tensor the forward pass can use.
pub fn f32_tensor(name: &str, rows: usize, cols: usize, values: &[f32]) -> Tensor<'static> {
    Tensor {
        name: name.to_owned(),
        ty: GgmlType::F32,
        shape: vec![rows, cols],
        data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
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

/// The embeddings of every sample: the first block's inputs.
pub fn embed_samples(
    model: &Model,
    samples: &[Vec<u32>],
    t: &mut Timings,
) -> Result<Vec<Vec<f32>>> {
    let clock = Instant::now();
    let xs = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    t.forward_seconds += clock.elapsed().as_secs_f64();
    Ok(xs)
}

/// Walks `model` block by block over `samples` (equal-length token sequences),
/// handing every block linear to `step` as soon as its input statistics are
/// complete, group by group in forward order ([`LINEAR_GROUPS`]; within a group
/// in the group's order). Sequential: block `l` sees the outputs of the blocks
/// before it as `step` changed them; true-sequential also inside the block (see
/// the module comment). With `diagonal_only` only `diag H` is accumulated
/// (Wanda's column norms), which skips the `XᵀX` GEMMs. `progress(block,
/// blocks)` after each block.
#[allow(clippy::too_many_arguments)]
pub fn sequential_blocks(
    model: &Model,
    samples: &[Vec<u32>],
    opts: &FactorOptions,
    true_sequential: bool,
    diagonal_only: bool,
    step: &mut LayerStep,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Timings> {
    let c = &model.config;
    c.refuse_moe("calibration (GPTQ, AWQ, Wanda, SparseGPT, structured cuts)")?;
    let arch = c.arch;
    let n = samples.first().map_or(0, Vec::len);
    let mut t = Timings::default();
    let mut xs = embed_samples(model, samples, &mut t)?;
    let blocks = c.num_hidden_layers;
    for l in 0..blocks {
        let original = model.block_weights(l)?;
        // The block as the step leaves it: changed layers owned, the rest borrowed.
        let mut changed = original.borrowed();
        let saved_inputs = (!true_sequential).then(|| xs.clone());
        let clock = Instant::now();
        let mut cursors: Vec<BlockCursor> = xs
            .drain(..)
            .map(|x| model.block_start(&original, x, n))
            .collect();
        t.forward_seconds += clock.elapsed().as_secs_f64();
        for (g, group) in LINEAR_GROUPS.iter().enumerate() {
            let specs: Vec<_> = group
                .iter()
                .filter_map(|&s| Some((s, arch.slot(s)?)))
                .collect();
            let cols = cursors.first().map_or(0, |c| c.input().len() / n.max(1));
            let clock = Instant::now();
            let mut h = if diagonal_only {
                Hessian::diagonal(cols)
            } else {
                Hessian::new(cols)
            };
            for cursor in &cursors {
                h.add(cursor.input());
            }
            let input = LayerInput {
                hessian: h.matrix(),
                cols: h.cols(),
                mean_abs: h.mean_abs(),
                opts: *opts,
                factored: OnceCell::new(),
            };
            drop(h);
            t.hessian_seconds += clock.elapsed().as_secs_f64();
            for (slot, spec) in specs {
                let name = names::block(l, spec.gguf);
                let weight = changed
                    .linear(slot)
                    .expect("linear groups hold linear slots");
                let new = step(&name, weight, &input, &mut t)?;
                changed.replace(slot, new)?;
            }
            t.factor_seconds += input.factor_seconds();
            drop(input);
            let last = g + 1 == LINEAR_GROUPS.len();
            if true_sequential || !last {
                let weights = if true_sequential { &changed } else { &original };
                let clock = Instant::now();
                for cursor in cursors.iter_mut() {
                    model.block_step(weights, cursor)?;
                }
                t.forward_seconds += clock.elapsed().as_secs_f64();
            }
        }
        // The block's output with every layer changed: the next block's input.
        match saved_inputs {
            None => {
                xs = cursors
                    .into_iter()
                    .map(BlockCursor::into_residual)
                    .collect()
            }
            Some(inputs) => {
                drop(cursors);
                xs = inputs;
                let clock = Instant::now();
                for x in xs.iter_mut() {
                    model.forward_block(&changed, x, n)?;
                }
                t.forward_seconds += clock.elapsed().as_secs_f64();
            }
        }
        progress(l + 1, blocks);
    }
    Ok(t)
}
