//! The whole decoder for training, for every described architecture:
//! [`forward`] runs one sequence (positions `0..n`) and keeps every value the
//! backward reads; [`backward`] walks the same graph in reverse and accumulates
//! the gradient of every parameter. The graph is `model::llama`'s (what differs
//! between architectures is data: the config and which tensors a block has),
//! per block:
//!
//! ```text
//! x₀ = E[tokens]                 (·s_emb = f32 √hidden: gemma3)
//! block l:  h  = rmsnorm(x)·g_attn               (h = x without a pre-norm: olmo2)
//!           q, k, v = h·Wqᵀ (+ b_q), h·Wkᵀ (+ b_k), h·Wvᵀ (+ b_v)    (biases: qwen2)
//!           q, k = rmsnorm(q)·g_q, rmsnorm(k)·g_k   over each head (qwen3, gemma3)
//!                                                   or the whole row (olmo2)
//!           q, k = rope_l(q), rope_l(k)     the layer's frequencies; none on a
//!                                           NoPE layer (smollm3)
//!           a  = softmax(q·kᵀ·s + mask_l)·v    s = 1/√d or 1/√query_pre_attn_scalar;
//!                                              mask_l: causal, or the last W keys
//!           y  = a·Woᵀ
//!           x' = x + post(y)         post(y) = rmsnorm(y)·g_attn_post (gemma3,
//!                                    olmo2), else y
//!           h' = rmsnorm(x')·g_ffn                  (h' = x' without a pre-norm)
//!           z  = (act(h'·Wgᵀ) ⊙ h'·Wuᵀ)·Wdᵀ        act = silu or gelu_tanh (gemma3)
//!                or, in a mixture-of-experts block, the routed experts'
//!                weighted sum ([`crate::moe`])
//!           x  = x' + post(z)        post(z) = rmsnorm(z)·g_ffn_post, else z
//! logits = rmsnorm(x_L)·g_out · Wₒᵀ          (Wₒ = E, unscaled, when tied)
//! ```
//!
//! A pre-norm or post-norm exists exactly when the architecture's block has its
//! slot ([`model::arch::Slot`]); the parameters of an absent one are empty.
//!
//! The backward also takes gradients with respect to the residual stream after
//! chosen blocks, so hidden-state distillation losses plug in beside the logit
//! losses.

use crate::float::Float;
use crate::moe::{self, MoeActs};
use crate::ops::{self, AttnShape, RopeTables};
use crate::params::{Grads, Params};
use anyhow::{bail, Result};
use model::arch::Slot;
use model::config::ModelConfig;
use model::llama::AttnMask;
use std::borrow::Cow;

