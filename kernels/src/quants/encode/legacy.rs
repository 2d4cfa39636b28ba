//! Quantizers of ggml's legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1 and
//! Q8_0 (layouts in [`crate::quants::legacy`]).
//!
//! Symmetric types (Q4_0, Q5_0, Q8_0 with importance) fit one scale per block with
//! `fit_scale`; Q4_1/Q5_1 fit a scale and a signed min with `fit_affine`. The
//! scale is then rounded to f16 and every element re-rounded to the stored scale
//! (optimal for that scale), and the least-squares scale of those quants is tried
//! once more in f16; a block keeps whichever stored form has the lower weighted
//! error.
//!
//! Weights: with importance `qw`, `qw · sqrt(σ² + x²)` where `σ²` is the mean
//! square of the whole `src` slice (ggml's `quantize_row_q4_0_impl` and friends);
//! without, `sqrt(σ² + x²)` (the same with all-ones importance; ggml itself
//! falls back to its reference rounding here, and its `x²` search default loses
//! to that rounding on rows with outliers). Q8_0 without importance is ggml's
//! `quantize_row_q8_0_ref`, byte for byte.

use super::search::{
    fit_affine, fit_scale, mean_square, nearest_int, to_f16, weights, DefaultWeight, Grid, Uniform,
    MAX_GROUP,
};
use crate::quants::legacy::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, QK};

/// Checks the slice lengths every per-type quantizer documents.
pub(crate) fn check_lengths(
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &[u8],
    elems: usize,
    bytes: usize,
) {
    assert!(
        src.len().is_multiple_of(elems),
        "quantize: {} elements is not a whole number of {elems}-element blocks",
        src.len()
    );
    assert_eq!(
        dst.len(),
        src.len() / elems * bytes,
        "quantize: destination size does not match {} elements",
        src.len()
    );
    if let Some(qw) = importance {
        assert_eq!(
            qw.len(),
            src.len(),
            "quantize: importance length differs from src"
        );
    }
}

/// Importance of block `b` (of `n` elements), if any.
#[inline]
pub(crate) fn block_qw(importance: Option<&[f32]>, b: usize, n: usize) -> Option<&[f32]> {
    importance.map(|qw| &qw[b * n..(b + 1) * n])
}

/// One symmetric block: f16 scale bits and level indices, with the stored scale's
/// quants re-rounded and the least-squares re-fit tried.
pub(crate) fn encode_symmetric<G: Grid>(x: &[f32], w: &[f32], grid: G, idx: &mut [u8]) -> u16 {
    let n = x.len();
    let s = fit_scale(x, w, grid, idx);
    let (mut bits, d) = to_f16(s);
    let mut err = requant_symmetric(x, w, grid, d, idx);
    let mut aux = [0u8; MAX_GROUP];
    let aux = &mut aux[..n];
    for _ in 0..2 {
        let (mut sxq, mut sq2) = (0f32, 0f32);
        for ((&x, &w), &i) in x.iter().zip(w).zip(idx.iter()) {
            let q = grid.level(i);
            sxq += w * x * q;
            sq2 += w * q * q;
        }
        if !(sq2 > 0.0) {
            break;
        }
        let (nbits, nd) = to_f16(sxq / sq2);
        if nbits == bits {
            break;
        }
        let e = requant_symmetric(x, w, grid, nd, aux);
        if e < err {
            (bits, err) = (nbits, e);
            idx.copy_from_slice(aux);
        } else {
            break;
        }
    }
    // The neighbouring halves of d.
    let b0 = bits;
    for db in [-1i16, 1] {
        let nb = b0.wrapping_add_signed(db);
        let nd = f16_value(nb);
        if !nd.is_finite() {
            continue;
        }
        let e = requant_symmetric(x, w, grid, nd, aux);
        if e < err {
            (bits, err) = (nb, e);
            idx.copy_from_slice(aux);
        }
    }
    bits
}

/// Re-rounds every element to stored scale `d` (`y = d · level`, as the decoders
/// compute it); returns the weighted error.
#[inline]
pub(crate) fn requant_symmetric<G: Grid>(
    x: &[f32],
    w: &[f32],
    grid: G,
    d: f32,
    idx: &mut [u8],
) -> f64 {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0f64;
    for ((i, &x), &w) in idx.iter_mut().zip(x).zip(w) {
        *i = grid.index(x * inv);
        let diff = (x - d * grid.level(*i)) as f64;
        err += w as f64 * diff * diff;
    }
    err
}

