//! Block codecs: bytes of a GGUF weight type to f32 ([`dequantize`]) and back
//! ([`quantize`], in [`encode`]).
//!
//! Layouts and arithmetic follow ggml's `ggml-quants.c` so that dequantized values
//! are bit-exact with llama.cpp and gguf-py.

pub mod encode;
pub mod grid;
pub mod iq4;
pub mod k_quants;
pub mod legacy;
pub mod low_bit;
pub mod mxfp4;
pub mod nvfp4;
pub mod ternary;

pub use encode::iq4::{quantize_iq4_nl, quantize_iq4_xs};
pub use encode::k_quants::{
    quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k,
};
pub use encode::legacy::{
    quantize_q4_0, quantize_q4_1, quantize_q5_0, quantize_q5_1, quantize_q8_0,
};
pub use encode::low_bit::{quantize_q1_0, quantize_q2_0};
pub use encode::nvfp4::{nvfp4_tensor_scale, quantize_nvfp4};
pub use encode::{quantize, quantize_bf16, quantize_f16, quantize_f32, quantize_to_vec};

use crate::{GgmlType, KernelError};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Reads a little-endian IEEE half from two bytes and widens it to f32 (exact).
#[inline(always)]
pub(crate) fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

/// Dequantizes `dst.len()` elements of type `ty` from `src` into `dst`.
///
/// `dst.len()` must be a whole number of blocks and `src` exactly that many blocks.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_sizes(ty, src.len(), dst.len())?;
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => {
            // Bulk conversion uses the F16C instructions when the CPU has them; the
            // bytes may be unaligned, so they go through a small aligned buffer.
            let mut buf = [f16::ZERO; 256];
            for (d, s) in dst.chunks_mut(256).zip(src.chunks(512)) {
                for (b, s) in buf.iter_mut().zip(s.chunks_exact(2)) {
                    *b = f16::from_le_bytes([s[0], s[1]]);
                }
                buf[..d.len()].convert_to_f32_slice(d);
            }
        }
        GgmlType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => legacy::dequantize_q4_0(src, dst),
        GgmlType::Q4_1 => legacy::dequantize_q4_1(src, dst),
        GgmlType::Q5_0 => legacy::dequantize_q5_0(src, dst),
        GgmlType::Q5_1 => legacy::dequantize_q5_1(src, dst),
        GgmlType::Q8_0 => legacy::dequantize_q8_0(src, dst),
        GgmlType::Q2_K => k_quants::dequantize_q2_k(src, dst),
        GgmlType::Q3_K => k_quants::dequantize_q3_k(src, dst),
        GgmlType::Q4_K => k_quants::dequantize_q4_k(src, dst),
        GgmlType::Q5_K => k_quants::dequantize_q5_k(src, dst),
        GgmlType::Q6_K => k_quants::dequantize_q6_k(src, dst),
        GgmlType::IQ4_NL => iq4::dequantize_iq4_nl(src, dst),
        GgmlType::IQ4_XS => iq4::dequantize_iq4_xs(src, dst),
        GgmlType::TQ1_0 => ternary::dequantize_tq1_0(src, dst),
        GgmlType::TQ2_0 => ternary::dequantize_tq2_0(src, dst),
        GgmlType::MXFP4 => mxfp4::dequantize_mxfp4(src, dst),
        GgmlType::NVFP4 => nvfp4::dequantize_nvfp4(src, dst),
        GgmlType::Q1_0 => low_bit::dequantize_q1_0(src, dst),
        GgmlType::Q2_0 => low_bit::dequantize_q2_0(src, dst),
    }
    Ok(())
}

/// The index of the first element of `src` (whole blocks of `ty`) that decodes
/// to NaN or ±Inf, if any. Decodes a few blocks at a time, so it needs no
/// buffer the size of the tensor: writers run it on every tensor before the
/// file gets its final name.
pub fn first_nonfinite(ty: GgmlType, src: &[u8]) -> Result<Option<usize>, KernelError> {
    let (elems, bytes) = (ty.block_elems(), ty.block_bytes());
    if !src.len().is_multiple_of(bytes) {
        return Err(KernelError::SizeMismatch {
            what: "source",
            ty,
            elems: src.len() / bytes * elems,
            expected: src.len() / bytes * bytes,
            got: src.len(),
        });
    }
    let blocks_per_pass = (4096 / elems).max(1);
    let mut buf = vec![0f32; blocks_per_pass * elems];
    for (pass, chunk) in src.chunks(blocks_per_pass * bytes).enumerate() {
        let out = &mut buf[..chunk.len() / bytes * elems];
        dequantize(ty, chunk, out)?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Ok(Some(pass * blocks_per_pass * elems + i));
        }
    }
    Ok(None)
}

