//! Dequantization of MXFP4 (ggml type 39): the OCP microscaling 4-bit float
//! format as llama.cpp stores it (gpt-oss's expert weights).
//!
//! A block holds 32 elements in 17 bytes: `e`, an E8M0 scale (a power of two,
//! exponent bias 127), then `qs: [u8; 16]`. Byte `j` holds element `j` in its low
//! nibble and element `j + 16` in its high nibble. A nibble is an E2M1 value, kept
//! doubled as an integer ([`KVALUES_FP4`], shared with NVFP4), so the scale is
//! halved: an element is `KVALUES_FP4[q] · 2^(e − 128)`, [`e8m0_to_f32_half`]
//! being exactly ggml's `ggml_e8m0_to_fp32_half` (subnormal for `e` < 2).

pub use super::nvfp4::KVALUES_FP4;

/// Elements per MXFP4 block.
pub const QK_MXFP4: usize = 32;
/// Bytes per MXFP4 block.
pub const MXFP4_BYTES: usize = 17;

/// The value of an E8M0 scale byte, halved: `2^(e − 128)`, built from its bits
/// as ggml does (so `e` = 0 and 1 give the subnormals 2⁻¹²⁸ and 2⁻¹²⁷).
#[inline(always)]
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        ((e - 1) as u32) << 23
    };
    f32::from_bits(bits)
}

/// Dequantizes MXFP4 blocks: `y = KVALUES_FP4[q] · 2^(e − 128)`.
///
/// `src` must hold exactly `dst.len() / 32` blocks of 17 bytes.
pub fn dequantize_mxfp4(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / MXFP4_BYTES * QK_MXFP4, dst.len());
    for (b, y) in src
        .chunks_exact(MXFP4_BYTES)
        .zip(dst.chunks_exact_mut(QK_MXFP4))
    {
        let d = e8m0_to_f32_half(b[0]);
        let (lo, hi) = y.split_at_mut(QK_MXFP4 / 2);
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[1..]) {
            *l = KVALUES_FP4[(q & 0x0F) as usize] as f32 * d;
            *h = KVALUES_FP4[(q >> 4) as usize] as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e8m0_halved_is_two_to_the_e_minus_128_for_every_byte() {
        for e in 0..=255u8 {
            assert_eq!(
                e8m0_to_f32_half(e) as f64,
                2f64.powi(e as i32 - 128),
                "e = {e}"
            );
        }
    }

    #[test]
    fn a_block_decodes_low_nibbles_first_then_high() {
        let mut block = [0u8; MXFP4_BYTES];
        block[0] = 128; // d = 1
        block[1] = 0x75; // element 0: code 5 (6), element 16: code 7 (12)
        block[16] = 0x9F; // element 15: code 15 (-12), element 31: code 9 (-1)
        let mut y = [0f32; QK_MXFP4];
        dequantize_mxfp4(&block, &mut y);
        assert_eq!((y[0], y[16], y[15], y[31]), (6.0, 12.0, -12.0, -1.0));
        assert!(y[1..15].iter().all(|&v| v == 0.0));
    }
}
