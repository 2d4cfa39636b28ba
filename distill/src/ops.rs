//! The operations of a decoder block of any described architecture (RMSNorm,
//! linear, bias, RoPE, causal or sliding-window grouped-query attention, the
//! SiLU- or GELU-gated MLP, the embedding), each forward next to its backward so
//! the pair can be read against the math (llm.c style). Conventions shared by
//! every op:
//!
//! * activations are row-major `[n, width]`, one row per position;
//! * weights are `[out, in]`, a linear layer is `y = x·Wᵀ` on rows;
//! * a backward takes the gradient of the op's output (`dy`) and the saved
//!   forward values, and *adds* into the gradients of inputs that other ops also
//!   feed (the residual stream, weight gradients) while it *overwrites* those
//!   only it produces (`dq`, `dgate`, …). Each function says which.
//!
//! Nothing here allocates per element or branches on the type: the same code runs
//! in f64 for the gradient checks and in f32 for training.

use crate::float::Float;
use crate::gemm::{par_gemm, MatRef};
use anyhow::{bail, Result};
use model::config::Activation;
use model::llama::{AttnMask, SQRT_2_OVER_PI};
use rayon::prelude::*;

// ---------------------------------------------------------------------------
// Linear: y = x·Wᵀ

/// `y = x·Wᵀ` for `n` rows of `x` (`[n, d_in]`) and `w` (`[d_out, d_in]`):
/// returns `[n, d_out]`.
pub fn linear_forward<T: Float>(x: &[T], w: &[T], n: usize) -> Vec<T> {
    let (d_in, d_out) = linear_dims(x, w, n);
    let mut y = vec![T::ZERO; n * d_out];
    par_gemm(
        MatRef::row_major(x, n, d_in, d_in),
        MatRef::row_major(w, d_out, d_in, d_in).t(),
        &mut y,
        false,
    );
    y
}

/// Backward of [`linear_forward`]. With `y_ij = Σ_k x_ik W_jk`:
/// `∂L/∂x = dy·W` (added into `dx`, `[n, d_in]`) and `∂L/∂W = dyᵀ·x` (added into
/// `dw`, `[d_out, d_in]`: gradients accumulate over positions and over calls).
pub fn linear_backward<T: Float>(dy: &[T], x: &[T], w: &[T], n: usize, dx: &mut [T], dw: &mut [T]) {
    let (d_in, d_out) = linear_dims(x, w, n);
    assert_eq!(
        dy.len(),
        n * d_out,
        "linear backward: dy is not [{n}, {d_out}]"
    );
    assert_eq!(
        dx.len(),
        x.len(),
        "linear backward: dx is not [{n}, {d_in}]"
    );
    assert_eq!(
        dw.len(),
        w.len(),
        "linear backward: dw is not [{d_out}, {d_in}]"
    );
    let dy_m = MatRef::row_major(dy, n, d_out, d_out);
    par_gemm(dy_m, MatRef::row_major(w, d_out, d_in, d_in), dx, true);
    par_gemm(dy_m.t(), MatRef::row_major(x, n, d_in, d_in), dw, true);
}

/// `(d_in, d_out)` of a linear layer, checking that the lengths agree.
fn linear_dims<T>(x: &[T], w: &[T], n: usize) -> (usize, usize) {
    assert!(
        n > 0 && x.len().is_multiple_of(n),
        "linear: {} inputs for {n} rows",
        x.len()
    );
    let d_in = x.len() / n;
    assert!(
        d_in > 0 && w.len().is_multiple_of(d_in),
        "linear: weight of {} elements for inputs of width {d_in}",
        w.len()
    );
    (d_in, w.len() / d_in)
}

// ---------------------------------------------------------------------------
// Bias: y = x + b on every row

