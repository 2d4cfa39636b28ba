//! The decoder block graph that the described architectures share, on the CPU
//! with f32 activations. What differs between them is data, in [`crate::arch`]
//! and [`crate::ModelConfig`]: which norms exist and where (before a branch,
//! after it, or both), q/k/v biases, q/k norms (per head or over the whole
//! projection), the MLP's activation, RoPE per layer (its base, or none),
//! sliding windows per layer, the attention and embedding scales:
//!
//! ```text
//! x   = embed(tokens) (·√hidden: gemma3)
//! per block l:  h = rmsnorm(x)·g_attn   (h = x when the block has no pre-norm: olmo2)
//!               q,k,v = h·Wq,k,vᵀ (+ b_q,k,v)
//!               q,k = rmsnorm(q,k)·g_q,k     per head (qwen3, gemma3) or whole row (olmo2)
//!               q,k = rope_l(q,k)            θ_l^(−2i/d) / scaling_i; none on NoPE layers
//!               a = softmax(q·kᵀ·s + mask_l)·v   s = 1/√d or 1/√query_pre_attn_scalar;
//!                                                mask_l causal, or the last W positions
//!               x = x + post_attn(a·Woᵀ)     post_attn = rmsnorm·g (gemma3, olmo2) or identity
//!               h = rmsnorm(x)·g_ffn (or x);  x = x + post_ffn((act(h·Wgᵀ) ⊙ h·Wuᵀ)·Wdᵀ)
//! logits = rmsnorm(x)·g · Wₒᵀ
//! ```
//!
//! Weights stay in their stored format and go through the dequantizing matmul; a
//! block's weights are read only while that block runs.

use crate::arch::Slot;
use crate::checkpoint::{Model, Tensor};
use crate::config::Activation;
use anyhow::{bail, Context, Result};
use kernels::matmul::{gemm, matmul, MatRef};
use rayon::prelude::*;

/// The optional attention parts of a block: biases and per-head norms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttnExtras {
    /// Query bias `[q_dim]`.
    pub q_bias: Option<Vec<f32>>,
    /// Key bias `[kv_dim]`.
    pub k_bias: Option<Vec<f32>>,
    /// Value bias `[kv_dim]`.
    pub v_bias: Option<Vec<f32>>,
    /// Per-head query RMSNorm gain `[head_dim]`, before RoPE.
    pub q_norm: Option<Vec<f32>>,
    /// Per-head key RMSNorm gain `[head_dim]`, before RoPE.
    pub k_norm: Option<Vec<f32>>,
}

impl AttnExtras {
    /// The extra of `slot`, if this is one of them.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Option<Vec<f32>>> {
        Some(match slot {
            Slot::QBias => &mut self.q_bias,
            Slot::KBias => &mut self.k_bias,
            Slot::VBias => &mut self.v_bias,
            Slot::QNorm => &mut self.q_norm,
            Slot::KNorm => &mut self.k_norm,
            _ => return None,
        })
    }
}

/// The weights of one decoder block, in their stored format.
pub struct BlockWeights<'a> {
    /// Which block of the model these are (its attention kind and RoPE).
    pub layer: usize,
    /// Pre-attention RMSNorm gain (none: the attention reads the stream itself).
    pub attn_norm: Option<Vec<f32>>,
    /// Query projection `[q_dim, hidden]`.
    pub q: Tensor<'a>,
    /// Key projection `[kv_dim, hidden]`.
    pub k: Tensor<'a>,
    /// Value projection `[kv_dim, hidden]`.
    pub v: Tensor<'a>,
    /// Attention output projection `[hidden, q_dim]`.
    pub o: Tensor<'a>,
    /// RMSNorm gain on the attention branch's output, before the residual add.
    pub attn_post_norm: Option<Vec<f32>>,
    /// Pre-MLP RMSNorm gain (none: the MLP reads the stream itself).
    pub ffn_norm: Option<Vec<f32>>,
    /// RMSNorm gain on the MLP branch's output, before the residual add.
    pub ffn_post_norm: Option<Vec<f32>>,
    /// Gate projection `[ffn, hidden]`.
    pub gate: Tensor<'a>,
    /// Up projection `[ffn, hidden]`.
    pub up: Tensor<'a>,
    /// Down projection `[hidden, ffn]`.
    pub down: Tensor<'a>,
    /// Biases and per-head norms of the attention, where the architecture has them.
    pub extras: AttnExtras,
    /// The router `[experts, hidden]` of a mixture-of-experts block; `gate`,
    /// `up` and `down` then stack the experts' matrices (`[experts, …]`).
    pub router: Option<Vec<f32>>,
    /// The shared expert (gate, up, down) of a mixture-of-experts block that has one.
    pub shared: Option<[Tensor<'a>; 3]>,
    /// The router's per-expert selection bias (DeepSeek's
    /// `e_score_correction_bias`), where it has one.
    pub router_bias: Option<Vec<f32>>,
    /// Multi-head latent attention's weights (DeepSeek), which replace `q`,
    /// `k` and `v` (then empty placeholders).
    pub mla: Option<MlaWeights<'a>>,
}

/// The weights of multi-head latent attention ([`crate::config::MlaConfig`]).
pub struct MlaWeights<'a> {
    /// Query down-projection `[q_lora, hidden]`.
    pub q_a: Tensor<'a>,
    /// Its RMSNorm gain `[q_lora]`.
    pub q_a_norm: Vec<f32>,
    /// Query up-projection `[heads·(nope + rope), q_lora]`.
    pub q_b: Tensor<'a>,
    /// Latent and shared RoPE key `[kv_lora + rope, hidden]`.
    pub kv_a: Tensor<'a>,
    /// The latent's RMSNorm gain `[kv_lora]`.
    pub kv_a_norm: Vec<f32>,
    /// Per head, the latent → key (no-RoPE part) map as llama.cpp stores it:
    /// `[heads, kv_lora, nope]`.
    pub k_b: Tensor<'a>,
    /// Per head, the latent → value map `[heads, v, kv_lora]`.
    pub v_b: Tensor<'a>,
}

impl MlaWeights<'_> {
    /// A copy that borrows these weights.
    fn borrowed(&self) -> MlaWeights<'_> {
        MlaWeights {
            q_a: self.q_a.borrowed(),
            q_a_norm: self.q_a_norm.clone(),
            q_b: self.q_b.borrowed(),
            kv_a: self.kv_a.borrowed(),
            kv_a_norm: self.kv_a_norm.clone(),
            k_b: self.k_b.borrowed(),
            v_b: self.v_b.borrowed(),
        }
    }
}