/// One Q4_1/Q5_1 block: f16 bits of `d` and `m`, and levels `0..=nmax`.
fn encode_affine(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8]) -> (u16, u16) {
    let n = x.len();
    let (d, m) = fit_affine(x, w, nmax, true, l);
    let (mut db, dv) = to_f16(d);
    let (mut mb, mv) = to_f16(m);
    let mut err = requant_affine(x, w, dv, mv, nmax, l);
    let mut aux = [0u8; MAX_GROUP];
    let aux = &mut aux[..n];
    // The same levels shifted up or down the grid (a different min): finds the
    // exact min of data already on this grid that does not span all levels.
    let (lmin, lmax) = l
        .iter()
        .fold((nmax, 0), |(a, b), &v| (a.min(v as i32), b.max(v as i32)));
    for s in -lmin..=nmax - lmax {
        if s == 0 {
            continue;
        }
        let (nm, nmv) = to_f16(m - s as f32 * d);
        let e = requant_affine(x, w, dv, nmv, nmax, aux);
        if e < err {
            (mb, err) = (nm, e);
            l.copy_from_slice(aux);
        }
    }
    for _ in 0..2 {
        // Least-squares (d, m) of the current quants, in f16.
        let (mut sw, mut sx, mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for ((&x, &w), &l) in x.iter().zip(w).zip(l.iter()) {
            let l = l as f32;
            sw += w;
            sx += w * x;
            sl += w * l;
            sl2 += w * l * l;
            sxl += w * x * l;
        }
        let det = sw * sl2 - sl * sl;
        if !(det > 0.0) {
            break;
        }
        let (nd, ndv) = to_f16((sw * sxl - sx * sl) / det);
        let (nm, nmv) = to_f16((sl2 * sx - sl * sxl) / det);
        if (nd, nm) == (db, mb) {
            break;
        }
        let e = requant_affine(x, w, ndv, nmv, nmax, aux);
        if e < err {
            (db, mb, err) = (nd, nm, e);
            l.copy_from_slice(aux);
        } else {
            break;
        }
    }
    // The neighbouring halves of d and m: rounding each to f16 on its own is not
    // always the best pair (and a least-squares m can land one unit off).
    let (d0, m0) = (db, mb);
    for dd in -1..=1i16 {
        for dm in -1..=1i16 {
            if (dd, dm) == (0, 0) {
                continue;
            }
            let (nd, nm) = (d0.wrapping_add_signed(dd), m0.wrapping_add_signed(dm));
            let (ndv, nmv) = (f16_value(nd), f16_value(nm));
            if !(ndv.is_finite() && nmv.is_finite()) {
                continue;
            }
            let e = requant_affine(x, w, ndv, nmv, nmax, aux);
            if e < err {
                (db, mb, err) = (nd, nm, e);
                l.copy_from_slice(aux);
            }
        }
    }
    (db, mb)
}

/// The value of f16 bits.
#[inline]
pub(crate) fn f16_value(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Re-rounds every element for stored `d`, `m` (`y = d · l + m`); returns the
/// weighted error.
#[inline]
fn requant_affine(x: &[f32], w: &[f32], d: f32, m: f32, nmax: i32, l: &mut [u8]) -> f64 {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut err = 0f64;
    for ((l, &x), &w) in l.iter_mut().zip(x).zip(w) {
        *l = nearest_int((x - m) * inv).max(0).min(nmax) as u8;
        let diff = (x - (d * *l as f32 + m)) as f64;
        err += w as f64 * diff * diff;
    }
    err
}

/// Packs 32 four-bit values: element `j` in the low nibble of byte `j`, element
/// `j + 16` in its high nibble.
#[inline]
pub(crate) fn pack_nibbles(q: &[u8], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4);
    }
}

/// The fifth bits of 32 five-bit values as Q5_0/Q5_1's `qh` (bit `i` = element `i`).
#[inline]
fn high_bits(q: &[u8]) -> [u8; 4] {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= (((v >> 4) & 1) as u32) << i;
    }
    qh.to_le_bytes()
}

