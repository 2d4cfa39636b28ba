//! AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before
//! round-to-nearest. Channels that carry large activations are scaled up in the
//! weight (and their input scaled down by the same factor, folded into the
//! preceding RMSNorm gain or linear), so their weights get finer steps:
//!
//! ```text
//! s_j = mean|x_j|^α, normalised by sqrt(max s · min s);  α on a grid of 20 in [0, 1)
//! W' = W · diag(s),  x' = x / s   (the float product is unchanged)
//! α* = argmin_α  Σ_layers ‖X Wᵀ − X' Q(W')ᵀ‖²
//! ```
//!
//! The output error of each candidate is computed from the input Hessian,
//! `tr(ΔW H ΔWᵀ)` with `ΔW = W − Q(W diag s) diag(1/s)`, so the search needs no
//! extra forward passes. `α = 0` is plain rounding, so the chosen scales never do
//! worse than RTN on this measure. Clipping is the grid's own per-group search
//! ([`Grid::Int`]'s `clip`).
//!
//! Where a scale may be folded is architecture knowledge: the description lists
//! its exact folds (`Arch::scale_folds`, the norm → linears table llm-compressor
//! keeps per architecture), and [`fold`] makes exactly those.

use crate::gptq::{rtn, Grid};
use anyhow::{Context, Result};
use model::arch::{Arch, Slot};
use model::calib::factor::output_error;
use model::llama::BlockWeights;
use model::Tensor;

/// The chosen scales of one group of linears sharing an input.
#[derive(Debug, Clone)]
pub struct AwqScales {
    /// Per input column: the weight columns are multiplied by it, the input divided.
    pub scales: Vec<f32>,
    /// The chosen exponent.
    pub alpha: f32,
    /// Summed output error with `α = 0` (plain rounding).
    pub rtn_error: f64,
    /// Summed output error with the chosen scales.
    pub error: f64,
}

/// The normalised scales `mean|x|^α / sqrt(max · min)`.
fn scales_for(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = mean_abs
        .iter()
        .map(|&m| m.max(1e-4).powf(alpha).max(1e-4))
        .collect();
    let (mx, mn) = s
        .iter()
        .fold((f32::MIN, f32::MAX), |(a, b), &v| (a.max(v), b.min(v)));
    let norm = (mx * mn).sqrt();
    s.iter().map(|v| v / norm).collect()
}

/// `w · diag(s)` for a `rows × s.len()` matrix.
pub fn scale_columns(w: &[f32], s: &[f32]) -> Vec<f32> {
    w.chunks(s.len())
        .flat_map(|row| row.iter().zip(s).map(|(x, s)| x * s))
        .collect()
}

/// The summed output error of rounding `ws` (each `rows × cols`) after scaling
/// their columns by `s`, on inputs with Hessian `h` (f32, `cols × cols`).
fn scaled_error(ws: &[&[f32]], h: &[f32], s: &[f32], grid_of: &dyn Fn(usize) -> Grid) -> f64 {
    let cols = s.len();
    let importance: Vec<f32> = (0..cols).map(|j| h[j * cols + j] / (s[j] * s[j])).collect();
    ws.iter()
        .enumerate()
        .map(|(i, w)| {
            // The clip search belongs to the final rounding, not to every α.
            let grid = match grid_of(i) {
                Grid::Int {
                    bits, group, sym, ..
                } => Grid::Int {
                    bits,
                    group,
                    sym,
                    clip: false,
                },
                g => g,
            };
            let q = rtn(&scale_columns(w, s), cols, &grid, Some(&importance));
            let back: Vec<f32> = q
                .values
                .chunks(cols)
                .flat_map(|row| row.iter().zip(s).map(|(x, s)| x / s))
                .collect();
            output_error(w, Some(&back), h, cols)
        })
        .sum()
}

/// Searches the scales of the linears `ws` (each `rows_i × cols`, sharing one
/// input with Hessian `h` and mean absolute activation `mean_abs`), linear `i`
/// rounded on `grid_of(i)`.
pub fn search_scales(
    ws: &[&[f32]],
    h: &[f32],
    mean_abs: &[f32],
    grid_of: &dyn Fn(usize) -> Grid,
) -> AwqScales {
    let cols = mean_abs.len();
    let ones = vec![1f32; cols];
    let rtn_error = scaled_error(ws, h, &ones, grid_of);
    let mut best = AwqScales {
        scales: ones,
        alpha: 0.0,
        rtn_error,
        error: rtn_error,
    };
    for i in 1..20 {
        let alpha = i as f32 / 20.0;
        let s = scales_for(mean_abs, alpha);
        let err = scaled_error(ws, h, &s, grid_of);
        if err < best.error {
            best = AwqScales {
                scales: s,
                alpha,
                rtn_error,
                error: err,
            };
        }
    }
    best
}

/// `w`'s rows divided by `s` (one factor per row).
fn divide_rows(w: &[f32], s: &[f32]) -> Vec<f32> {
    let cols = w.len() / s.len();
    w.chunks(cols)
        .zip(s)
        .flat_map(|(row, &s)| row.iter().map(move |x| x / s))
        .collect()
}

/// One fold with its scales: the producer of an input (a norm gain, or a
/// linear's rows), the linears reading that input, and the per-channel scales.
pub struct Fold<'s> {
    /// The producer: its gain (or its rows) is divided by the scales.
    pub from: Slot,
    /// The consumers: their weight columns are multiplied by the scales.
    pub to: &'static [Slot],
    /// One scale per channel of the shared input.
    pub scales: &'s [f32],
}

