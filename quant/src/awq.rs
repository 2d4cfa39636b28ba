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

use crate::gptq::{output_error, rtn, Grid};
use anyhow::Result;
use kernels::GgmlType;
use model::arch::Slot;
use model::llama::BlockWeights;
use model::Tensor;
use std::borrow::Cow;

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

/// An f32 matrix tensor.
fn f32_matrix(name: &str, shape: &[usize], values: &[f32]) -> Tensor<'static> {
    Tensor {
        name: name.to_owned(),
        ty: GgmlType::F32,
        shape: shape.to_vec(),
        data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// The folds [`fold`] makes: (producer, the linears reading its output), as the
/// architecture descriptions list them in `scale_folds`.
pub const FOLDS: [(Slot, &[Slot]); 3] = [
    (Slot::AttnNorm, &[Slot::Q, Slot::K, Slot::V]),
    (Slot::FfnNorm, &[Slot::Gate, Slot::Up]),
    (Slot::Up, &[Slot::Down]),
];

/// The scales of one block: q/k/v inputs (folded into the attention norm),
/// gate/up inputs (into the MLP norm) and down inputs (into up's rows).
#[derive(Debug, Clone)]
pub struct BlockScales {
    /// Per hidden channel, for q, k, v.
    pub attn: Vec<f32>,
    /// Per hidden channel, for gate and up.
    pub ffn: Vec<f32>,
    /// Per intermediate channel, for down.
    pub down: Vec<f32>,
}

/// Folds `s` into a block: weight columns times the scale, the producer of
/// their input (norm gain, or up's rows) divided by it. The float block computes
/// the same function, up to rounding. Returns f32 weights.
pub fn fold(w: &BlockWeights, s: &BlockScales) -> Result<BlockWeights<'static>> {
    let m = |t: &Tensor, values: Vec<f32>| f32_matrix(&t.name, &t.shape, &values);
    let up = scale_columns(&w.up.to_f32()?, &s.ffn);
    Ok(BlockWeights {
        attn_norm: w
            .attn_norm
            .iter()
            .zip(&s.attn)
            .map(|(g, s)| g / s)
            .collect(),
        q: m(&w.q, scale_columns(&w.q.to_f32()?, &s.attn)),
        k: m(&w.k, scale_columns(&w.k.to_f32()?, &s.attn)),
        v: m(&w.v, scale_columns(&w.v.to_f32()?, &s.attn)),
        o: m(&w.o, w.o.to_f32()?),
        ffn_norm: w.ffn_norm.iter().zip(&s.ffn).map(|(g, s)| g / s).collect(),
        gate: m(&w.gate, scale_columns(&w.gate.to_f32()?, &s.ffn)),
        up: m(&w.up, divide_rows(&up, &s.down)),
        down: m(&w.down, scale_columns(&w.down.to_f32()?, &s.down)),
        // Biases and per-head norms act on the projections' outputs, which the
        // input-side scales leave unchanged.
        extras: w.extras.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
