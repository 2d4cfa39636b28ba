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
//!
//! A mixture-of-experts block's experts are calibrated one by one: each
//! routed expert's gate/up Hessian comes from the rows of the tokens the
//! (float) router sends to it, its down Hessian from its own activations on
//! those tokens (through its changed gate/up, true-sequentially). An expert
//! with fewer routed tokens than [`ExpertCalibration::min_tokens`], or every
//! expert under [`ExpertCalibration::all_experts`], takes its statistics from
//! every calibration token run through it instead, while the block's output
//! always uses the true routing. So no expert is left without statistics: each
//! is changed, and its [`LayerInput::expert`] says how.

use crate::arch::Slot;
use crate::calib::factor::{FactorOptions, Factored, HessianRef};
use crate::calib::Hessian;
use crate::llama::{
    gated_mlp, route, routed_to, BlockCursor, BlockWeights, EXPERT_SLOTS, LINEAR_GROUPS,
};
use crate::{names, Model, Tensor};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use serde::Serialize;
use std::borrow::Cow;
use std::cell::{Cell, OnceCell};
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

/// How a mixture of experts' routed experts get their calibration statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExpertCalibration {
    /// Every expert's statistics from every calibration token (llm-compressor's
    /// `calibrate_all_experts`); the block output still uses the true routing.
    pub all_experts: bool,
    /// An expert routed fewer tokens than this takes its statistics from every
    /// calibration token instead: a Hessian from fewer tokens than its width is
    /// singular, and GPTQ on it fits the few tokens it saw.
    pub min_tokens: usize,
}

impl Default for ExpertCalibration {
    fn default() -> Self {
        ExpertCalibration {
            all_experts: false,
            min_tokens: 64,
        }
    }
}

/// Where a routed expert's statistics came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertStatistics {
    /// The tokens routed to it.
    Routed,
    /// Every token: it was routed fewer than the minimum.
    AllTokensStarved,
    /// Every token: `--calibrate-all-experts`.
    AllTokensRequested,
    /// No token reached it: the pooled statistics of its block's experts (every
    /// token routed to any of them), as the imatrix does (AWQ's rounding).
    PooledStarved,
}

/// The routed expert a [`LayerInput`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExpertInput {
    /// Its number.
    pub expert: usize,
    /// Its experts' count in the stacked tensor.
    pub experts: usize,
    /// Calibration tokens routed to it (over all samples).
    pub routed_tokens: usize,
    /// Tokens its statistics come from.
    pub statistics: ExpertStatistics,
}

/// The input statistics of one linear layer, handed to the per-layer step of
/// [`sequential_blocks`]: the Hessian `2XᵀX/n` (only its diagonal when the walk
/// was asked for diagonals), mean |x|, and the damped inverse factor that GPTQ
/// and SparseGPT need, computed on first use (in the Hessian's own buffer) and
/// shared by the layers reading the same input.
pub struct LayerInput {
    /// `2XᵀX / n`, `cols × cols`, row-major, until it is factored (then the
    /// [`Factored`] holds it); empty when the walk gathered diagonals only.
    hessian: Cell<Vec<f32>>,
    full_hessian: bool,
    /// Input features.
    pub cols: usize,
    /// Mean |x| per input feature.
    pub mean_abs: Vec<f32>,
    /// For one routed expert of a stacked experts' tensor (the step is then
    /// handed that expert's matrix and returns its new one): which, and how
    /// its statistics were gathered.
    pub expert: Option<ExpertInput>,
    /// For one head's matrix of a per-head tensor (latent attention's `k_b`
    /// and `v_b`): `(head, heads)`. The step is handed that head's matrix and
    /// returns its new one.
    pub head: Option<(usize, usize)>,
    /// Calibration tokens left out of these statistics because their input
    /// row held NaN or Inf.
    pub nonfinite_rows: u64,
    diagonal: Vec<f32>,
    opts: FactorOptions,
    factored: OnceCell<Factored>,
}