/// What AWQ does on `arch`, for the log: which linears' input scales fold into
/// what (the description's exact folds), and which linears are only rounded
/// because nothing before them can absorb a scale exactly.
pub fn folds_said(arch: &Arch) -> String {
    let short = |slot: Slot| {
        arch.slot(slot).map_or(format!("{slot:?}"), |s| {
            s.gguf.trim_end_matches(".weight").to_owned()
        })
    };
    let folded: Vec<Slot> = arch
        .scale_folds
        .iter()
        .flat_map(|(_, to)| to.iter().copied())
        .collect();
    let folds: Vec<String> = arch
        .scale_folds
        .iter()
        .map(|&(from, to)| {
            let to: Vec<String> = to.iter().map(|&s| short(s)).collect();
            format!("{} into {}", to.join(", "), short(from))
        })
        .collect();
    let plain: Vec<String> = arch
        .block
        .iter()
        .filter(|s| s.role == model::arch::Role::Linear)
        .filter_map(|s| s.slot)
        .filter(|s| !folded.contains(s))
        .map(short)
        .collect();
    let mut said = format!(
        "AWQ ({}): folds the input scales of {}",
        arch.name,
        folds.join("; ")
    );
    if !plain.is_empty() {
        said += &format!(
            "; {} get no scales (nothing before them absorbs one exactly) and are only rounded",
            plain.join(", ")
        );
    }
    said
}

/// Folds scales into a block, each fold as the architecture's description lists
/// it (`scale_folds`): weight columns times the scale, the producer of their
/// input divided by it. The float block computes the same function, up to
/// rounding. Returns f32 weights.
pub fn fold(w: &BlockWeights, folds: &[Fold]) -> Result<BlockWeights<'static>> {
    let m = |t: &Tensor| -> Result<Tensor<'static>> {
        Ok(Tensor::from_f32(&t.name, t.shape.clone(), &t.to_f32()?))
    };
    // Biases and per-head norms act on the projections' outputs, which the
    // input-side scales leave unchanged.
    let mut out = BlockWeights {
        layer: w.layer,
        attn_norm: w.attn_norm.clone(),
        q: m(&w.q)?,
        k: m(&w.k)?,
        v: m(&w.v)?,
        o: m(&w.o)?,
        attn_post_norm: w.attn_post_norm.clone(),
        ffn_norm: w.ffn_norm.clone(),
        ffn_post_norm: w.ffn_post_norm.clone(),
        gate: m(&w.gate)?,
        up: m(&w.up)?,
        down: m(&w.down)?,
        extras: w.extras.clone(),
        router: w.router.clone(),
        shared: match &w.shared {
            None => None,
            Some([g, u, d]) => Some([m(g)?, m(u)?, m(d)?]),
        },
        router_bias: w.router_bias.clone(),
        // AWQ refuses mixtures of experts, latent attention among them.
        mla: None,
    };
    for f in folds {
        for &slot in f.to {
            let t = out
                .linear_mut(slot)
                .with_context(|| format!("AWQ folds scales into {slot:?}, which is no linear"))?;
            *t = Tensor::from_f32(
                &t.name,
                t.shape.clone(),
                &scale_columns(&t.to_f32()?, f.scales),
            );
        }
        if let Some(t) = out.linear_mut(f.from) {
            *t = Tensor::from_f32(
                &t.name,
                t.shape.clone(),
                &divide_rows(&t.to_f32()?, f.scales),
            );
        } else {
            let gain = out.gain_mut(f.from).with_context(|| {
                format!(
                    "AWQ folds scales out of {:?}, which is no norm or linear",
                    f.from
                )
            })?;
            for (g, s) in gain.iter_mut().zip(f.scales) {
                *g /= s;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folds_are_said_with_what_is_left_unscaled() {
        let s = folds_said(&model::arch::LLAMA);
        assert!(s.contains("attn_q, attn_k, attn_v into attn_norm"), "{s}");
        assert!(s.contains("attn_output get no scales"), "{s}");
    }

    #[test]
    fn scaling_helps_when_a_few_channels_carry_the_activations() {
        // 64 inputs, 4 of them with 30x the activation; weights of equal size.
        let (rows, cols, n) = (32, 64, 256);
        let mut seed = 11u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|k| rnd() * if k % cols < 4 { 30.0 } else { 1.0 })
            .collect();
        let mut h = vec![0f32; cols * cols];
        let mut mean_abs = vec![0f32; cols];
        for t in 0..n {
            for i in 0..cols {
                mean_abs[i] += x[t * cols + i].abs() / n as f32;
                for j in 0..cols {
                    h[i * cols + j] += 2.0 * x[t * cols + i] * x[t * cols + j] / n as f32;
                }
            }
        }
        let grid = |_| Grid::Int {
            bits: 3,
            group: 32,
            sym: true,
            clip: false,
        };
        let r = search_scales(&[&w], &h, &mean_abs, &grid);
        assert!(r.alpha > 0.0, "{r:?}");
        assert!(
            r.error < 0.95 * r.rtn_error,
            "{} vs {}",
            r.error,
            r.rtn_error
        );
        // Scaling the weight's columns by s and the input by 1/s is exact in floats
        // up to rounding: the product is unchanged.
        let ws = scale_columns(&w, &r.scales);
        for t in 0..4 {
            let (mut a, mut b) = (0f64, 0f64);
            for c in 0..cols {
                a += (w[c] * x[t * cols + c]) as f64;
                b += (ws[c] * (x[t * cols + c] / r.scales[c])) as f64;
            }
            assert!((a - b).abs() < 1e-4 * a.abs().max(1.0));
        }
    }
}