/// The values of one block's forward that its backward reads.
#[derive(Debug, Clone)]
pub struct BlockActs<T> {
    /// `1/√(mean(x²)+ε)` of the block input, per position `[n]`; empty without
    /// a pre-attention norm.
    pub rstd_attn: Vec<T>,
    /// Normalised block input, the input of Q/K/V `[n, hidden]`; empty without
    /// a pre-attention norm (Q/K/V then read the block input,
    /// `Activations::residual[l]`).
    pub h_attn: Vec<T>,
    /// Queries after the projection and bias, before the query norm
    /// `[n, heads·d]`; empty when the architecture has no query norm.
    pub q_pre: Vec<T>,
    /// `1/√(mean(q²)+ε)` of each `q_norm`-wide chunk of `q_pre` (a head, or the
    /// whole row), `[n·heads]` or `[n]`; empty without a query norm.
    pub rstd_q: Vec<T>,
    /// Keys before the key norm `[n, kv·d]`; empty without a key norm.
    pub k_pre: Vec<T>,
    /// `1/√(mean(k²)+ε)` of each `k_norm`-wide chunk of `k_pre`; empty without
    /// a key norm.
    pub rstd_k: Vec<T>,
    /// Queries after RoPE (as projected on a NoPE layer) `[n, heads·d]`.
    pub q: Vec<T>,
    /// Keys after RoPE (as projected on a NoPE layer) `[n, kv·d]`.
    pub k: Vec<T>,
    /// Values `[n, kv·d]`.
    pub v: Vec<T>,
    /// Attention weights `[heads, n, n]` (row `i` zero outside the keys query
    /// `i` sees: after `i`, and before the window on a sliding layer).
    pub probs: Vec<T>,
    /// Attention output, the input of Wo `[n, heads·d]`.
    pub att: Vec<T>,
    /// The attention branch's output `att·Woᵀ` before its post-norm
    /// `[n, hidden]`; empty without a post-norm.
    pub attn_out: Vec<T>,
    /// `1/√(mean(y²)+ε)` of `attn_out`, per position `[n]`; empty without a
    /// post-norm.
    pub rstd_attn_post: Vec<T>,
    /// Residual stream after the attention branch `[n, hidden]`.
    pub x_mid: Vec<T>,
    /// `1/√(mean(x'²)+ε)` of `x_mid`, per position `[n]`; empty without a
    /// pre-MLP norm.
    pub rstd_ffn: Vec<T>,
    /// Normalised `x_mid`, the input of the gate and up projections
    /// `[n, hidden]`; empty without a pre-MLP norm (they then read `x_mid`).
    pub h_ffn: Vec<T>,
    /// Gate projection before the activation `[n, ffn]`; empty in a
    /// mixture-of-experts block (the experts' values are in `moe`), like `up`
    /// and `mlp`.
    pub gate: Vec<T>,
    /// Up projection `[n, ffn]`.
    pub up: Vec<T>,
    /// `act(gate) ⊙ up`, the input of the down projection `[n, ffn]`.
    pub mlp: Vec<T>,
    /// The MLP branch's output `mlp·Wdᵀ` before its post-norm `[n, hidden]`;
    /// empty without a post-norm.
    pub ffn_out: Vec<T>,
    /// `1/√(mean(z²)+ε)` of `ffn_out`, per position `[n]`; empty without a
    /// post-norm.
    pub rstd_ffn_post: Vec<T>,
    /// The routing and the experts' values of a mixture-of-experts block;
    /// `None` in a dense block.
    pub moe: Option<MoeActs<T>>,
}

/// Everything [`forward`] computed for one sequence.
#[derive(Debug, Clone)]
pub struct Activations<T> {
    /// The input tokens.
    pub tokens: Vec<u32>,
    /// The residual stream: entry 0 is the embedding output (scaled, where the
    /// architecture scales it), entry `l + 1` the output of block `l`; each
    /// `[n, hidden]`.
    pub residual: Vec<Vec<T>>,
    /// Per-block saved values.
    pub blocks: Vec<BlockActs<T>>,
    /// `1/√(mean(x²)+ε)` of the last residual, per position `[n]`.
    pub rstd_out: Vec<T>,
    /// Final-norm output, the input of the head `[n, hidden]`.
    pub h_out: Vec<T>,
    /// Logits `[n, vocab]`, row `p` predicting the token after position `p`.
    pub logits: Vec<T>,
    /// RoPE tables for positions `0..n`, one per distinct set of frequencies
    /// the layers use (Gemma's sliding layers have a base of their own).
    pub rope: Vec<RopeTables<T>>,
    /// Per block: the index into `rope` of its tables, `None` on a NoPE layer.
    pub layer_rope: Vec<Option<usize>>,
}

impl<T> Activations<T> {
    /// Number of positions.
    pub fn n(&self) -> usize {
        self.tokens.len()
    }

    /// The residual stream after block `l` (`[n, hidden]`): what a hidden-state
    /// loss on block `l` compares.
    pub fn hidden(&self, l: usize) -> &[T] {
        &self.residual[l + 1]
    }

    /// The RoPE tables of block `l`, `None` when the layer has no RoPE.
    pub fn rope_of(&self, l: usize) -> Option<&RopeTables<T>> {
        self.layer_rope[l].map(|i| &self.rope[i])
    }
}

