//! Dequantization of ggml's 1- and 2-bit block types Q1_0 and Q2_0 (ggml types
//! 41 and 42, llama.cpp since autumn 2026): one f16 scale per block and no min.
//!
//! Block layouts (little-endian, as `block_q1_0` / `block_q2_0` in ggml's
//! `ggml-common.h`):
//!
//! | type | elems | bytes | layout | value of code `q` |
//! | --- | --- | --- | --- | --- |
//! | Q1_0 | 128 | 18 | `d: f16`, `qs: [u8; 16]` | `q ? d : -d` |
//! | Q2_0 | 64 | 18 | `d: f16`, `qs: [u8; 16]` | `(q - 1) · d` |
//!
//! Element `j` of Q1_0 is bit `j % 8` of byte `j / 8`; element `j` of Q2_0 is bits
//! `2 (j % 4)`..`2 (j % 4) + 2` of byte `j / 4` (ggml's `dequantize_row_q1_0` /
//! `dequantize_row_q2_0`).

use super::f16_le;

/// Elements per Q1_0 block.
pub const QK1_0: usize = 128;
/// Elements per Q2_0 block.
pub const QK2_0: usize = 64;
/// Bytes per Q1_0 block.
pub const Q1_0_BYTES: usize = 18;
/// Bytes per Q2_0 block.
pub const Q2_0_BYTES: usize = 18;

/// Dequantizes Q1_0 blocks: `y = bit ? d : -d`.
///
/// `src` must hold exactly `dst.len() / 128` blocks of 18 bytes.
pub fn dequantize_q1_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q1_0_BYTES * QK1_0, dst.len());
    for (b, y) in src
        .chunks_exact(Q1_0_BYTES)
        .zip(dst.chunks_exact_mut(QK1_0))
    {
        let d = f16_le(b[0], b[1]);
        let values = [-d, d];
        for (y8, &byte) in y.chunks_exact_mut(8).zip(&b[2..18]) {
            for (k, y) in y8.iter_mut().enumerate() {
                *y = values[((byte >> k) & 1) as usize];
            }
        }
    }
}

/// Dequantizes Q2_0 blocks: `y = (q - 1) · d` with `q` in 0..4.
///
/// `src` must hold exactly `dst.len() / 64` blocks of 18 bytes.
pub fn dequantize_q2_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q2_0_BYTES * QK2_0, dst.len());
    for (b, y) in src
        .chunks_exact(Q2_0_BYTES)
        .zip(dst.chunks_exact_mut(QK2_0))
    {
        let d = f16_le(b[0], b[1]);
        for (y4, &byte) in y.chunks_exact_mut(4).zip(&b[2..18]) {
            for (k, y) in y4.iter_mut().enumerate() {
                *y = (((byte >> (2 * k)) & 3) as i32 - 1) as f32 * d;
            }
        }
    }
}