impl LayerInput {
    /// The statistics of `h` for a layer (or expert, with `expert`); refused
    /// when every row reaching it was NaN or Inf (nothing left to calibrate on).
    fn new(h: Hessian, opts: &FactorOptions, expert: Option<ExpertInput>) -> Result<Self> {
        if h.tokens() == 0 && h.nonfinite_rows() > 0 {
            bail!(
                "every calibration token reaching it has NaN or Inf activations ({} tokens): the model overflows on this text",
                h.nonfinite_rows()
            );
        }
        let (cols, mean_abs, nonfinite_rows) = (h.cols(), h.mean_abs(), h.nonfinite_rows());
        let diagonal = h.diagonal_values();
        let hessian = h.into_matrix();
        Ok(LayerInput {
            full_hessian: hessian.len() == cols * cols,
            hessian: Cell::new(hessian),
            diagonal,
            cols,
            mean_abs,
            expert,
            head: None,
            nonfinite_rows,
            opts: *opts,
            factored: OnceCell::new(),
        })
    }

    /// Which part of a stacked tensor the step is handed, `(index, count)`:
    /// an expert of a stacked experts' tensor or a head of a per-head one.
    pub fn part(&self) -> Option<(usize, usize)> {
        self.expert.map(|e| (e.expert, e.experts)).or(self.head)
    }

    /// The Hessian factored for the walk's options (dead inputs, order,
    /// dampening). Needs the full Hessian (a walk not asked for diagonals only).
    pub fn factored(&self) -> &Factored {
        assert!(
            self.full_hessian,
            "a diagonal-only walk's Hessian cannot be factored"
        );
        self.factored
            .get_or_init(|| Factored::new(self.hessian.take(), self.cols, &self.opts))
    }

    /// The Hessian, for output errors: it is read from beside its factor, so
    /// this factors it if that has not happened yet.
    pub fn hessian(&self) -> HessianRef<'_> {
        HessianRef::Factored(self.factored())
    }

    /// `diag H`.
    pub fn diagonal(&self) -> Vec<f32> {
        self.diagonal.clone()
    }

    /// Seconds spent factoring, if it was factored.
    fn factor_seconds(&self) -> f64 {
        self.factored.get().map_or(0.0, Factored::seconds)
    }
}

/// The per-layer step of [`sequential_blocks`]: given a layer's canonical name,
/// its weight and its input statistics, returns the layer's new weight (which the
/// rest of the walk runs with). For a stacked experts' tensor it is called once
/// per expert, in expert order, with that expert's matrix and
/// [`LayerInput::expert`] set.
pub type LayerStep<'a> =
    dyn FnMut(&str, &Tensor, &LayerInput, &mut Timings) -> Result<Tensor<'static>> + 'a;