/// Checks that `bytes` holds exactly `elems` elements of `ty` in whole blocks.
pub fn check_sizes(ty: GgmlType, bytes: usize, elems: usize) -> Result<(), KernelError> {
    let expected = ty.bytes_for(elems).ok_or(KernelError::NotBlockAligned {
        ty,
        elems,
        block: ty.block_elems(),
    })?;
    if expected != bytes {
        return Err(KernelError::SizeMismatch {
            what: "source",
            ty,
            elems,
            expected,
            got: bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVFP4, Q1_0 and Q2_0 blocks decoded by ggml's own `to_float` (the
    /// llama.cpp of `scripts/build-llama-cpp.sh`; written by
    /// `scripts/make-ggml-decode-vectors.sh`, since gguf-py from PyPI cannot
    /// decode them): ours must give the same bits. Random blocks (NVFP4's cover
    /// all 256 scale bytes), then 64 real blocks of each type from SmolLM2 as
    /// `compress quantize` wrote them.
    #[test]
    fn low_bit_types_decode_bit_exactly_like_ggml() {
        let file = include_bytes!("../../tests/data/ggml_decode_vectors.bin");
        let u32_at = |o: usize| u32::from_le_bytes(file[o..o + 4].try_into().unwrap()) as usize;
        let (mut at, mut seen) = (0, vec![]);
        while at < file.len() {
            let ty = GgmlType::from_id(u32_at(at) as u32).unwrap();
            let blocks = u32_at(at + 4);
            let (n, nb) = (blocks * ty.block_elems(), blocks * ty.block_bytes());
            let src = &file[at + 8..at + 8 + nb];
            let want = &file[at + 8 + nb..at + 8 + nb + 4 * n];
            let mut got = vec![0f32; n];
            dequantize(ty, src, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(want.chunks_exact(4)).enumerate() {
                let w = f32::from_le_bytes(w.try_into().unwrap());
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{ty} element {i}: {g} vs ggml's {w}"
                );
            }
            seen.push(ty);
            at += 8 + nb + 4 * n;
        }
        let types = [GgmlType::NVFP4, GgmlType::Q1_0, GgmlType::Q2_0];
        assert_eq!(seen, [types, types].concat(), "random, then real blocks");
    }

    #[test]
    fn first_nonfinite_finds_a_nan_scale_and_an_inf_value() {
        let values: Vec<f32> = (0..8192).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut q = quantize_to_vec(GgmlType::Q4_0, &values, 256, None).unwrap();
        assert_eq!(first_nonfinite(GgmlType::Q4_0, &q).unwrap(), None);
        // Block 200's f16 scale set to NaN: its first element is the first bad one.
        let block = GgmlType::Q4_0.block_bytes();
        q[200 * block..200 * block + 2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert_eq!(first_nonfinite(GgmlType::Q4_0, &q).unwrap(), Some(200 * 32));
        let mut raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw[4 * 5000..4 * 5001].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_eq!(first_nonfinite(GgmlType::F32, &raw).unwrap(), Some(5000));
        assert!(first_nonfinite(GgmlType::Q4_0, &q[..block + 1]).is_err());
    }

    /// All-zero tensors, zero importance (a dead input column in the imatrix)
    /// and values next to zero: every encoder gives finite values, zeros for
    /// zeros (no 0/0 in a scale search).
    #[test]
    fn zeros_and_zero_importance_encode_to_finite_values() {
        let n = 2 * 256;
        let zeros = vec![0f32; n];
        let tiny: Vec<f32> = (0..n)
            .map(|i| if i % 7 == 0 { 1e-30 } else { 0.0 })
            .collect();
        let wave: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).sin()).collect();
        let no_importance = vec![0f32; 256];
        for ty in crate::types::ALL_TYPES {
            for (what, values) in [("zeros", &zeros), ("tiny", &tiny), ("wave", &wave)] {
                for importance in [None, Some(&no_importance[..])] {
                    let q = quantize_to_vec(ty, values, 256, importance).unwrap();
                    assert_eq!(
                        first_nonfinite(ty, &q).unwrap(),
                        None,
                        "{ty} on {what} with importance {:?}",
                        importance.map(|_| "zero")
                    );
                    if what == "zeros" {
                        let mut back = vec![1f32; n];
                        dequantize(ty, &q, &mut back).unwrap();
                        assert!(
                            back.iter().all(|&v| v == 0.0),
                            "{ty}: zeros come back as zeros"
                        );
                    }
                }
            }
        }
    }
}
