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

pub use encode::iq4::{quantize_iq4_nl, quantize_iq4_xs};
pub use encode::k_quants::{
    quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k, quantize_q6_k,
};
pub use encode::legacy::{
    quantize_q4_0, quantize_q4_1, quantize_q5_0, quantize_q5_1, quantize_q8_0,
};
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
    }
    Ok(())
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