/// A matrix of f32 values as a tensor the forward pass can use.
pub fn f32_tensor(name: &str, rows: usize, cols: usize, values: Vec<f32>) -> Tensor<'static> {
    Tensor::from_f32_vec(name, vec![rows, cols], values)
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
/// (Wanda's column norms), which skips the `XᵀX` GEMMs. Routed experts as
/// `experts` says (see the module comment). `progress(block, blocks)` after
/// each block.
#[allow(clippy::too_many_arguments)]
pub fn sequential_blocks(
    model: &Model,
    samples: &[Vec<u32>],
    opts: &FactorOptions,
    true_sequential: bool,
    diagonal_only: bool,
    experts: &ExpertCalibration,
    step: &mut LayerStep,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Timings> {
    let c = &model.config;
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
            if changed.mla.is_some() && group.contains(&Slot::Q) {
                let h: Vec<&[f32]> = cursors.iter().map(BlockCursor::input).collect();
                for (slot, tensor) in calibrate_latent_attention(
                    model,
                    &changed,
                    l,
                    &h,
                    n,
                    opts,
                    diagonal_only,
                    step,
                    &mut t,
                )? {
                    changed.replace(slot, tensor)?;
                }
            }
            let moe = changed.router.is_some();
            if moe && group.contains(&Slot::Gate) {
                let h: Vec<&[f32]> = cursors.iter().map(BlockCursor::input).collect();
                let stacked = calibrate_experts(
                    model,
                    &changed,
                    l,
                    &h,
                    n,
                    opts,
                    true_sequential,
                    diagonal_only,
                    experts,
                    step,
                    &mut t,
                )?;
                for (slot, tensor) in stacked {
                    changed.replace(slot, tensor)?;
                }
            }
            // The group's layers that read the cursor's input (routed experts
            // are done above, each on its own tokens).
            let specs: Vec<_> = group
                .iter()
                .filter(|s| !(moe && EXPERT_SLOTS.contains(s)))
                .filter_map(|&s| Some((s, arch.layer_slot(c, l, s)?)))
                .collect();
            let cols = cursors.first().map_or(0, |c| c.input().len() / n.max(1));
            let clock = Instant::now();
            let mut h = new_hessian(cols, diagonal_only);
            if !specs.is_empty() {
                for cursor in &cursors {
                    h.add(cursor.input());
                }
            }
            let input = LayerInput::new(h, opts, None).with_context(|| {
                let layers: Vec<String> =
                    specs.iter().map(|(_, s)| names::block(l, s.gguf)).collect();
                format!("the input of {}", layers.join(", "))
            })?;
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

/// Refuses latent attention in a calibrated stage that does not handle it
/// (`what`: AWQ's scale folds, structured cuts), before it writes anything.
pub fn refuse_latent_attention(c: &crate::ModelConfig, what: &str) -> Result<()> {
    if c.mla.is_some() {
        bail!(
            "{what} does not handle multi-head latent attention yet (this '{}' model); \
             GPTQ into GGUF types, Wanda, SparseGPT, GGUF `quantize --type`, `imatrix`, `eval`, `convert` and `prune --experts` do",
            c.arch.name
        );
    }
    Ok(())
}

/// Hands the linears of block `l`'s multi-head latent attention to `step` in
/// forward order, each as soon as its input statistics are complete, always
/// true-sequential (each statistic computed with the layers before it already
/// changed), in file order: `q_a` on the block input `h` (`n` rows per
/// sample), `q_b` on the normed query latent, `kv_a` on `h`, each head's `k_b`
/// on that head's query
/// part without RoPE, each head's `v_b` on its attention-weighted latent
/// (llama.cpp's absorbed form, in which `attn_k_b` maps the query into the
/// latent space and `attn_v_b` maps the attended latent to the head's value).
/// Returns the changed tensors.
#[allow(clippy::too_many_arguments)]
fn calibrate_latent_attention(
    model: &Model,
    w: &BlockWeights,
    l: usize,
    h: &[&[f32]],
    n: usize,
    opts: &FactorOptions,
    diagonal_only: bool,
    step: &mut LayerStep,
    t: &mut Timings,
) -> Result<Vec<(Slot, Tensor<'static>)>> {
    let c = &model.config;
    let m = c
        .mla
        .as_ref()
        .context("latent attention without its config")?;
    let mut w = w.borrowed();
    let mut out: Vec<(Slot, Tensor<'static>)> = Vec::new();
    let hessian_of = |rows: &[Vec<f32>], cols: usize, t: &mut Timings| {
        let clock = Instant::now();
        let mut hg = new_hessian(cols, diagonal_only);
        for r in rows {
            hg.add(r);
        }
        t.hessian_seconds += clock.elapsed().as_secs_f64();
        hg
    };
    let mut run = |w: &mut BlockWeights, slot: Slot, input: &LayerInput, t: &mut Timings| {
        let name = names::block(l, gguf_suffix(c, l, slot)?);
        let weight = w.linear(slot).expect("latent attention's linears");
        let new = step(&name, weight, input, t)?;
        t.factor_seconds += input.factor_seconds();
        out.push((
            slot,
            Tensor::from_f32(&name, new.shape.clone(), &new.to_f32()?),
        ));
        w.replace(slot, new)?;
        Ok::<_, anyhow::Error>(())
    };
    // q_a and kv_a read the block input; the layers go in file order (q_a,
    // q_b, kv_a, k_b, v_b), which the writers stream in.
    let rows: Vec<Vec<f32>> = h.iter().map(|x| x.to_vec()).collect();
    let block_input = LayerInput::new(hessian_of(&rows, c.hidden_size, t), opts, None)
        .with_context(|| format!("block {l}: the input of its latent attention"))?;
    drop(rows);
    run(&mut w, Slot::QA, &block_input, t)?;
    let parts = |w: &BlockWeights, t: &mut Timings| {
        let clock = Instant::now();
        let mla = w.mla.as_ref().expect("a latent-attention block");
        let p = h
            .iter()
            .map(|x| model.latent_parts(mla, m, x, n))
            .collect::<Result<Vec<_>>>();
        t.forward_seconds += clock.elapsed().as_secs_f64();
        p
    };
    // q_b reads the normed query latent.
    let p = parts(&w, t)?;
    let rows: Vec<Vec<f32>> = p.into_iter().map(|p| p.q_a_normed).collect();
    let input = LayerInput::new(hessian_of(&rows, m.q_lora_rank, t), opts, None)
        .with_context(|| format!("block {l}: the input of its q_b"))?;
    run(&mut w, Slot::QB, &input, t)?;
    drop(input);
    run(&mut w, Slot::KvA, &block_input, t)?;
    drop(block_input);
    let (heads, qk, nope, lora) = (
        c.num_attention_heads,
        m.qk_nope_head_dim + c.head_dim,
        m.qk_nope_head_dim,
        m.kv_lora_rank,
    );
    let mut per_head = |w: &mut BlockWeights,
                        slot: Slot,
                        inputs: &[Vec<f32>],
                        stride: usize,
                        width: usize,
                        t: &mut Timings|
     -> Result<()> {
        let name = names::block(l, gguf_suffix(c, l, slot)?);
        let mut bytes = Vec::new();
        let mut shape = [0, 0];
        for head in 0..heads {
            // This head's `width` leading values of each `stride`-wide chunk.
            let rows: Vec<Vec<f32>> = inputs
                .iter()
                .map(|x| {
                    x.chunks(stride)
                        .skip(head)
                        .step_by(heads)
                        .flat_map(|r| r[..width].iter().copied())
                        .collect()
                })
                .collect();
            let mut input = LayerInput::new(hessian_of(&rows, width, t), opts, None)
                .with_context(|| format!("{name}, head {head}"))?;
            input.head = Some((head, heads));
            let original = w.linear(slot).expect("a per-head linear").expert(head)?;
            let new = step(&name, &original, &input, t)?;
            t.factor_seconds += input.factor_seconds();
            check_expert_shape(&original, &new)?;
            shape = [new.shape[0], new.shape[1]];
            bytes.extend_from_slice(&crate::dense::encode_floats(&new.to_f32()?, GgmlType::F32));
        }
        let stacked = Tensor {
            name,
            ty: GgmlType::F32,
            shape: vec![heads, shape[0], shape[1]],
            data: Cow::Owned(bytes),
            scale: None,
        };
        out.push((
            slot,
            Tensor::from_f32(&stacked.name, stacked.shape.clone(), &stacked.to_f32()?),
        ));
        w.replace(slot, stacked)
    };
    // Per head: k_b reads the head's query part without RoPE.
    let queries: Vec<Vec<f32>> = parts(&w, t)?.into_iter().map(|p| p.q).collect();
    per_head(&mut w, Slot::KB, &queries, qk, nope, t)?;
    // Per head: v_b reads the latent weighted by the head's attention
    // probabilities (with the changed k_b).
    let p = parts(&w, t)?;
    let clock = Instant::now();
    let attended: Vec<Vec<f32>> = p.iter().map(|p| attended_latent(p, lora, n)).collect();
    t.forward_seconds += clock.elapsed().as_secs_f64();
    per_head(&mut w, Slot::VB, &attended, lora, lora, t)?;
    Ok(out)
}

/// Per position and head, the latent weighted by the head's attention
/// probabilities (`n × heads·lora`): attention with the latent as every
/// head's value, queries and keys zero-padded to the latent's width where it
/// is the wider (padding leaves the scores as they are).
fn attended_latent(p: &crate::llama::LatentParts, lora: usize, n: usize) -> Vec<f32> {
    let (heads, d) = (p.heads, p.d);
    let d2 = d.max(lora);
    let pad = |x: &[f32]| -> Vec<f32> {
        x.chunks(d)
            .flat_map(|head| head.iter().copied().chain(std::iter::repeat_n(0.0, d2 - d)))
            .collect()
    };
    let values: Vec<f32> = p
        .latent
        .chunks(lora)
        .flat_map(|row| {
            (0..heads).flat_map(move |_| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, d2 - lora))
            })
        })
        .collect();
    let out = crate::llama::attention(
        &pad(&p.qs),
        &pad(&p.ks),
        &values,
        n,
        heads,
        heads,
        d2,
        p.mask,
    );
    out.chunks(d2)
        .flat_map(|head| head[..lora].to_vec())
        .collect()
}