impl<'a> BlockWeights<'a> {
    /// The linear in `slot`.
    pub fn linear(&self, slot: Slot) -> Option<&Tensor<'a>> {
        Some(match slot {
            Slot::Q => &self.q,
            Slot::K => &self.k,
            Slot::V => &self.v,
            Slot::O => &self.o,
            Slot::Gate => &self.gate,
            Slot::Up => &self.up,
            Slot::Down => &self.down,
            Slot::SharedGate => &self.shared.as_ref()?[0],
            Slot::SharedUp => &self.shared.as_ref()?[1],
            Slot::SharedDown => &self.shared.as_ref()?[2],
            Slot::QA => &self.mla.as_ref()?.q_a,
            Slot::QB => &self.mla.as_ref()?.q_b,
            Slot::KvA => &self.mla.as_ref()?.kv_a,
            Slot::KB => &self.mla.as_ref()?.k_b,
            Slot::VB => &self.mla.as_ref()?.v_b,
            _ => return None,
        })
    }

    /// A copy whose linears borrow this block's (norm gains and extras copied).
    pub fn borrowed(&self) -> BlockWeights<'_> {
        BlockWeights {
            layer: self.layer,
            attn_norm: self.attn_norm.clone(),
            q: self.q.borrowed(),
            k: self.k.borrowed(),
            v: self.v.borrowed(),
            o: self.o.borrowed(),
            attn_post_norm: self.attn_post_norm.clone(),
            ffn_norm: self.ffn_norm.clone(),
            ffn_post_norm: self.ffn_post_norm.clone(),
            gate: self.gate.borrowed(),
            up: self.up.borrowed(),
            down: self.down.borrowed(),
            extras: self.extras.clone(),
            router: self.router.clone(),
            shared: self
                .shared
                .as_ref()
                .map(|[g, u, d]| [g.borrowed(), u.borrowed(), d.borrowed()]),
            router_bias: self.router_bias.clone(),
            mla: self.mla.as_ref().map(MlaWeights::borrowed),
        }
    }

    /// The linear in `slot`, to change it.
    pub fn linear_mut(&mut self, slot: Slot) -> Option<&mut Tensor<'a>> {
        Some(match slot {
            Slot::Q => &mut self.q,
            Slot::K => &mut self.k,
            Slot::V => &mut self.v,
            Slot::O => &mut self.o,
            Slot::Gate => &mut self.gate,
            Slot::Up => &mut self.up,
            Slot::Down => &mut self.down,
            Slot::SharedGate => &mut self.shared.as_mut()?[0],
            Slot::SharedUp => &mut self.shared.as_mut()?[1],
            Slot::SharedDown => &mut self.shared.as_mut()?[2],
            Slot::QA => &mut self.mla.as_mut()?.q_a,
            Slot::QB => &mut self.mla.as_mut()?.q_b,
            Slot::KvA => &mut self.mla.as_mut()?.kv_a,
            Slot::KB => &mut self.mla.as_mut()?.k_b,
            Slot::VB => &mut self.mla.as_mut()?.v_b,
            _ => return None,
        })
    }

    /// The residual-stream norm gain in `slot`, to change it (`None` when the
    /// block has no such norm).
    pub fn gain_mut(&mut self, slot: Slot) -> Option<&mut Vec<f32>> {
        self.vector_mut(slot)?.as_mut()
    }

    /// The float vector in `slot` (norm gains, biases, q/k norms).
    pub fn vector_mut(&mut self, slot: Slot) -> Option<&mut Option<Vec<f32>>> {
        match slot {
            Slot::AttnNorm => Some(&mut self.attn_norm),
            Slot::AttnPostNorm => Some(&mut self.attn_post_norm),
            Slot::FfnNorm => Some(&mut self.ffn_norm),
            Slot::FfnPostNorm => Some(&mut self.ffn_post_norm),
            Slot::RouterBias => Some(&mut self.router_bias),
            _ => self.extras.get_mut(slot),
        }
    }

    /// Replaces the tensor in `slot` with `t` (vectors are read as f32).
    pub fn replace(&mut self, slot: Slot, t: Tensor<'a>) -> Result<()> {
        if let Some(v) = self.vector_mut(slot) {
            *v = Some(t.to_f32()?);
        } else if let Some(l) = self.linear_mut(slot) {
            *l = t;
        } else {
            bail!(
                "block {} has no {slot:?} to replace with '{}'",
                self.layer,
                t.name
            );
        }
        Ok(())
    }
}