/// Adds `bias` to every row of `y` (`[n, bias.len()]`), in place.
pub fn bias_forward<T: Float>(y: &mut [T], bias: &[T]) {
    assert!(
        !bias.is_empty() && y.len().is_multiple_of(bias.len()),
        "bias: {} values for a bias of {}",
        y.len(),
        bias.len()
    );
    y.par_chunks_mut(bias.len())
        .for_each(|row| row.iter_mut().zip(bias).for_each(|(y, &b)| *y += b));
}

/// Backward of [`bias_forward`]: the bias is shared by every row, so
/// `∂L/∂b_j = Σ_rows dy_j`, added into `dbias`. (The gradient of the input is
/// `dy` itself.)
pub fn bias_backward<T: Float>(dy: &[T], dbias: &mut [T]) {
    assert!(
        !dbias.is_empty() && dy.len().is_multiple_of(dbias.len()),
        "bias backward: {} values for a bias of {}",
        dy.len(),
        dbias.len()
    );
    for row in dy.chunks(dbias.len()) {
        dbias.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
    }
}

// ---------------------------------------------------------------------------
// RMSNorm: y = x·r·g,  r = 1/√(mean(x²) + ε)

/// RMSNorm of each row of `x` (width `gain.len()`) times `gain`, into `out`; the
/// per-row `r = 1/√(mean(x²)+ε)` goes to `rstd` for the backward. The sum of
/// squares is accumulated in f64, as the inference path (and ggml) does, so the
/// f32 forward matches it bit for bit.
pub fn rms_norm_forward<T: Float>(x: &[T], gain: &[T], eps: f64, out: &mut [T], rstd: &mut [T]) {
    let h = gain.len();
    assert_eq!(x.len(), out.len(), "rms_norm: out differs from x");
    assert_eq!(x.len(), rstd.len() * h, "rms_norm: rstd is not one per row");
    out.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, row), r)| {
            let ss: f64 = row.iter().map(|v| v.to_f64() * v.to_f64()).sum();
            *r = T::from_f64(1.0 / (ss / h as f64 + eps).sqrt());
            for ((o, &v), &g) in o.iter_mut().zip(row).zip(gain) {
                *o = v * *r * g;
            }
        });
}

/// Backward of [`rms_norm_forward`], added into `dx` and `dgain`.
///
/// Per row, with `u_j = dy_j·g_j`: `y_j = x_j·r·g_j` depends on `x_k` directly
/// (`j = k`) and through `r`, and `∂r/∂x_k = −r³·x_k/H`, so
/// `∂L/∂x_k = r·u_k − r³·x_k·(Σ_j u_j x_j)/H`. The gain sees `∂L/∂g_j = Σ_rows dy_j·x_j·r`.
pub fn rms_norm_backward<T: Float>(
    dy: &[T],
    x: &[T],
    gain: &[T],
    rstd: &[T],
    dx: &mut [T],
    dgain: &mut [T],
) {
    let h = gain.len();
    assert!(
        dy.len() == x.len() && dx.len() == x.len() && x.len() == rstd.len() * h,
        "rms_norm backward: shapes differ"
    );
    assert_eq!(dgain.len(), h, "rms_norm backward: dgain is not [{h}]");
    let inv_h = T::from_f64(1.0 / h as f64);
    dx.par_chunks_mut(h)
        .zip(dy.par_chunks(h))
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), x), &r)| {
            let dot: T = dy
                .iter()
                .zip(gain)
                .zip(x)
                .map(|((&d, &g), &v)| d * g * v)
                .sum();
            let c = r * r * r * dot * inv_h;
            for (((dx, &d), &g), &v) in dx.iter_mut().zip(dy).zip(gain).zip(x) {
                *dx += r * d * g - c * v;
            }
        });
    // The gain is shared by all rows: a serial sum over rows, O(n·H).
    for ((dy, x), &r) in dy.chunks(h).zip(x.chunks(h)).zip(rstd) {
        for ((dg, &d), &v) in dgain.iter_mut().zip(dy).zip(x) {
            *dg += d * v * r;
        }
    }
}

