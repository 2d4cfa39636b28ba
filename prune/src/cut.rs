//! The structured pruning stage (`compress prune --heads/--ffn/--layers/--width`,
//! and `--experts` for a mixture of experts):
//! cuts that make the model genuinely smaller. Importance comes from the
//! original model's activations on calibration samples (one pass of the
//! calibration walk for the per-channel statistics, one for the blocks'
//! input/output similarity when blocks go); then every tensor is sliced the way
//! the architecture's description says its dimensions are cut, and written
//! with a rewritten config, so the family's loaders run the result as a
//! smaller dense model.

use crate::structured::{
    blocks_to_keep, heads_to_keep, input_channel_scores, keep_highest, mean_row_cosine,
};
use anyhow::{bail, Context, Result};
use kernels::GgmlType;
use model::arch::{Arch, Dim, Role, TensorSpec};
use model::calib::factor::FactorOptions;
use model::calib::walk::{self, f32_tensor, finite_weights, LayerInput, Timings};
use model::config::Routing;
use model::dense::DenseWriter;
use model::llama::LINEAR_GROUPS;
use model::{names, Model, ModelConfig, Tensor};
use serde::Serialize;
use std::path::Path;

/// What to cut.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cuts {
    /// Query heads removed per block: a multiple of the key/value heads in
    /// grouped-query attention; in multi-head attention their keys and values go too.
    pub heads: usize,
    /// Fraction of each block's FFN channels removed.
    pub ffn: f64,
    /// Decoder blocks removed.
    pub layers: usize,
    /// Fraction of the hidden (embedding) channels removed.
    pub width: f64,
    /// Routed experts removed from every block of a mixture of experts.
    pub experts: usize,
}

impl Cuts {
    /// Whether any structured cut is asked for.
    pub fn any(&self) -> bool {
        self.heads > 0
            || self.ffn != 0.0
            || self.layers > 0
            || self.width != 0.0
            || self.experts > 0
    }
}

/// Kept FFN sizes are rounded down to a multiple of this, so the smaller
/// matrices still split into whole quantization blocks.
const ALIGN: usize = 32;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// How many of `n` channels stay when `fraction` is removed, rounded down to a
/// multiple of `align`, checked.
fn kept(n: usize, fraction: f64, align: usize, what: &str) -> Result<usize> {
    if !(fraction.is_finite() && (0.0..1.0).contains(&fraction)) {
        bail!("--{what} {fraction} is outside [0, 1)");
    }
    let keep = ((n as f64 * (1.0 - fraction)) as usize / align * align).min(n);
    if keep == 0 {
        bail!(
            "--{what} {fraction} leaves no {what} channels of {n} (sizes are multiples of {align})"
        );
    }
    Ok(keep)
}

/// Whether every query head has its own key/value head (multi-head attention:
/// OLMo 2, Llama 2 7B), so a head goes with its keys and values.
fn multi_head(c: &ModelConfig) -> bool {
    c.num_key_value_heads == c.num_attention_heads
}

/// The query heads that stay: in grouped-query attention the same number
/// leaves every group; in multi-head attention a head leaves with its own key
/// and value head.
fn kept_heads(c: &ModelConfig, scores: &[f64], remove: usize) -> Result<Vec<usize>> {
    if !multi_head(c) {
        return heads_to_keep(scores, c.num_key_value_heads, remove);
    }
    if remove >= scores.len() {
        bail!(
            "removing {remove} of {} heads leaves none; at most {} can go",
            scores.len(),
            scores.len() - 1
        );
    }
    Ok(keep_highest(scores, remove))
}