/// Each token's experts and their weights from router scores `scores`
/// (`n × experts`): the softmax over all experts, the `used` most probable
/// (the lower index first on a tie), renormalised to sum to 1 when the config
/// says so; with [`crate::config::Routing::SigmoidInput`] the `used` highest
/// scores, each weighted by its sigmoid. `n × used` pairs (expert, weight),
/// each token's best first.
pub fn route(
    scores: &[f32],
    m: &crate::config::MoeConfig,
    bias: Option<&[f32]>,
) -> Vec<(usize, f32)> {
    if let crate::config::Routing::Grouped(g) = m.routing {
        return scores
            .chunks(m.experts)
            .flat_map(|row| route_grouped(row, m, &g, bias))
            .collect();
    }
    if m.routing == crate::config::Routing::SigmoidInput {
        return scores
            .chunks(m.experts)
            .flat_map(|row| {
                let mut order: Vec<usize> = (0..m.experts).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                order[..m.used]
                    .iter()
                    .map(|&e| (e, 1.0 / (1.0 + (-row[e]).exp())))
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    scores
        .chunks(m.experts)
        .flat_map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let exp: Vec<f32> = row.iter().map(|&s| (s - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..m.experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let chosen = &order[..m.used];
            let norm = if m.norm_topk_prob {
                chosen.iter().map(|&e| exp[e]).sum()
            } else {
                sum
            };
            chosen
                .iter()
                .map(|&e| (e, exp[e] / norm))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The tokens routed to expert `e` by `routes` (`used` pairs (expert, weight)
/// per token, as [`route`] gives them): (position, weight), in position order.
pub fn routed_to<W: Copy>(routes: &[(usize, W)], used: usize, e: usize) -> Vec<(usize, W)> {
    routes
        .chunks(used)
        .enumerate()
        .filter_map(|(t, r)| r.iter().find(|x| x.0 == e).map(|x| (t, x.1)))
        .collect()
}

/// One token's experts under DeepSeek's routing: scores `s` (sigmoid or
/// softmax of `logits`), selection scores `s + bias`; groups of `E / groups`
/// consecutive experts ranked by the sum of their two best selection scores,
/// only the best `groups_used` eligible; the `used` best eligible experts
/// (the lower index first on a tie), weighted by their unbiased scores,
/// renormalised when `norm_topk_prob` (÷ (Σ + 1e-20), as transformers and
/// DeepSeek's reference), times `scale`.
fn route_grouped(
    logits: &[f32],
    m: &crate::config::MoeConfig,
    g: &crate::config::GroupedRouting,
    bias: Option<&[f32]>,
) -> Vec<(usize, f32)> {
    let e = logits.len();
    let s: Vec<f32> = if g.sigmoid {
        logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect()
    } else {
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        exp.iter().map(|x| x / sum).collect()
    };
    let mut sel: Vec<f32> = match bias {
        Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => s.clone(),
    };
    if g.groups > 1 {
        let per = e / g.groups;
        let group_score = |k: usize| {
            let mut v: Vec<f32> = sel[k * per..(k + 1) * per].to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v.iter().take(2).sum::<f32>()
        };
        let scores: Vec<f32> = (0..g.groups).map(group_score).collect();
        let mut order: Vec<usize> = (0..g.groups).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for &k in &order[g.groups_used.min(g.groups)..] {
            sel[k * per..(k + 1) * per]
                .iter_mut()
                .for_each(|x| *x = f32::NEG_INFINITY);
        }
    }
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| sel[b].total_cmp(&sel[a]).then(a.cmp(&b)));
    let chosen = &order[..m.used];
    let norm = if m.norm_topk_prob {
        chosen.iter().map(|&x| s[x]).sum::<f32>() + 1e-20
    } else {
        1.0
    };
    chosen.iter().map(|&x| (x, s[x] / norm * g.scale)).collect()
}

/// Adds `bias` to every row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    x.par_chunks_mut(bias.len())
        .for_each(|row| row.iter_mut().zip(bias).for_each(|(x, b)| *x += b));
}

/// `out = x · wᵀ` for `n` rows of `x`, allocating the output.
pub fn linear(x: &[f32], n: usize, w: &Tensor) -> Result<Vec<f32>> {
    let wr = w.as_weight()?;
    let mut out = vec![0f32; n * wr.rows];
    matmul(x, n, &wr, &mut out).with_context(|| format!("matmul with '{}'", w.name))?;
    Ok(out)
}

/// `√(2/π)`, GELU's tanh-form constant.
pub const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `act(x)` of the MLP's gate.
#[inline]
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

/// The gated MLP's hidden for `n` rows of its input `h`:
/// `act(h · Wgᵀ) ⊙ (h · Wuᵀ)` (SwiGLU with SiLU, GeGLU with GELU), the input
/// of the down projection.
pub fn gated_mlp(
    h: &[f32],
    n: usize,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
) -> Result<Vec<f32>> {
    let mut g = linear(h, n, gate)?;
    let u = linear(h, n, up)?;
    g.par_iter_mut()
        .zip(&u)
        .for_each(|(g, &u)| *g = activate(act, *g) * u);
    Ok(g)
}

/// RMSNorm of each row of `x` (width `gain.len()`), times `gain`, into `out`.
/// The sum of squares is accumulated in f64, as ggml does.
pub fn rms_norm(x: &[f32], gain: &[f32], eps: f64, out: &mut [f32]) {
    let h = gain.len();
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .for_each(|(o, row)| {
            let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let scale = (1.0 / (ss / h as f64 + eps).sqrt()) as f32;
            for ((o, &v), &g) in o.iter_mut().zip(row).zip(gain) {
                *o = v * scale * g;
            }
        });
}

/// Rotary tables: `cos[p·d/2 + i]`, `sin[…]` for positions `0..n` and the
/// frequencies `freqs` (one per pair, [`crate::ModelConfig::rope_frequencies`]),
/// both multiplied by `factor` (YaRN's attention factor,
/// [`crate::ModelConfig::layer_rope_factor`]; 1 otherwise).
pub fn rope_tables(n: usize, freqs: &[f64], factor: f64) -> (Vec<f32>, Vec<f32>) {
    let half = freqs.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for &f in freqs {
            let angle = p as f64 * f;
            cos.push((angle.cos() * factor) as f32);
            sin.push((angle.sin() * factor) as f32);
        }
    }
    (cos, sin)
}

/// Applies RoPE in HF's "rotate half" layout to every head of every row of `x`
/// (`n × n_heads·head_dim`): element `i` pairs with element `i + d/2`.
pub fn apply_rope(x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    x.par_chunks_mut(n_heads * head_dim)
        .enumerate()
        .for_each(|(p, row)| {
            let (c, s) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x1 * c[i] + x0 * s[i];
                }
            }
        });
}

/// Applies RoPE to adjacent pairs: element `2i` pairs with `2i + 1` (Llama 4's
/// complex rotation, llama.cpp's "normal" mode).
pub fn apply_rope_interleaved(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    x.par_chunks_mut(n_heads * head_dim)
        .enumerate()
        .for_each(|(p, row)| {
            let (c, s) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for head in row.chunks_mut(head_dim) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * c[i] - x1 * s[i];
                    pair[1] = x1 * c[i] + x0 * s[i];
                }
            }
        });
}

/// What a query may see and how its scores are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnMask {
    /// Scores are `q·k · scale`.
    pub scale: f32,
    /// `Some(W)`: query `i` sees keys `i − W < j ≤ i`; `None`: every `j ≤ i`.
    pub window: Option<usize>,
    /// `Some(C)`: query `i` sees only keys of its own chunk `⌊i/C⌋·C ≤ j ≤ i`.
    pub chunk: Option<usize>,
}

impl AttnMask {
    /// Full causal attention scaled by `1/√d`.
    pub fn causal(d: usize) -> Self {
        AttnMask {
            scale: 1.0 / (d as f32).sqrt(),
            window: None,
            chunk: None,
        }
    }

    /// The first key query `i` sees (never decreasing in `i`).
    pub fn first_key(&self, i: usize) -> usize {
        let windowed = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
        let chunked = self.chunk.map_or(0, |c| i / c.max(1) * c.max(1));
        windowed.max(chunked)
    }
}

/// Queries per tile of [`attention`]: a tile's scores are `TILE × (W + TILE)`
/// on a sliding layer, so the work per token is O(window), not O(context).
const TILE: usize = 64;

