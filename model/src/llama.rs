//! The Llama-family forward pass on the CPU, f32 activations:
//!
//! ```text
//! x   = embed(tokens)
//! per block:  h = rmsnorm(x)·g₁;  q,k,v = h·Wq,k,vᵀ;  q,k = rope(q,k)
//!             a = softmax(q·kᵀ/√d + causal)·v   (grouped: kv head = q head / group)
//!             x = x + a·Woᵀ
//!             h = rmsnorm(x)·g₂;  x = x + (silu(h·Wgᵀ) ⊙ h·Wuᵀ)·Wdᵀ
//! logits = rmsnorm(x)·g · Wₒᵀ
//! ```
//!
//! Weights stay in their stored format and go through the dequantizing matmul; a
//! block's weights are read only while that block runs.

use crate::checkpoint::{Model, Tensor};
use anyhow::{bail, Context, Result};
use kernels::matmul::{gemm, matmul, MatRef};
use rayon::prelude::*;

/// The weights of one decoder block, in their stored format.
pub struct BlockWeights<'a> {
    /// Pre-attention RMSNorm gain.
    pub attn_norm: Vec<f32>,
    /// Query projection `[q_dim, hidden]`.
    pub q: Tensor<'a>,
    /// Key projection `[kv_dim, hidden]`.
    pub k: Tensor<'a>,
    /// Value projection `[kv_dim, hidden]`.
    pub v: Tensor<'a>,
    /// Attention output projection `[hidden, q_dim]`.
    pub o: Tensor<'a>,
    /// Pre-MLP RMSNorm gain.
    pub ffn_norm: Vec<f32>,
    /// Gate projection `[ffn, hidden]`.
    pub gate: Tensor<'a>,
    /// Up projection `[ffn, hidden]`.
    pub up: Tensor<'a>,
    /// Down projection `[hidden, ffn]`.
    pub down: Tensor<'a>,
}

/// `out = x · wᵀ` for `n` rows of `x`, allocating the output.
pub fn linear(x: &[f32], n: usize, w: &Tensor) -> Result<Vec<f32>> {
    let wr = w.as_weight()?;
    let mut out = vec![0f32; n * wr.rows];
    matmul(x, n, &wr, &mut out).with_context(|| format!("matmul with '{}'", w.name))?;
    Ok(out)
}

/// `x += a · wᵀ` for `n` rows: a residual branch's projection added to the stream.
pub fn add_linear(x: &mut [f32], a: &[f32], n: usize, w: &Tensor) -> Result<()> {
    let o = linear(a, n, w)?;
    x.par_iter_mut().zip(&o).for_each(|(x, o)| *x += o);
    Ok(())
}

/// The SwiGLU hidden of the MLP for `n` rows of its normalised input `h`:
/// `silu(h · Wgᵀ) ⊙ (h · Wuᵀ)`, the input of the down projection.
pub fn swiglu(h: &[f32], n: usize, gate: &Tensor, up: &Tensor) -> Result<Vec<f32>> {
    let mut g = linear(h, n, gate)?;
    let u = linear(h, n, up)?;
    g.par_iter_mut()
        .zip(&u)
        .for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u);
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

/// Rotary tables: `cos[p·d/2 + i]`, `sin[…]` for positions `0..n` and frequency
/// `θ^(−2i/d)`.
pub fn rope_tables(n: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for i in 0..half {
            let angle = p as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
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

/// Causal grouped-query attention for `n` positions: `q` is `n × (heads·d)`,
/// `k`/`v` are `n × (kv_heads·d)`; returns `n × (heads·d)`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Vec<f32> {
    let (qd, kvd) = (heads * d, kv_heads * d);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            // Scores S = q_h · k_hᵀ: (n × d)·(d × n).
            let mut s = vec![0f32; n * n];
            gemm(
                MatRef::row_major(&q[h * d..], n, d, qd),
                MatRef::row_major(&k[kvh * d..], n, d, kvd).t(),
                &mut s,
                n,
                false,
            );
            for (i, row) in s.chunks_mut(n).enumerate() {
                let live = &mut row[..=i];
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
                row[i + 1..].fill(0.0);
            }
            // Output P · v_h: (n × n)·(n × d).
            let mut o = vec![0f32; n * d];
            gemm(
                MatRef::row_major(&s, n, n, n),
                MatRef::row_major(&v[kvh * d..], n, d, kvd),
                &mut o,
                d,
                false,
            );
            o
        })
        .collect();
    let mut out = vec![0f32; n * qd];
    for (h, o) in per_head.iter().enumerate() {
        for (dst, src) in out.chunks_mut(qd).zip(o.chunks(d)) {
            dst[h * d..(h + 1) * d].copy_from_slice(src);
        }
    }
    out
}