/// The RoPE tables of `c`'s layers for positions `0..n`: one table per distinct
/// frequency set, and per layer the index of its table (`None`: NoPE).
fn layer_rope_tables<T: Float>(
    c: &ModelConfig,
    n: usize,
) -> (Vec<RopeTables<T>>, Vec<Option<usize>>) {
    let mut freqs_seen: Vec<(Vec<f64>, f64)> = Vec::new();
    let mut tables = Vec::new();
    let index = (0..c.num_hidden_layers)
        .map(|l| {
            let key = (c.layer_rope_frequencies(l)?, c.layer_rope_factor(l));
            Some(match freqs_seen.iter().position(|f| *f == key) {
                Some(i) => i,
                None => {
                    tables.push(RopeTables::new(n, &key.0, key.1));
                    freqs_seen.push(key);
                    tables.len() - 1
                }
            })
        })
        .collect();
    (tables, index)
}

/// What query `i` of block `l` sees and how its scores are scaled, as
/// `model::llama`'s attention reads it.
fn layer_mask(c: &ModelConfig, l: usize) -> AttnMask {
    AttnMask {
        scale: c.attention_scale(),
        window: c.layer_window(l),
        chunk: None,
    }
}

/// Checks that every tensor of `p` has the length its shape implies, and that
/// the tensors the architecture lacks (biases, q/k norms, pre- or post-norms)
/// are empty.
fn check_shapes<T: Float>(p: &Params<T>) -> Result<()> {
    crate::params::refuse_untrainable(&p.config)?;
    if p.blocks.len() != p.config.num_hidden_layers {
        bail!(
            "{} blocks for a config of {} layers",
            p.blocks.len(),
            p.config.num_hidden_layers
        );
    }
    if p.output.is_some() == p.config.tie_word_embeddings {
        bail!(
            "the output head is {} but tie_word_embeddings is {}",
            if p.output.is_some() {
                "present"
            } else {
                "absent"
            },
            p.config.tie_word_embeddings
        );
    }
    // Whether a block has a norm is read from whether its gain is empty, so an
    // empty gain is accepted only where the architecture has no such slot (where
    // it has one, the length check below asks for the full gain).
    for (l, b) in p.blocks.iter().enumerate() {
        for slot in [
            Slot::AttnNorm,
            Slot::FfnNorm,
            Slot::AttnPostNorm,
            Slot::FfnPostNorm,
            Slot::QBias,
            Slot::KBias,
            Slot::VBias,
            Slot::QNorm,
            Slot::KNorm,
        ] {
            if p.config.arch.slot(slot).is_none() && !b.slot(slot).is_empty() {
                bail!(
                    "block {l} has a tensor for the {slot:?} slot, which the '{}' architecture does not have",
                    p.config.arch.gguf_name
                );
            }
        }
    }
    for t in p.tensors() {
        let want: usize = t.shape.iter().product();
        if t.data.len() != want {
            bail!(
                "tensor '{}' has {} elements, its shape {:?} needs {want}",
                t.name,
                t.data.len(),
                t.shape
            );
        }
    }
    Ok(())
}

/// A branch's pre-norm: `(rmsnorm(x)·gain, rstd)`, or two empty vectors when
/// `gain` is empty (no pre-norm: the branch reads `x` itself).
fn pre_norm_forward<T: Float>(x: &[T], gain: &[T], n: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    if gain.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let mut h = vec![T::ZERO; x.len()];
    let mut rstd = vec![T::ZERO; n];
    ops::rms_norm_forward(x, gain, eps, &mut h, &mut rstd);
    (h, rstd)
}

/// Backward of [`pre_norm_forward`]: `dh`, the gradient of the branch input,
/// is added into `dx` through the norm (its gain's gradient into `dgain`), or
/// as it is when there is no norm (the branch input is the stream).
fn pre_norm_backward<T: Float>(
    dh: &[T],
    x: &[T],
    gain: &[T],
    rstd: &[T],
    dx: &mut [T],
    dgain: &mut [T],
) {
    if gain.is_empty() {
        dx.iter_mut().zip(dh).for_each(|(d, &g)| *d += g);
    } else {
        ops::rms_norm_backward(dh, x, gain, rstd, dx, dgain);
    }
}