/// A Hessian of `cols` columns, or only its diagonal.
fn new_hessian(cols: usize, diagonal_only: bool) -> Hessian {
    if diagonal_only {
        Hessian::diagonal(cols)
    } else {
        Hessian::new(cols)
    }
}

/// Hands every routed expert of block `l` (weights `w`, the step's changes so
/// far) to `step`, gate and up then down, expert by expert: `h` holds each
/// sample's MLP input (`n` rows each). Returns the stacked gate, up and down
/// tensors with every expert changed.
#[allow(clippy::too_many_arguments)]
fn calibrate_experts(
    model: &Model,
    w: &BlockWeights,
    l: usize,
    h: &[&[f32]],
    n: usize,
    opts: &FactorOptions,
    true_sequential: bool,
    diagonal_only: bool,
    calibration: &ExpertCalibration,
    step: &mut LayerStep,
    t: &mut Timings,
) -> Result<Vec<(Slot, Tensor<'static>)>> {
    let c = &model.config;
    let router = w.router.as_deref().expect("a routed block");
    let hidden = c.hidden_size;
    let m = c
        .moe
        .as_ref()
        .context("a block with a router but no experts in the config")?;
    let logits = h
        .iter()
        .map(|x| model.router_logits(router, x, n))
        .collect::<Result<Vec<_>>>()?;
    let routes: Vec<Vec<(usize, f32)>> = logits
        .iter()
        .map(|s| route(s, m, w.router_bias.as_deref()))
        .collect();
    let (experts, used) = (m.experts, m.used);
    // Input-weighted routing (Llama 4) scales each row by the sigmoid of its score.
    let scores: Vec<Option<&[f32]>> = logits
        .iter()
        .map(|s| model.input_weighted_experts().then_some(s.as_slice()))
        .collect();
    let slots = [Slot::Gate, Slot::Up, Slot::Down];
    // The changed stacked tensors' f32 bytes, expert after expert.
    let mut changed: Vec<Vec<u8>> = vec![Vec::new(); slots.len()];
    let mut shapes: Vec<[usize; 2]> = vec![[0, 0]; slots.len()];
    for e in 0..experts {
        // Each sample's positions routed to `e`.
        let positions: Vec<Vec<usize>> = routes
            .iter()
            .map(|r| {
                routed_to(r, used, e)
                    .into_iter()
                    .map(|(pos, _)| pos)
                    .collect()
            })
            .collect();
        let routed_tokens: usize = positions.iter().map(Vec::len).sum();
        let statistics = if calibration.all_experts {
            ExpertStatistics::AllTokensRequested
        } else if routed_tokens < calibration.min_tokens.max(1) {
            ExpertStatistics::AllTokensStarved
        } else {
            ExpertStatistics::Routed
        };
        let tag = Some(ExpertInput {
            expert: e,
            experts,
            routed_tokens,
            statistics,
        });
        // The rows the statistics come from, per sample (scaled by the
        // router's weight where it scales the expert's input: the sigmoid of
        // the token's score for this expert).
        let rows: Vec<Vec<f32>> = h
            .iter()
            .zip(&positions)
            .zip(&scores)
            .map(|((x, pos), score)| {
                let all: Vec<usize>;
                let pos = match statistics {
                    ExpertStatistics::Routed => pos,
                    _ => {
                        all = (0..n).collect();
                        &all
                    }
                };
                pos.iter()
                    .flat_map(|&p| {
                        let scale = score
                            .as_ref()
                            .map_or(1.0, |s| 1.0 / (1.0 + (-s[p * experts + e]).exp()));
                        x[p * hidden..(p + 1) * hidden]
                            .iter()
                            .map(move |v| v * scale)
                    })
                    .collect()
            })
            .collect();
        let clock = Instant::now();
        let mut hg = new_hessian(hidden, diagonal_only);
        for r in &rows {
            hg.add(r);
        }
        t.hessian_seconds += clock.elapsed().as_secs_f64();
        let input = LayerInput::new(hg, opts, tag)
            .with_context(|| format!("block {l}: the input of expert {e}"))?;
        let mut mine: Vec<Tensor<'static>> = Vec::with_capacity(slots.len());
        for (i, &slot) in slots[..2].iter().enumerate() {
            let original = w.linear(slot).expect("a linear slot").expert(e)?;
            let new = step(
                &names::block(l, gguf_suffix(c, l, slot)?),
                &original,
                &input,
                t,
            )?;
            check_expert_shape(&original, &new)?;
            shapes[i] = [new.shape[0], new.shape[1]];
            mine.push(new);
        }
        t.factor_seconds += input.factor_seconds();
        drop(input);
        // The down projection's input: this expert's activations on those rows.
        let (gate, up) = if true_sequential {
            (mine[0].borrowed(), mine[1].borrowed())
        } else {
            (
                w.linear(Slot::Gate).expect("a linear slot").expert(e)?,
                w.linear(Slot::Up).expect("a linear slot").expert(e)?,
            )
        };
        let width = gate.shape[0];
        let mut hd = new_hessian(width, diagonal_only);
        for r in rows.iter().filter(|r| !r.is_empty()) {
            let clock = Instant::now();
            let a = gated_mlp(r, r.len() / hidden, &gate, &up, c.hidden_act)?;
            t.forward_seconds += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            hd.add(&a);
            t.hessian_seconds += clock.elapsed().as_secs_f64();
        }
        drop((gate, up));
        let input = LayerInput::new(hd, opts, tag)
            .with_context(|| format!("block {l}: the down projection's input of expert {e}"))?;
        let original = w.linear(Slot::Down).expect("a linear slot").expert(e)?;
        let new = step(
            &names::block(l, gguf_suffix(c, l, Slot::Down)?),
            &original,
            &input,
            t,
        )?;
        check_expert_shape(&original, &new)?;
        shapes[2] = [new.shape[0], new.shape[1]];
        t.factor_seconds += input.factor_seconds();
        mine.push(new);
        for (acc, tensor) in changed.iter_mut().zip(&mine) {
            acc.extend_from_slice(&crate::dense::encode_floats(
                &tensor.to_f32()?,
                GgmlType::F32,
            ));
        }
    }
    Ok(slots
        .iter()
        .zip(changed)
        .zip(shapes)
        .map(|((&slot, bytes), [rows, cols])| {
            let tensor = Tensor {
                name: format!("{slot:?}"),
                ty: GgmlType::F32,
                shape: vec![experts, rows, cols],
                data: Cow::Owned(bytes),
                scale: None,
            };
            (slot, tensor)
        })
        .collect())
}

