//! Quantization: f32 rows to the bytes of every supported GGUF weight type, with
//! optional per-column importance weights (an imatrix).
//!
//! Each block quantizer searches its scales (and mins) to minimise the weighted
//! squared error `Σ w (x - x̂)²` of the stored form, following the algorithms of
//! llama.cpp's `ggml-quants.c` (`make_qx_quants`, `make_qkx3_quants`,
//! `make_qp_quants`, `quantize_row_iq4_nl_impl`) and then polishing what they find
//! against the exact stored values (f16 scales, integer sub-scales). With
//! importance `qw` the element weights are `qw · sqrt(σ² + x²)` as in ggml's
//! `_impl` quantizers; without, llama.cpp's `sqrt(σ²) + |x|` for Q2_K/Q4_K/Q5_K
//! and `sqrt(σ² + x²)` (all-ones importance) for the rest, where llama.cpp's `x²`
//! would lose to plain rounding on rows with outliers; Q8_0 without importance is
//! exactly llama.cpp's (and gguf-py's) reference rounding. Without importance every
//! type's squared error is below that of the reference rounding in aggregate
//! (tested on Gaussian rows with and without outliers, and on the real model). The output always decodes with
//! [`crate::quants::dequantize`].
//!
//! | module | types |
//! | --- | --- |
//! | [`legacy`] | Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 |
//! | [`k_quants`] | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K |
//! | [`iq4`] | IQ4_NL, IQ4_XS |
//! | [`low_bit`] | Q1_0, Q2_0 |
//! | [`nvfp4`] | NVFP4 |
//! | [`mxfp4`] | MXFP4 |
//! | [`ternary`] | TQ1_0, TQ2_0 |
//!
//! F32, F16 and BF16 are plain conversions (round to nearest even) that ignore
//! the importance.

// Index loops over sub-blocks read several parallel arrays; and the `!(a > b)`
// comparisons are deliberate: they are also true for NaN.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

pub mod iq4;
pub mod k_quants;
pub mod legacy;
pub mod low_bit;
pub mod mxfp4;
pub mod nvfp4;
pub(crate) mod search;
pub mod ternary;

#[cfg(test)]
mod tests;

use crate::{GgmlType, KernelError};
use half::f16;
use rayon::prelude::*;

/// Inputs at least this large (elements) are quantized on the rayon pool, a
/// chunk of rows per task.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// Writes `src` as little-endian f32.
pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 4 * src.len(), "quantize_f32: destination size");
    for (o, v) in dst.chunks_exact_mut(4).zip(src) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

/// Writes `src` as little-endian IEEE half, rounded to nearest even (values
/// beyond ±65504 become ±infinity, as in ggml and numpy).
pub fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 2 * src.len(), "quantize_f16: destination size");
    for (o, &v) in dst.chunks_exact_mut(2).zip(src) {
        o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

/// Converts one f32 to bfloat16 bits as ggml's `ggml_compute_fp32_to_bf16` and
/// gguf-py do: round to nearest even, NaN kept NaN (made quiet).
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + 0x7fff + ((u >> 16) & 1) as u64) >> 16) as u16
}

/// Writes `src` as little-endian bfloat16 (see [`f32_to_bf16_bits`]).
pub fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), 2 * src.len(), "quantize_bf16: destination size");
    for (o, &v) in dst.chunks_exact_mut(2).zip(src) {
        o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// The block quantizer of a block type (`None` for the float types).
type BlockFn = fn(&[f32], Option<&[f32]>, &mut [u8]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        GgmlType::Q4_0 => legacy::quantize_q4_0,
        GgmlType::Q4_1 => legacy::quantize_q4_1,
        GgmlType::Q5_0 => legacy::quantize_q5_0,
        GgmlType::Q5_1 => legacy::quantize_q5_1,
        GgmlType::Q8_0 => legacy::quantize_q8_0,
        GgmlType::Q2_K => k_quants::quantize_q2_k,
        GgmlType::Q3_K => k_quants::quantize_q3_k,
        GgmlType::Q4_K => k_quants::quantize_q4_k,
        GgmlType::Q5_K => k_quants::quantize_q5_k,
        GgmlType::Q6_K => k_quants::quantize_q6_k,
        GgmlType::IQ4_NL => iq4::quantize_iq4_nl,
        GgmlType::IQ4_XS => iq4::quantize_iq4_xs,
        GgmlType::TQ1_0 => ternary::quantize_tq1_0,
        GgmlType::TQ2_0 => ternary::quantize_tq2_0,
        GgmlType::MXFP4 => mxfp4::quantize_mxfp4,
        GgmlType::NVFP4 => nvfp4::quantize_nvfp4,
        GgmlType::Q1_0 => low_bit::quantize_q1_0,
        GgmlType::Q2_0 => low_bit::quantize_q2_0,
    })
}

