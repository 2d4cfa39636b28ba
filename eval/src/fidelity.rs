//! Per-layer fidelity of an artifact against its base: for every linear layer,
//! the artifact's weights and the base's applied to the same inputs (the base
//! model's own activations on calibration text), compared by relative error
//! `‖Y_a − Y_b‖ / ‖Y_b‖` and cosine `⟨Y_a, Y_b⟩ / (‖Y_a‖ ‖Y_b‖)` over all outputs.
//! Layers whose shapes differ (structured cuts) are skipped. A mixture of
//! experts' stacked experts are compared expert by expert on the tokens the
//! base routes to each, summed per tensor and also reported per expert.

use anyhow::{Context, Result};
use model::llama::linear;
use model::Model;
use serde::Serialize;

/// One linear layer's output fidelity.
#[derive(Debug, Clone, Serialize)]
pub struct LayerFidelity {
    /// Canonical weight name.
    pub name: String,
    /// `‖Y_a − Y_b‖ / ‖Y_b‖` over every token and output.
    pub rel_error: f64,
    /// Cosine between `Y_a` and `Y_b` flattened.
    pub cosine: f64,
    /// For a stacked experts' tensor: each expert on the tokens routed to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertFidelity>,
}

/// One routed expert's output fidelity.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertFidelity {
    /// The expert.
    pub expert: usize,
    /// Calibration tokens the base routed to it (its fidelity is 0 / 1 with none).
    pub tokens: u64,
    /// As [`LayerFidelity::rel_error`], over its tokens.
    pub rel_error: f64,
    /// As [`LayerFidelity::cosine`], over its tokens.
    pub cosine: f64,
}

#[derive(Default, Clone, Copy)]
struct Sums {
    diff: f64,
    base: f64,
    art: f64,
    dot: f64,
    tokens: u64,
}

impl Sums {
    fn add(&mut self, ya: &[f32], yb: &[f32], rows: usize) {
        for (&a, &b) in ya.iter().zip(yb) {
            let (a, b) = (a as f64, b as f64);
            self.diff += (a - b) * (a - b);
            self.base += b * b;
            self.art += a * a;
            self.dot += a * b;
        }
        self.tokens += rows as u64;
    }

    fn rel_error(&self) -> f64 {
        (self.diff / self.base.max(f64::MIN_POSITIVE)).sqrt()
    }

    fn cosine(&self) -> f64 {
        self.dot / (self.base * self.art).sqrt().max(f64::MIN_POSITIVE)
    }
}

/// Runs `base` on `tokens` in chunks of `ctx` and compares each linear of
/// `artifact` with the base's on the base's inputs. Layers missing from the
/// artifact, of another shape, or whose input the forward does not show, are
/// left out. `progress(chunk, total)`.
pub fn output_fidelity(
    base: &Model,
    artifact: &Model,
    tokens: &[u32],
    ctx: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerFidelity>> {
    let layers = base.config.num_hidden_layers;
    let mut names = Vec::new();
    for layer in 0..layers {
        for suffix in base.config.arch.layer_linears(&base.config, layer) {
            let name = model::names::block(layer, suffix);
            let same = match (base.tensor_meta(&name), artifact.tensor_meta(&name)) {
                (Ok((_, a)), Ok((_, b))) => a == b,
                _ => false,
            };
            if same {
                names.push(name);
            }
        }
    }
    let experts = base.config.moe.as_ref().map_or(0, |m| m.experts);
    let mut sums = vec![Sums::default(); names.len()];
    let mut expert_sums = vec![vec![Sums::default(); experts]; names.len()];
    let index = |name: &str| names.iter().position(|n| n == name);
    let chunks: Vec<&[u32]> = tokens.chunks(ctx.max(1)).filter(|c| c.len() > 1).collect();
    for (c, chunk) in chunks.iter().enumerate() {
        let mut x = base.embed(chunk)?;
        let n = chunk.len();
        for layer in 0..layers {
            let w = base.block_weights(layer)?;
            let mut inputs: Vec<(&'static str, Option<usize>, Vec<f32>)> = Vec::new();
            base.forward_block_observed(&w, &mut x, n, &mut |suffix, expert, input| {
                inputs.push((suffix, expert, input.to_vec()))
            })
            .with_context(|| format!("block {layer}"))?;
            for (suffix, expert, input) in inputs {
                let name = model::names::block(layer, suffix);
                let Some(i) = index(&name) else { continue };
                let (whole_b, whole_a) = (base.tensor(&name)?, artifact.tensor(&name)?);
                let (wb, wa) = match expert {
                    Some(e) => (whole_b.expert(e)?, whole_a.expert(e)?),
                    None => (whole_b.borrowed(), whole_a.borrowed()),
                };
                let rows = input.len() / wb.shape[1].max(1);
                let yb = linear(&input, rows, &wb)?;
                let ya = linear(&input, rows, &wa)?;
                sums[i].add(&ya, &yb, rows);
                if let Some(e) = expert {
                    expert_sums[i][e].add(&ya, &yb, rows);
                }
            }
        }
        progress(c + 1, chunks.len());
    }
    Ok(names
        .into_iter()
        .zip(sums)
        .zip(expert_sums)
        // A layer whose input the forward never showed (latent attention's
        // per-head k_b/v_b) has nothing measured: left out, not reported exact.
        .filter(|((_, s), _)| s.tokens > 0)
        .map(|((name, s), per_expert)| LayerFidelity {
            rel_error: s.rel_error(),
            cosine: s.cosine(),
            experts: if base
                .tensor_meta(&name)
                .is_ok_and(|(_, shape)| shape.len() == 3)
            {
                per_expert
                    .iter()
                    .enumerate()
                    .map(|(e, s)| ExpertFidelity {
                        expert: e,
                        tokens: s.tokens,
                        rel_error: s.rel_error(),
                        cosine: s.cosine(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            name,
        })
        .collect())
}
