//! Dequantization of NVFP4 (ggml type 40): NVIDIA's 4-bit float format as
//! llama.cpp stores it.
//!
//! A block holds 64 elements in 36 bytes: `d: [u8; 4]`, one UE4M3 scale per
//! sub-block of 16, then `qs: [u8; 32]`, 8 bytes per sub-block. Byte `j` of a
//! sub-block holds element `j` in its low nibble and element `j + 8` in its high
//! nibble. A nibble is an E2M1 value (sign bit 3, magnitudes 0, 0.5, 1, 1.5, 2, 3,
//! 4, 6); ggml keeps them doubled as integers ([`KVALUES_FP4`]) and halves the
//! scale instead, so an element is `KVALUES_FP4[q] · ue4m3(d)` with
//! [`ue4m3_to_f32`] exactly ggml's `ggml_ue4m3_to_fp32`.
//!
//! llama.cpp multiplies a layer's output by an optional per-tensor f32
//! `NAME.scale` tensor (shape {1}, ModelOpt's "weight_scale_2"); that factor is
//! applied by the model reader, not here.

/// Elements per NVFP4 block.
pub const QK_NVFP4: usize = 64;
/// Elements per sub-block (one scale each).
pub const QK_NVFP4_SUB: usize = 16;
/// Bytes per NVFP4 block.
pub const NVFP4_BYTES: usize = 36;

/// E2M1 values doubled (ggml's `kvalues_fp4`): codes 0..8 positive, 8..16 their
/// negatives (code 8 is -0).
pub const KVALUES_FP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// The value of a UE4M3 scale byte, halved (to go with the doubled
/// [`KVALUES_FP4`]): 4 exponent bits (bias 7) and 3 mantissa bits, subnormals
/// below exponent 1, `0x00` and `0x7F` (E4M3's NaN) read as 0; bit 7 is ignored,
/// as ggml does.
#[inline(always)]
pub fn ue4m3_to_f32(x: u8) -> f32 {
    if x == 0 || x == 0x7F {
        return 0.0;
    }
    let exp = ((x >> 3) & 0xF) as i32;
    let man = (x & 7) as f32;
    // Powers of two are exact, so these products round exactly as ldexpf does.
    let raw = if exp == 0 {
        man * f32::powi(2.0, -9)
    } else {
        (1.0 + man / 8.0) * f32::powi(2.0, exp - 7)
    };
    raw * 0.5
}

/// Dequantizes NVFP4 blocks: `y = KVALUES_FP4[q] · ue4m3(d_sub)`.
///
/// `src` must hold exactly `dst.len() / 64` blocks of 36 bytes.
pub fn dequantize_nvfp4(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / NVFP4_BYTES * QK_NVFP4, dst.len());
    for (b, y) in src
        .chunks_exact(NVFP4_BYTES)
        .zip(dst.chunks_exact_mut(QK_NVFP4))
    {
        for (s, y) in y.chunks_exact_mut(QK_NVFP4_SUB).enumerate() {
            let d = ue4m3_to_f32(b[s]);
            let qs = &b[4 + 8 * s..12 + 8 * s];
            let (lo, hi) = y.split_at_mut(8);
            for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                *l = KVALUES_FP4[(q & 0x0F) as usize] as f32 * d;
                *h = KVALUES_FP4[(q >> 4) as usize] as f32 * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's formula with ldexp spelled out, for every byte.
    #[test]
    fn ue4m3_matches_ggml_formula_on_every_byte() {
        for x in 0..=255u8 {
            let want = if x == 0 || x == 0x7F {
                0.0
            } else {
                let exp = ((x >> 3) & 0xF) as i32;
                let man = (x & 7) as f64;
                let raw = if exp == 0 {
                    man / 512.0
                } else {
                    (1.0 + man / 8.0) * 2f64.powi(exp - 7)
                };
                (raw * 0.5) as f32
            };
            assert_eq!(ue4m3_to_f32(x).to_bits(), want.to_bits(), "byte {x:#04x}");
        }
        // The largest finite scale (0x7E: 448 in E4M3), halved.
        assert_eq!(ue4m3_to_f32(0x7E), 224.0);
    }
}