/// The GGUF suffix of the tensor in `slot` of block `l`.
fn gguf_suffix(c: &crate::ModelConfig, l: usize, slot: Slot) -> Result<&'static str> {
    c.arch
        .layer_slot(c, l, slot)
        .map(|s| s.gguf)
        .with_context(|| {
            format!(
                "block {l} of a '{}' model has no {slot:?} tensor",
                c.arch.gguf_name
            )
        })
}

/// A step must hand an expert's matrix back in its shape.
fn check_expert_shape(original: &Tensor, new: &Tensor) -> Result<()> {
    if new.shape != original.shape {
        bail!(
            "'{}' came back as {:?}, expected {:?}",
            original.name,
            new.shape,
            original.shape
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token whose embedding is NaN (patched into a copy of the llama3
    /// fixture): its rows, and the rows attention mixes it into, are left out
    /// of every Hessian and counted; the clean sample's rows all count.
    #[test]
    fn nonfinite_activation_rows_are_left_out_and_counted() {
        let src =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/llama3");
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "model.gguf",
            "tokenizer.json",
            "tokenizer_config.json",
            "config.json",
        ] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        let path = dir.path().join("model.gguf");
        let g = crate::gguf::GgufFile::open(&path).unwrap();
        let emb = g.tensor("token_embd.weight").unwrap();
        assert_eq!(emb.ty, GgmlType::F32);
        let hidden = emb.dims[0] as usize;
        let bad_token = 5usize;
        let at = (g.data_offset + emb.offset) as usize + bad_token * hidden * 4;
        drop(g);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at..at + hidden * 4]
            .chunks_mut(4)
            .for_each(|v| v.copy_from_slice(&f32::NAN.to_le_bytes()));
        std::fs::write(&path, bytes).unwrap();
        let model = Model::open(&path).unwrap();
        let n = 16;
        let clean: Vec<u32> = (10..10 + n as u32).collect();
        let mut poisoned = clean.clone();
        poisoned[12] = bad_token as u32;
        let mut seen: Vec<(String, u64, u64)> = Vec::new();
        let mut step = |name: &str, w: &Tensor, input: &LayerInput, _: &mut Timings| {
            let tokens = (2 * n) as u64 - input.nonfinite_rows;
            seen.push((name.to_owned(), input.nonfinite_rows, tokens));
            Ok(Tensor::from_f32(name, w.shape.clone(), &w.to_f32()?))
        };
        sequential_blocks(
            &model,
            &[clean, poisoned],
            &FactorOptions::default(),
            true,
            true,
            &ExpertCalibration::default(),
            &mut step,
            &mut |_, _| {},
        )
        .unwrap();
        let first = seen
            .iter()
            .find(|(name, ..)| name == "blk.0.attn_q.weight")
            .unwrap();
        assert_eq!(
            first.1, 1,
            "only the NaN token's own row at blk.0's norm output"
        );
        // Attention carries NaN from position 12 through that sample (at least
        // every later position; the tiled product of zero weights with a NaN
        // value reaches the earlier ones too), never into the clean sample.
        let later = seen
            .iter()
            .find(|(name, ..)| name == "blk.0.attn_output.weight")
            .unwrap();
        assert!(later.1 >= (n - 12) as u64, "{seen:?}");
        assert!(seen.iter().all(|(_, bad, _)| *bad <= n as u64), "{seen:?}");
    }

    /// The inputs the walk gives latent attention's per-head linears are what
    /// those linears multiply in the absorbed form: each head's output is
    /// `v_b[h]` times its attention-weighted latent, and its no-RoPE scores
    /// are its query's no-RoPE part mapped by `k_b[h]` against the latent.
    #[test]
    fn latent_attention_per_head_inputs_are_what_k_b_and_v_b_multiply() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/moe/deepseek_v3/model.gguf");
        let model = Model::open(&path).unwrap();
        let c = &model.config;
        let m = c.mla.as_ref().unwrap();
        let tokens: Vec<u32> = (1..=12).collect();
        let n = tokens.len();
        let w = model.block_weights(0).unwrap();
        let h = model
            .block_start(&w, model.embed(&tokens).unwrap(), n)
            .input()
            .to_vec();
        let mla = w.mla.as_ref().unwrap();
        let p = model.latent_parts(mla, m, &h, n).unwrap();
        let (heads, lora, nope, vd) = (
            c.num_attention_heads,
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.v_head_dim,
        );
        let attended = attended_latent(&p, lora, n);
        let out = model.attention_mix(&w, &h, n).unwrap();
        let mut worst = 0f32;
        for head in 0..heads {
            let vb = mla.v_b.expert(head).unwrap().to_f32().unwrap(); // [v, lora]
            let kb = mla.k_b.expert(head).unwrap().to_f32().unwrap(); // [lora, nope]
            for pos in 0..n {
                let a = &attended[(pos * heads + head) * lora..][..lora];
                for j in 0..vd {
                    let want: f32 = (0..lora).map(|i| vb[j * lora + i] * a[i]).sum();
                    let got = out[(pos * heads + head) * vd + j];
                    worst = worst.max((got - want).abs());
                }
                // q_nope · (latent_k · k_b) = (k_b · q_nope) · latent_k.
                let qk = nope + c.head_dim;
                let q_nope = &p.q[(pos * heads + head) * qk..][..nope];
                let absorbed: Vec<f32> = (0..lora)
                    .map(|i| (0..nope).map(|j| kb[i * nope + j] * q_nope[j]).sum())
                    .collect();
                for key in 0..=pos {
                    let latent = &p.latent[key * lora..][..lora];
                    let via_absorbed: f32 = absorbed.iter().zip(latent).map(|(a, b)| a * b).sum();
                    let k_nope = &p.ks[(key * heads + head) * p.d..][..nope];
                    let direct: f32 = q_nope.iter().zip(k_nope).map(|(a, b)| a * b).sum();
                    worst = worst.max((via_absorbed - direct).abs());
                }
            }
        }
        assert!(worst < 1e-4, "absorbed form differs by {worst}");
    }
}