/// A branch's post-norm on its output `y`: returns what the residual adds
/// (`rmsnorm(y)·gain`, or `y` itself when `gain` is empty) and, for the
/// backward, `y` and its `rstd` (both empty without a norm).
fn post_norm_forward<T: Float>(
    y: Vec<T>,
    gain: &[T],
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    if gain.is_empty() {
        return (y, Vec::new(), Vec::new());
    }
    let mut out = vec![T::ZERO; y.len()];
    let mut rstd = vec![T::ZERO; n];
    ops::rms_norm_forward(&y, gain, eps, &mut out, &mut rstd);
    (out, y, rstd)
}

/// Backward of [`post_norm_forward`]: from `dx`, the gradient of what the
/// residual added (the stream's gradient: `x_out = x_in + post(y)`), the
/// gradient of the branch output `y` (its gain's gradient added into `dgain`);
/// `dx` itself without a norm.
fn post_norm_backward<'a, T: Float>(
    dx: &'a [T],
    y: &[T],
    gain: &[T],
    rstd: &[T],
    dgain: &mut [T],
) -> Cow<'a, [T]> {
    if gain.is_empty() {
        return Cow::Borrowed(dx);
    }
    // rms_norm_backward adds into its dx, so it starts from zero.
    let mut dy = vec![T::ZERO; dx.len()];
    ops::rms_norm_backward(dx, y, gain, rstd, &mut dy, dgain);
    Cow::Owned(dy)
}