/// The smaller config, checked against the model before any work.
pub fn plan_config(c: &ModelConfig, cuts: &Cuts) -> Result<ModelConfig> {
    let mut n = c.clone();
    if cuts.heads > 0 {
        kept_heads(c, &vec![0.0; c.num_attention_heads], cuts.heads)?;
        n.num_attention_heads -= cuts.heads;
        if multi_head(c) {
            n.num_key_value_heads -= cuts.heads;
        }
    }
    if cuts.layers > 0 {
        let kept = blocks_to_keep(&vec![0.0; c.num_hidden_layers], cuts.layers)?;
        // Which layers stay is decided later; `run` sets their kinds.
        n.keep_layers(&kept);
    }
    if cuts.ffn > 0.0 {
        n.intermediate_size = kept(c.intermediate_size, cuts.ffn, ALIGN, "ffn")?;
    }
    if cuts.experts > 0 {
        let Some(m) = n.moe.as_mut() else {
            bail!(
                "--experts {} removes routed experts; a '{}' model has none",
                cuts.experts,
                c.arch.name
            );
        };
        if cuts.experts >= m.experts || m.experts - cuts.experts < m.used {
            bail!(
                "--experts {} leaves {} of {} experts, but every token runs through {}",
                cuts.experts,
                m.experts.saturating_sub(cuts.experts),
                m.experts,
                m.used
            );
        }
        if let Routing::Grouped(g) = m.routing {
            // Group-limited routing keeps its groups: as many experts go from
            // each, and each keeps the two whose sum scores it.
            let per = m.experts / g.groups;
            if g.groups > 1
                && (!cuts.experts.is_multiple_of(g.groups) || per - cuts.experts / g.groups < 2)
            {
                bail!(
                    "--experts {} cannot come evenly out of {} expert groups of {per} leaving at least 2 in each \
                     (the router scores a group by its two best experts); cut a multiple of {} up to {}",
                    cuts.experts,
                    g.groups,
                    g.groups,
                    g.groups * per.saturating_sub(2)
                );
            }
        }
        m.experts -= cuts.experts;
    }
    if cuts.width > 0.0 {
        // HF transformers insists on a hidden size that the query heads divide
        // (even with head_dim given); 8 keeps rows SIMD-friendly.
        let heads = n.num_attention_heads;
        let align = heads * 8 / gcd(heads, 8);
        n.hidden_size = kept(c.hidden_size, cuts.width, align, "width")?;
        if !n.hidden_size.is_multiple_of(ALIGN) {
            eprintln!(
                "note: the hidden size becomes {} (a multiple of {align}, as HF transformers needs with {heads} heads), \
                 not of {ALIGN}: GGUF block types will fall back to F16 for rows of that length",
                n.hidden_size
            );
        }
    }
    if !n.hidden_size.is_multiple_of(n.num_attention_heads) {
        bail!(
            "hidden size {} is not a multiple of the {} query heads left; HF transformers refuses such a config",
            n.hidden_size,
            n.num_attention_heads
        );
    }
    Ok(n)
}

/// Which indices of the original each cut keeps.
struct Keep {
    blocks: Vec<usize>,
    heads: Vec<Vec<usize>>,
    ffn: Vec<Vec<usize>>,
    width: Vec<usize>,
    experts: Vec<Vec<usize>>,
}

/// One tensor of the result: its name, shape, source, and kept rows/columns
/// (`None`: all). 1-D tensors are one row.
struct Slice {
    name: String,
    shape: Vec<usize>,
    source: String,
    rows: Option<Vec<usize>>,
    cols: Option<Vec<usize>>,
}

/// What the report records.
#[derive(Serialize)]
pub struct StructuredReport {
    /// The original and new shapes.
    pub before: Shape,
    /// After the cuts.
    pub after: Shape,
    /// Parameters before and after.
    pub params_before: u64,
    /// After the cuts.
    pub params_after: u64,
    /// Blocks removed (original numbering).
    pub removed_blocks: Vec<usize>,
    /// Mean cosine similarity of each block's input and output (when blocks were cut).
    pub block_similarity: Vec<f64>,
    /// Query heads kept per block (original numbering).
    pub kept_heads: Vec<Vec<usize>>,
    /// Routed experts kept per block (original numbering), when experts were cut.
    pub kept_experts: Vec<Vec<usize>>,
    /// Per block and expert: REAP's saliency on the calibration samples (the
    /// mean router weight × output norm over the tokens routed to it).
    pub expert_scores: Vec<Vec<f64>>,
    /// Per block and expert: calibration tokens routed to it.
    pub expert_tokens: Vec<Vec<u64>>,
}

/// The sizes a cut changes.
#[derive(Serialize)]
pub struct Shape {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
}

