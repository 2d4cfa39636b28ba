//! Dequantization of ggml's 4-bit non-linear types IQ4_NL and IQ4_XS: each 4-bit
//! index selects a value from the fixed grid [`KVALUES_IQ4NL`], scaled per block.
//!
//! Block layouts (little-endian, as in ggml's `ggml-common.h`):
//!
//! | type | elems | bytes | layout |
//! | --- | --- | --- | --- |
//! | IQ4_NL | 32 | 18 | `d: f16`, `qs: [u8; 16]` |
//! | IQ4_XS | 256 | 136 | `d: f16`, `scales_h: u16`, `scales_l: [u8; 4]`, `qs: [u8; 128]` |
//!
//! In both, each 16 bytes of `qs` cover 32 elements: low nibbles are elements
//! 0..16, high nibbles 16..32. IQ4_XS gives each 32 elements a 6-bit scale `ls`
//! (low 4 bits from the nibbles of `scales_l`, high 2 bits from `scales_h`) and
//! computes `(d * (ls - 32)) * grid[q]`, as ggml's `dequantize_row_iq4_xs` does.

use super::f16_le;

/// The IQ4 value grid (ggml's `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// [`KVALUES_IQ4NL`] as f32 (exact).
const KVALUES_F32: [f32; 16] = {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = KVALUES_IQ4NL[i] as f32;
        i += 1;
    }
    out
};

/// Elements per IQ4_NL block.
pub const QK4_NL: usize = 32;
/// Bytes per IQ4_NL block.
pub const IQ4_NL_BYTES: usize = 18;
/// Elements per IQ4_XS super-block.
pub const QK_K: usize = 256;
/// Bytes per IQ4_XS block.
pub const IQ4_XS_BYTES: usize = 136;

/// Writes `dl * grid[q]` for the 32 elements held by 16 bytes of `qs`.
#[inline(always)]
fn grid32(dl: f32, qs: &[u8; 16], y: &mut [f32]) {
    let (lo, hi) = y.split_at_mut(16);
    let lo: &mut [f32; 16] = lo.try_into().unwrap();
    let hi: &mut [f32; 16] = hi.try_into().unwrap();
    for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
        *l = dl * KVALUES_F32[(q & 0x0F) as usize];
        *h = dl * KVALUES_F32[(q >> 4) as usize];
    }
}

/// Dequantizes IQ4_NL blocks: `y = d * grid[q]`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 18 bytes.
pub fn dequantize_iq4_nl(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / IQ4_NL_BYTES * QK4_NL, dst.len());
    for (b, y) in src
        .chunks_exact(IQ4_NL_BYTES)
        .zip(dst.chunks_exact_mut(QK4_NL))
    {
        let b: &[u8; IQ4_NL_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        grid32(d, b[2..18].try_into().unwrap(), y);
    }
}

/// Dequantizes IQ4_XS blocks: `y = (d * (ls - 32)) * grid[q]` with a 6-bit `ls`
/// per 32 elements.
///
/// Sub-block `ib` (0..8) has `ls = ((scales_l[ib / 2] >> 4 * (ib % 2)) & 15) |
/// (((scales_h >> 2 * ib) & 3) << 4)` and its quants in `qs[16 * ib..16 * ib + 16]`.
///
/// `src` must hold exactly `dst.len() / 256` blocks of 136 bytes.
pub fn dequantize_iq4_xs(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / IQ4_XS_BYTES * QK_K, dst.len());
    for (b, y) in src
        .chunks_exact(IQ4_XS_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let b: &[u8; IQ4_XS_BYTES] = b.try_into().unwrap();
        let d = f16_le(b[0], b[1]);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let scales_l: &[u8; 4] = b[4..8].try_into().unwrap();
        for (ib, (y, qs)) in y
            .chunks_exact_mut(32)
            .zip(b[8..].chunks_exact(16))
            .enumerate()
        {
            let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            let ls = (low | (high << 4)) as i32 - 32;
            let dl = d * ls as f32;
            grid32(dl, qs.try_into().unwrap(), y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn iq4_nl_every_grid_value() {
        // Element j (low nibble) picks index j, element 16 + j picks 15 - j.
        let mut src = h(0.5).to_vec();
        for j in 0..16u8 {
            src.push(j | ((15 - j) << 4));
        }
        let mut y = [0f32; 32];
        dequantize_iq4_nl(&src, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * KVALUES_IQ4NL[j] as f32);
            assert_eq!(y[16 + j], 0.5 * KVALUES_IQ4NL[15 - j] as f32);
        }
    }

    #[test]
    fn iq4_xs_sub_block_scales() {
        let ls: [u8; 8] = [0, 63, 32, 1, 40, 17, 31, 50];
        let mut scales_l = [0u8; 4];
        let mut scales_h = 0u16;
        for (ib, &v) in ls.iter().enumerate() {
            scales_l[ib / 2] |= (v & 0x0F) << (4 * (ib % 2));
            scales_h |= ((v >> 4) as u16) << (2 * ib);
        }
        let idx: [u8; 256] = std::array::from_fn(|e| ((e * 7 + e / 11) % 16) as u8);
        let mut qs = [0u8; 128];
        for (e, &v) in idx.iter().enumerate() {
            qs[16 * (e / 32) + e % 16] |= v << (4 * ((e % 32) / 16));
        }
        let mut src = h(0.25).to_vec();
        src.extend_from_slice(&scales_h.to_le_bytes());
        src.extend_from_slice(&scales_l);
        src.extend_from_slice(&qs);
        let mut y = [0f32; 256];
        dequantize_iq4_xs(&src, &mut y);
        for e in 0..256 {
            let dl = 0.25 * (ls[e / 32] as i32 - 32) as f32;
            let want = dl * KVALUES_IQ4NL[idx[e] as usize] as f32;
            assert_eq!(y[e].to_bits(), want.to_bits(), "element {e}");
        }
    }
}