/// Runs the model on one sequence of `tokens` (positions `0..n`) and keeps what
/// [`backward`] needs. Memory: per block about
/// `n·(4·hidden + 2·q_dim + 2·kv_dim + 3·ffn) + heads·n²` values (less
/// `n·hidden` per absent pre-norm, plus `n·hidden` per post-norm, plus
/// `n·(q_dim + kv_dim)` with q/k norms), plus `n·vocab` logits
/// (SmolLM2-135M, 256 tokens, f32: about 0.4 GB).
pub fn forward<T: Float>(p: &Params<T>, tokens: &[u32]) -> Result<Activations<T>> {
    check_shapes(p)?;
    let c = &p.config;
    let n = tokens.len();
    if n == 0 {
        bail!("forward on an empty sequence");
    }
    let (h, eps) = (c.hidden_size, c.rms_norm_eps);
    let shape = AttnShape {
        n,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let (rope, layer_rope) = layer_rope_tables::<T>(c, n);

    let mut x = ops::embedding_forward(&p.token_embd, h, tokens)?;
    if let Some(s) = c.embedding_scale() {
        // Gemma: the stream starts at E[t]·√hidden, the f32 value inference
        // multiplies by. Only the lookup is scaled: a tied head reads the table.
        let s = T::from_f64(s as f64);
        x.iter_mut().for_each(|v| *v *= s);
    }
    let mut residual = Vec::with_capacity(c.num_hidden_layers + 1);
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for (l, b) in p.blocks.iter().enumerate() {
        // Attention branch: x_mid = x + post(attention(pre(x))·Woᵀ).
        let (h_attn, rstd_attn) = pre_norm_forward(&x, &b.attn_norm, n, eps);
        let input = if b.attn_norm.is_empty() { &x } else { &h_attn };
        let (mut q, q_pre, rstd_q) = project_forward(input, &b.wq, &b.bq, &b.q_norm, n, eps);
        let (mut k, k_pre, rstd_k) = project_forward(input, &b.wk, &b.bk, &b.k_norm, n, eps);
        let (v, ..) = project_forward(input, &b.wv, &b.bv, &[], n, eps);
        if let Some(i) = layer_rope[l] {
            ops::rope_forward(&mut q, shape.heads, &rope[i]);
            ops::rope_forward(&mut k, shape.kv_heads, &rope[i]);
        }
        let mut probs = vec![T::ZERO; shape.heads * n * n];
        let mut att = vec![T::ZERO; n * c.q_dim()];
        ops::attention_forward(shape, layer_mask(c, l), &q, &k, &v, &mut probs, &mut att);
        let y = ops::linear_forward(&att, &b.wo, n);
        let (mut x_mid, attn_out, rstd_attn_post) = post_norm_forward(y, &b.attn_post_norm, n, eps);
        x_mid.iter_mut().zip(&x).for_each(|(m, &r)| *m += r);

        // MLP branch: x_out = x_mid + post((act(h'·Wgᵀ) ⊙ h'·Wuᵀ)·Wdᵀ), h' = pre(x_mid).
        let (h_ffn, rstd_ffn) = pre_norm_forward(&x_mid, &b.ffn_norm, n, eps);
        let input = if b.ffn_norm.is_empty() {
            &x_mid
        } else {
            &h_ffn
        };
        let (gate, up, mlp, z, moe) = if c.is_moe_block(l) {
            let (z, acts) = moe::forward(c, b, input, n);
            (Vec::new(), Vec::new(), Vec::new(), z, Some(acts))
        } else {
            let gate = ops::linear_forward(input, &b.w_gate, n);
            let up = ops::linear_forward(input, &b.w_up, n);
            let mlp = ops::gated_forward(c.hidden_act, &gate, &up);
            let z = ops::linear_forward(&mlp, &b.w_down, n);
            (gate, up, mlp, z, None)
        };
        let (mut x_out, ffn_out, rstd_ffn_post) = post_norm_forward(z, &b.ffn_post_norm, n, eps);
        x_out.iter_mut().zip(&x_mid).for_each(|(o, &r)| *o += r);

        residual.push(std::mem::replace(&mut x, x_out));
        blocks.push(BlockActs {
            rstd_attn,
            h_attn,
            q_pre,
            rstd_q,
            k_pre,
            rstd_k,
            q,
            k,
            v,
            probs,
            att,
            attn_out,
            rstd_attn_post,
            x_mid,
            rstd_ffn,
            h_ffn,
            gate,
            up,
            mlp,
            ffn_out,
            rstd_ffn_post,
            moe,
        });
    }
    let mut rstd_out = vec![T::ZERO; n];
    let mut h_out = vec![T::ZERO; n * h];
    ops::rms_norm_forward(&x, &p.output_norm, eps, &mut h_out, &mut rstd_out);
    let logits = ops::linear_forward(&h_out, p.head(), n);
    residual.push(x);
    Ok(Activations {
        tokens: tokens.to_vec(),
        residual,
        blocks,
        rstd_out,
        h_out,
        logits,
        rope,
        layer_rope,
    })
}

/// Accumulates into `grads` the gradient of a loss whose derivative is `dlogits`
/// (`[n, vocab]`) with respect to the logits of `acts`, plus, for each
/// `(l, d)` of `hidden_grads`, `d` (`[n, hidden]`) with respect to the residual
/// stream after block `l` ([`Activations::hidden`]). Gradients add to what
/// `grads` holds (accumulation over sequences); zero it first for one sequence.
///
/// # Panics
/// When the shapes of `p`, `acts`, `dlogits`, `hidden_grads` or `grads` disagree.
pub fn backward<T: Float>(
    p: &Params<T>,
    acts: &Activations<T>,
    dlogits: &[T],
    hidden_grads: &[(usize, &[T])],
    grads: &mut Grads<T>,
) {
    let c = &p.config;
    let (n, h) = (acts.n(), c.hidden_size);
    assert_eq!(
        dlogits.len(),
        n * c.vocab_size,
        "backward: dlogits is not [{n}, {}]",
        c.vocab_size
    );
    assert_eq!(grads.config, *c, "backward: gradients of another model");
    assert_eq!(
        acts.blocks.len(),
        c.num_hidden_layers,
        "backward: activations of another model"
    );
    for &(l, d) in hidden_grads {
        assert!(
            l < c.num_hidden_layers,
            "backward: hidden gradient for block {l}"
        );
        assert_eq!(
            d.len(),
            n * h,
            "backward: hidden gradient of block {l} is not [n, hidden]"
        );
    }
    let shape = AttnShape {
        n,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };

    // Head: logits = h_out·Wₒᵀ. When tied, Wₒ is the (unscaled) embedding table,
    // so its gradient lands in the embedding's (the scatter-add below adds the
    // lookup's part).
    let mut dh = vec![T::ZERO; n * h];
    {
        let dhead = match &mut grads.output {
            Some(o) => o,
            None => &mut grads.token_embd,
        };
        ops::linear_backward(dlogits, &acts.h_out, p.head(), n, &mut dh, dhead);
    }
    // dx is ∂L/∂(residual stream) at the point the walk has reached.
    let mut dx = vec![T::ZERO; n * h];
    ops::rms_norm_backward(
        &dh,
        &acts.residual[c.num_hidden_layers],
        &p.output_norm,
        &acts.rstd_out,
        &mut dx,
        &mut grads.output_norm,
    );

    for l in (0..c.num_hidden_layers).rev() {
        // A hidden-state loss on block l reads the stream right where dx is now.
        for &(_, d) in hidden_grads.iter().filter(|(b, _)| *b == l) {
            dx.iter_mut().zip(d).for_each(|(x, &g)| *x += g);
        }
        let (b, a, g) = (&p.blocks[l], &acts.blocks[l], &mut grads.blocks[l]);

        // x_out = x_mid + post(z): the residual passes dx through unchanged, so
        // dx already is the direct part of ∂L/∂x_mid; the branch gets
        // ∂L/∂z = post'ᵀ·dx.
        let input = if b.ffn_norm.is_empty() {
            &a.x_mid
        } else {
            &a.h_ffn
        };
        dh.fill(T::ZERO);
        {
            let dz = post_norm_backward(
                &dx,
                &a.ffn_out,
                &b.ffn_post_norm,
                &a.rstd_ffn_post,
                &mut g.ffn_post_norm,
            );
            match &a.moe {
                Some(m) => moe::backward(c, b, m, &dz, input, n, &mut dh, g),
                None => {
                    let mut dmlp = vec![T::ZERO; a.mlp.len()];
                    ops::linear_backward(&dz, &a.mlp, &b.w_down, n, &mut dmlp, &mut g.w_down);
                    let mut dgate = vec![T::ZERO; dmlp.len()];
                    let mut dup = vec![T::ZERO; dmlp.len()];
                    ops::gated_backward(c.hidden_act, &dmlp, &a.gate, &a.up, &mut dgate, &mut dup);
                    ops::linear_backward(&dgate, input, &b.w_gate, n, &mut dh, &mut g.w_gate);
                    ops::linear_backward(&dup, input, &b.w_up, n, &mut dh, &mut g.w_up);
                }
            }
        }
        pre_norm_backward(
            &dh,
            &a.x_mid,
            &b.ffn_norm,
            &a.rstd_ffn,
            &mut dx,
            &mut g.ffn_norm,
        );

        // x_mid = x_in + post(att·Woᵀ): as above, dx is now the direct part of
        // ∂L/∂x_in.
        let mut datt = vec![T::ZERO; n * c.q_dim()];
        {
            let dy = post_norm_backward(
                &dx,
                &a.attn_out,
                &b.attn_post_norm,
                &a.rstd_attn_post,
                &mut g.attn_post_norm,
            );
            ops::linear_backward(&dy, &a.att, &b.wo, n, &mut datt, &mut g.wo);
        }
        let mut dq = vec![T::ZERO; a.q.len()];
        let mut dk = vec![T::ZERO; a.k.len()];
        let mut dv = vec![T::ZERO; a.v.len()];
        ops::attention_backward(
            shape,
            layer_mask(c, l),
            &datt,
            &a.q,
            &a.k,
            &a.v,
            &a.probs,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        // The saved q, k are rotated; their gradients rotate back before the
        // q/k norms and the projections see them (a NoPE layer never rotated).
        if let Some(rope) = acts.rope_of(l) {
            ops::rope_backward(&mut dq, shape.heads, rope);
            ops::rope_backward(&mut dk, shape.kv_heads, rope);
        }
        dh.fill(T::ZERO);
        let x_in = &acts.residual[l];
        let input = if b.attn_norm.is_empty() {
            x_in
        } else {
            &a.h_attn
        };
        let q_norm = (!b.q_norm.is_empty()).then_some(QkNorm {
            gain: &b.q_norm,
            pre: &a.q_pre,
            rstd: &a.rstd_q,
            dgain: &mut g.q_norm,
        });
        project_backward(dq, input, &b.wq, q_norm, n, &mut dh, &mut g.wq, &mut g.bq);
        let k_norm = (!b.k_norm.is_empty()).then_some(QkNorm {
            gain: &b.k_norm,
            pre: &a.k_pre,
            rstd: &a.rstd_k,
            dgain: &mut g.k_norm,
        });
        project_backward(dk, input, &b.wk, k_norm, n, &mut dh, &mut g.wk, &mut g.bk);
        project_backward(dv, input, &b.wv, None, n, &mut dh, &mut g.wv, &mut g.bv);
        pre_norm_backward(
            &dh,
            x_in,
            &b.attn_norm,
            &a.rstd_attn,
            &mut dx,
            &mut g.attn_norm,
        );
    }
    // x₀ = s·E[tokens]: ∂x₀/∂E[t] = s, so the lookup's gradient is s·dx.
    if let Some(s) = c.embedding_scale() {
        let s = T::from_f64(s as f64);
        dx.iter_mut().for_each(|d| *d *= s);
    }
    ops::embedding_backward(&dx, h, &acts.tokens, &mut grads.token_embd);
}

/// One attention projection before RoPE: `y = h·Wᵀ (+ bias)`, then, when `norm`
/// is not empty, the RMSNorm of each `norm.len()`-wide chunk of each row times
/// `norm`: each head with a per-head gain (`[head_dim]`: qwen3, gemma3, the
/// `[n·heads, head_dim]` view of `y`), the whole row with a gain as wide as the
/// projection (`[q_dim]` / `[kv_dim]`: olmo2). Returns the output, and for the
/// backward the values before the norm and their per-chunk `rstd` (both empty
/// without a norm). An empty `bias` adds nothing.
fn project_forward<T: Float>(
    h: &[T],
    w: &[T],
    bias: &[T],
    norm: &[T],
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut y = ops::linear_forward(h, w, n);
    if !bias.is_empty() {
        ops::bias_forward(&mut y, bias);
    }
    if norm.is_empty() {
        return (y, Vec::new(), Vec::new());
    }
    let mut out = vec![T::ZERO; y.len()];
    let mut rstd = vec![T::ZERO; y.len() / norm.len()];
    ops::rms_norm_forward(&y, norm, eps, &mut out, &mut rstd);
    (out, y, rstd)
}

/// The q or k norm of a projection as its backward reads it.
struct QkNorm<'a, T> {
    /// The gain, `[head_dim]` (per head) or the projection's width (whole row).
    gain: &'a [T],
    /// The saved values before the norm `[n, heads·head_dim]`.
    pre: &'a [T],
    /// Their `rstd`, one per `gain.len()`-wide chunk.
    rstd: &'a [T],
    /// The gain's gradient, added into.
    dgain: &'a mut [T],
}

/// Backward of [`project_forward`] from `dy`, the gradient of its output (for
/// q and k: already rotated back through RoPE). Through the q/k norm when
/// there is one (its gain's gradient added into `norm.dgain`), then
/// the bias (`dbias` += column sums, when the bias exists, i.e. `dbias` is not
/// empty), then the projection: `dh` and `dw` are added into.
#[allow(clippy::too_many_arguments)]
fn project_backward<T: Float>(
    dy: Vec<T>,
    h: &[T],
    w: &[T],
    norm: Option<QkNorm<'_, T>>,
    n: usize,
    dh: &mut [T],
    dw: &mut [T],
    dbias: &mut [T],
) {
    let dy = match norm {
        None => dy,
        Some(nm) => {
            // rms_norm_backward adds into dx, so it starts from zero.
            let mut dpre = vec![T::ZERO; dy.len()];
            ops::rms_norm_backward(&dy, nm.pre, nm.gain, nm.rstd, &mut dpre, nm.dgain);
            dpre
        }
    };
    if !dbias.is_empty() {
        ops::bias_backward(&dy, dbias);
    }
    ops::linear_backward(&dy, h, w, n, dh, dw);
}