fn shape_of(c: &ModelConfig) -> Shape {
    Shape {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
    }
}

/// The block linear whose input has dimension `d` (the attention output
/// projection for [`Dim::QDim`], the MLP down projection for [`Dim::Ffn`]): the
/// layer whose input channels a head or FFN cut removes.
fn reader_of(arch: &Arch, d: Dim) -> Result<&'static TensorSpec> {
    arch.block
        .iter()
        .find(|s| s.role == Role::Linear && s.shape.get(1) == Some(&d))
        .with_context(|| format!("a '{}' block has no linear reading {d:?}", arch.gguf_name))
}

/// Sums `Σx²` per input channel of the layers the cuts score, over the samples,
/// without changing the model: (head-cut layer inputs, FFN-cut layer inputs,
/// normed block inputs) per block.
type ChannelStats = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<f64>);

fn channel_stats(
    model: &Model,
    samples: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ChannelStats> {
    let c = &model.config;
    let arch = c.arch;
    let blocks = c.num_hidden_layers;
    let heads_reader = reader_of(arch, Dim::QDim)?.gguf;
    let ffn_reader = reader_of(arch, Dim::Ffn)?.gguf;
    // Each group of linears that reads the hidden stream counts once for width.
    let width_readers: Vec<&str> = LINEAR_GROUPS
        .iter()
        .filter_map(|g| g.iter().find_map(|&s| arch.slot(s)))
        .filter(|spec| spec.shape.get(1) == Some(&Dim::Hidden))
        .map(|spec| spec.gguf)
        .collect();
    let mut o_in = vec![Vec::new(); blocks];
    let mut down_in = vec![Vec::new(); blocks];
    let mut width = vec![0f64; c.hidden_size];
    walk::sequential_blocks(
        model,
        samples,
        &FactorOptions::default(),
        true,
        true,
        &walk::ExpertCalibration::default(),
        &mut |name: &str, w: &Tensor, input: &LayerInput, _t: &mut Timings| {
            let (l, suffix) = model::arch::split_block(name).unwrap_or((0, name));
            let diag = input.diagonal();
            if suffix == heads_reader {
                o_in[l] = diag;
            } else if suffix == ffn_reader {
                down_in[l] = diag;
            } else if width_readers.contains(&suffix) {
                for (s, d) in width.iter_mut().zip(&diag) {
                    *s += d.max(0.0).sqrt() as f64;
                }
            }
            let values = finite_weights(model, name, w)?;
            Ok(f32_tensor(name, w.shape[0], w.shape[1], values))
        },
        progress,
    )?;
    Ok((o_in, down_in, width))
}

/// ShortGPT's per-block similarity of input and output on the original model.
fn block_similarity(model: &Model, samples: &[Vec<u32>]) -> Result<Vec<f64>> {
    let c = &model.config;
    let mut xs: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let mut sim = vec![0f64; c.num_hidden_layers];
    for (l, s) in sim.iter_mut().enumerate() {
        let w = model.block_weights(l)?;
        for x in xs.iter_mut() {
            let before = x.clone();
            let n = x.len() / c.hidden_size;
            model.forward_block(&w, x, n)?;
            *s += mean_row_cosine(&before, x, c.hidden_size) / samples.len() as f64;
        }
    }
    Ok(sim)
}

/// Gathers rows and columns of a row-major `rows × cols` matrix.
fn gather(
    values: &[f32],
    cols: usize,
    keep_rows: Option<&[usize]>,
    keep_cols: Option<&[usize]>,
) -> Vec<f32> {
    let rows = values.len() / cols;
    let all_rows: Vec<usize>;
    let rs = match keep_rows {
        Some(r) => r,
        None => {
            all_rows = (0..rows).collect();
            &all_rows
        }
    };
    let mut out = Vec::with_capacity(rs.len() * keep_cols.map_or(cols, <[usize]>::len));
    for &r in rs {
        let row = &values[r * cols..(r + 1) * cols];
        match keep_cols {
            Some(cs) => out.extend(cs.iter().map(|&c| row[c])),
            None => out.extend_from_slice(row),
        }
    }
    out
}

/// Runs the structured cuts and writes the smaller model.
pub fn run(
    model: &Model,
    cuts: &Cuts,
    samples: &[Vec<u32>],
    output: &Path,
    dtype: GgmlType,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<StructuredReport> {
    let c = &model.config;
    if cuts.heads > 0 || cuts.ffn > 0.0 || cuts.layers > 0 || cuts.width > 0.0 {
        c.refuse_moe("structured pruning of heads, FFN channels, blocks or width")?;
    }
    let mut new = plan_config(c, cuts)?;
    let hd = c.head_dim;

    let needs_channels = cuts.heads > 0 || cuts.ffn > 0.0 || cuts.width > 0.0;
    let (o_in, down_in, width_score) = if needs_channels {
        channel_stats(model, samples, &mut |d, n| {
            progress("channel statistics", d, n)
        })?
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let similarity = if cuts.layers > 0 {
        progress("block similarity", 0, 1);
        let s = block_similarity(model, samples)?;
        progress("block similarity", 1, 1);
        s
    } else {
        Vec::new()
    };
    let (expert_scores, expert_tokens) = if cuts.experts > 0 {
        expert_stats(model, samples, &mut |d, n| {
            progress("expert statistics", d, n)
        })?
    } else {
        (Vec::new(), Vec::new())
    };
    let blocks = if cuts.layers > 0 {
        blocks_to_keep(&similarity, cuts.layers)?
    } else {
        (0..c.num_hidden_layers).collect()
    };
    // The kept blocks keep their attention kinds (window, RoPE).
    new.layer_types = blocks.iter().map(|&l| c.layer_types[l]).collect();
    let mut keep = Keep {
        blocks,
        heads: Vec::new(),
        ffn: Vec::new(),
        experts: Vec::new(),
        width: if cuts.width > 0.0 {
            keep_highest(&width_score, c.hidden_size - new.hidden_size)
        } else {
            (0..c.hidden_size).collect()
        },
    };
    for &l in &keep.blocks {
        let heads = if cuts.heads > 0 {
            let wo = model
                .tensor(&names::block(l, reader_of(c.arch, Dim::QDim)?.gguf))?
                .to_f32()?;
            let ch = input_channel_scores(&wo, &o_in[l]);
            let per_head: Vec<f64> = ch.chunks(hd).map(|h| h.iter().sum()).collect();
            kept_heads(c, &per_head, cuts.heads)?
        } else {
            (0..c.num_attention_heads).collect()
        };
        keep.heads.push(heads);
        let ffn = if cuts.ffn > 0.0 {
            let wd = model
                .tensor(&names::block(l, reader_of(c.arch, Dim::Ffn)?.gguf))?
                .to_f32()?;
            keep_highest(
                &input_channel_scores(&wd, &down_in[l]),
                c.intermediate_size - new.intermediate_size,
            )
        } else {
            (0..c.intermediate_size).collect()
        };
        keep.ffn.push(ffn);
        if cuts.experts > 0 {
            keep.experts.push(match expert_scores[l].is_empty() {
                // A dense block keeps no experts list.
                true => Vec::new(),
                false => keep_experts(c, &expert_scores[l], cuts.experts),
            });
        }
    }

    // Every tensor of the result and where it comes from: each dimension the
    // description gives a tensor is cut the way that dimension is cut.
    let width = (cuts.width > 0.0).then(|| keep.width.clone());
    let select = |d: Dim, nl: Option<usize>| -> Option<Vec<usize>> {
        match (d, nl) {
            (Dim::Hidden, _) => width.clone(),
            (Dim::Ffn, Some(nl)) if cuts.ffn > 0.0 => Some(keep.ffn[nl].clone()),
            (Dim::Experts, Some(nl)) if cuts.experts > 0 => Some(keep.experts[nl].clone()),
            (Dim::KvDim, Some(nl)) if cuts.heads > 0 && multi_head(c) => Some(
                keep.heads[nl]
                    .iter()
                    .flat_map(|&h| h * hd..(h + 1) * hd)
                    .collect(),
            ),
            (Dim::QDim, Some(nl)) if cuts.heads > 0 => Some(
                keep.heads[nl]
                    .iter()
                    .flat_map(|&h| h * hd..(h + 1) * hd)
                    .collect(),
            ),
            _ => None,
        }
    };
    let mut slices = Vec::new();
    for name in model::names::all(&new) {
        let spec = c
            .arch
            .spec(&name)
            .with_context(|| format!("'{name}' is not described"))?;
        let (source, nl) = match model::arch::split_block(&name) {
            Some((nl, suffix)) => (names::block(keep.blocks[nl], suffix), Some(nl)),
            None => (name.clone(), None),
        };
        let (rows, cols) = match spec.shape {
            [d] => (None, select(*d, nl)),
            [r, k] => (select(*r, nl), select(*k, nl)),
            // Stacked experts: whole experts go, each its block of rows.
            [e, r, k] => {
                let per = r.size(c);
                let rows = select(*e, nl)
                    .map(|kept| kept.iter().flat_map(|&x| x * per..(x + 1) * per).collect());
                (rows, select(*k, nl))
            }
            other => bail!("'{name}' has {} dimensions; cuts know 1 to 3", other.len()),
        };
        slices.push(Slice {
            shape: spec.shape.iter().map(|d| d.size(&new)).collect(),
            name,
            source,
            rows,
            cols,
        });
    }

    let declared: Vec<(String, Vec<usize>)> = slices
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect();
    let mut writer = DenseWriter::create(model, &new, &declared, output, dtype)?;
    // An embedding scaled by √hidden (Gemma) would shrink with the width: the
    // table grows by √(old/new) to keep what the blocks see, and a tied head's
    // final-norm gain shrinks by as much to keep the logits.
    let regain = match (c.embedding_scale(), new.embedding_scale()) {
        (Some(old), Some(now)) if old != now => Some(old / now),
        _ => None,
    };
    let (embedding, final_norm) = (
        c.arch.global_name(Role::Embedding),
        c.arch.global_name(Role::Norm),
    );
    for (i, s) in slices.iter().enumerate() {
        let t = model.tensor(&s.source)?;
        let values = finite_weights(model, &s.source, &t)?;
        let cols = *t.shape.last().unwrap_or(&1);
        let mut out = gather(&values, cols, s.rows.as_deref(), s.cols.as_deref());
        if let Some(k) = regain {
            if s.name == embedding {
                out.iter_mut().for_each(|v| *v *= k);
            } else if s.name == final_norm && new.tie_word_embeddings {
                out.iter_mut().for_each(|v| *v /= k);
            }
        }
        debug_assert_eq!(out.len(), s.shape.iter().product::<usize>(), "{}", s.name);
        writer.write(&s.name, &s.shape, &out)?;
        progress("write", i + 1, slices.len());
    }
    writer.finish(model)?;

    let params = |shapes: &mut dyn Iterator<Item = usize>| shapes.sum::<usize>() as u64;
    let removed_blocks = (0..c.num_hidden_layers)
        .filter(|l| !keep.blocks.contains(l))
        .collect();
    Ok(StructuredReport {
        before: shape_of(c),
        after: shape_of(&new),
        params_before: model.n_params()?,
        params_after: params(&mut slices.iter().map(|s| s.shape.iter().product::<usize>())),
        removed_blocks,
        block_similarity: similarity,
        kept_heads: keep.heads,
        kept_experts: keep.experts,
        expert_scores,
        expert_tokens,
    })
}

/// The experts a block keeps when `remove` of them go by `scores`: the most
/// salient overall, or within each group under group-limited routing (as
/// many from each group, see [`plan_config`]).
fn keep_experts(c: &ModelConfig, scores: &[f64], remove: usize) -> Vec<usize> {
    let groups = match c.moe.as_ref().map(|m| m.routing) {
        Some(Routing::Grouped(g)) if g.groups > 1 => g.groups,
        _ => return keep_highest(scores, remove),
    };
    let per = scores.len() / groups;
    (0..groups)
        .flat_map(|k| {
            keep_highest(&scores[k * per..(k + 1) * per], remove / groups)
                .into_iter()
                .map(move |e| k * per + e)
        })
        .collect()
}

/// Per block and routed expert, REAP's saliency on the calibration samples
/// (the mean over the tokens routed to the expert of its router weight times
/// the norm of its output, or of the norm of its output alone where the weight
/// scales its input; 0 for an expert no token reached) and how many tokens
/// reached it; empty for a dense block. Each block runs on every sample's
/// stream before the next.
#[allow(clippy::type_complexity)]
fn expert_stats(
    model: &Model,
    samples: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Vec<f64>>, Vec<Vec<u64>>)> {
    let c = &model.config;
    let experts = c.moe.as_ref().map_or(0, |m| m.experts);
    let mut xs: Vec<Vec<f32>> = samples
        .iter()
        .map(|s| model.embed(s))
        .collect::<Result<_>>()?;
    let (mut scores, mut tokens) = (Vec::new(), Vec::new());
    for l in 0..c.num_hidden_layers {
        let w = model.block_weights(l)?;
        let Some(router) = w.router.as_ref() else {
            // A dense block (Llama 4 interleaves them): nothing to score.
            for x in xs.iter_mut() {
                let n = x.len() / c.hidden_size;
                model.forward_block(&w, x, n)?;
            }
            scores.push(Vec::new());
            tokens.push(Vec::new());
            progress(l + 1, c.num_hidden_layers);
            continue;
        };
        // Where the router's weight scales the expert's input, the output is
        // already the expert's whole contribution.
        let input_weighted = model.input_weighted_experts();
        let (mut sum, mut count) = (vec![0f64; experts], vec![0u64; experts]);
        for x in xs.iter_mut() {
            let n = x.len() / c.hidden_size;
            let mut cursor = model.block_start(&w, std::mem::take(x), n);
            // Attention and its output: the cursor then holds the MLP's input.
            model.block_step(&w, &mut cursor)?;
            model.block_step(&w, &mut cursor)?;
            for pass in model.expert_outputs(&w, router, cursor.input(), n, &mut |_, _, _| {})? {
                for (&(_, weight), row) in pass.tokens.iter().zip(pass.out.chunks(c.hidden_size)) {
                    let norm = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                    let weight = if input_weighted { 1.0 } else { weight as f64 };
                    sum[pass.expert] += weight * norm;
                    count[pass.expert] += 1;
                }
            }
            model.block_step(&w, &mut cursor)?;
            model.block_step(&w, &mut cursor)?;
            *x = cursor.into_residual();
        }
        scores.push(
            sum.iter()
                .zip(&count)
                .map(|(&s, &n)| if n == 0 { 0.0 } else { s / n as f64 })
                .collect(),
        );
        tokens.push(count);
        progress(l + 1, c.num_hidden_layers);
    }
    Ok((scores, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::config::{GroupedRouting, MoeConfig};

    fn grouped(groups: usize) -> ModelConfig {
        let mut c = ModelConfig::from_hf_json(&serde_json::json!({
            "model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}))
        .unwrap();
        let mut m = MoeConfig::softmax(8, 2, 4, true);
        m.routing = Routing::Grouped(GroupedRouting {
            sigmoid: true,
            groups,
            groups_used: 1,
            scale: 1.0,
        });
        c.moe = Some(m);
        c
    }

    #[test]
    fn grouped_experts_are_cut_evenly_from_each_group() {
        // Groups {0..4} and {4..8}: the globally least salient are 0, 1 and 2,
        // but each group loses its own two least salient.
        let scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.6, 0.5];
        assert_eq!(keep_experts(&grouped(2), &scores, 4), vec![2, 3, 4, 5]);
        assert_eq!(keep_experts(&grouped(1), &scores, 4), vec![3, 4, 5, 6]);
        let cuts = |experts| Cuts {
            experts,
            ..Cuts::default()
        };
        assert_eq!(
            plan_config(&grouped(2), &cuts(4))
                .unwrap()
                .moe
                .unwrap()
                .experts,
            4
        );
        // Odd cuts, or groups left with fewer than 2, are refused.
        for bad in [3, 6] {
            let e = plan_config(&grouped(2), &cuts(bad))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot come evenly out of 2 expert groups of 4"),
                "{e}"
            );
        }
    }
}