// ---------------------------------------------------------------------------
// RoPE, HF "rotate half" layout: element i of a head pairs with i + d/2

/// Rotary tables for positions `0..n`: `cos[p·d/2 + i]` and `sin[…]` of the angle
/// `p·f_i` for the pair frequencies `f_i` (`θ^(−2i/d)` divided by any rope
/// scaling, [`model::ModelConfig::rope_frequencies`]), computed in f64 and rounded
/// once (as `model::llama::rope_tables`).
#[derive(Debug, Clone)]
pub struct RopeTables<T> {
    /// Cosines, `[n, head_dim/2]`.
    pub cos: Vec<T>,
    /// Sines, `[n, head_dim/2]`.
    pub sin: Vec<T>,
    /// `head_dim / 2`.
    pub half: usize,
}

impl<T: Float> RopeTables<T> {
    /// Tables for `n` positions and the frequencies `freqs` (one per pair),
    /// cos and sin multiplied by `factor` (YaRN's attention factor, else 1).
    pub fn new(n: usize, freqs: &[f64], factor: f64) -> Self {
        let half = freqs.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for &f in freqs {
                let angle = p as f64 * f;
                cos.push(T::from_f64(angle.cos() * factor));
                sin.push(T::from_f64(angle.sin() * factor));
            }
        }
        RopeTables { cos, sin, half }
    }
}

/// Rotates every head of every row of `x` (`[n, n_heads·head_dim]`) in place by
/// its position's angles: `(a, b) ← (a·c − b·s, b·c + a·s)` for the pair
/// `(x_i, x_{i+d/2})`.
pub fn rope_forward<T: Float>(x: &mut [T], n_heads: usize, t: &RopeTables<T>) {
    rope_rotate(x, n_heads, t, false);
}

/// Backward of [`rope_forward`], in place on the gradient: a rotation is
/// orthogonal, so its transpose is the rotation by the opposite angle,
/// `(da, db) ← (da·c + db·s, db·c − da·s)`.
pub fn rope_backward<T: Float>(dx: &mut [T], n_heads: usize, t: &RopeTables<T>) {
    rope_rotate(dx, n_heads, t, true);
}