/// Quantizes `src` (a whole number of rows of `row_len` elements) into `dst`
/// (exactly the bytes of that many elements of `ty`).
///
/// `importance`: optional per-column weights of length `row_len` (the imatrix:
/// mean squared activation of that input column), applied to every row. The
/// quantizers minimise `Σ importance[c] · (x - x̂)²`-style weighted errors (see the
/// module docs); without importance their squared error is below that of
/// llama.cpp's reference rounding on weight-like data (tested in aggregate, not
/// promised per block). The float types ignore it.
///
/// Errors when `row_len` is not a multiple of the type's block size, `src` is not
/// a whole number of rows, or `dst`/`importance` have the wrong length (for
/// `importance` the reported counts are elements). NaN or infinite inputs do not
/// panic; their blocks hold unspecified values (callers check for them first).
/// Large inputs are split by rows over the rayon pool; the result does not depend
/// on the number of threads.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<(), KernelError> {
    let block = ty.block_elems();
    let row_bytes = ty.bytes_for(row_len).ok_or(KernelError::NotBlockAligned {
        ty,
        elems: row_len,
        block,
    })?;
    let rows_ok = if row_len == 0 {
        src.is_empty()
    } else {
        src.len().is_multiple_of(row_len)
    };
    if !rows_ok {
        return Err(KernelError::NotBlockAligned {
            ty,
            elems: src.len(),
            block: row_len,
        });
    }
    let rows = src.len().checked_div(row_len).unwrap_or(0);
    let expected = rows * row_bytes;
    if dst.len() != expected {
        return Err(KernelError::SizeMismatch {
            what: "destination",
            ty,
            elems: src.len(),
            expected,
            got: dst.len(),
        });
    }
    if let Some(qw) = importance {
        if qw.len() != row_len {
            return Err(KernelError::SizeMismatch {
                what: "importance (one weight per column; counts are elements)",
                ty,
                elems: row_len,
                expected: row_len,
                got: qw.len(),
            });
        }
    }
    let Some(f) = block_fn(ty) else {
        match ty {
            GgmlType::F32 => quantize_f32(src, dst),
            GgmlType::F16 => quantize_f16(src, dst),
            _ => quantize_bf16(src, dst),
        }
        return Ok(());
    };
    if rows == 0 {
        return Ok(());
    }
    let do_rows = |src: &[f32], dst: &mut [u8]| {
        for (x, out) in src
            .chunks_exact(row_len)
            .zip(dst.chunks_exact_mut(row_bytes))
        {
            f(x, importance, out);
        }
    };
    if src.len() >= PARALLEL_MIN_ELEMS && rows > 1 {
        // About 16K elements per task, whole rows.
        let rows_per_task = (16_384 / row_len).max(1);
        src.par_chunks(rows_per_task * row_len)
            .zip(dst.par_chunks_mut(rows_per_task * row_bytes))
            .for_each(|(s, d)| do_rows(s, d));
    } else {
        do_rows(src, dst);
    }
    Ok(())
}

/// Like [`quantize`], allocating and returning the bytes.
pub fn quantize_to_vec(
    ty: GgmlType,
    src: &[f32],
    row_len: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>, KernelError> {
    let bytes = ty
        .bytes_for(src.len())
        .ok_or(KernelError::NotBlockAligned {
            ty,
            elems: src.len(),
            block: ty.block_elems(),
        })?;
    let mut dst = vec![0u8; bytes];
    quantize(ty, src, row_len, importance, &mut dst)?;
    Ok(dst)
}
