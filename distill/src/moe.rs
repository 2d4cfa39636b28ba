//! A mixture-of-experts MLP for training (Qwen3-MoE, Mixtral, OLMoE): the
//! forward that `model::llama::Model::moe_mlp` computes, and its backward with
//! the router frozen. Per token `t` with MLP input `h_t`:
//!
//! ```text
//! r_t  = h_t·W_rᵀ                              router logits [experts]
//! p_t  = softmax(r_t)
//! S_t  = the `used` largest p_t,e (the lower index first on a tie)
//! w_te = p_te / Σ_{j∈S_t} p_tj   (norm_topk_prob)   or   p_te
//! z_t  = Σ_{e∈S_t} w_te · (act(h_t·W_g,eᵀ) ⊙ h_t·W_u,eᵀ)·W_d,eᵀ
//! ```
//!
//! Each expert runs once on the tokens routed to it. The selection `S_t` is
//! piecewise constant, so gradients flow through the chosen experts' outputs
//! (into their weights and `h_t`) and through the weights `w_te` (into `r_t`,
//! and from there into `h_t` and `W_r`):
//!
//! ```text
//! g_te   = ⟨∂L/∂z_t, o_te⟩                      ∂L/∂w_te, o_te the expert's output
//! normalised:  ∂L/∂r_tj = w_tj·(g_tj − Σ_{e∈S_t} w_te·g_te)   for j ∈ S_t, else 0
//! otherwise:   ∂L/∂r_tj = p_tj·(g_tj·[j∈S_t] − Σ_{e∈S_t} p_te·g_te)
//! ```
//!
//! The router's own gradient is computed (the gradient checks cover it) but
//! never applied: training keeps the routing the model was calibrated with.

use crate::float::Float;
use crate::ops;
use crate::params::BlockParams;
use model::config::{ModelConfig, MoeConfig};

/// One expert's run over the tokens routed to it.
#[derive(Debug, Clone)]
pub struct ExpertPass<T> {
    /// The expert.
    pub expert: usize,
    /// Its tokens (positions, ascending) and their router weights `w_te`.
    pub tokens: Vec<(usize, T)>,
    /// Those tokens' rows of the MLP input `[tokens, hidden]`.
    pub input: Vec<T>,
    /// Gate projection before the activation `[tokens, expert_ffn]`.
    pub gate: Vec<T>,
    /// Up projection `[tokens, expert_ffn]`.
    pub up: Vec<T>,
    /// `act(gate) ⊙ up`, the down projection's input `[tokens, expert_ffn]`.
    pub mlp: Vec<T>,
    /// The expert's output before its router weight `[tokens, hidden]`.
    pub out: Vec<T>,
}

/// What the forward of a mixture-of-experts MLP keeps for its backward.
#[derive(Debug, Clone)]
pub struct MoeActs<T> {
    /// Router probabilities over every expert `[n, experts]`.
    pub probs: Vec<T>,
    /// Each token's chosen experts and weights `[n, used]`, best first.
    pub routes: Vec<(usize, T)>,
    /// The experts that received tokens, in expert order.
    pub passes: Vec<ExpertPass<T>>,
}

/// Expert `e`'s matrix in a stack of `experts` equal matrices.
fn expert_slice<T>(stack: &[T], experts: usize, e: usize) -> &[T] {
    let size = stack.len() / experts;
    &stack[e * size..(e + 1) * size]
}

/// [`expert_slice`], writable.
fn expert_slice_mut<T>(stack: &mut [T], experts: usize, e: usize) -> &mut [T] {
    let size = stack.len() / experts;
    &mut stack[e * size..(e + 1) * size]
}