/// Runs `block(x, w, out)` over every `N`-element block with its weights.
pub(crate) fn for_blocks<const N: usize>(
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [u8],
    bytes: usize,
    mut block: impl FnMut(&[f32], &[f32], &mut [u8]),
) {
    check_lengths(src, importance, dst, N, bytes);
    let sigma2 = mean_square(src);
    let mut w = [0f32; N];
    for (b, (x, out)) in src
        .chunks_exact(N)
        .zip(dst.chunks_exact_mut(bytes))
        .enumerate()
    {
        weights(
            x,
            block_qw(importance, b, N),
            sigma2,
            DefaultWeight::Sqrt,
            &mut w,
        );
        block(x, &w, out);
    }
}

/// Quantizes whole blocks of `src` to Q4_0 (`y = d · (q - 8)`).
///
/// `importance`, when given, holds one weight per element of `src` (the imatrix
/// entries of those columns). Panics unless `src` is a whole number of 32-element
/// blocks, `dst` exactly their 18-byte blocks and `importance` as long as `src`.
pub fn quantize_q4_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -8, hi: 7 };
    for_blocks::<QK>(src, importance, dst, Q4_0_BYTES, |x, w, out| {
        let mut q = [0u8; QK];
        let d = encode_symmetric(x, w, grid, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        pack_nibbles(&q, &mut out[2..18]);
    });
}

/// Quantizes whole blocks of `src` to Q4_1 (`y = d · q + m`).
///
/// Same contract as [`quantize_q4_0`], with 20-byte blocks.
pub fn quantize_q4_1(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_blocks::<QK>(src, importance, dst, Q4_1_BYTES, |x, w, out| {
        let mut q = [0u8; QK];
        let (d, m) = encode_affine(x, w, 15, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        out[2..4].copy_from_slice(&m.to_le_bytes());
        pack_nibbles(&q, &mut out[4..20]);
    });
}

/// Quantizes whole blocks of `src` to Q5_0 (`y = d · (q - 16)`, 5-bit `q`).
///
/// Same contract as [`quantize_q4_0`], with 22-byte blocks.
pub fn quantize_q5_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -16, hi: 15 };
    for_blocks::<QK>(src, importance, dst, Q5_0_BYTES, |x, w, out| {
        let mut q = [0u8; QK];
        let d = encode_symmetric(x, w, grid, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        out[2..6].copy_from_slice(&high_bits(&q));
        pack_nibbles(&q, &mut out[6..22]);
    });
}

/// Quantizes whole blocks of `src` to Q5_1 (`y = d · q + m`, 5-bit `q`).
///
/// Same contract as [`quantize_q4_0`], with 24-byte blocks.
pub fn quantize_q5_1(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_blocks::<QK>(src, importance, dst, Q5_1_BYTES, |x, w, out| {
        let mut q = [0u8; QK];
        let (d, m) = encode_affine(x, w, 31, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        out[2..4].copy_from_slice(&m.to_le_bytes());
        out[4..8].copy_from_slice(&high_bits(&q));
        pack_nibbles(&q, &mut out[8..24]);
    });
}

/// Quantizes whole blocks of `src` to Q8_0 (`y = d · q`, signed 8-bit `q`).
///
/// Without importance this is ggml's reference rounding (`d = max|x| / 127`,
/// `q = round(x / d)` half away from zero), byte-identical to llama.cpp and
/// gguf-py. With importance the scale is searched like the other symmetric types,
/// over the full range -128..=127. Same contract as [`quantize_q4_0`], with
/// 34-byte blocks.
pub fn quantize_q8_0(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    if importance.is_none() {
        check_lengths(src, None, dst, QK, Q8_0_BYTES);
        for (x, out) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out[..2].copy_from_slice(&to_f16(d).0.to_le_bytes());
            for (o, &v) in out[2..].iter_mut().zip(x) {
                *o = (v * id).round() as i8 as u8;
            }
        }
        return;
    }
    let grid = Uniform { lo: -128, hi: 127 };
    for_blocks::<QK>(src, importance, dst, Q8_0_BYTES, |x, w, out| {
        let mut q = [0u8; QK];
        let d = encode_symmetric(x, w, grid, &mut q);
        out[..2].copy_from_slice(&d.to_le_bytes());
        for (o, &i) in out[2..].iter_mut().zip(&q) {
            *o = i ^ 0x80; // index i is the integer i - 128
        }
    });
}
