//! The whole Llama-family model for training: [`forward`] runs one sequence
//! (positions `0..n`, causal) and keeps every value the backward reads;
//! [`backward`] walks the same graph in reverse and accumulates the gradient of
//! every parameter. The graph, per block (as in `model::llama`):
//!
//! ```text
//! x₀ = E[tokens]
//! block l:  h  = rmsnorm(x)·g_attn
//!           q, k, v = h·Wqᵀ (+ b_q), h·Wkᵀ (+ b_k), h·Wvᵀ (+ b_v)   (biases: qwen2)
//!           q, k = rmsnorm_per_head(q)·g_q, rmsnorm_per_head(k)·g_k  (qwen3)
//!           q, k = rope(q), rope(k)
//!           a  = causal_gqa_softmax_attention(q, k, v)
//!           x' = x + a·Woᵀ
//!           h' = rmsnorm(x')·g_ffn
//!           x  = x' + (silu(h'·Wgᵀ) ⊙ h'·Wuᵀ)·Wdᵀ
//! logits = rmsnorm(x_L)·g_out · Wₒᵀ          (Wₒ = E when tied)
//! ```
//!
//! The backward also takes gradients with respect to the residual stream after
//! chosen blocks, so hidden-state distillation losses plug in beside the logit
//! losses.

use crate::float::Float;
use crate::ops::{self, AttnShape, RopeTables};
use crate::params::{Grads, Params};
use anyhow::{bail, Result};
use model::arch::Slot;

/// The values of one block's forward that its backward reads.
#[derive(Debug, Clone)]
pub struct BlockActs<T> {
    /// `1/√(mean(x²)+ε)` of the block input, per position `[n]`.
    pub rstd_attn: Vec<T>,
    /// Normalised block input, the input of Q/K/V `[n, hidden]`.
    pub h_attn: Vec<T>,
    /// Queries after the projection and bias, before the per-head norm
    /// `[n, heads·d]`; empty when the architecture has no query norm.
    pub q_pre: Vec<T>,
    /// `1/√(mean(q²)+ε)` of each head of `q_pre`, `[n·heads]`; empty without
    /// a query norm.
    pub rstd_q: Vec<T>,
    /// Keys before the per-head norm `[n, kv·d]`; empty without a key norm.
    pub k_pre: Vec<T>,
    /// `1/√(mean(k²)+ε)` of each head of `k_pre`, `[n·kv]`; empty without a
    /// key norm.
    pub rstd_k: Vec<T>,
    /// Queries after RoPE `[n, heads·d]`.
    pub q: Vec<T>,
    /// Keys after RoPE `[n, kv·d]`.
    pub k: Vec<T>,
    /// Values `[n, kv·d]`.
    pub v: Vec<T>,
    /// Attention weights `[heads, n, n]` (zero above the diagonal).
    pub probs: Vec<T>,
    /// Attention output, the input of Wo `[n, heads·d]`.
    pub att: Vec<T>,
    /// Residual stream after the attention branch `[n, hidden]`.
    pub x_mid: Vec<T>,
    /// `1/√(mean(x'²)+ε)` of `x_mid`, per position `[n]`.
    pub rstd_ffn: Vec<T>,
    /// Normalised `x_mid`, the input of the gate and up projections `[n, hidden]`.
    pub h_ffn: Vec<T>,
    /// Gate projection before SiLU `[n, ffn]`.
    pub gate: Vec<T>,
    /// Up projection `[n, ffn]`.
    pub up: Vec<T>,
    /// `silu(gate) ⊙ up`, the input of the down projection `[n, ffn]`.
    pub mlp: Vec<T>,
}

/// Everything [`forward`] computed for one sequence.
#[derive(Debug, Clone)]
pub struct Activations<T> {
    /// The input tokens.
    pub tokens: Vec<u32>,
    /// The residual stream: entry 0 is the embedding output, entry `l + 1` the
    /// output of block `l`; each `[n, hidden]`.
    pub residual: Vec<Vec<T>>,
    /// Per-block saved values.
    pub blocks: Vec<BlockActs<T>>,
    /// `1/√(mean(x²)+ε)` of the last residual, per position `[n]`.
    pub rstd_out: Vec<T>,
    /// Final-norm output, the input of the head `[n, hidden]`.
    pub h_out: Vec<T>,
    /// Logits `[n, vocab]`, row `p` predicting the token after position `p`.
    pub logits: Vec<T>,
    /// RoPE tables for positions `0..n`.
    pub rope: RopeTables<T>,
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
}

