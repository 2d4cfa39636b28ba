//! A block's quantization grid once its scales are fixed, and writing chosen codes
//! into it. GPTQ constrained to a GGUF type needs both: the encoder fixes each
//! block's scales (and mins) from the weights, GPTQ's error feedback then picks
//! every element's code on that grid, and the codes are written back into the
//! block without touching its scales, so llama.cpp runs the result unchanged.
//!
//! Every supported type dequantizes an element as a function of its own code
//! and its sub-block's stored scales only, so the grid of a sub-block is found by
//! probing: write code `c` everywhere, dequantize with the reference decoder, and
//! read off the value. The values are therefore exactly what the decoder
//! computes, rounding included.

use super::dequantize;
use super::k_quants::QK_K;
use crate::GgmlType;

/// Elements sharing one scale (and min) in `ty`, and the number of codes an element
/// can take; `None` for types without a code grid (floats).
pub fn grid_shape(ty: GgmlType) -> Option<(usize, usize)> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 | Q4_1 | IQ4_NL => (32, 16),
        Q5_0 | Q5_1 => (32, 32),
        Q8_0 => (32, 256),
        Q2_K => (16, 4),
        Q3_K => (16, 8),
        Q4_K | IQ4_XS => (32, 16),
        Q5_K => (32, 32),
        Q6_K => (16, 64),
        NVFP4 => (16, 16),
        MXFP4 => (32, 16),
        TQ1_0 => (256, 3),
        TQ2_0 => (256, 4),
        Q1_0 => (128, 2),
        Q2_0 => (64, 4),
        F32 | F16 | BF16 => return None,
    })
}

/// Writes 4-bit codes the Q4_0/Q4_1/IQ4_NL way into 16 bytes: element `j` in the
/// low nibble of byte `j`, element `j + 16` in its high nibble.
fn pack_nibbles_32(codes: &[u8], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (codes[j] & 0x0F) | ((codes[j + 16] & 0x0F) << 4);
    }
}

/// The fifth bits of 32 five-bit codes as Q5_0/Q5_1 store them.
fn high_bits_32(codes: &[u8]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &c) in codes.iter().enumerate() {
        qh |= (((c >> 4) & 1) as u32) << j;
    }
    qh.to_le_bytes()
}

/// Packs 2-bit values the Q2_K/Q3_K way: element `e` at byte
/// `32 (e / 128) + e % 32`, bits `2 ((e % 128) / 32)`.
fn pack_2bit_k(codes: &[u8], out: &mut [u8]) {
    out[..64].fill(0);
    for (e, &c) in codes.iter().enumerate() {
        out[32 * (e / 128) + e % 32] |= (c & 3) << (2 * ((e % 128) / 32));
    }
}

/// Packs 4-bit values the Q4_K/Q5_K way: each 64 elements share 32 bytes, low
/// nibbles first.
fn pack_4bit_k(codes: &[u8], out: &mut [u8]) {
    for c in 0..4 {
        for l in 0..32 {
            out[32 * c + l] = (codes[64 * c + l] & 0x0F) | ((codes[64 * c + l + 32] & 0x0F) << 4);
        }
    }
}

