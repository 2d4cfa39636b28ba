//! Quantizer of MXFP4 (layout in [`crate::quants::mxfp4`]).
//!
//! llama.cpp's reference takes a block's exponent from its largest element
//! (`floor(log2(amax)) − 2`, biased) and rounds every element to the nearest
//! E2M1 value. That exponent can clip the largest element (up to 2·2^⌊log2 amax⌋
//! against a largest grid value of 1.5·2^⌊log2 amax⌋) or leave the grid coarse.
//! Here each block tries the exponents from two below to two above it and keeps
//! the one whose nearest-value codes give the smallest weighted error
//! `Σ w (x − x̂)²`: for a fixed scale the nearest code is optimal for every
//! element, so this is an exact search over those five scales, which contain
//! the reference's. Weights are those of the legacy types (`qw · sqrt(σ² + x²)`
//! with importance `qw`, `sqrt(σ² + x²)` without).

use super::legacy::for_blocks;
use super::nvfp4::{fp4_error, pack_fp4};
use super::search::{usable, GROUP_MAX_EPS};
use crate::quants::mxfp4::{e8m0_to_f32_half, MXFP4_BYTES, QK_MXFP4};

/// llama.cpp's exponent for a block whose largest magnitude is `amax` (> 0).
pub(crate) fn reference_exponent(amax: f32) -> i32 {
    amax.log2().floor() as i32 - 2 + 127
}

/// One block: its E8M0 byte and 32 codes.
fn encode_block(x: &[f32], w: &[f32]) -> (u8, [u8; QK_MXFP4]) {
    let mut codes = [0u8; QK_MXFP4];
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !(amax >= GROUP_MAX_EPS && amax.is_finite()) {
        return (0, codes);
    }
    let w = usable(w);
    let e0 = reference_exponent(amax);
    let (mut best, mut best_e) = (f64::INFINITY, 0u8);
    let mut trial = [0u8; QK_MXFP4];
    for e in (e0 - 2).max(0)..=(e0 + 2).min(254) {
        let err = fp4_error(x, w, e8m0_to_f32_half(e as u8), &mut trial);
        if err < best {
            (best, best_e) = (err, e as u8);
            codes = trial;
        }
    }
    (best_e, codes)
}

/// Quantizes whole blocks of `src` to MXFP4 (`y = fp4[q] · 2^(e − 128)`).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 32-element blocks, `dst` exactly their 17-byte
/// blocks and `importance` as long as `src`.
pub fn quantize_mxfp4(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_blocks::<QK_MXFP4>(src, importance, dst, MXFP4_BYTES, |x, w, out| {
        let (e, codes) = encode_block(x, w);
        out[0] = e;
        pack_fp4(&codes, &mut out[1..]);
    });
}