impl Model {
    /// Reads the weights of block `layer`.
    pub fn block_weights(&self, layer: usize) -> Result<BlockWeights<'_>> {
        let t = |s: &str| self.tensor(&crate::names::block(layer, s));
        Ok(BlockWeights {
            attn_norm: t("attn_norm.weight")?.to_f32()?,
            q: t("attn_q.weight")?,
            k: t("attn_k.weight")?,
            v: t("attn_v.weight")?,
            o: t("attn_output.weight")?,
            ffn_norm: t("ffn_norm.weight")?.to_f32()?,
            gate: t("ffn_gate.weight")?,
            up: t("ffn_up.weight")?,
            down: t("ffn_down.weight")?,
        })
    }

    /// Token embeddings, `tokens.len() × hidden`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.embed_with(&self.tensor("token_embd.weight")?, tokens)
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
        Ok(x)
    }

    /// Runs one decoder block in place on `x` (`n` positions starting at 0).
    pub fn forward_block(&self, w: &BlockWeights, x: &mut [f32], n: usize) -> Result<()> {
        self.forward_block_observed(w, x, n, &mut |_, _| {})
    }

    /// [`Model::forward_block`], showing `observe` the input of every linear layer
    /// (`n × in_features`, row-major) with the GGUF suffix of its weight
    /// (`"attn_q.weight"`, …), before the layer runs. Layers that share an input are
    /// each shown it. Used to collect calibration statistics.
    pub fn forward_block_observed(
        &self,
        w: &BlockWeights,
        x: &mut [f32],
        n: usize,
        observe: &mut dyn FnMut(&'static str, &[f32]),
    ) -> Result<()> {
        let c = &self.config;
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &w.attn_norm, c.rms_norm_eps, &mut h);
        for name in ["attn_q.weight", "attn_k.weight", "attn_v.weight"] {
            observe(name, &h);
        }
        let a = self.attention_mix(&w.q, &w.k, &w.v, &h, n)?;
        observe("attn_output.weight", &a);
        add_linear(x, &a, n, &w.o)?;

        rms_norm(x, &w.ffn_norm, c.rms_norm_eps, &mut h);
        observe("ffn_gate.weight", &h);
        observe("ffn_up.weight", &h);
        let g = swiglu(&h, n, &w.gate, &w.up)?;
        observe("ffn_down.weight", &g);
        add_linear(x, &g, n, &w.down)
    }

    /// The attention mixer of a block on its normalised input `h` (`n` positions
    /// from 0): q, k, v projections, RoPE, causal grouped-query attention; the
    /// input of the output projection, `n × q_dim`.
    pub fn attention_mix(
        &self,
        wq: &Tensor,
        wk: &Tensor,
        wv: &Tensor,
        h: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let mut q = linear(h, n, wq)?;
        let mut k = linear(h, n, wk)?;
        let v = linear(h, n, wv)?;
        let (cos, sin) = rope_tables(n, hd, c.rope_theta);
        apply_rope(&mut q, heads, hd, &cos, &sin);
        apply_rope(&mut k, kv_heads, hd, &cos, &sin);
        Ok(attention(&q, &k, &v, n, heads, kv_heads, hd))
    }

    /// Final norm and output head for the rows `from..n` of the residual stream `x`:
    /// `(n − from) × vocab` logits.
    pub fn head_logits(&self, x: &[f32], from: usize) -> Result<Vec<f32>> {
        let gain = self.tensor("output_norm.weight")?.to_f32()?;
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
    fn rope_rotates_pairs_by_position() {
        let (cos, sin) = rope_tables(3, 4, 10000.0);
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
        let out = attention(&q, &k, &v, n, 2, 1, 2);
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

    #[test]
    fn rms_norm_matches_definition() {
        let x = [3.0f32, 4.0];
        let mut out = [0.0; 2];
        rms_norm(&x, &[1.0, 2.0], 0.0, &mut out);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
    }
}
