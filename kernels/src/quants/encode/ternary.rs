//! Quantizers of TQ1_0 and TQ2_0 (layouts in [`crate::quants::ternary`]).
//!
//! llama.cpp's reference sets `d = max |x|` and rounds `x / d` to {-1, 0, 1},
//! ignoring the importance matrix. Here both are the search of the symmetric
//! legacy types over their grid with the legacy weights (`qw · sqrt(σ² + x²)`
//! with importance `qw`, `sqrt(σ² + x²)` without): TQ1_0 over `{-1, 0, 1}`, and
//! TQ2_0 over `{-1, 0, 1, 2}`, as its 2-bit codes decode code 3 to `2d` in every
//! llama.cpp kernel (its grid is Q2_0's, in blocks of 256; negative scales
//! mirror it).

use super::legacy::{encode_symmetric, for_blocks};
use super::low_bit::pack_2bit;
use super::search::Uniform;
use crate::quants::ternary::{tq1_0_positions, QK_TQ, TQ1_0_BYTES, TQ2_0_BYTES};

/// Packs 256 trits (0..3) the TQ1_0 way into 52 bytes (`qs` then `qh`).
pub(crate) fn pack_trits(t: &[u8], out: &mut [u8]) {
    let mut numbers = [0u16; 52];
    for (byte, n, e) in tq1_0_positions() {
        // Trit n is the n-th most significant of five (qh bytes carry four and
        // a zero last trit).
        numbers[byte] += t[e] as u16 * 3u16.pow(4 - n as u32);
    }
    for (o, &v) in out.iter_mut().zip(&numbers) {
        *o = (v * 256).div_ceil(243) as u8;
    }
}

/// Packs 256 two-bit codes the TQ2_0 way: element `128 c + 32 l + m` at bits
/// `2 l` of byte `32 c + m`.
pub(crate) fn pack_tq2(q: &[u8], out: &mut [u8]) {
    let mut reordered = [0u8; QK_TQ];
    for (e, &c) in q.iter().enumerate() {
        let (blk, l, m) = (e / 128, (e % 128) / 32, e % 32);
        reordered[4 * (32 * blk + m) + l] = c;
    }
    pack_2bit(&reordered, out);
}

/// Quantizes whole blocks of `src` to TQ1_0 (`y = (t − 1) · d`, `t` in 0..3).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 256-element blocks, `dst` exactly their 54-byte
/// blocks and `importance` as long as `src`.
pub fn quantize_tq1_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -1, hi: 1 };
    for_blocks::<QK_TQ>(src, importance, dst, TQ1_0_BYTES, |x, w, out| {
        let mut t = [0u8; QK_TQ];
        let d = encode_symmetric(x, w, grid, &mut t);
        pack_trits(&t, &mut out[..52]);
        out[52..].copy_from_slice(&d.to_le_bytes());
    });
}

/// Quantizes whole blocks of `src` to TQ2_0 (`y = (q − 1) · d`, `q` in 0..4).
///
/// Same contract as [`quantize_tq1_0`], with 66-byte blocks.
pub fn quantize_tq2_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -1, hi: 2 };
    for_blocks::<QK_TQ>(src, importance, dst, TQ2_0_BYTES, |x, w, out| {
        let mut q = [0u8; QK_TQ];
        let d = encode_symmetric(x, w, grid, &mut q);
        pack_tq2(&q, &mut out[..64]);
        out[64..].copy_from_slice(&d.to_le_bytes());
    });
}
