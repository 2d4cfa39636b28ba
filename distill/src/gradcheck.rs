//! The checks that make the hand-written backward trustworthy: on a tiny random
//! model, the analytic gradient of a distillation-shaped objective (next-token
//! cross-entropy + forward KL + reverse KL + hidden-state MSE on two blocks)
//! against central finite differences in f64 for every element of every tensor,
//! and the f32 path against the f64 one. Every check runs on a tiny llama, a
//! tiny qwen2 (q/k/v biases) and a tiny qwen3 (per-head q/k norms, heads wider
//! than `hidden / heads`), and on the newer families' shapes: a Gemma-3-like model
//! (pre- and post-norms, GELU-tanh, embedding scale, `query_pre_attn_scalar`,
//! a sliding layer with its own RoPE base beside a global one), an OLMo-2-like
//! one (no pre-norms, post-norms, q/k norms over the whole projection) and a
//! SmolLM3/Mistral-like one (a NoPE layer, windows on every layer), and the
//! mixtures of experts (Qwen3-MoE, Mixtral, OLMoE: four experts, two per
//! token, the router's gradient included). The sequence (5 tokens) is longer
//! than every window (2, 3) and routes to every expert of the tiny MoEs.

use crate::float::Float;
use crate::loss::{forward_kl, next_token_cross_entropy, reverse_kl};
use crate::params::{Grads, Params};
use crate::testutil::{
    all_tiny_configs, moe_configs, random_params, random_vec, tiny_config, tiny_gemma_config,
    tiny_nope_window_config, tiny_olmo_config, tiny_qwen2_config, tiny_qwen3_config,
};
use crate::transformer::{backward, forward, Activations};
use model::config::ModelConfig;

/// The fixed inputs of the objective: tokens (one repeated, so the embedding's
/// scatter-add sees two positions on one row), teacher logits, hidden targets.
struct Setup<T> {
    tokens: Vec<u32>,
    teacher: Vec<T>,
    hidden_targets: Vec<(usize, Vec<T>)>,
}

impl Setup<f64> {
    fn new(c: &ModelConfig) -> Self {
        let tokens = vec![3, 7, 1, 3, 10];
        let n = tokens.len();
        Setup {
            teacher: random_vec(n * c.vocab_size, 3.0, 11),
            hidden_targets: (0..c.num_hidden_layers)
                .map(|l| (l, random_vec(n * c.hidden_size, 1.0, 20 + l as u64)))
                .collect(),
            tokens,
        }
    }

    fn cast<T: Float>(&self) -> Setup<T> {
        let cv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        Setup {
            tokens: self.tokens.clone(),
            teacher: cv(&self.teacher),
            hidden_targets: self
                .hidden_targets
                .iter()
                .map(|(l, t)| (*l, cv(t)))
                .collect(),
        }
    }
}

/// The objective's value, the forward's activations, ∂L/∂logits and
/// ∂L/∂hidden per target block.
type Evaluated<T> = (f64, Activations<T>, Vec<T>, Vec<(usize, Vec<T>)>);

/// `CE + 0.7·KL_fwd(T=2) + 0.3·KL_rev(T=1.5) + Σ_l 0.5·mean((h_l − target_l)²)`.
fn objective<T: Float>(p: &Params<T>, s: &Setup<T>) -> Evaluated<T> {
    let vocab = p.config.vocab_size;
    let acts = forward(p, &s.tokens).unwrap();
    let mut dl = vec![T::ZERO; acts.logits.len()];
    let mut loss = next_token_cross_entropy(&acts.logits, vocab, &s.tokens, 1.0, &mut dl).unwrap();
    loss += 0.7 * forward_kl(&acts.logits, &s.teacher, vocab, 2.0, 0.7, &mut dl).unwrap();
    loss += 0.3 * reverse_kl(&acts.logits, &s.teacher, vocab, 1.5, 0.3, &mut dl).unwrap();
    let mut hidden_grads = Vec::new();
    for (l, target) in &s.hidden_targets {
        let h = acts.hidden(*l);
        let inv = 1.0 / h.len() as f64;
        let mut d = vec![T::ZERO; h.len()];
        for ((d, &h), &t) in d.iter_mut().zip(h).zip(target) {
            let diff = h.to_f64() - t.to_f64();
            loss += 0.5 * inv * diff * diff;
            *d = T::from_f64(inv * diff);
        }
        hidden_grads.push((*l, d));
    }
    (loss, acts, dl, hidden_grads)
}