/// Causal grouped-query attention for `n` positions: `q` is `n × (heads·d)`,
/// `k`/`v` are `n × (kv_heads·d)`; returns `n × (heads·d)`. Queries run in tiles
/// that score only the keys some query of the tile can see.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    mask: AttnMask,
) -> Vec<f32> {
    let (qd, kvd) = (heads * d, kv_heads * d);
    let group = heads / kv_heads;
    let scale = mask.scale;
    let tiles = n.div_ceil(TILE);
    // One (head, tile) per task: its output rows `t·TILE..` of head h.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..heads * tiles)
        .into_par_iter()
        .map(|task| {
            let (h, t) = (task / tiles, task % tiles);
            let kvh = h / group;
            let (a, b) = (t * TILE, ((t + 1) * TILE).min(n));
            let (rows, lo) = (b - a, mask.first_key(a));
            let keys = b - lo;
            // Scores S = q_h[a..b] · k_h[lo..b]ᵀ.
            let mut s = vec![0f32; rows * keys];
            gemm(
                MatRef::row_major(&q[a * qd + h * d..], rows, d, qd),
                MatRef::row_major(&k[lo * kvd + kvh * d..], keys, d, kvd).t(),
                &mut s,
                keys,
                false,
            );
            for (r, row) in s.chunks_mut(keys).enumerate() {
                let i = a + r;
                let (first, last) = (mask.first_key(i) - lo, i - lo);
                row[..first].fill(0.0);
                let live = &mut row[first..=last];
                let max = live
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0f32;
                for x in live.iter_mut() {
                    *x = (*x * scale - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                live.iter_mut().for_each(|x| *x *= inv);
                row[last + 1..].fill(0.0);
            }
            // Output P · v_h[lo..b].
            let mut o = vec![0f32; rows * d];
            gemm(
                MatRef::row_major(&s, rows, keys, keys),
                MatRef::row_major(&v[lo * kvd + kvh * d..], keys, d, kvd),
                &mut o,
                d,
                false,
            );
            (h, a, o)
        })
        .collect();
    let mut out = vec![0f32; n * qd];
    for (h, a, o) in &parts {
        for (r, src) in o.chunks(d).enumerate() {
            let dst = &mut out[(a + r) * qd..];
            dst[h * d..(h + 1) * d].copy_from_slice(src);
        }
    }
    out
}

/// The block's linear layers grouped by the input they read, in the order the
/// forward pass reaches them: the layers of a group all read the same input, and
/// a group's input depends on every group before it. Calibration walks the
/// groups in this order (see [`BlockCursor`]).
pub const LINEAR_GROUPS: [&[Slot]; 4] = [
    &[Slot::Q, Slot::K, Slot::V],
    &[Slot::O],
    &[Slot::Gate, Slot::Up, Slot::SharedGate, Slot::SharedUp],
    &[Slot::Down, Slot::SharedDown],
];

/// What multi-head latent attention computes before it attends
/// ([`Model::latent_parts`]).
pub struct LatentParts {
    /// `norm(q_a·h)`, the input of `q_b`, `n × q_lora`.
    pub q_a_normed: Vec<f32>,
    /// `q_b·norm(q_a·h)` before RoPE, `n × heads·(nope + rope)`: each head's
    /// no-RoPE part is the input of its `k_b` in the absorbed form llama.cpp
    /// stores (`q_nope·k_b[h]ᵀ` against the latent).
    pub q: Vec<f32>,
    /// The normed latent `n × kv_lora`: what `v_b` reads, weighted per head by
    /// the attention probabilities.
    pub latent: Vec<f32>,
    /// Queries, keys and values per head, each padded to `d`, `n × heads·d`.
    pub qs: Vec<f32>,
    /// See `qs`.
    pub ks: Vec<f32>,
    /// See `qs`.
    pub vs: Vec<f32>,
    /// Heads.
    pub heads: usize,
    /// Padded head width `max(nope + rope, v)`.
    pub d: usize,
    /// Causal, scaled by `(nope + rope)^−½` and YaRN's mscale².
    pub mask: AttnMask,
}

/// One routed expert's pass over the tokens routed to it.
pub struct ExpertOutput {
    /// The expert.
    pub expert: usize,
    /// The tokens routed to it (position, router weight), in position order.
    pub tokens: Vec<(usize, f32)>,
    /// Its output for those tokens, `tokens.len() × hidden`, before weighting
    /// (for input-weighted routing, on the weighted inputs).
    pub out: Vec<f32>,
}

/// The slots a mixture-of-experts block fills with its stacked experts.
pub const EXPERT_SLOTS: [Slot; 3] = [Slot::Gate, Slot::Up, Slot::Down];

/// Sees a linear layer's input: (its weight's GGUF suffix, the routed expert
/// for a stacked experts' tensor, its rows).
pub type LinearObserver<'o> = dyn FnMut(&'static str, Option<usize>, &[f32]) + 'o;

/// Sees a routed expert's input: (expert, the slot of the linear, its rows).
pub type ExpertObserver<'o> = dyn FnMut(usize, Slot, &[f32]) + 'o;

/// One sequence part way through a decoder block, stopped at the input of a
/// linear group ([`LINEAR_GROUPS`]). A caller holding one cursor per sequence
/// sees each group's input for all of them, may change that group's weights,
/// and then moves them all on ([`Model::block_step`]): the calibration walk's
/// one forward pass per block.
pub struct BlockCursor {
    /// The residual stream, `n × hidden`.
    x: Vec<f32>,
    /// The input of the group the cursor stands at.
    input: Vec<f32>,
    /// Index of that group in [`LINEAR_GROUPS`] (its length once done).
    group: usize,
    /// Positions.
    n: usize,
    /// A mixture-of-experts block's routed output, waiting for the shared
    /// expert's down projection (whose input the cursor then holds).
    routed: Option<Vec<f32>>,
}

impl BlockCursor {
    /// The input of the linear group the cursor stands at (`n × in_features`).
    pub fn input(&self) -> &[f32] {
        &self.input
    }

    /// The residual stream: the block's output once every group has run.
    pub fn into_residual(self) -> Vec<f32> {
        self.x
    }
}

impl Model {
    /// Reads the weights of block `layer`, each slot from the tensor the
    /// architecture's description puts there.
    pub fn block_weights(&self, layer: usize) -> Result<BlockWeights<'_>> {
        let (arch, c) = (self.config.arch, &self.config);
        let t = |slot: Slot| -> Result<Tensor<'_>> {
            let spec = arch
                .layer_slot(c, layer, slot)
                .with_context(|| format!("a '{}' block has no {slot:?} tensor", arch.gguf_name))?;
            self.tensor(&crate::names::block(layer, spec.gguf))
        };
        let vector = |slot: Slot| -> Result<Option<Vec<f32>>> {
            match arch.layer_slot(c, layer, slot) {
                None => Ok(None),
                Some(spec) => Ok(Some(
                    self.tensor(&crate::names::block(layer, spec.gguf))?
                        .to_f32()?,
                )),
            }
        };
        let mla = match c.mla {
            None => None,
            Some(_) => {
                let gain = |slot: Slot| -> Result<Vec<f32>> {
                    vector(slot)?.with_context(|| {
                        format!("a '{}' block has no {slot:?} gain", arch.gguf_name)
                    })
                };
                Some(MlaWeights {
                    q_a: t(Slot::QA)?,
                    q_a_norm: gain(Slot::QANorm)?,
                    q_b: t(Slot::QB)?,
                    kv_a: t(Slot::KvA)?,
                    kv_a_norm: gain(Slot::KvANorm)?,
                    k_b: t(Slot::KB)?,
                    v_b: t(Slot::VB)?,
                })
            }
        };
        // Latent attention has no q/k/v projections: empty placeholders.
        let qkv = |slot: Slot| match mla {
            Some(_) => Ok(Tensor::from_f32("none", vec![0, 0], &[])),
            None => t(slot),
        };
        Ok(BlockWeights {
            layer,
            attn_norm: vector(Slot::AttnNorm)?,
            q: qkv(Slot::Q)?,
            k: qkv(Slot::K)?,
            v: qkv(Slot::V)?,
            o: t(Slot::O)?,
            attn_post_norm: vector(Slot::AttnPostNorm)?,
            ffn_norm: vector(Slot::FfnNorm)?,
            ffn_post_norm: vector(Slot::FfnPostNorm)?,
            gate: t(Slot::Gate)?,
            up: t(Slot::Up)?,
            down: t(Slot::Down)?,
            extras: AttnExtras {
                q_bias: vector(Slot::QBias)?,
                k_bias: vector(Slot::KBias)?,
                v_bias: vector(Slot::VBias)?,
                q_norm: vector(Slot::QNorm)?,
                k_norm: vector(Slot::KNorm)?,
            },
            router: arch
                .router()
                .filter(|spec| c.block_has(layer, spec))
                .map(|spec| {
                    self.tensor(&crate::names::block(layer, spec.gguf))?
                        .to_f32()
                })
                .transpose()?,
            shared: match arch.layer_slot(c, layer, Slot::SharedGate) {
                None => None,
                Some(_) => Some([
                    t(Slot::SharedGate)?,
                    t(Slot::SharedUp)?,
                    t(Slot::SharedDown)?,
                ]),
            },
            router_bias: vector(Slot::RouterBias)?,
            mla,
        })
    }

    /// Token embeddings, `tokens.len() × hidden`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let name = self.config.arch.global_name(crate::arch::Role::Embedding);
        self.embed_with(&self.tensor(name)?, tokens)
    }

    /// Token embeddings looked up in `emb` (`vocab × hidden`) instead of the
    /// model's own table.
    pub fn embed_with(&self, emb: &Tensor, tokens: &[u32]) -> Result<Vec<f32>> {
        let w = emb.as_weight()?;
        let h = self.config.hidden_size;
        let mut x = vec![0f32; tokens.len() * h];
        for (row, &t) in x.chunks_mut(h).zip(tokens) {
            if t as usize >= w.rows {
                bail!(
                    "token id {t} is outside the vocabulary of {} tokens",
                    w.rows
                );
            }
            w.dequantize_rows(t as usize, t as usize + 1, row)?;
        }
        if let Some(scale) = self.config.embedding_scale() {
            x.par_iter_mut().for_each(|v| *v *= scale);
        }
        Ok(x)
    }

    /// Runs one decoder block in place on `x` (`n` positions starting at 0).
    pub fn forward_block(&self, w: &BlockWeights, x: &mut [f32], n: usize) -> Result<()> {
        self.forward_block_observed(w, x, n, &mut |_, _, _| {})
    }

    /// [`Model::forward_block`], showing `observe` the input of every linear layer
    /// (`rows × in_features`, row-major) with the GGUF suffix of its weight as the
    /// architecture's description names it, before the layer runs. Layers that
    /// share an input are each shown it. A routed expert is shown only the rows
    /// of the tokens routed to it, with its number (`None` for other layers).
    /// Used to collect calibration statistics.
    pub fn forward_block_observed(
        &self,
        w: &BlockWeights,
        x: &mut [f32],
        n: usize,
        observe: &mut LinearObserver,
    ) -> Result<()> {
        let (arch, c) = (self.config.arch, &self.config);
        let mut cursor = self.block_start(w, x.to_vec(), n);
        let routed = w.router.is_some();
        if let Some(mla) = &w.mla {
            // Latent attention's projections of the block input, and the
            // query's up-projection of the normed down-projection.
            let h = cursor.input();
            for slot in [Slot::QA, Slot::KvA] {
                if let Some(spec) = arch.layer_slot(c, w.layer, slot) {
                    observe(spec.gguf, None, h);
                }
            }
            let q_a = linear(h, n, &mla.q_a)?;
            let mut normed = vec![0f32; q_a.len()];
            rms_norm(&q_a, &mla.q_a_norm, c.rms_norm_eps, &mut normed);
            if let Some(spec) = arch.layer_slot(c, w.layer, Slot::QB) {
                observe(spec.gguf, None, &normed);
            }
        }
        for group in LINEAR_GROUPS {
            for spec in group
                .iter()
                .filter(|s| !(routed && EXPERT_SLOTS.contains(s)))
                .filter_map(|&slot| arch.layer_slot(c, w.layer, slot))
            {
                observe(spec.gguf, None, cursor.input());
            }
            self.block_step_observed(w, &mut cursor, &mut |e, slot, input| {
                if let Some(spec) = arch.layer_slot(c, w.layer, slot) {
                    observe(spec.gguf, Some(e), input);
                }
            })?;
        }
        x.copy_from_slice(&cursor.x);
        Ok(())
    }

    /// `rmsnorm(x)·gain`, or `x` itself when the block has no such norm.
    fn maybe_norm(&self, x: &[f32], gain: &Option<Vec<f32>>) -> Vec<f32> {
        match gain {
            None => x.to_vec(),
            Some(g) => {
                let mut out = vec![0f32; x.len()];
                rms_norm(x, g, self.config.rms_norm_eps, &mut out);
                out
            }
        }
    }

    /// Adds a branch's output `y` to the stream `x`, through the branch's
    /// post-norm when the block has one.
    fn add_branch(&self, x: &mut [f32], y: Vec<f32>, post_norm: &Option<Vec<f32>>) {
        let y = match post_norm {
            None => y,
            Some(_) => self.maybe_norm(&y, post_norm),
        };
        x.par_iter_mut().zip(&y).for_each(|(x, y)| *x += y);
    }

    /// Starts one sequence's pass through a block: the cursor stands at the
    /// first linear group's input (the attention norm's output).
    pub fn block_start(&self, w: &BlockWeights, x: Vec<f32>, n: usize) -> BlockCursor {
        let input = self.maybe_norm(&x, &w.attn_norm);
        BlockCursor {
            x,
            input,
            group: 0,
            n,
            routed: None,
        }
    }

    /// Runs the linear group the cursor stands at with `w`'s weights and moves
    /// the cursor to the next group's input (or to the block's output after the
    /// last group).
    pub fn block_step(&self, w: &BlockWeights, cursor: &mut BlockCursor) -> Result<()> {
        self.block_step_observed(w, cursor, &mut |_, _, _| {})
    }

    /// [`Model::block_step`], showing `observe` each routed expert's inputs (see
    /// [`Model::moe_mlp`]).
    pub fn block_step_observed(
        &self,
        w: &BlockWeights,
        cursor: &mut BlockCursor,
        observe: &mut ExpertObserver,
    ) -> Result<()> {
        let n = cursor.n;
        match cursor.group {
            0 => {
                cursor.input = self.attention_mix(w, &cursor.input, n)?;
            }
            1 => {
                let o = linear(&cursor.input, n, &w.o)?;
                self.add_branch(&mut cursor.x, o, &w.attn_post_norm);
                cursor.input = self.maybe_norm(&cursor.x, &w.ffn_norm);
            }
            2 => {
                let act = self.config.hidden_act;
                cursor.input = match &w.router {
                    Some(router) => {
                        let routed = self.moe_mlp(w, router, &cursor.input, n, observe)?;
                        match &w.shared {
                            // The shared expert's activation is the next input;
                            // the routed output waits for its down projection.
                            Some([g, u, _]) => {
                                cursor.routed = Some(routed);
                                gated_mlp(&cursor.input, n, g, u, act)?
                            }
                            // The experts' summed output: group 3 only adds it.
                            None => routed,
                        }
                    }
                    None => gated_mlp(&cursor.input, n, &w.gate, &w.up, act)?,
                };
            }
            3 => {
                let d = match (&w.router, &w.shared) {
                    (Some(_), Some([_, _, down])) => {
                        let mut d = linear(&cursor.input, n, down)?;
                        let routed = cursor.routed.take().unwrap_or_default();
                        d.iter_mut().zip(&routed).for_each(|(d, r)| *d += r);
                        d
                    }
                    (Some(_), None) => std::mem::take(&mut cursor.input),
                    (None, _) => linear(&cursor.input, n, &w.down)?,
                };
                self.add_branch(&mut cursor.x, d, &w.ffn_post_norm);
                cursor.input = Vec::new();
            }
            _ => bail!("the block's pass is already complete"),
        }
        cursor.group += 1;
        Ok(())
    }

    /// Each token's experts and weights ([`route`]) for the MLP input `h`
    /// (`n × hidden`) under `router` (`[experts, hidden]`, a block's
    /// [`BlockWeights::router`]).
    pub fn expert_routes(
        &self,
        router: &[f32],
        bias: Option<&[f32]>,
        h: &[f32],
        n: usize,
    ) -> Result<Vec<(usize, f32)>> {
        Ok(route(&self.router_logits(router, h, n)?, self.moe()?, bias))
    }

    /// The router's scores `n × experts` for the MLP input `h` (`n × hidden`).
    pub fn router_logits(&self, router: &[f32], h: &[f32], n: usize) -> Result<Vec<f32>> {
        let m = self.moe()?;
        let router = Tensor::from_f32("router", vec![m.experts, self.config.hidden_size], router);
        linear(h, n, &router)
    }

    /// The config's mixture of experts, for a block that has a router.
    fn moe(&self) -> Result<&crate::config::MoeConfig> {
        self.config
            .moe
            .as_ref()
            .context("a block with a router but no experts in the config")
    }

    /// A mixture-of-experts MLP on its input `h` (`n × hidden`): each token's
    /// router probabilities, its `used` best experts, and the sum of their gated
    /// MLPs' outputs weighted by those probabilities ([`Model::expert_outputs`]).
    pub fn moe_mlp(
        &self,
        w: &BlockWeights,
        router: &[f32],
        h: &[f32],
        n: usize,
        observe: &mut ExpertObserver,
    ) -> Result<Vec<f32>> {
        let hidden = self.config.hidden_size;
        let input_weighted = self.input_weighted_experts();
        let mut out = vec![0f32; n * hidden];
        for pass in self.expert_outputs(w, router, h, n, observe)? {
            for (&(t, weight), row) in pass.tokens.iter().zip(pass.out.chunks(hidden)) {
                let weight = if input_weighted { 1.0 } else { weight };
                for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                    *o += weight * v;
                }
            }
        }
        Ok(out)
    }

    /// Whether the router's weight scales each expert's input (Llama 4) rather
    /// than its output.
    pub fn input_weighted_experts(&self) -> bool {
        self.config
            .moe
            .as_ref()
            .is_some_and(|m| m.routing == crate::config::Routing::SigmoidInput)
    }

    /// Every routed expert's output on the tokens routed to it, for the MLP
    /// input `h` (`n × hidden`). Only routed experts run, each once on all its
    /// tokens; `observe` sees each expert's gate/up input (those tokens' rows
    /// of `h`) and down input.
    pub fn expert_outputs(
        &self,
        w: &BlockWeights,
        router: &[f32],
        h: &[f32],
        n: usize,
        observe: &mut ExpertObserver,
    ) -> Result<Vec<ExpertOutput>> {
        let c = &self.config;
        let m = c
            .moe
            .as_ref()
            .context("a block with a router but no experts in the config")?;
        let hidden = c.hidden_size;
        let routes = self.expert_routes(router, w.router_bias.as_deref(), h, n)?;
        let mut passes = Vec::new();
        for e in 0..m.experts {
            let tokens = routed_to(&routes, m.used, e);
            if tokens.is_empty() {
                continue;
            }
            let input_weighted = self.input_weighted_experts();
            let x: Vec<f32> = tokens
                .iter()
                .flat_map(|&(t, weight)| {
                    let scale = if input_weighted { weight } else { 1.0 };
                    h[t * hidden..(t + 1) * hidden]
                        .iter()
                        .map(move |v| v * scale)
                })
                .collect();
            observe(e, Slot::Gate, &x);
            observe(e, Slot::Up, &x);
            let a = gated_mlp(
                &x,
                tokens.len(),
                &w.gate.expert(e)?,
                &w.up.expert(e)?,
                c.hidden_act,
            )?;
            observe(e, Slot::Down, &a);
            let out = linear(&a, tokens.len(), &w.down.expert(e)?)?;
            passes.push(ExpertOutput {
                expert: e,
                tokens,
                out,
            });
        }
        Ok(passes)
    }

    /// The attention mixer of block `w.layer` on its input `h` (`n` positions
    /// from 0): q, k, v projections (with their biases), q/k norms, the layer's
    /// RoPE, causal or sliding-window grouped-query attention; the input of the
    /// output projection, `n × q_dim`.
    pub fn attention_mix(&self, w: &BlockWeights, h: &[f32], n: usize) -> Result<Vec<f32>> {
        if let (Some(mla), Some(cfg)) = (&w.mla, &self.config.mla) {
            return self.latent_attention(mla, cfg, h, n);
        }
        let (wq, wk, wv, extras) = (&w.q, &w.k, &w.v, &w.extras);
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let project = |w: &Tensor, bias: &Option<Vec<f32>>, norm: &Option<Vec<f32>>| {
            let mut y = linear(h, n, w)?;
            if let Some(b) = bias {
                add_bias(&mut y, b);
            }
            if let Some(g) = norm {
                let mut normed = vec![0f32; y.len()];
                rms_norm(&y, g, c.rms_norm_eps, &mut normed);
                y = normed;
            }
            Ok::<_, anyhow::Error>(y)
        };
        let mut q = project(wq, &extras.q_bias, &extras.q_norm)?;
        let mut k = project(wk, &extras.k_bias, &extras.k_norm)?;
        let v = project(wv, &extras.v_bias, &None)?;
        let rope = c.layer_rope_frequencies(w.layer);
        if let Some(freqs) = &rope {
            let (cos, sin) = rope_tables(n, freqs, c.layer_rope_factor(w.layer));
            let rotate = if c.rope_interleaved {
                apply_rope_interleaved
            } else {
                apply_rope
            };
            rotate(&mut q, heads, hd, &cos, &sin);
            rotate(&mut k, kv_heads, hd, &cos, &sin);
        }
        let mut chunk = None;
        if let Some(ca) = &c.chunked_attention {
            if rope.is_some() {
                chunk = Some(ca.chunk);
                if ca.qk_norm {
                    let ones = vec![1f32; hd];
                    for x in [&mut q, &mut k] {
                        let mut normed = vec![0f32; x.len()];
                        rms_norm(x, &ones, c.rms_norm_eps, &mut normed);
                        *x = normed;
                    }
                }
            } else if ca.temperature_tuning {
                for (p, row) in q.chunks_mut(heads * hd).enumerate() {
                    let t = 1.0
                        + ca.attn_scale * (((p + 1) as f64 / ca.floor_scale).floor() + 1.0).ln();
                    row.iter_mut().for_each(|v| *v *= t as f32);
                }
            }
        }
        let mask = AttnMask {
            scale: c.attention_scale(),
            window: c.layer_window(w.layer),
            chunk,
        };
        Ok(attention(&q, &k, &v, n, heads, kv_heads, hd, mask))
    }

    /// Multi-head latent attention on `h` (`n` positions from 0), written as
    /// transformers computes it: q = q_b·norm(q_a·h) per head split into a
    /// part without RoPE and a rotated part; the latent c = norm(kv_a·h)[..kv_lora]
    /// and one rotated key part shared by the heads; per head the key's
    /// no-RoPE part c·k_b[h] and the value v_b[h]·c; causal attention scaled by
    /// `(nope + rope)^−½` (and YaRN's mscale²). The input of the output
    /// projection, `n × heads·v`.
    fn latent_attention(
        &self,
        w: &MlaWeights,
        m: &crate::config::MlaConfig,
        h: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let p = self.latent_parts(w, m, h, n)?;
        let out = attention(&p.qs, &p.ks, &p.vs, n, p.heads, p.heads, p.d, p.mask);
        Ok(out
            .chunks(p.d)
            .flat_map(|head| head[..m.v_head_dim].to_vec())
            .collect())
    }

    /// The values [`Model::latent_attention`] attends with, and the inputs of
    /// its per-head linears that calibration reads.
    pub fn latent_parts(
        &self,
        w: &MlaWeights,
        m: &crate::config::MlaConfig,
        h: &[f32],
        n: usize,
    ) -> Result<LatentParts> {
        let c = &self.config;
        let (heads, rope, nope, vd, lora) = (
            c.num_attention_heads,
            c.head_dim,
            m.qk_nope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let qk = nope + rope;
        let mut qa = vec![0f32; n * m.q_lora_rank];
        rms_norm(&linear(h, n, &w.q_a)?, &w.q_a_norm, c.rms_norm_eps, &mut qa);
        let q = linear(&qa, n, &w.q_b)?;
        let kva = linear(h, n, &w.kv_a)?;
        let mut latent = vec![0f32; n * lora];
        let mut k_rope = vec![0f32; n * rope];
        for (p, row) in kva.chunks(lora + rope).enumerate() {
            rms_norm(
                &row[..lora],
                &w.kv_a_norm,
                c.rms_norm_eps,
                &mut latent[p * lora..(p + 1) * lora],
            );
            k_rope[p * rope..(p + 1) * rope].copy_from_slice(&row[lora..]);
        }
        let mut q_rope: Vec<f32> = q
            .chunks(qk)
            .flat_map(|head| head[nope..].to_vec())
            .collect();
        if let Some(freqs) = c.layer_rope_frequencies(0) {
            let (cos, sin) = rope_tables(n, &freqs, c.layer_rope_factor(0));
            let rotate = if c.rope_interleaved {
                apply_rope_interleaved
            } else {
                apply_rope
            };
            rotate(&mut q_rope, heads, rope, &cos, &sin);
            rotate(&mut k_rope, 1, rope, &cos, &sin);
        }
        // Per head: its key's no-RoPE part and its value from the latent.
        let d = qk.max(vd);
        let (mut qs, mut ks, mut vs) = (
            vec![0f32; n * heads * d],
            vec![0f32; n * heads * d],
            vec![0f32; n * heads * d],
        );
        for head in 0..heads {
            let kb = w.k_b.expert(head)?.to_f32()?;
            // k_b[h] is [kv_lora, nope]: the key is latent · k_b[h].
            let kb_t: Vec<f32> = (0..nope)
                .flat_map(|j| (0..lora).map(move |i| (i, j)))
                .map(|(i, j)| kb[i * nope + j])
                .collect();
            let k_nope = linear(
                &latent,
                n,
                &Tensor::from_f32("k_b", vec![nope, lora], &kb_t),
            )?;
            let v = linear(&latent, n, &w.v_b.expert(head)?)?;
            for p in 0..n {
                let at = (p * heads + head) * d;
                let qrow = &q[(p * heads + head) * qk..(p * heads + head + 1) * qk];
                qs[at..at + nope].copy_from_slice(&qrow[..nope]);
                qs[at + nope..at + qk].copy_from_slice(
                    &q_rope[(p * heads + head) * rope..(p * heads + head + 1) * rope],
                );
                ks[at..at + nope].copy_from_slice(&k_nope[p * nope..(p + 1) * nope]);
                ks[at + nope..at + qk].copy_from_slice(&k_rope[p * rope..(p + 1) * rope]);
                vs[at..at + vd].copy_from_slice(&v[p * vd..(p + 1) * vd]);
            }
        }
        let score_factor = match &c.rope_scaling {
            Some(crate::config::RopeScaling::Yarn(y)) => y.score_factor(),
            _ => 1.0,
        };
        let mask = AttnMask {
            // DeepSeek-V3 with YaRN also scales the scores by mscale(factor,
            // mscale_all_dim)², as transformers' `yarn_apply_mscale`.
            scale: (score_factor / (qk as f64).sqrt()) as f32,
            window: None,
            chunk: None,
        };
        Ok(LatentParts {
            q_a_normed: qa,
            q,
            latent,
            qs,
            ks,
            vs,
            heads,
            d,
            mask,
        })
    }

    /// Final norm and output head for the rows `from..n` of the residual stream `x`:
    /// `(n − from) × vocab` logits.
    pub fn head_logits(&self, x: &[f32], from: usize) -> Result<Vec<f32>> {
        let name = self.config.arch.global_name(crate::arch::Role::Norm);
        let gain = self.tensor(name)?.to_f32()?;
        self.head_logits_with(x, from, &gain, &self.output_head()?)
    }

    /// [`Model::head_logits`] with the given final-norm gain and head matrix.
    pub fn head_logits_with(
        &self,
        x: &[f32],
        from: usize,
        gain: &[f32],
        head: &Tensor,
    ) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let rows = &x[from * h..];
        let mut normed = vec![0f32; rows.len()];
        rms_norm(rows, gain, self.config.rms_norm_eps, &mut normed);
        linear(&normed, rows.len() / h, head)
    }

    /// Logits for positions `from..tokens.len()` of one sequence starting at
    /// position 0 (no cache): `(tokens.len() − from) × vocab`, row-major.
    pub fn logits(&self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if from > tokens.len() {
            bail!(
                "logits from position {from} of a {}-token sequence",
                tokens.len()
            );
        }
        let mut x = self.embed(tokens)?;
        for layer in 0..self.config.num_hidden_layers {
            let w = self.block_weights(layer)?;
            self.forward_block(&w, &mut x, tokens.len())
                .with_context(|| format!("block {layer}"))?;
        }
        self.head_logits(&x, from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_picks_the_most_probable_experts_and_weights_them() {
        let mut m = crate::config::MoeConfig::softmax(4, 2, 1, false);
        // Token 0: experts 2 and 0 lead; token 1: a tie between 1 and 3 goes to 1.
        let scores = [1.0f32, 0.0, 2.0, -1.0, 0.0, 0.5, 0.0, 0.5];
        let p = |row: &[f32], e: usize| row[e].exp() / row.iter().map(|x| x.exp()).sum::<f32>();
        let r = route(&scores, &m, None);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [2, 0, 1, 3]);
        assert!((r[0].1 - p(&scores[..4], 2)).abs() < 1e-6);
        assert!((r[1].1 - p(&scores[..4], 0)).abs() < 1e-6);
        m.norm_topk_prob = true;
        let r = route(&scores, &m, None);
        assert!((r[0].1 + r[1].1 - 1.0).abs() < 1e-6 && (r[2].1 - 0.5).abs() < 1e-6);
        assert!((r[0].1 - 1.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let freqs: Vec<f64> = (0..2)
            .map(|i| 10000f64.powf(-2.0 * i as f64 / 4.0))
            .collect();
        let (cos, sin) = rope_tables(3, &freqs, 1.0);
        // One head of dim 4 at position 2: pairs (0,2) and (1,3).
        let mut x = vec![0.0; 8];
        x.extend([1.0, 0.0, 0.0, 0.0]);
        apply_rope(&mut x, 1, 4, &cos, &sin);
        let (c, s) = (2f32.cos(), 2f32.sin());
        assert!((x[8] - c).abs() < 1e-6 && (x[10] - s).abs() < 1e-6);
    }

    #[test]
    fn attention_is_causal_and_grouped() {
        // 2 query heads sharing 1 kv head, d = 2, 3 positions.
        let n = 3;
        let q: Vec<f32> = (0..n * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..n * 2).map(|i| (i as f32 * 0.71).cos()).collect();
        let v: Vec<f32> = (0..n * 2).map(|i| i as f32).collect();
        let out = attention(&q, &k, &v, n, 2, 1, 2, AttnMask::causal(2));
        // Position 0 sees only itself: output = v[0] for both heads.
        assert_eq!(&out[0..4], &[0.0, 1.0, 0.0, 1.0]);
        // Reference for position 2, head 1.
        let qh = &q[2 * 4 + 2..2 * 4 + 4];
        let scores: Vec<f32> = (0..3)
            .map(|j| (qh[0] * k[j * 2] + qh[1] * k[j * 2 + 1]) / 2f32.sqrt())
            .collect();
        let m = scores.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let want0: f32 = (0..3).map(|j| e[j] / z * v[j * 2]).sum();
        assert!((out[2 * 4 + 2] - want0).abs() < 1e-5);
    }

    /// Attention written out from its definition, one query at a time.
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (n, heads, kv, d): (usize, usize, usize, usize),
        mask: AttnMask,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * heads * d];
        for h in 0..heads {
            let kvh = h / (heads / kv);
            for i in 0..n {
                let qi = &q[i * heads * d + h * d..][..d];
                // Written from the definitions, not from `first_key`.
                let seen: Vec<usize> = (0..=i)
                    .filter(|&j| mask.window.is_none_or(|w| i - j < w))
                    .filter(|&j| mask.chunk.is_none_or(|c| j / c == i / c))
                    .collect();
                let s: Vec<f64> = seen
                    .iter()
                    .map(|&j| {
                        let kj = &k[j * kv * d + kvh * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            * mask.scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (&j, sj) in seen.iter().zip(&s) {
                    let p = (sj - m).exp() / z;
                    for e in 0..d {
                        out[i * heads * d + h * d + e] +=
                            (p * v[j * kv * d + kvh * d + e] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn tiled_attention_matches_its_definition_with_and_without_a_window() {
        // Several tiles, a window shorter and one longer than a tile.
        let (n, heads, kv, d) = (150, 4, 2, 8);
        let q: Vec<f32> = (0..n * heads * d)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let k: Vec<f32> = (0..n * kv * d).map(|i| (i as f32 * 0.71).cos()).collect();
        let v: Vec<f32> = (0..n * kv * d).map(|i| (i as f32 * 0.13).sin()).collect();
        let cases = [None, Some(1), Some(8), Some(70), Some(500)]
            .map(|window| (window, None))
            .into_iter()
            .chain([(None, Some(16)), (None, Some(1)), (Some(8), Some(20))]);
        for (window, chunk) in cases {
            let mask = AttnMask {
                scale: 0.3,
                window,
                chunk,
            };
            let got = attention(&q, &k, &v, n, heads, kv, d, mask);
            let want = naive_attention(&q, &k, &v, (n, heads, kv, d), mask);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "window {window:?} chunk {chunk:?}: {err}");
        }
        // A window of 1 is the value at the query's own position.
        let one = attention(
            &q,
            &k,
            &v,
            n,
            heads,
            kv,
            d,
            AttnMask {
                scale: 1.0,
                window: Some(1),
                chunk: None,
            },
        );
        assert_eq!(
            &one[5 * heads * d..5 * heads * d + d],
            &v[5 * kv * d..5 * kv * d + d]
        );
    }

    #[test]
    fn gelu_tanh_matches_its_formula() {
        for x in [-3.0f32, -0.5, 0.0, 0.7, 2.5] {
            let want = 0.5
                * x as f64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt()
                        * (x as f64 + 0.044715 * (x as f64).powi(3)))
                    .tanh());
            assert!(
                (activate(Activation::GeluTanh, x) as f64 - want).abs() < 1e-6,
                "{x}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [3.0f32, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
