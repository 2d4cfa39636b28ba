//! Dequantization of ggml's ternary block types TQ1_0 and TQ2_0 (ggml types 34
//! and 35; BitNet-style weights `{-1, 0, 1} · d`), 256 elements per block with
//! one f16 scale stored last.
//!
//! | type | bytes | layout | bits per weight |
//! | --- | --- | --- | --- |
//! | TQ1_0 | 54 | `qs: [u8; 48]`, `qh: [u8; 4]`, `d: f16` | 1.6875 |
//! | TQ2_0 | 66 | `qs: [u8; 64]`, `d: f16` | 2.0625 |
//!
//! TQ1_0 packs five trits per byte (four in `qh`) as a base-3 number scaled to a
//! byte, `ceil(t · 256 / 243)`, first trit most significant; trit `n` of byte `q`
//! is `((q · 3ⁿ mod 256) · 3) >> 8`. Bytes 0..32 of `qs` hold elements
//! `32 n + m` (trit `n` of byte `m`), bytes 32..48 elements `160 + 16 n + m`,
//! and `qh[j]` elements `240 + 4 n + j`. A trit `t` is the value `(t − 1) · d`.
//!
//! TQ2_0 holds 2-bit codes `q`, value `(q − 1) · d`: byte `32 c + m`, bits
//! `2 l`, is element `128 c + 32 l + m`. Code 3 (value `2d`) is valid for every
//! llama.cpp kernel though its reference quantizer only writes 0..2 (ggml's
//! `dequantize_row_tq1_0` / `dequantize_row_tq2_0`).

use super::f16_le;

/// Elements per TQ1_0 / TQ2_0 block.
pub const QK_TQ: usize = 256;
/// Bytes per TQ1_0 block.
pub const TQ1_0_BYTES: usize = 54;
/// Bytes per TQ2_0 block.
pub const TQ2_0_BYTES: usize = 66;

/// Trit `n` (0 = most significant) of a TQ1_0 byte.
#[inline(always)]
fn trit(q: u8, n: usize) -> u8 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    ((q.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8
}

/// The element each TQ1_0 trit holds: `(byte, trit, element)` for all 256.
pub(crate) fn tq1_0_positions() -> impl Iterator<Item = (usize, usize, usize)> {
    let first = (0..5).flat_map(|n| (0..32).map(move |m| (m, n, 32 * n + m)));
    let second = (0..5).flat_map(|n| (0..16).map(move |m| (32 + m, n, 160 + 16 * n + m)));
    let high = (0..4).flat_map(|n| (0..4).map(move |j| (48 + j, n, 240 + 4 * n + j)));
    first.chain(second).chain(high)
}

/// Dequantizes TQ1_0 blocks: `y = (trit − 1) · d`.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 54 bytes.
pub fn dequantize_tq1_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / TQ1_0_BYTES * QK_TQ, dst.len());
    for (b, y) in src
        .chunks_exact(TQ1_0_BYTES)
        .zip(dst.chunks_exact_mut(QK_TQ))
    {
        let d = f16_le(b[52], b[53]);
        for (byte, n, e) in tq1_0_positions() {
            y[e] = (trit(b[byte], n) as i32 - 1) as f32 * d;
        }
    }
}

/// Dequantizes TQ2_0 blocks: `y = (q − 1) · d`.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 66 bytes.
pub fn dequantize_tq2_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / TQ2_0_BYTES * QK_TQ, dst.len());
    for (b, y) in src
        .chunks_exact(TQ2_0_BYTES)
        .zip(dst.chunks_exact_mut(QK_TQ))
    {
        let d = f16_le(b[64], b[65]);
        for (e, y) in y.iter_mut().enumerate() {
            let (c, l, m) = (e / 128, (e % 128) / 32, e % 32);
            let q = (b[32 * c + m] >> (2 * l)) & 3;
            *y = (q as i32 - 1) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 5-trit number packed as ggml packs it reads back trit by trit.
    #[test]
    fn packed_trits_read_back() {
        for t in 0..243u16 {
            let q = (t * 256).div_ceil(243) as u8;
            let mut rest = t;
            for n in (0..5).rev() {
                assert_eq!(trit(q, n) as u16, rest % 3, "t = {t}, trit {n}");
                rest /= 3;
            }
        }
    }

    #[test]
    fn positions_cover_every_element_once() {
        let mut seen = [0u8; QK_TQ];
        for (byte, n, e) in tq1_0_positions() {
            assert!(byte < 52 && n < 5);
            seen[e] += 1;
        }
        assert!(seen.iter().all(|&s| s == 1));
    }
}
