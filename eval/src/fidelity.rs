//! Per-layer fidelity of an artifact against its base: for every linear layer,
//! the artifact's weights and the base's applied to the same inputs (the base
//! model's own activations on calibration text), compared by relative error
//! `‖Y_a − Y_b‖ / ‖Y_b‖` and cosine `⟨Y_a, Y_b⟩ / (‖Y_a‖ ‖Y_b‖)` over all outputs.
//! Layers whose shapes differ (structured cuts) are skipped.

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
}

#[derive(Default, Clone, Copy)]
struct Sums {
    diff: f64,
    base: f64,
    art: f64,
    dot: f64,
}

/// Runs `base` on `tokens` in chunks of `ctx` and compares each linear of
/// `artifact` with the base's on the base's inputs. Layers missing from the
/// artifact, or of another shape, are left out. `progress(chunk, total)`.
pub fn output_fidelity(
    base: &Model,
    artifact: &Model,
    tokens: &[u32],
    ctx: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LayerFidelity>> {
    base.config
        .refuse_moe("per-layer output fidelity (--calib)")?;
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
    let mut sums = vec![Sums::default(); names.len()];
    let index = |name: &str| names.iter().position(|n| n == name);
    let chunks: Vec<&[u32]> = tokens.chunks(ctx.max(1)).filter(|c| c.len() > 1).collect();
    for (c, chunk) in chunks.iter().enumerate() {
        let mut x = base.embed(chunk)?;
        let n = chunk.len();
        for layer in 0..layers {
            let w = base.block_weights(layer)?;
            let mut inputs: Vec<(&'static str, Vec<f32>)> = Vec::new();
            base.forward_block_observed(&w, &mut x, n, &mut |suffix, _, input| {
                inputs.push((suffix, input.to_vec()))
            })
            .with_context(|| format!("block {layer}"))?;
            for (suffix, input) in inputs {
                let name = model::names::block(layer, suffix);
                let Some(i) = index(&name) else { continue };
                let yb = linear(&input, n, &base.tensor(&name)?)?;
                let ya = linear(&input, n, &artifact.tensor(&name)?)?;
                let s = &mut sums[i];
                for (&a, &b) in ya.iter().zip(&yb) {
                    let (a, b) = (a as f64, b as f64);
                    s.diff += (a - b) * (a - b);
                    s.base += b * b;
                    s.art += a * a;
                    s.dot += a * b;
                }
            }
        }
        progress(c + 1, chunks.len());
    }
    Ok(names
        .into_iter()
        .zip(sums)
        .map(|(name, s)| LayerFidelity {
            name,
            rel_error: (s.diff / s.base.max(f64::MIN_POSITIVE)).sqrt(),
            cosine: s.dot / (s.base * s.art).sqrt().max(f64::MIN_POSITIVE),
        })
        .collect())
}
