//! Quantizers of ggml's 1- and 2-bit types Q1_0 and Q2_0 (layouts in
//! [`crate::quants::low_bit`]).
//!
//! llama.cpp makes both by plain rounding and ignores the importance matrix
//! (Q1_0: `d = mean |x|`, Q2_0: `d = max |x|`). Here both minimise a weighted
//! error `Σ w (x - x̂)²`:
//!
//! - Q1_0 stores only signs, so for a positive scale the sign of `x` is always the
//!   best code and the least-squares scale is `d = Σ w |x| / Σ w`, with `w` the
//!   importance itself (without importance that is llama.cpp's `mean |x|`, the
//!   scale of least squared error; the `sqrt(σ² + x²)` factor of the other types
//!   favours large elements, which costs a 1-bit grid more than it gains). That
//!   `d` is rounded to f16 and its two neighbouring halves are tried.
//! - Q2_0's grid `{-1, 0, 1, 2} · d` is not symmetric, so the scale search also
//!   tries negative scales (the grid mirrored: `{1, 0, -1, -2} · |d|`); it is the
//!   search of the symmetric legacy types over `Uniform { lo: -1, hi: 2 }`, with
//!   their weights (`qw · sqrt(σ² + x²)` with importance `qw`, `sqrt(σ² + x²)`
//!   without).

use super::legacy::{block_qw, check_lengths, encode_symmetric, f16_value, for_blocks};
use super::search::{to_f16, Uniform};
use crate::quants::low_bit::{Q1_0_BYTES, Q2_0_BYTES, QK1_0, QK2_0};

/// Quantizes whole blocks of `src` to Q1_0 (`y = ±d`).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 128-element blocks, `dst` exactly their 18-byte
/// blocks and `importance` as long as `src`.
pub fn quantize_q1_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    check_lengths(src, importance, dst, QK1_0, Q1_0_BYTES);
    const ONES: [f32; QK1_0] = [1.0; QK1_0];
    for (b, (x, out)) in src
        .chunks_exact(QK1_0)
        .zip(dst.chunks_exact_mut(Q1_0_BYTES))
        .enumerate()
    {
        // The importance when it carries weight, else uniform.
        let w = match block_qw(importance, b, QK1_0) {
            Some(qw) if qw.iter().sum::<f32>() > 0.0 && qw.iter().all(|v| v.is_finite()) => qw,
            _ => &ONES[..],
        };
        let (mut swa, mut sw) = (0f64, 0f64);
        for (&x, &w) in x.iter().zip(w) {
            swa += w as f64 * x.abs() as f64;
            sw += w as f64;
        }
        let d = if sw > 0.0 { (swa / sw) as f32 } else { 0.0 };
        let d = if d.is_finite() { d } else { 0.0 };
        // The error of scale `d` with the codes fixed to the signs.
        let err = |d: f32| -> f64 {
            x.iter()
                .zip(w)
                .map(|(&x, &w)| w as f64 * ((x.abs() - d) as f64).powi(2))
                .sum()
        };
        let (mut bits, value) = to_f16(d);
        let mut best = err(value);
        for nb in [bits.wrapping_sub(1), bits.wrapping_add(1)] {
            let v = f16_value(nb);
            // Only finite, non-negative neighbours (0x0000 - 1 is -NaN).
            if v.is_finite() && v >= 0.0 && nb & 0x8000 == 0 {
                let e = err(v);
                if e < best {
                    (bits, best) = (nb, e);
                }
            }
        }
        out[..2].copy_from_slice(&bits.to_le_bytes());
        out[2..].fill(0);
        for (j, &v) in x.iter().enumerate() {
            // ggml's convention: non-negative (and NaN-free zero) is bit 1.
            if v >= 0.0 {
                out[2 + j / 8] |= 1 << (j % 8);
            }
        }
    }
}

/// Quantizes whole blocks of `src` to Q2_0 (`y = (q - 1) · d`, `q` in 0..4).
///
/// Same contract as [`quantize_q1_0`], with 64-element blocks of 18 bytes.
pub fn quantize_q2_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -1, hi: 2 };
    for_blocks::<QK2_0>(src, importance, dst, Q2_0_BYTES, |x, w, out| {
        let mut q = [0u8; QK2_0];
        let d = encode_symmetric(x, w, grid, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        pack_2bit(&q, &mut out[2..18]);
    });
}

/// Packs 2-bit codes the Q2_0 way: element `j` at bits `2 (j % 4)` of byte `j / 4`.
pub(crate) fn pack_2bit(q: &[u8], out: &mut [u8]) {
    for (o, q4) in out.iter_mut().zip(q.chunks_exact(4)) {
        *o = q4
            .iter()
            .enumerate()
            .fold(0u8, |acc, (k, &c)| acc | ((c & 3) << (2 * k)));
    }
}
