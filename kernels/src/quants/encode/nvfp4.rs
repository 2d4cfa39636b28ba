//! Quantizer of NVFP4 (layout in [`crate::quants::nvfp4`]).
//!
//! llama.cpp's reference takes each sub-block's scale from its largest element
//! (`ue4m3(amax / 6)`) and rounds every element to the nearest E2M1 value. Here
//! each sub-block of 16 tries the stored scales around that one (from eight UE4M3
//! steps below, which clip the largest element, to six above, which put it on a
//! smaller grid value) and keeps the one
//! whose nearest-value codes give the smallest weighted error `Σ w (x - x̂)²`: for
//! a fixed scale the nearest code is optimal for every element, so this is an
//! exact search over those stored scales. Weights are those of the legacy types
//! (`qw · sqrt(σ² + x²)` with importance `qw`, `sqrt(σ² + x²)` without).
//!
//! UE4M3 has few steps between its smallest normal (2⁻⁷, halved) and its largest
//! value (224, halved), and LLM weights sit near the bottom of that range. The
//! per-tensor scale llama.cpp multiplies in (the `NAME.scale` tensor) moves them to
//! the top: [`nvfp4_tensor_scale`] is the factor that maps a tensor's largest
//! magnitude to the largest stored value; callers divide the weights by it before
//! encoding and store it beside the tensor.

use super::legacy::for_blocks;
use super::search::{usable, GROUP_MAX_EPS};
use crate::quants::nvfp4::{ue4m3_to_f32, KVALUES_FP4, NVFP4_BYTES, QK_NVFP4, QK_NVFP4_SUB};
use std::sync::LazyLock;

/// The largest finite UE4M3 byte (E4M3's 448; 224 once halved).
const UE4M3_MAX_CODE: u8 = 0x7E;

/// Largest element magnitude of the doubled E2M1 grid.
const FP4_MAX: f32 = 12.0;

/// The decoded value of every UE4M3 byte `0..=0x7E` (increasing).
static UE4M3_VALUES: LazyLock<[f32; 127]> =
    LazyLock::new(|| std::array::from_fn(|c| ue4m3_to_f32(c as u8)));

/// The factor that maps a tensor whose largest magnitude is `amax` onto the full
/// range of NVFP4: `amax / (12 · 224)`, so that the sub-block holding `amax`
/// gets the largest stored scale. 1 for an all-zero or non-finite `amax`.
pub fn nvfp4_tensor_scale(amax: f32) -> f32 {
    let s = amax / (FP4_MAX * ue4m3_to_f32(UE4M3_MAX_CODE));
    if s > 0.0 && s.is_finite() && (1.0 / s).is_finite() {
        s
    } else {
        1.0
    }
}

/// The code of the E2M1 value (doubled grid) nearest to `v`, in units of the scale.
#[inline(always)]
fn nearest_fp4(v: f32) -> u8 {
    // Midpoints between the doubled magnitudes 0, 1, 2, 3, 4, 6, 8, 12.
    const MIDS: [f32; 7] = [0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0];
    let a = v.abs();
    let mag = MIDS.iter().filter(|&&m| a > m).count() as u8;
    if v < 0.0 && mag != 0 {
        mag | 8
    } else {
        mag
    }
}

/// The weighted error of `x` at stored scale `d` with every element on its
/// nearest E2M1 value, writing the codes (an NVFP4 sub-block, an MXFP4 block).
#[inline]
pub(crate) fn fp4_error<const N: usize>(x: &[f32], w: &[f32], d: f32, codes: &mut [u8; N]) -> f64 {
    let inv = 1.0 / d;
    let mut err = 0f64;
    for ((c, &x), &w) in codes.iter_mut().zip(x).zip(w) {
        *c = nearest_fp4(x * inv);
        let diff = (x - KVALUES_FP4[*c as usize] as f32 * d) as f64;
        err += w as f64 * diff * diff;
    }
    err
}

/// One sub-block: its UE4M3 scale byte and 16 codes.
fn encode_sub_block(x: &[f32], w: &[f32]) -> (u8, [u8; QK_NVFP4_SUB]) {
    let mut codes = [0u8; QK_NVFP4_SUB];
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !(amax >= GROUP_MAX_EPS && amax.is_finite()) {
        return (0, codes);
    }
    let w = usable(w);
    let values = &*UE4M3_VALUES;
    // The smallest stored scale at least amax / 12 (the largest element on the
    // grid's end), then a window around it.
    let c0 = values
        .partition_point(|&v| v < amax / FP4_MAX)
        .min(UE4M3_MAX_CODE as usize);
    let (mut best, mut best_code) = (f64::INFINITY, 0u8);
    let mut trial = [0u8; QK_NVFP4_SUB];
    for c in c0.saturating_sub(8).max(1)..=(c0 + 6).min(UE4M3_MAX_CODE as usize) {
        let e = fp4_error(x, w, values[c], &mut trial);
        if e < best {
            (best, best_code) = (e, c as u8);
            codes = trial;
        }
    }
    (best_code, codes)
}

/// Quantizes whole blocks of `src` to NVFP4 (`y = fp4[q] · ue4m3(d_sub)`).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 64-element blocks, `dst` exactly their 36-byte blocks
/// and `importance` as long as `src`. The per-tensor scale is the caller's (see
/// the module docs).
pub fn quantize_nvfp4(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_blocks::<QK_NVFP4>(src, importance, dst, NVFP4_BYTES, |x, w, out| {
        for (s, (xs, ws)) in x
            .chunks_exact(QK_NVFP4_SUB)
            .zip(w.chunks_exact(QK_NVFP4_SUB))
            .enumerate()
        {
            let (d, codes) = encode_sub_block(xs, ws);
            out[s] = d;
            pack_fp4_sub_block(&codes, &mut out[4 + 8 * s..12 + 8 * s]);
        }
    });
}

/// Packs 16 codes of one sub-block: element `j` in the low nibble of byte `j`,
/// element `j + 8` in its high nibble.
pub(crate) fn pack_fp4_sub_block(codes: &[u8], out: &mut [u8]) {
    pack_fp4(&codes[..QK_NVFP4_SUB], out);
}

/// Packs `n` 4-bit codes into `n / 2` bytes the way NVFP4's sub-blocks and
/// MXFP4's blocks store them: element `j` in the low nibble of byte `j`, element
/// `j + n / 2` in its high nibble.
pub(crate) fn pack_fp4(codes: &[u8], out: &mut [u8]) {
    let half = codes.len() / 2;
    for j in 0..half {
        out[j] = (codes[j] & 0x0F) | ((codes[j + half] & 0x0F) << 4);
    }
}