/// Checks that every tensor of `p` has the length its shape implies.
fn check_shapes<T: Float>(p: &Params<T>) -> Result<()> {
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
    for (l, b) in p.blocks.iter().enumerate() {
        for slot in [
            Slot::QBias,
            Slot::KBias,
            Slot::VBias,
            Slot::QNorm,
            Slot::KNorm,
        ] {
            if p.config.arch.slot(slot).is_none() && !b.slot(slot).is_empty() {
                bail!(
                    "block {l} has a {slot:?} tensor, which a '{}' model does not have",
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

/// Runs the model on one sequence of `tokens` (positions `0..n`) and keeps what
/// [`backward`] needs. Memory: per block about
/// `n·(4·hidden + 2·q_dim + 2·kv_dim + 3·ffn) + heads·n²` values (plus
/// `n·(q_dim + kv_dim)` with per-head q/k norms), plus `n·vocab` logits
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
    let rope = RopeTables::new(n, &c.rope_frequencies());

    let mut x = ops::embedding_forward(&p.token_embd, h, tokens)?;
    let mut residual = Vec::with_capacity(c.num_hidden_layers + 1);
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for b in &p.blocks {
        let mut rstd_attn = vec![T::ZERO; n];
        let mut h_attn = vec![T::ZERO; n * h];
        ops::rms_norm_forward(&x, &b.attn_norm, eps, &mut h_attn, &mut rstd_attn);
        let (mut q, q_pre, rstd_q) = project_forward(&h_attn, &b.wq, &b.bq, &b.q_norm, n, eps);
        let (mut k, k_pre, rstd_k) = project_forward(&h_attn, &b.wk, &b.bk, &b.k_norm, n, eps);
        let (v, ..) = project_forward(&h_attn, &b.wv, &b.bv, &[], n, eps);
        ops::rope_forward(&mut q, shape.heads, &rope);
        ops::rope_forward(&mut k, shape.kv_heads, &rope);
        let mut probs = vec![T::ZERO; shape.heads * n * n];
        let mut att = vec![T::ZERO; n * c.q_dim()];
        ops::attention_forward(shape, &q, &k, &v, &mut probs, &mut att);
        let mut x_mid = ops::linear_forward(&att, &b.wo, n);
        x_mid.iter_mut().zip(&x).for_each(|(m, &r)| *m += r);

        let mut rstd_ffn = vec![T::ZERO; n];
        let mut h_ffn = vec![T::ZERO; n * h];
        ops::rms_norm_forward(&x_mid, &b.ffn_norm, eps, &mut h_ffn, &mut rstd_ffn);
        let gate = ops::linear_forward(&h_ffn, &b.w_gate, n);
        let up = ops::linear_forward(&h_ffn, &b.w_up, n);
        let mlp = ops::swiglu_forward(&gate, &up);
        let mut x_out = ops::linear_forward(&mlp, &b.w_down, n);
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
            x_mid,
            rstd_ffn,
            h_ffn,
            gate,
            up,
            mlp,
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

    // Head: logits = h_out·Wₒᵀ. When tied, Wₒ is the embedding, so its gradient
    // lands in the embedding's (the scatter-add below adds the lookup's part).
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

        // x_out = x_mid + mlp·Wdᵀ: the residual passes dx through unchanged, so
        // dx already is the direct part of ∂L/∂x_mid.
        let mut dmlp = vec![T::ZERO; n * c.intermediate_size];
        ops::linear_backward(&dx, &a.mlp, &b.w_down, n, &mut dmlp, &mut g.w_down);
        let mut dgate = vec![T::ZERO; dmlp.len()];
        let mut dup = vec![T::ZERO; dmlp.len()];
        ops::swiglu_backward(&dmlp, &a.gate, &a.up, &mut dgate, &mut dup);
        dh.fill(T::ZERO);
        ops::linear_backward(&dgate, &a.h_ffn, &b.w_gate, n, &mut dh, &mut g.w_gate);
        ops::linear_backward(&dup, &a.h_ffn, &b.w_up, n, &mut dh, &mut g.w_up);
        ops::rms_norm_backward(
            &dh,
            &a.x_mid,
            &b.ffn_norm,
            &a.rstd_ffn,
            &mut dx,
            &mut g.ffn_norm,
        );

        // x_mid = x_in + att·Woᵀ: as above, dx is now the direct part of ∂L/∂x_in.
        let mut datt = vec![T::ZERO; n * c.q_dim()];
        ops::linear_backward(&dx, &a.att, &b.wo, n, &mut datt, &mut g.wo);
        let mut dq = vec![T::ZERO; a.q.len()];
        let mut dk = vec![T::ZERO; a.k.len()];
        let mut dv = vec![T::ZERO; a.v.len()];
        ops::attention_backward(
            shape, &datt, &a.q, &a.k, &a.v, &a.probs, &mut dq, &mut dk, &mut dv,
        );
        // The saved q, k are rotated; their gradients rotate back before the
        // per-head norms and the projections see them.
        ops::rope_backward(&mut dq, shape.heads, &acts.rope);
        ops::rope_backward(&mut dk, shape.kv_heads, &acts.rope);
        dh.fill(T::ZERO);
        let h_attn = &a.h_attn;
        let q_norm = (!b.q_norm.is_empty()).then_some(PerHeadNorm {
            gain: &b.q_norm,
            pre: &a.q_pre,
            rstd: &a.rstd_q,
            dgain: &mut g.q_norm,
        });
        project_backward(dq, h_attn, &b.wq, q_norm, n, &mut dh, &mut g.wq, &mut g.bq);
        let k_norm = (!b.k_norm.is_empty()).then_some(PerHeadNorm {
            gain: &b.k_norm,
            pre: &a.k_pre,
            rstd: &a.rstd_k,
            dgain: &mut g.k_norm,
        });
        project_backward(dk, h_attn, &b.wk, k_norm, n, &mut dh, &mut g.wk, &mut g.bk);
        project_backward(dv, h_attn, &b.wv, None, n, &mut dh, &mut g.wv, &mut g.bv);
        ops::rms_norm_backward(
            &dh,
            &acts.residual[l],
            &b.attn_norm,
            &a.rstd_attn,
            &mut dx,
            &mut g.attn_norm,
        );
    }
    ops::embedding_backward(&dx, h, &acts.tokens, &mut grads.token_embd);
}

/// One attention projection before RoPE: `y = h·Wᵀ (+ bias)`, then, when `norm`
/// (the per-head gain, `[head_dim]`) is not empty, the RMSNorm of each head of
/// each row (the `[n·heads, head_dim]` view of `y`) times `norm`. Returns the
/// output, and for the backward the values before the norm and their per-head
/// `rstd` (both empty without a norm). An empty `bias` adds nothing.
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

/// The per-head norm of a projection as its backward reads it.
struct PerHeadNorm<'a, T> {
    /// The gain `[head_dim]`.
    gain: &'a [T],
    /// The saved values before the norm `[n, heads·head_dim]`.
    pre: &'a [T],
    /// Their `rstd`, one per position and head.
    rstd: &'a [T],
    /// The gain's gradient, added into.
    dgain: &'a mut [T],
}

/// Backward of [`project_forward`] from `dy`, the gradient of its output (for
/// q and k: already rotated back through RoPE). Through the per-head norm when
/// there is one (its gain's gradient added into `norm.dgain`), then
/// the bias (`dbias` += column sums, when the bias exists, i.e. `dbias` is not
/// empty), then the projection: `dh` and `dw` are added into.
#[allow(clippy::too_many_arguments)]
fn project_backward<T: Float>(
    dy: Vec<T>,
    h: &[T],
    w: &[T],
    norm: Option<PerHeadNorm<'_, T>>,
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