/// Each token's chosen experts and weights from its router logits, as
/// `model::llama::route` chooses them for softmax routing (ranked by
/// probability, the lower index first on a tie), and the probabilities.
fn route<T: Float>(logits: &[T], m: &MoeConfig) -> (Vec<T>, Vec<(usize, T)>) {
    let mut probs = vec![T::ZERO; logits.len()];
    let mut routes = Vec::with_capacity(logits.len() / m.experts * m.used);
    for (row, p) in logits.chunks(m.experts).zip(probs.chunks_mut(m.experts)) {
        let max = row.iter().fold(T::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = T::ZERO;
        for (p, &r) in p.iter_mut().zip(row) {
            *p = (r - max).exp();
            sum += *p;
        }
        p.iter_mut().for_each(|v| *v /= sum);
        let mut order: Vec<usize> = (0..m.experts).collect();
        order.sort_by(|&a, &b| {
            p[b].partial_cmp(&p[a])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        let chosen = &order[..m.used];
        let norm = if m.norm_topk_prob {
            chosen.iter().fold(T::ZERO, |s, &e| s + p[e])
        } else {
            T::ONE
        };
        routes.extend(chosen.iter().map(|&e| (e, p[e] / norm)));
    }
    (probs, routes)
}

/// The mixture-of-experts MLP of block `b` (config `c`) on its input `h`
/// (`[n, hidden]`): its output `z` (`[n, hidden]`, before any post-norm) and
/// what [`backward`] reads.
pub fn forward<T: Float>(
    c: &ModelConfig,
    b: &BlockParams<T>,
    h: &[T],
    n: usize,
) -> (Vec<T>, MoeActs<T>) {
    let m = c
        .moe
        .as_ref()
        .expect("a mixture-of-experts block has a config");
    let hidden = c.hidden_size;
    let logits = ops::linear_forward(h, &b.router, n);
    let (probs, routes) = route(&logits, m);
    let mut z = vec![T::ZERO; n * hidden];
    let mut passes = Vec::new();
    for e in 0..m.experts {
        let tokens = model::llama::routed_to(&routes, m.used, e);
        if tokens.is_empty() {
            continue;
        }
        let rows = tokens.len();
        let input: Vec<T> = tokens
            .iter()
            .flat_map(|&(t, _)| h[t * hidden..(t + 1) * hidden].iter().copied())
            .collect();
        let gate = ops::linear_forward(&input, expert_slice(&b.w_gate, m.experts, e), rows);
        let up = ops::linear_forward(&input, expert_slice(&b.w_up, m.experts, e), rows);
        let mlp = ops::gated_forward(c.hidden_act, &gate, &up);
        let out = ops::linear_forward(&mlp, expert_slice(&b.w_down, m.experts, e), rows);
        for (&(t, w), o) in tokens.iter().zip(out.chunks(hidden)) {
            for (z, &o) in z[t * hidden..(t + 1) * hidden].iter_mut().zip(o) {
                *z += w * o;
            }
        }
        passes.push(ExpertPass {
            expert: e,
            tokens,
            input,
            gate,
            up,
            mlp,
            out,
        });
    }
    (
        z,
        MoeActs {
            probs,
            routes,
            passes,
        },
    )
}

/// Backward of [`forward`] from `dz` (`[n, hidden]`, the gradient of its
/// output) with `h` the MLP input it read: the experts' and router's gradients
/// are added into `g`, the input's into `dh`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    c: &ModelConfig,
    b: &BlockParams<T>,
    a: &MoeActs<T>,
    dz: &[T],
    h: &[T],
    n: usize,
    dh: &mut [T],
    g: &mut BlockParams<T>,
) {
    let m = c
        .moe
        .as_ref()
        .expect("a mixture-of-experts block has a config");
    let hidden = c.hidden_size;
    // ∂L/∂w_te, in the layout of `routes`.
    let mut dweight = vec![T::ZERO; a.routes.len()];
    for pass in &a.passes {
        let rows = pass.tokens.len();
        let mut dout = vec![T::ZERO; rows * hidden];
        for ((&(t, w), o), d) in pass
            .tokens
            .iter()
            .zip(pass.out.chunks(hidden))
            .zip(dout.chunks_mut(hidden))
        {
            let dzt = &dz[t * hidden..(t + 1) * hidden];
            let slot = (0..m.used)
                .find(|&k| a.routes[t * m.used + k].0 == pass.expert)
                .expect("an expert pass lists only tokens routed to it");
            dweight[t * m.used + slot] = dzt.iter().zip(o).fold(T::ZERO, |s, (&d, &o)| s + d * o);
            d.iter_mut().zip(dzt).for_each(|(d, &v)| *d = w * v);
        }
        let e = pass.expert;
        let mut dmlp = vec![T::ZERO; pass.mlp.len()];
        ops::linear_backward(
            &dout,
            &pass.mlp,
            expert_slice(&b.w_down, m.experts, e),
            rows,
            &mut dmlp,
            expert_slice_mut(&mut g.w_down, m.experts, e),
        );
        let mut dgate = vec![T::ZERO; dmlp.len()];
        let mut dup = vec![T::ZERO; dmlp.len()];
        ops::gated_backward(
            c.hidden_act,
            &dmlp,
            &pass.gate,
            &pass.up,
            &mut dgate,
            &mut dup,
        );
        let mut dinput = vec![T::ZERO; pass.input.len()];
        ops::linear_backward(
            &dgate,
            &pass.input,
            expert_slice(&b.w_gate, m.experts, e),
            rows,
            &mut dinput,
            expert_slice_mut(&mut g.w_gate, m.experts, e),
        );
        ops::linear_backward(
            &dup,
            &pass.input,
            expert_slice(&b.w_up, m.experts, e),
            rows,
            &mut dinput,
            expert_slice_mut(&mut g.w_up, m.experts, e),
        );
        for (&(t, _), d) in pass.tokens.iter().zip(dinput.chunks(hidden)) {
            dh[t * hidden..(t + 1) * hidden]
                .iter_mut()
                .zip(d)
                .for_each(|(x, &v)| *x += v);
        }
    }
    // Through the weights into the router logits (see the module comment).
    let mut dlogits = vec![T::ZERO; n * m.experts];
    for t in 0..n {
        let routes = &a.routes[t * m.used..(t + 1) * m.used];
        let dw = &dweight[t * m.used..(t + 1) * m.used];
        let dr = &mut dlogits[t * m.experts..(t + 1) * m.experts];
        let mean = routes
            .iter()
            .zip(dw)
            .fold(T::ZERO, |s, (&(_, w), &d)| s + w * d);
        if m.norm_topk_prob {
            for (&(e, w), &d) in routes.iter().zip(dw) {
                dr[e] = w * (d - mean);
            }
        } else {
            let p = &a.probs[t * m.experts..(t + 1) * m.experts];
            for (dr, &p) in dr.iter_mut().zip(p) {
                *dr = -p * mean;
            }
            for (&(e, _), &d) in routes.iter().zip(dw) {
                dr[e] += p[e] * d;
            }
        }
    }
    ops::linear_backward(&dlogits, h, &b.router, n, dh, &mut g.router);
}
