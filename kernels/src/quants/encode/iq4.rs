//! Quantizers of ggml's non-linear 4-bit types IQ4_NL and IQ4_XS (layouts in
//! [`crate::quants::iq4`]).
//!
//! Each 32 elements get a scale for the fixed grid `KVALUES_IQ4NL` by the search of
//! ggml's `quantize_row_iq4_nl_impl` (the largest element on either end of the
//! grid, fanned out by ±7 grid units, least-squares scale per assignment), then
//! polished like the other types. IQ4_NL stores that scale as f16 and re-rounds
//! every element against the stored value; IQ4_XS quantizes the eight sub-block
//! scales to signed 6-bit integers times one f16 super-scale, as the symmetric
//! k-quants do.
//!
//! Weights: with importance `qw`, `qw · sqrt(2σ² + x²)` with `σ²` the mean square of
//! the block (IQ4_NL) or super-block (IQ4_XS), as ggml; without, `sqrt(2σ² + x²)`
//! (all-ones importance) in place of ggml's `x²`, which loses to plain rounding on
//! rows with outliers.

use super::k_quants::{encode_sym_super, for_super_blocks, SymSuper};
use super::legacy::{block_qw, check_lengths, encode_symmetric, pack_nibbles};
use super::search::{mean_square, weights, DefaultWeight, Iq4, Uniform};
use crate::quants::iq4::{IQ4_NL_BYTES, IQ4_XS_BYTES, QK4_NL};

/// Quantizes whole blocks of `src` to IQ4_NL (`y = d · grid[q]`).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 32-element blocks, `dst` exactly their 18-byte blocks
/// and `importance` as long as `src`.
pub fn quantize_iq4_nl(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    check_lengths(src, importance, dst, QK4_NL, IQ4_NL_BYTES);
    let mut w = [0f32; QK4_NL];
    for (b, (x, out)) in src
        .chunks_exact(QK4_NL)
        .zip(dst.chunks_exact_mut(IQ4_NL_BYTES))
        .enumerate()
    {
        let sigma2 = 2.0 * mean_square(x);
        weights(
            x,
            block_qw(importance, b, QK4_NL),
            sigma2,
            DefaultWeight::Sqrt,
            &mut w,
        );
        let mut q = [0u8; QK4_NL];
        let d = encode_symmetric(x, &w, Iq4, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        pack_nibbles(&q, &mut out[2..18]);
    }
}

/// Quantizes whole super-blocks of `src` to IQ4_XS (`y = (d · (ls - 32)) ·
/// grid[q]`, 6-bit `ls` per 32 elements).
///
/// Same contract as [`quantize_iq4_nl`], with 256-element super-blocks of 136
/// bytes.
pub fn quantize_iq4_xs(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let sgrid = Uniform { lo: -32, hi: 31 };
    for_super_blocks(
        src,
        importance,
        dst,
        IQ4_XS_BYTES,
        2.0,
        DefaultWeight::Sqrt,
        false,
        |x, w, out| {
            write_iq4_xs(&encode_sym_super(x, w, 32, Iq4, sgrid), out);
        },
    );
}

/// Writes one IQ4_XS block (136 bytes) from its stored form (scale indices 0..64
/// for -32..=31).
pub(crate) fn write_iq4_xs(s: &SymSuper, out: &mut [u8]) {
    {
        out[0..2].copy_from_slice(&s.d.to_le_bytes());
        // Index u (0..64) is the scale u - 32, stored as u.
        let mut scales_h = 0u16;
        let mut scales_l = [0u8; 4];
        for (ib, &u) in s.ls[..8].iter().enumerate() {
            scales_l[ib / 2] |= (u & 0x0F) << (4 * (ib % 2));
            scales_h |= ((u >> 4) as u16) << (2 * ib);
        }
        out[2..4].copy_from_slice(&scales_h.to_le_bytes());
        out[4..8].copy_from_slice(&scales_l);
        for (ib, q) in s.q.chunks_exact(32).enumerate() {
            pack_nibbles(q, &mut out[8 + 16 * ib..24 + 16 * ib]);
        }
    }
}