/// Rotation by `+angle` (forward) or `−angle` (`inverse`, the backward).
fn rope_rotate<T: Float>(x: &mut [T], n_heads: usize, t: &RopeTables<T>, inverse: bool) {
    let half = t.half;
    let width = n_heads * 2 * half;
    assert!(
        x.len().is_multiple_of(width) && x.len() / width * half <= t.cos.len(),
        "rope: {} values for heads of {} and {} positions",
        x.len(),
        2 * half,
        t.cos.len() / half.max(1)
    );
    x.par_chunks_mut(width).enumerate().for_each(|(p, row)| {
        let c = &t.cos[p * half..(p + 1) * half];
        let s = &t.sin[p * half..(p + 1) * half];
        for head in row.chunks_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                let si = if inverse { -s[i] } else { s[i] };
                a[i] = x0 * c[i] - x1 * si;
                b[i] = x1 * c[i] + x0 * si;
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Grouped-query attention: o_i = Σ_{j∈seen(i)} softmax_j(q_i·k_j·s)·v_j, where
// seen(i) = first(i)..=i: all of 0..=i (causal), or the last W positions
// i−W < j ≤ i on a sliding-window layer; s = 1/√d, or Gemma's
// 1/√query_pre_attn_scalar. The mask is `model::llama::AttnMask`, the inference
// path's own, so both read "which keys does query i see" from one definition.

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Positions (the sequence starts at position 0).
    pub n: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttnShape {
    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn check<T>(&self, q: &[T], k: &[T], v: &[T], probs: &[T]) {
        let AttnShape { n, heads, .. } = *self;
        assert!(
            self.kv_heads > 0 && heads.is_multiple_of(self.kv_heads),
            "attention: {heads} query heads for {} kv heads",
            self.kv_heads
        );
        assert_eq!(
            q.len(),
            n * self.q_dim(),
            "attention: q is not [n, heads·d]"
        );
        assert_eq!(k.len(), n * self.kv_dim(), "attention: k is not [n, kv·d]");
        assert_eq!(v.len(), n * self.kv_dim(), "attention: v is not [n, kv·d]");
        assert_eq!(
            probs.len(),
            heads * n * n,
            "attention: probs is not [heads, n, n]"
        );
    }
}

/// Attention of `q` (`[n, heads·d]`, rotated) over `k`, `v` (`[n, kv·d]`), query
/// `i` seeing keys `mask.first_key(i)..=i` with scores scaled by `mask.scale`:
/// writes `out` (`[n, heads·d]`) and the attention weights `probs`
/// (`[heads, n, n]`, row `i` zero outside the keys it sees) that the backward
/// needs.
pub fn attention_forward<T: Float>(
    s: AttnShape,
    mask: AttnMask,
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &mut [T],
    out: &mut [T],
) {
    s.check(q, k, v, probs);
    let AttnShape { n, head_dim: d, .. } = s;
    // The scale as the config gives it (f32), so the f32 path multiplies by the
    // very number inference does.
    let (qd, kvd, scale) = (s.q_dim(), s.kv_dim(), T::from_f64(mask.scale as f64));
    assert_eq!(out.len(), n * qd, "attention: out is not [n, heads·d]");
    let per_head: Vec<Vec<T>> = probs
        .par_chunks_mut(n * n)
        .enumerate()
        .map(|(h, p)| {
            let g = h / s.group();
            // Raw scores q_h·k_gᵀ, scaled inside the softmax (as the inference path).
            T::gemm(
                MatRef::row_major(&q[h * d..], n, d, qd),
                MatRef::row_major(&k[g * d..], n, d, kvd).t(),
                p,
                n,
                false,
            );
            for (i, row) in p.chunks_mut(n).enumerate() {
                // Position i sees first..=i; the keys it does not see (before the
                // window, after i) get weight exactly 0, as exp(−∞) would give.
                // Subtracting the max keeps exp() ≤ 1.
                let first = mask.first_key(i);
                let live = &mut row[first..=i];
                let max = live.iter().fold(T::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = T::ZERO;
                for x in live.iter_mut() {
                    *x = (*x * scale - max).exp();
                    sum += *x;
                }
                let inv = T::ONE / sum;
                live.iter_mut().for_each(|x| *x *= inv);
                row[..first].fill(T::ZERO);
                row[i + 1..].fill(T::ZERO);
            }
            let mut o = vec![T::ZERO; n * d];
            T::gemm(
                MatRef::row_major(p, n, n, n),
                MatRef::row_major(&v[g * d..], n, d, kvd),
                &mut o,
                d,
                false,
            );
            o
        })
        .collect();
    for (h, o) in per_head.iter().enumerate() {
        for (dst, src) in out.chunks_mut(qd).zip(o.chunks(d)) {
            dst[h * d..(h + 1) * d].copy_from_slice(src);
        }
    }
}

/// Backward of [`attention_forward`]: from `dout` (`[n, heads·d]`) and the saved
/// `q`, `k`, `v`, `probs`, overwrites `dq` (`[n, heads·d]`), `dk` and `dv`
/// (`[n, kv·d]`).
///
/// Per query head, with `P = softmax(S + mask)`, `S = q·kᵀ·s`, `o = P·v`:
/// * `dv = Pᵀ·do` and `dP = do·vᵀ`;
/// * softmax over the keys row `i` sees: `dS_ij = P_ij·(dP_ij − Σ_k P_ik·dP_ik)`;
///   zero for the keys it does not see (the mask is a constant, and there
///   `P_ij = 0`, so no gradient reaches those scores);
/// * `dq = dS·k·s` and `dk = dSᵀ·q·s`.
///
/// A kv head is read by `heads / kv_heads` query heads, so its `dk`, `dv` are the
/// sums over them; each task owns one kv head and its group, so no two tasks
/// write the same gradient.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    s: AttnShape,
    mask: AttnMask,
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    s.check(q, k, v, probs);
    let AttnShape { n, head_dim: d, .. } = s;
    let (qd, kvd, group) = (s.q_dim(), s.kv_dim(), s.group());
    let scale = T::from_f64(mask.scale as f64);
    assert!(
        dout.len() == q.len() && dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len(),
        "attention backward: gradient shapes differ from q, k, v"
    );
    // Per kv head: the dq of each query head of its group, its dk and dv, each [n, d].
    type KvHeadGrads<T> = (Vec<Vec<T>>, Vec<T>, Vec<T>);
    let per_kv: Vec<KvHeadGrads<T>> = (0..s.kv_heads)
        .into_par_iter()
        .map(|g| {
            let k_g = MatRef::row_major(&k[g * d..], n, d, kvd);
            let v_g = MatRef::row_major(&v[g * d..], n, d, kvd);
            let mut dk_g = vec![T::ZERO; n * d];
            let mut dv_g = vec![T::ZERO; n * d];
            let mut dps = vec![T::ZERO; n * n];
            let dqs = (g * group..(g + 1) * group)
                .map(|h| {
                    let p = MatRef::row_major(&probs[h * n * n..(h + 1) * n * n], n, n, n);
                    let do_h = MatRef::row_major(&dout[h * d..], n, d, qd);
                    let q_h = MatRef::row_major(&q[h * d..], n, d, qd);
                    T::gemm(p.t(), do_h, &mut dv_g, d, true);
                    T::gemm(do_h, v_g.t(), &mut dps, n, false);
                    // dP → dS in place over the keys row i sees, with the
                    // scale s of S folded in; the rest of the row is masked.
                    // (P is 0 there, so the whole row would give the same dS:
                    // the window reaches the gradient only through P.)
                    for (i, (ds, pr)) in dps.chunks_mut(n).zip(p.data.chunks(n)).enumerate() {
                        let first = mask.first_key(i);
                        let (live, pr) = (&mut ds[first..=i], &pr[first..=i]);
                        let dot: T = live.iter().zip(pr).map(|(&a, &b)| a * b).sum();
                        for (x, &pij) in live.iter_mut().zip(pr) {
                            *x = pij * (*x - dot) * scale;
                        }
                        ds[..first].fill(T::ZERO);
                        ds[i + 1..].fill(T::ZERO);
                    }
                    let ds = MatRef::row_major(&dps[..], n, n, n);
                    let mut dq_h = vec![T::ZERO; n * d];
                    T::gemm(ds, k_g, &mut dq_h, d, false);
                    T::gemm(ds.t(), q_h, &mut dk_g, d, true);
                    dq_h
                })
                .collect();
            (dqs, dk_g, dv_g)
        })
        .collect();
    for (g, (dqs, dk_g, dv_g)) in per_kv.iter().enumerate() {
        for (i, dq_h) in dqs.iter().enumerate() {
            let h = g * group + i;
            for (dst, src) in dq.chunks_mut(qd).zip(dq_h.chunks(d)) {
                dst[h * d..(h + 1) * d].copy_from_slice(src);
            }
        }
        for (dst, src) in dk.chunks_mut(kvd).zip(dk_g.chunks(d)) {
            dst[g * d..(g + 1) * d].copy_from_slice(src);
        }
        for (dst, src) in dv.chunks_mut(kvd).zip(dv_g.chunks(d)) {
            dst[g * d..(g + 1) * d].copy_from_slice(src);
        }
    }
}

// ---------------------------------------------------------------------------
// Gated MLP: m = act(g) ⊙ u, with act = silu (SwiGLU: Llama, Qwen, OLMo 2,
// SmolLM3, Mistral) or gelu_tanh (GeGLU: Gemma)
//   silu(g)      = g·σ(g)
//   gelu_tanh(g) = ½·g·(1 + tanh(c·(g + a·g³))),  c = √(2/π), a = 0.044715

/// GELU's cubic coefficient (`a` above).
const GELU_CUBIC: f64 = 0.044715;

/// `act(g)`, written as `model::llama::activate` writes it, so the f32 path
/// computes the inference path's bits (the tanh form's `c` is its f32 constant).
#[inline]
fn act_forward<T: Float>(act: Activation, g: T) -> T {
    match act {
        Activation::Silu => g / (T::ONE + (-g).exp()),
        Activation::GeluTanh => {
            let (half, c, a) = (
                T::from_f64(0.5),
                T::from_f64(SQRT_2_OVER_PI as f64),
                T::from_f64(GELU_CUBIC),
            );
            half * g * (T::ONE + (c * (g + a * g * g * g)).tanh())
        }
    }
}

/// `act'(g)`:
/// * silu: product rule on `g·σ(g)` with `σ' = σ(1−σ)`: `σ(g)·(1 + g·(1 − σ(g)))`;
/// * gelu_tanh: with `t = tanh(c·(g + a·g³))` and `tanh' = 1 − tanh²`,
///   `½·(1 + t) + ½·g·(1 − t²)·c·(1 + 3a·g²)`.
#[inline]
fn act_derivative<T: Float>(act: Activation, g: T) -> T {
    match act {
        Activation::Silu => {
            let sig = T::ONE / (T::ONE + (-g).exp());
            sig * (T::ONE + g * (T::ONE - sig))
        }
        Activation::GeluTanh => {
            let (half, c, a) = (
                T::from_f64(0.5),
                T::from_f64(SQRT_2_OVER_PI as f64),
                T::from_f64(GELU_CUBIC),
            );
            let t = (c * (g + a * g * g * g)).tanh();
            let du = c * (T::ONE + T::from_f64(3.0) * a * g * g);
            half * (T::ONE + t) + half * g * (T::ONE - t * t) * du
        }
    }
}

/// `act(gate) ⊙ up`, elementwise, the input of the down projection.
pub fn gated_forward<T: Float>(act: Activation, gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "gated MLP: gate and up differ");
    gate.par_iter()
        .zip(up.par_iter())
        .map(|(&g, &u)| act_forward(act, g) * u)
        .collect()
}

/// Backward of [`gated_forward`], overwriting `dgate` and `dup`:
/// `∂m/∂u = act(g)` and `∂m/∂g = u·act'(g)` (see `act_derivative`).
pub fn gated_backward<T: Float>(
    act: Activation,
    dm: &[T],
    gate: &[T],
    up: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) {
    assert!(
        dm.len() == gate.len() && up.len() == gate.len(),
        "gated MLP backward: shapes differ"
    );
    assert!(
        dgate.len() == gate.len() && dup.len() == gate.len(),
        "gated MLP backward: shapes differ"
    );
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dm.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .for_each(|((dg, du), (&d, (&g, &u)))| {
            *du = d * act_forward(act, g);
            *dg = d * u * act_derivative(act, g);
        });
}

// ---------------------------------------------------------------------------
// Embedding: x_p = E[token_p]

/// The rows of `table` (`[vocab, hidden]`) for `tokens`: `[n, hidden]`.
pub fn embedding_forward<T: Float>(table: &[T], hidden: usize, tokens: &[u32]) -> Result<Vec<T>> {
    let vocab = table.len() / hidden;
    let mut x = Vec::with_capacity(tokens.len() * hidden);
    for &t in tokens {
        if t as usize >= vocab {
            bail!("token id {t} is outside the vocabulary of {vocab} tokens");
        }
        x.extend_from_slice(&table[t as usize * hidden..(t as usize + 1) * hidden]);
    }
    Ok(x)
}

/// Backward of [`embedding_forward`]: a scatter-add of each position's gradient
/// into its token's row of `dtable` (a token seen twice gets both).
pub fn embedding_backward<T: Float>(dx: &[T], hidden: usize, tokens: &[u32], dtable: &mut [T]) {
    assert_eq!(
        dx.len(),
        tokens.len() * hidden,
        "embedding backward: dx is not [n, hidden]"
    );
    for (row, &t) in dx.chunks(hidden).zip(tokens) {
        let dst = &mut dtable[t as usize * hidden..(t as usize + 1) * hidden];
        dst.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
    }
}

#[cfg(test)]
mod tests {
    //! The f32 ops against the inference path's own (`model::llama`), on random
    //! inputs: the training forward must compute the same function.
    use super::*;
    use model::llama;
    use model::Tensor;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    #[test]
    fn rms_norm_matches_inference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (n, h) = (7, 48);
        let x = rand_vec(&mut rng, n * h);
        let g = rand_vec(&mut rng, h);
        let mut want = vec![0f32; n * h];
        llama::rms_norm(&x, &g, 1e-5, &mut want);
        let (mut got, mut rstd) = (vec![0f32; n * h], vec![0f32; n]);
        rms_norm_forward(&x, &g, 1e-5, &mut got, &mut rstd);
        assert_eq!(got, want, "same arithmetic, same bits");
    }

    #[test]
    fn rope_matches_inference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (n, heads, d, theta) = (9, 3, 16, 100000.0);
        let x = rand_vec(&mut rng, n * heads * d);
        let freqs: Vec<f64> = (0..d / 2)
            .map(|i| f64::powf(theta, -2.0 * i as f64 / d as f64))
            .collect();
        let (cos, sin) = llama::rope_tables(n, &freqs, 1.0);
        let t = RopeTables::<f32>::new(n, &freqs, 1.0);
        assert_eq!((&t.cos, &t.sin), (&cos, &sin));
        let mut want = x.clone();
        llama::apply_rope(&mut want, heads, d, &cos, &sin);
        let mut got = x.clone();
        rope_forward(&mut got, heads, &t);
        assert_eq!(got, want);
        rope_backward(&mut got, heads, &t);
        assert!(
            max_rel(&got, &x) < 1e-6,
            "the inverse rotation undoes the rotation"
        );
    }

    #[test]
    fn attention_matches_inference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (n, heads, kv, d) in [(6, 4, 2, 8), (11, 3, 1, 16), (5, 2, 2, 4)] {
            let q = rand_vec(&mut rng, n * heads * d);
            let k = rand_vec(&mut rng, n * kv * d);
            let v = rand_vec(&mut rng, n * kv * d);
            // Causal 1/√d (llama), Gemma's 1/√query_pre_attn_scalar, and sliding
            // windows shorter than, equal to and longer than the sequence.
            let masks = [
                llama::AttnMask::causal(d),
                llama::AttnMask {
                    scale: 1.0 / 10f32.sqrt(),
                    window: None,
                    chunk: None,
                },
                llama::AttnMask {
                    scale: 0.3,
                    window: Some(1),
                    chunk: None,
                },
                llama::AttnMask {
                    scale: 1.0 / (d as f32).sqrt(),
                    window: Some(3),
                    chunk: None,
                },
                llama::AttnMask {
                    scale: 0.7,
                    window: Some(n),
                    chunk: None,
                },
                llama::AttnMask {
                    scale: 0.7,
                    window: Some(4 * n),
                    chunk: None,
                },
            ];
            for mask in masks {
                let want = llama::attention(&q, &k, &v, n, heads, kv, d, mask);
                let s = AttnShape {
                    n,
                    heads,
                    kv_heads: kv,
                    head_dim: d,
                };
                let mut probs = vec![0f32; heads * n * n];
                let mut got = vec![0f32; n * heads * d];
                attention_forward(s, mask, &q, &k, &v, &mut probs, &mut got);
                let err = max_rel(&got, &want);
                assert!(
                    err < 1e-6,
                    "attention {n}/{heads}/{kv}/{d} {mask:?}: rel err {err:e}"
                );
                // Every row of weights sums to 1 over exactly the keys it sees.
                for (r, row) in probs.chunks(n).enumerate() {
                    let i = r % n;
                    let first = mask.first_key(i);
                    assert!(row[..first].iter().chain(&row[i + 1..]).all(|&p| p == 0.0));
                    assert!(row[first..=i].iter().all(|&p| p > 0.0));
                    let sum: f32 = row.iter().sum();
                    assert!((sum - 1.0).abs() < 1e-6, "{mask:?} row {r}: {sum}");
                }
            }
        }
    }

    #[test]
    fn linear_and_gated_mlp_match_inference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (n, h, f) = (5, 24, 40);
        // Inputs of ±3 so the gate reaches the tails of both activations.
        let x: Vec<f32> = rand_vec(&mut rng, n * h).iter().map(|v| 3.0 * v).collect();
        let wg = rand_vec(&mut rng, f * h);
        let wu = rand_vec(&mut rng, f * h);
        let tg = Tensor::from_f32("g", vec![f, h], &wg);
        let tu = Tensor::from_f32("u", vec![f, h], &wu);
        let want_lin = llama::linear(&x, n, &tg).unwrap();
        let g = linear_forward(&x, &wg, n);
        assert!(max_rel(&g, &want_lin) < 1e-6);
        let u = linear_forward(&x, &wu, n);
        for act in [Activation::Silu, Activation::GeluTanh] {
            let want = llama::gated_mlp(&x, n, &tg, &tu, act).unwrap();
            let got = gated_forward(act, &g, &u);
            let err = max_rel(&got, &want);
            assert!(err < 1e-6, "{act:?} gated MLP rel err {err:e}");
            // The activation itself is the inference path's, bit for bit.
            for &v in &g {
                assert_eq!(act_forward(act, v), llama::activate(act, v), "{act:?}({v})");
            }
        }
    }

    #[test]
    fn activation_derivatives_match_finite_differences() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            for i in -60..=60 {
                let g = i as f64 * 0.1 + 0.013;
                let step = 1e-6;
                let fd = (act_forward(act, g + step) - act_forward(act, g - step)) / (2.0 * step);
                let d = act_derivative(act, g);
                assert!(
                    (fd - d).abs() < 1e-8 * d.abs().max(1.0),
                    "{act:?}'({g}): {d} vs finite differences {fd}"
                );
            }
        }
    }

    #[test]
    fn bias_matches_inference_and_its_gradient_sums_the_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, d) = (4, 6);
        let x = rand_vec(&mut rng, n * d);
        let b = rand_vec(&mut rng, d);
        let mut want = x.clone();
        llama::add_bias(&mut want, &b);
        let mut got = x.clone();
        bias_forward(&mut got, &b);
        assert_eq!(got, want);
        let mut db = vec![1.0f32; d];
        bias_backward(&x, &mut db);
        for (j, &g) in db.iter().enumerate() {
            let sum: f32 = (0..n).map(|i| x[i * d + j]).sum();
            assert!((g - 1.0 - sum).abs() < 1e-6);
        }
    }

    #[test]
    fn embedding_rejects_unknown_tokens_and_scatters_repeats() {
        let table: Vec<f64> = (0..12).map(f64::from).collect();
        let x = embedding_forward(&table, 3, &[2, 0, 2]).unwrap();
        assert_eq!(x, [6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]);
        let err = embedding_forward(&table, 3, &[4]).unwrap_err().to_string();
        assert!(err.contains("token id 4"), "{err}");
        let mut d = vec![0.0; 12];
        embedding_backward(&[1.0; 9], 3, &[2, 0, 2], &mut d);
        assert_eq!(&d[6..9], &[2.0, 2.0, 2.0]);
        assert_eq!(&d[0..3], &[1.0, 1.0, 1.0]);
    }
}