/// The analytic gradient of [`objective`] at `p`.
fn analytic<T: Float>(p: &Params<T>, s: &Setup<T>) -> Grads<T> {
    let (_, acts, dl, hidden) = objective(p, s);
    let refs: Vec<(usize, &[T])> = hidden.iter().map(|(l, d)| (*l, &d[..])).collect();
    let mut g = p.zeros_like();
    backward(p, &acts, &dl, &refs, &mut g);
    g
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Finite differences for every element of every tensor of a model of config
/// `c`; returns the worst per-tensor relative error and panics naming every
/// tensor that fails.
fn check_against_finite_differences(c: &ModelConfig) -> f64 {
    check_with_seed(c, if c.tie_word_embeddings { 1 } else { 2 })
}

/// [`check_against_finite_differences`] at the parameters drawn from `seed`.
fn check_with_seed(c: &ModelConfig, seed: u64) -> f64 {
    let c = c.clone();
    let tied = c.tie_word_embeddings;
    let p = random_params::<f64>(&c, seed);
    let s = Setup::new(&c);
    let g = analytic(&p, &s);
    let step = 1e-5;
    let mut work = p.clone();
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for (t, gt) in p.tensors().into_iter().zip(g.tensors()) {
        assert_eq!(t.name, gt.name);
        let mut fd = vec![0f64; t.data.len()];
        for (i, fd) in fd.iter_mut().enumerate() {
            let x = t.data[i];
            work.get_mut(&t.name).unwrap()[i] = x + step;
            let up = objective(&work, &s).0;
            work.get_mut(&t.name).unwrap()[i] = x - step;
            let down = objective(&work, &s).0;
            work.get_mut(&t.name).unwrap()[i] = x;
            *fd = (up - down) / (2.0 * step);
        }
        let (n_fd, n_g) = (norm(fd.iter().copied()), norm(gt.data.iter().copied()));
        let n_diff = norm(fd.iter().zip(gt.data).map(|(a, b)| a - b));
        let rel = n_diff / n_fd.max(n_g).max(1e-300);
        // Per element: relative, with an absolute floor for elements whose
        // gradient is at the level of the differences' rounding (~1e-11).
        let (mut bad, mut worst_elem) = (0, 0f64);
        for (a, b) in fd.iter().zip(gt.data) {
            let e = (a - b).abs() / (a.abs().max(b.abs()) + 1e-8);
            worst_elem = worst_elem.max(e);
            if (a - b).abs() > 1e-6 * a.abs().max(b.abs()) + 1e-9 {
                bad += 1;
            }
        }
        println!(
            "{:<24} |g| {n_g:.3e}  rel err {rel:.2e}  worst element {worst_elem:.2e}",
            t.name
        );
        worst = worst.max(rel);
        if rel.is_nan() || rel >= 1e-6 || bad > 0 || n_g == 0.0 {
            failures.push(format!(
                "{}: relative error {rel:e}, {bad} elements off, |g| {n_g:e}",
                t.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "gradient check failed ({}, {} head):\n{}",
        c.arch.gguf_name,
        if tied { "tied" } else { "untied" },
        failures.join("\n")
    );
    worst
}

#[test]
fn gradients_match_finite_differences_tied_head() {
    let worst = check_against_finite_differences(&tiny_config(true));
    println!("llama, tied head: worst per-tensor relative error {worst:.2e}");
}

#[test]
fn gradients_match_finite_differences_untied_head() {
    let worst = check_against_finite_differences(&tiny_config(false));
    println!("llama, untied head: worst per-tensor relative error {worst:.2e}");
}

#[test]
fn gradients_match_finite_differences_qwen2_biases() {
    for tied in [true, false] {
        let worst = check_against_finite_differences(&tiny_qwen2_config(tied));
        println!("qwen2, tied {tied}: worst per-tensor relative error {worst:.2e}");
    }
}

#[test]
fn gradients_match_finite_differences_qwen3_qk_norms() {
    for tied in [true, false] {
        let worst = check_against_finite_differences(&tiny_qwen3_config(tied));
        println!("qwen3, tied {tied}: worst per-tensor relative error {worst:.2e}");
    }
}

#[test]
fn gradients_match_finite_differences_yarn() {
    // YaRN scales cos and sin (by 0.1·ln 4 + 1 here) besides the frequencies:
    // RoPE's backward must carry the factor too.
    let mut c = tiny_qwen3_config(false);
    c.max_position_embeddings = 8;
    let v = serde_json::json!({"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 2});
    c.rope_scaling = Some(model::config::RopeScaling::Yarn(yarn_of(&v)));
    assert!((c.layer_rope_factor(0) - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    let worst = check_against_finite_differences(&c);
    println!("qwen3 with YaRN: worst per-tensor relative error {worst:.2e}");
}

/// The YaRN settings of an HF `rope_scaling` object.
fn yarn_of(v: &serde_json::Value) -> model::config::Yarn {
    let mut hf = serde_json::json!({"model_type": "qwen3", "vocab_size": 11, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 8});
    hf["rope_scaling"] = v.clone();
    match model::ModelConfig::from_hf_json(&hf).unwrap().rope_scaling {
        Some(model::config::RopeScaling::Yarn(y)) => y,
        other => panic!("{other:?}"),
    }
}

#[test]
fn gradients_match_finite_differences_gemma_like() {
    for tied in [true, false] {
        let worst = check_against_finite_differences(&tiny_gemma_config(tied));
        println!("gemma-like, tied {tied}: worst per-tensor relative error {worst:.2e}");
    }
}

#[test]
fn gradients_match_finite_differences_olmo_like() {
    for tied in [true, false] {
        let worst = check_against_finite_differences(&tiny_olmo_config(tied));
        println!("olmo-like, tied {tied}: worst per-tensor relative error {worst:.2e}");
    }
}

#[test]
fn gradients_match_finite_differences_mixtures_of_experts() {
    for c in moe_configs() {
        // The check covers every expert only where each receives a token: the
        // first seed whose parameters route to all four in both blocks.
        let tokens = Setup::new(&c).tokens;
        let seed = (1..100)
            .find(|&seed| {
                let acts = forward(&random_params::<f64>(&c, seed), &tokens).unwrap();
                acts.blocks
                    .iter()
                    .all(|b| b.moe.as_ref().expect("an expert block").passes.len() == 4)
            })
            .expect("a seed that routes to every expert");
        let worst = check_with_seed(&c, seed);
        println!(
            "{}, tied {}: worst per-tensor relative error {worst:.2e}",
            c.arch.name, c.tie_word_embeddings
        );
    }
}

#[test]
fn gradients_match_finite_differences_nope_and_windows() {
    for tied in [true, false] {
        let worst = check_against_finite_differences(&tiny_nope_window_config(tied));
        println!("NoPE + windows, tied {tied}: worst per-tensor relative error {worst:.2e}");
    }
}

/// The features the checks above cover are live in their configs: turning one
/// off changes the logits, so a forward and backward that both ignored it
/// could not pass unnoticed against the inference tests (`ops`, `load`).
#[test]
fn issue17_features_change_the_function() {
    let tokens = [3, 7, 1, 3, 10];
    let logits = |c: &ModelConfig, seed_cfg: &ModelConfig| {
        // Same parameters (drawn for seed_cfg's tensors) under config c.
        let mut p = random_params::<f64>(seed_cfg, 7);
        p.config = c.clone();
        forward(&p, &tokens).unwrap().logits
    };
    let differs = |a: &[f64], b: &[f64]| a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-6);
    let base = tiny_gemma_config(true);
    let want = logits(&base, &base);
    let mut variants: Vec<(&str, ModelConfig)> = Vec::new();
    let mut c = base.clone();
    c.sliding_window = Some(5);
    variants.push(("window 2 → 5 (all visible)", c));
    let mut c = base.clone();
    c.query_pre_attn_scalar = None;
    variants.push(("query_pre_attn_scalar → head_dim", c));
    let mut c = base.clone();
    c.rope_local_theta = None;
    variants.push(("local RoPE base → global", c));
    let mut c = base.clone();
    c.hidden_act = model::config::Activation::Silu;
    variants.push(("GELU-tanh → SiLU", c));
    for (what, c) in &variants {
        assert!(differs(&logits(c, &base), &want), "gemma-like: {what}");
    }
    let base = tiny_nope_window_config(true);
    let want = logits(&base, &base);
    let mut c = base.clone();
    c.layer_types[1].rope = true;
    assert!(differs(&logits(&c, &base), &want), "NoPE layer → RoPE");
    let mut c = base.clone();
    c.sliding_window = Some(5);
    assert!(differs(&logits(&c, &base), &want), "window 3 → 5");
}

#[test]
fn f32_path_agrees_with_f64() {
    for c in all_tiny_configs() {
        let (tied, arch) = (c.tie_word_embeddings, c.arch.gguf_name);
        let p64 = random_params::<f64>(&c, 3);
        let p32: Params<f32> = p64.cast();
        let s64 = Setup::new(&c);
        let s32 = s64.cast::<f32>();
        let (l64, a64, ..) = objective(&p64, &s64);
        let (l32, a32, ..) = objective(&p32, &s32);
        let scale = a64.logits.iter().fold(0f64, |m, x| m.max(x.abs()));
        let diff = a64
            .logits
            .iter()
            .zip(&a32.logits)
            .fold(0f64, |m, (a, b)| m.max((a - b.to_f64()).abs()));
        println!(
            "{arch}, tied {tied}: logits max rel diff {:.2e}, loss {l64:.6} vs {l32:.6}",
            diff / scale
        );
        assert!(
            diff / scale < 1e-5,
            "f32 logits differ by {diff:e} at scale {scale}"
        );
        assert!(((l64 - l32) / l64).abs() < 1e-5, "loss {l64} vs {l32}");
        let (g64, g32) = (analytic(&p64, &s64), analytic(&p32, &s32));
        let mut worst = 0f64;
        for (a, b) in g64.tensors().into_iter().zip(g32.tensors()) {
            let d = norm(a.data.iter().zip(b.data).map(|(x, y)| x - y.to_f64()));
            let rel = d / norm(a.data.iter().copied());
            worst = worst.max(rel);
            assert!(
                rel < 1e-3,
                "{}: f32 gradient off by {rel:e} ({arch}, tied {tied})",
                a.name
            );
        }
        println!("{arch}, tied {tied}: f32 gradients, worst per-tensor relative error {worst:.2e}");
    }
}

#[test]
fn backward_accumulates_across_calls() {
    for c in [
        tiny_config(false),
        tiny_qwen2_config(false),
        tiny_qwen3_config(false),
        tiny_gemma_config(true),
        tiny_olmo_config(false),
        tiny_nope_window_config(true),
    ] {
        let p = random_params::<f64>(&c, 4);
        let s = Setup::new(&c);
        let (_, acts, dl, hidden) = objective(&p, &s);
        let refs: Vec<(usize, &[f64])> = hidden.iter().map(|(l, d)| (*l, &d[..])).collect();
        let mut once = p.zeros_like();
        backward(&p, &acts, &dl, &refs, &mut once);
        let mut twice = p.zeros_like();
        backward(&p, &acts, &dl, &refs, &mut twice);
        backward(&p, &acts, &dl, &refs, &mut twice);
        for (a, b) in once.tensors().into_iter().zip(twice.tensors()) {
            for (x, y) in a.data.iter().zip(b.data) {
                assert!(
                    (2.0 * x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{}",
                    a.name
                );
            }
        }
    }
}

#[test]
fn forward_rejects_bad_input() {
    let c = tiny_config(true);
    let mut p = random_params::<f32>(&c, 5);
    let e = forward(&p, &[1, 11]).unwrap_err().to_string();
    assert!(e.contains("token id 11"), "{e}");
    assert!(forward(&p, &[]).is_err());
    p.blocks[1].wk.pop();
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("blk.1.attn_k.weight"), "{e}");
    // A tensor the architecture lacks, or an optional one of the wrong size.
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[0].bq = vec![0.0; c.q_dim()];
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("QBias") && e.contains("llama"), "{e}");
    let c = tiny_qwen3_config(true);
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[1].k_norm.pop();
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("blk.1.attn_k_norm.weight"), "{e}");
    // An empty pre-norm means "no pre-norm" only where the architecture has no
    // such slot: a Gemma block without its norm is an error, not an OLMo block.
    let c = tiny_gemma_config(true);
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[1].ffn_norm.clear();
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("blk.1.ffn_norm.weight"), "{e}");
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[0].ffn_post_norm.clear();
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("blk.0.post_ffw_norm.weight"), "{e}");
    let c = tiny_olmo_config(false);
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[0].attn_norm = vec![1.0; c.hidden_size];
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("AttnNorm") && e.contains("olmo2"), "{e}");
    // A whole-projection q norm of per-head width is refused by its shape.
    let mut p = random_params::<f32>(&c, 5);
    p.blocks[0].q_norm.truncate(c.head_dim);
    let e = forward(&p, &[1, 2]).unwrap_err().to_string();
    assert!(e.contains("blk.0.attn_q_norm.weight"), "{e}");
}