/// Replaces the codes of one block of `ty` (`block` is `ty.block_bytes()` long,
/// `codes` one per element, each below the type's code count) and keeps its
/// scales. Code `c` means: the nibble / bit pattern `c` for the 4- and 5-bit
/// types and Q2_K; `q + 128` for Q8_0's signed `q`; `q + 4` and `q + 32` for
/// the signed quants of Q3_K and Q6_K; the grid index for IQ4_NL and IQ4_XS;
/// the E2M1 nibble for NVFP4 and MXFP4; the bit for Q1_0 and `q + 1` for Q2_0.
///
/// Panics on a float type or wrong lengths (programming errors).
pub fn set_codes(ty: GgmlType, block: &mut [u8], codes: &[u8]) {
    use GgmlType::*;
    assert_eq!(block.len(), ty.block_bytes(), "block of {ty}");
    assert_eq!(codes.len(), ty.block_elems(), "codes of a {ty} block");
    match ty {
        Q4_0 | IQ4_NL => pack_nibbles_32(codes, &mut block[2..18]),
        Q4_1 => pack_nibbles_32(codes, &mut block[4..20]),
        Q5_0 => {
            block[2..6].copy_from_slice(&high_bits_32(codes));
            pack_nibbles_32(codes, &mut block[6..22]);
        }
        Q5_1 => {
            block[4..8].copy_from_slice(&high_bits_32(codes));
            pack_nibbles_32(codes, &mut block[8..24]);
        }
        Q8_0 => {
            for (b, &c) in block[2..34].iter_mut().zip(codes) {
                *b = c ^ 0x80;
            }
        }
        Q2_K => pack_2bit_k(codes, &mut block[16..80]),
        Q3_K => {
            let (hmask, rest) = block.split_at_mut(32);
            hmask.fill(0);
            for (e, &c) in codes.iter().enumerate() {
                hmask[e % 32] |= ((c >> 2) & 1) << (e / 32);
            }
            pack_2bit_k(codes, &mut rest[..64]);
        }
        Q4_K => pack_4bit_k(codes, &mut block[16..144]),
        Q5_K => {
            let qh = &mut block[16..48];
            qh.fill(0);
            for (e, &c) in codes.iter().enumerate() {
                qh[e % 32] |= ((c >> 4) & 1) << (e / 32);
            }
            pack_4bit_k(codes, &mut block[48..176]);
        }
        Q6_K => {
            let (ql, rest) = block.split_at_mut(128);
            let qh = &mut rest[..64];
            ql.fill(0);
            qh.fill(0);
            for (e, &c) in codes.iter().enumerate() {
                let (n, r) = (e / 128, e % 128);
                let (k, l) = (r / 32, r % 32);
                ql[64 * n + l + 32 * (k % 2)] |= (c & 0x0F) << (4 * (k / 2));
                qh[32 * n + l] |= ((c >> 4) & 3) << (2 * k);
            }
        }
        IQ4_XS => {
            for ib in 0..QK_K / 32 {
                pack_nibbles_32(
                    &codes[32 * ib..32 * ib + 32],
                    &mut block[8 + 16 * ib..8 + 16 * ib + 16],
                );
            }
        }
        MXFP4 => super::encode::nvfp4::pack_fp4(codes, &mut block[1..17]),
        TQ1_0 => super::encode::ternary::pack_trits(codes, &mut block[..52]),
        TQ2_0 => super::encode::ternary::pack_tq2(codes, &mut block[..64]),
        NVFP4 => {
            for (s, c) in codes.chunks_exact(16).enumerate() {
                super::encode::nvfp4::pack_fp4_sub_block(c, &mut block[4 + 8 * s..12 + 8 * s]);
            }
        }
        Q1_0 => {
            block[2..18].fill(0);
            for (j, &c) in codes.iter().enumerate() {
                block[2 + j / 8] |= (c & 1) << (j % 8);
            }
        }
        Q2_0 => super::encode::low_bit::pack_2bit(codes, &mut block[2..18]),
        F32 | F16 | BF16 => panic!("{ty} has no codes"),
    }
}

/// The values every code takes in each sub-block of one encoded block:
/// `levels[s · n_codes + c]` is what the decoder gives an element of sub-block
/// `s` whose code is `c`. Panics on a float type or a wrong block length.
pub fn block_levels(ty: GgmlType, block: &[u8]) -> Vec<f32> {
    let (sub, n_codes) = grid_shape(ty).unwrap_or_else(|| panic!("{ty} has no code grid"));
    let elems = ty.block_elems();
    let n_sub = elems / sub;
    let mut probe = block.to_vec();
    let mut codes = vec![0u8; elems];
    let mut values = vec![0f32; elems];
    let mut levels = vec![0f32; n_sub * n_codes];
    for c in 0..n_codes {
        codes.fill(c as u8);
        set_codes(ty, &mut probe, &codes);
        dequantize(ty, &probe, &mut values).expect("one whole block");
        for s in 0..n_sub {
            levels[s * n_codes + c] = values[s * sub];
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quants::quantize_to_vec;

    /// Encoding random data, reading each element's code off the probed grid and
    /// writing those codes back over scrambled ones must decode to the same values:
    /// proves `set_codes` is the exact inverse of every decoder's code layout and
    /// `block_levels` gives the decoder's own values.
    #[test]
    fn codes_read_off_the_grid_rebuild_every_block() {
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        for ty in crate::types::ALL_TYPES
            .into_iter()
            .filter(|t| !t.is_float())
        {
            let (sub, n_codes) = grid_shape(ty).unwrap();
            let elems = ty.block_elems();
            for _ in 0..20 {
                let x: Vec<f32> = (0..elems).map(|_| next() * 3.0).collect();
                let block = quantize_to_vec(ty, &x, elems, None).unwrap();
                let mut decoded = vec![0f32; elems];
                dequantize(ty, &block, &mut decoded).unwrap();
                let levels = block_levels(ty, &block);
                let codes: Vec<u8> = decoded
                    .iter()
                    .enumerate()
                    .map(|(e, &y)| {
                        let row = &levels[(e / sub) * n_codes..(e / sub + 1) * n_codes];
                        row.iter()
                            .position(|&v| v.to_bits() == y.to_bits())
                            .unwrap_or_else(|| {
                                panic!("{ty}: element {e} = {y} is not on its grid {row:?}")
                            }) as u8
                    })
                    .collect();
                let mut rebuilt = block.clone();
                // Scramble the codes first so nothing passes by leaving bytes alone.
                set_codes(ty, &mut rebuilt, &vec![(n_codes - 1) as u8; elems]);
                set_codes(ty, &mut rebuilt, &codes);
                let mut again = vec![0f32; elems];
                dequantize(ty, &rebuilt, &mut again).unwrap();
                assert_eq!(
                    again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty}"
                );
            }
        }
    }
}
