//! Quantizers of ggml's k-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (layouts in
//! [`crate::quants::k_quants`]).
//!
//! Every 256-element super-block is done in three steps:
//!
//! 1. each sub-block (16 or 32 elements) gets its own float scale (and min) by
//!    weighted least squares: `fit_affine` for the types with a min (Q2_K, Q4_K,
//!    Q5_K, as ggml's `make_qkx3_quants`), `fit_scale` for the symmetric ones
//!    (Q3_K, Q6_K, as `make_qx_quants`);
//! 2. those scales (and mins) are themselves quantized to the stored integer
//!    sub-scales times one f16 super-scale, again by a weighted fit, where a
//!    sub-scale's weight is how much the block's error moves with it (`Σ w q²` for
//!    a scale, `Σ w` for a min);
//! 3. every element is re-rounded against the stored sub-block scale, then two
//!    polishing rounds each try the neighbouring integer sub-scales of every
//!    sub-block and the least-squares super-scale(s) of the current quants,
//!    keeping only changes that lower the exact weighted error of the stored form.
//!
//! Weights: with importance `qw`, `qw · sqrt(σ² + x²)` with `σ²` the super-block's
//! mean square (times 2 for Q3_K/Q4_K/Q5_K, as ggml's `_impl` do), and `qw` alone
//! for Q6_K (as ggml); without, ggml's `sqrt(2σ²) + |x|` for Q4_K/Q5_K, the same
//! with `σ²` for Q2_K (whose ggml reference uses `|x|` with an absolute-error
//! criterion), and `sqrt(σ² + x²)` (all-ones importance) for Q3_K and Q6_K in
//! place of ggml's `x²`, which loses to plain rounding on rows with outliers.

use super::legacy::{block_qw, check_lengths};
use super::search::{
    fit_affine, fit_scale, mean_square, nearest_int, to_f16, weights, DefaultWeight, Grid, Uniform,
    MAX_GROUP,
};
use crate::quants::k_quants::{Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, QK_K};

/// Polishing rounds after the first stored form.
const ROUNDS: usize = 2;

/// The stored form of a super-block with sub-block scales and mins
/// (`y = (d · ls) · q - (dmin · lm)`).
pub(crate) struct AffineSuper {
    /// f16 bits of the super-scale.
    pub d: u16,
    /// f16 bits of the super-min.
    pub dmin: u16,
    /// Integer sub-block scales.
    pub ls: [u8; 16],
    /// Integer sub-block mins.
    pub lm: [u8; 16],
    /// Quants `0..=nmax`.
    pub q: [u8; QK_K],
}

/// Re-rounds one sub-block for stored `dl`, `ml` (`y = dl · q - ml`, as the
/// decoders compute it); returns the weighted error.
#[inline]
fn requant_affine_sub(x: &[f32], w: &[f32], dl: f32, ml: f32, nmax: i32, q: &mut [u8]) -> f64 {
    let inv = if dl != 0.0 { 1.0 / dl } else { 0.0 };
    let mut err = 0f64;
    for ((q, &x), &w) in q.iter_mut().zip(x).zip(w) {
        *q = nearest_int((x + ml) * inv).max(0).min(nmax) as u8;
        let diff = (x - (dl * *q as f32 - ml)) as f64;
        err += w as f64 * diff * diff;
    }
    err
}

/// Encodes one super-block with `256 / sub` sub-blocks of quants `0..=nmax`, and
/// sub-scales and sub-mins `0..=snmax`.
pub(crate) fn encode_affine_super(
    x: &[f32],
    w: &[f32],
    sub: usize,
    nmax: i32,
    snmax: i32,
) -> AffineSuper {
    let nsub = QK_K / sub;
    let mut out = AffineSuper {
        d: 0,
        dmin: 0,
        ls: [0; 16],
        lm: [0; 16],
        q: [0; QK_K],
    };
    let (mut scales, mut mins, mut ws, mut wm) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    for j in 0..nsub {
        let r = j * sub..(j + 1) * sub;
        let (s, m) = fit_affine(
            &x[r.clone()],
            &w[r.clone()],
            nmax,
            false,
            &mut out.q[r.clone()],
        );
        scales[j] = s;
        mins[j] = -m;
        for (&w, &q) in w[r.clone()].iter().zip(&out.q[r]) {
            let q = q as f32;
            ws[j] += w * q * q;
            wm[j] += w;
        }
    }
    let grid = Uniform { lo: 0, hi: snmax };
    let d = fit_scale(&scales[..nsub], &ws[..nsub], grid, &mut out.ls[..nsub]);
    let dm = fit_scale(&mins[..nsub], &wm[..nsub], grid, &mut out.lm[..nsub]);
    let (mut db, mut dv) = to_f16(d);
    let (mut mb, mut mv) = to_f16(dm);

    let mut errs = [0f64; 16];
    for j in 0..nsub {
        let r = j * sub..(j + 1) * sub;
        let (dl, ml) = (dv * out.ls[j] as f32, mv * out.lm[j] as f32);
        errs[j] = requant_affine_sub(&x[r.clone()], &w[r.clone()], dl, ml, nmax, &mut out.q[r]);
    }

    let mut aux = [0u8; MAX_GROUP];
    for _ in 0..ROUNDS {
        // Neighbouring integer sub-scale and sub-min of every sub-block.
        for j in 0..nsub {
            let r = j * sub..(j + 1) * sub;
            let (xs, wsub) = (&x[r.clone()], &w[r.clone()]);
            let (ls0, lm0) = (out.ls[j] as i32, out.lm[j] as i32);
            for ls in (ls0 - 1).max(0)..=(ls0 + 1).min(snmax) {
                for lm in (lm0 - 1).max(0)..=(lm0 + 1).min(snmax) {
                    if (ls, lm) == (ls0, lm0) {
                        continue;
                    }
                    let (dl, ml) = (dv * ls as f32, mv * lm as f32);
                    let e = requant_affine_sub(xs, wsub, dl, ml, nmax, &mut aux[..sub]);
                    if e < errs[j] {
                        errs[j] = e;
                        (out.ls[j], out.lm[j]) = (ls as u8, lm as u8);
                        out.q[r.clone()].copy_from_slice(&aux[..sub]);
                    }
                }
            }
        }
        // Least-squares (d, dmin) of the current quants and sub-scales:
        // x ≈ d · a - dmin · b with a = ls · q, b = lm.
        let (mut saa, mut sab, mut sbb, mut sax, mut sbx) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for j in 0..nsub {
            let (ls, lm) = (out.ls[j] as f64, out.lm[j] as f64);
            for i in j * sub..(j + 1) * sub {
                let (a, wi, xi) = (ls * out.q[i] as f64, w[i] as f64, x[i] as f64);
                saa += wi * a * a;
                sab += wi * a * lm;
                sbb += wi * lm * lm;
                sax += wi * a * xi;
                sbx += wi * lm * xi;
            }
        }
        // Unknowns (d, e = -dmin): saa d + sab e = sax, sab d + sbb e = sbx.
        let det = saa * sbb - sab * sab;
        let (nd, ndm) = if det > 0.0 {
            (
                (sax * sbb - sab * sbx) / det,
                -(saa * sbx - sab * sax) / det,
            )
        } else if saa > 0.0 {
            (sax / saa, mv as f64)
        } else {
            break;
        };
        let (nb, nv) = to_f16(nd as f32);
        let (nmb, nmv) = to_f16(ndm as f32);
        if (nb, nmb) == (db, mb) {
            break;
        }
        let mut q = out.q;
        let mut new_errs = [0f64; 16];
        for j in 0..nsub {
            let r = j * sub..(j + 1) * sub;
            let (dl, ml) = (nv * out.ls[j] as f32, nmv * out.lm[j] as f32);
            new_errs[j] = requant_affine_sub(&x[r.clone()], &w[r.clone()], dl, ml, nmax, &mut q[r]);
        }
        if new_errs.iter().sum::<f64>() < errs.iter().sum::<f64>() {
            (db, dv, mb, mv) = (nb, nv, nmb, nmv);
            out.q = q;
            errs = new_errs;
        } else {
            break;
        }
    }
    out.d = db;
    out.dmin = mb;
    out
}

/// The stored form of a symmetric super-block (`y = (d · ls) · grid[q]`).
pub(crate) struct SymSuper {
    /// f16 bits of the super-scale.
    pub d: u16,
    /// Sub-block scale indices into the scale grid.
    pub ls: [u8; 16],
    /// Quant indices into the element grid.
    pub q: [u8; QK_K],
}

/// Re-rounds one sub-block for stored scale `dl`; returns the weighted error.
#[inline]
fn requant_sym_sub<G: Grid>(x: &[f32], w: &[f32], grid: G, dl: f32, q: &mut [u8]) -> f64 {
    let inv = if dl != 0.0 { 1.0 / dl } else { 0.0 };
    let mut err = 0f64;
    for ((q, &x), &w) in q.iter_mut().zip(x).zip(w) {
        *q = grid.index(x * inv);
        let diff = (x - dl * grid.level(*q)) as f64;
        err += w as f64 * diff * diff;
    }
    err
}

/// Encodes one symmetric super-block with `256 / sub` sub-blocks on `grid`, and
/// signed sub-scales on `sgrid`.
pub(crate) fn encode_sym_super<G: Grid>(
    x: &[f32],
    w: &[f32],
    sub: usize,
    grid: G,
    sgrid: Uniform,
) -> SymSuper {
    let nsub = QK_K / sub;
    let mut out = SymSuper {
        d: 0,
        ls: [0; 16],
        q: [0; QK_K],
    };
    let (mut scales, mut ws) = ([0f32; 16], [0f32; 16]);
    for j in 0..nsub {
        let r = j * sub..(j + 1) * sub;
        scales[j] = fit_scale(&x[r.clone()], &w[r.clone()], grid, &mut out.q[r.clone()]);
        for (&w, &q) in w[r.clone()].iter().zip(&out.q[r]) {
            let q = grid.level(q);
            ws[j] += w * q * q;
        }
    }
    let d = fit_scale(&scales[..nsub], &ws[..nsub], sgrid, &mut out.ls[..nsub]);
    let (mut db, mut dv) = to_f16(d);
    let level = |i: u8| sgrid.level(i);

    let mut errs = [0f64; 16];
    for j in 0..nsub {
        let r = j * sub..(j + 1) * sub;
        let dl = dv * level(out.ls[j]);
        errs[j] = requant_sym_sub(&x[r.clone()], &w[r.clone()], grid, dl, &mut out.q[r]);
    }

    let mut aux = [0u8; MAX_GROUP];
    let top = sgrid.hi - sgrid.lo;
    for _ in 0..ROUNDS {
        for j in 0..nsub {
            let r = j * sub..(j + 1) * sub;
            let l0 = out.ls[j] as i32;
            for l in (l0 - 1).max(0)..=(l0 + 1).min(top) {
                if l == l0 {
                    continue;
                }
                let dl = dv * level(l as u8);
                let e = requant_sym_sub(&x[r.clone()], &w[r.clone()], grid, dl, &mut aux[..sub]);
                if e < errs[j] {
                    errs[j] = e;
                    out.ls[j] = l as u8;
                    out.q[r.clone()].copy_from_slice(&aux[..sub]);
                }
            }
        }
        let (mut sxa, mut saa) = (0f64, 0f64);
        for j in 0..nsub {
            let ls = level(out.ls[j]) as f64;
            for i in j * sub..(j + 1) * sub {
                let a = ls * grid.level(out.q[i]) as f64;
                sxa += w[i] as f64 * x[i] as f64 * a;
                saa += w[i] as f64 * a * a;
            }
        }
        if !(saa > 0.0) {
            break;
        }
        let (nb, nv) = to_f16((sxa / saa) as f32);
        if nb == db {
            break;
        }
        let mut q = out.q;
        let mut new_errs = [0f64; 16];
        for j in 0..nsub {
            let r = j * sub..(j + 1) * sub;
            let dl = nv * level(out.ls[j]);
            new_errs[j] = requant_sym_sub(&x[r.clone()], &w[r.clone()], grid, dl, &mut q[r]);
        }
        if new_errs.iter().sum::<f64>() < errs.iter().sum::<f64>() {
            (db, dv) = (nb, nv);
            out.q = q;
            errs = new_errs;
        } else {
            break;
        }
    }
    out.d = db;
    out
}

/// Runs `block(x, w, out)` over every 256-element super-block with its weights:
/// `qw · sqrt(k · σ² + x²)` with importance (`σ²` the super-block's mean square),
/// else `default` with that spread; Q6_K asks for `qw` alone with `raw_qw`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn for_super_blocks(
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [u8],
    bytes: usize,
    sigma_factor: f32,
    default: DefaultWeight,
    raw_qw: bool,
    mut block: impl FnMut(&[f32], &[f32], &mut [u8]),
) {
    check_lengths(src, importance, dst, QK_K, bytes);
    let mut w = [0f32; QK_K];
    for (b, (x, out)) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(bytes))
        .enumerate()
    {
        let qw = block_qw(importance, b, QK_K);
        let sigma2 = sigma_factor * mean_square(x);
        match qw {
            Some(qw) if raw_qw => w.copy_from_slice(qw),
            _ => weights(x, qw, sigma2, default, &mut w),
        }
        block(x, &w, out);
    }
}

/// Packs 2-bit values the Q2_K/Q3_K way: element `e` at byte
/// `32 (e / 128) + e % 32`, bits `2 ((e % 128) / 32)`.
fn pack_2bit(q: &[u8; QK_K], out: &mut [u8]) {
    for half in 0..2 {
        for l in 0..32 {
            let e = 128 * half + l;
            out[32 * half + l] = (q[e] & 3)
                | ((q[e + 32] & 3) << 2)
                | ((q[e + 64] & 3) << 4)
                | ((q[e + 96] & 3) << 6);
        }
    }
}

/// Packs eight 6-bit scales and mins the Q4_K/Q5_K way (inverse of
/// [`crate::quants::k_quants::scale_min_k4`]).
fn pack_scale_min_k4(sc: &[u8], mn: &[u8], out: &mut [u8]) {
    for j in 0..4 {
        out[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        out[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
}

/// Packs 4-bit values the Q4_K/Q5_K way: each 64 elements share 32 bytes, low
/// nibbles first.
fn pack_4bit_k(q: &[u8; QK_K], out: &mut [u8]) {
    for c in 0..4 {
        for l in 0..32 {
            out[32 * c + l] = (q[64 * c + l] & 0x0F) | ((q[64 * c + l + 32] & 0x0F) << 4);
        }
    }
}

/// Quantizes whole super-blocks of `src` to Q2_K (`y = (d · sc) · q - dmin · m`,
/// 2-bit `q`, 4-bit `sc` and `m` per 16 elements).
///
/// `importance`, when given, holds one weight per element of `src`. Panics unless
/// `src` is a whole number of 256-element super-blocks, `dst` exactly their
/// 84-byte blocks and `importance` as long as `src`.
pub fn quantize_q2_k(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_super_blocks(
        src,
        importance,
        dst,
        Q2_K_BYTES,
        1.0,
        DefaultWeight::AvAbs,
        false,
        |x, w, out| {
            write_q2_k(&encode_affine_super(x, w, 16, 3, 15), out);
        },
    );
}

/// Writes one Q2_K block (84 bytes) from its stored form.
pub(crate) fn write_q2_k(s: &AffineSuper, out: &mut [u8]) {
    for j in 0..16 {
        out[j] = (s.ls[j] & 0x0F) | (s.lm[j] << 4);
    }
    pack_2bit(&s.q, &mut out[16..80]);
    out[80..82].copy_from_slice(&s.d.to_le_bytes());
    out[82..84].copy_from_slice(&s.dmin.to_le_bytes());
}

/// Quantizes whole super-blocks of `src` to Q3_K (`y = (d · sc) · q`, 3-bit
/// `q` in -4..=3, signed 6-bit `sc` per 16 elements).
///
/// Same contract as [`quantize_q2_k`], with 110-byte blocks.
pub fn quantize_q3_k(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -4, hi: 3 };
    let sgrid = Uniform { lo: -32, hi: 31 };
    for_super_blocks(
        src,
        importance,
        dst,
        Q3_K_BYTES,
        2.0,
        DefaultWeight::Sqrt,
        false,
        |x, w, out| {
            write_q3_k(&encode_sym_super(x, w, 16, grid, sgrid), out);
        },
    );
}

/// Writes one Q3_K block (110 bytes) from its stored form (quant indices 0..8 for
/// -4..=3, scale indices 0..64 for -32..=31).
pub(crate) fn write_q3_k(s: &SymSuper, out: &mut [u8]) {
    {
        // Index q (0..8) is the quant q - 4: low 2 bits in qs, bit 2 in hmask.
        let (hmask, rest) = out.split_at_mut(32);
        let (qs, rest) = rest.split_at_mut(64);
        let (scales, d) = rest.split_at_mut(12);
        hmask.fill(0);
        for (e, &q) in s.q.iter().enumerate() {
            hmask[e % 32] |= ((q >> 2) & 1) << (e / 32);
        }
        pack_2bit(&s.q, qs);
        scales.fill(0);
        for (j, &u) in s.ls.iter().enumerate() {
            // Index u (0..64) is the scale u - 32, stored as u.
            scales[j % 8] |= (u & 0x0F) << (4 * (j / 8));
            scales[8 + j % 4] |= (u >> 4) << (2 * (j / 4));
        }
        d.copy_from_slice(&s.d.to_le_bytes());
    }
}

/// Quantizes whole super-blocks of `src` to Q4_K (`y = (d · sc) · q - dmin · m`,
/// 4-bit `q`, 6-bit `sc` and `m` per 32 elements).
///
/// Same contract as [`quantize_q2_k`], with 144-byte blocks.
pub fn quantize_q4_k(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_super_blocks(
        src,
        importance,
        dst,
        Q4_K_BYTES,
        2.0,
        DefaultWeight::AvAbs,
        false,
        |x, w, out| {
            write_q4_k(&encode_affine_super(x, w, 32, 15, 63), out);
        },
    );
}

/// Writes one Q4_K block (144 bytes) from its stored form.
pub(crate) fn write_q4_k(s: &AffineSuper, out: &mut [u8]) {
    out[0..2].copy_from_slice(&s.d.to_le_bytes());
    out[2..4].copy_from_slice(&s.dmin.to_le_bytes());
    pack_scale_min_k4(&s.ls[..8], &s.lm[..8], &mut out[4..16]);
    pack_4bit_k(&s.q, &mut out[16..144]);
}

/// Quantizes whole super-blocks of `src` to Q5_K (`y = (d · sc) · q - dmin · m`,
/// 5-bit `q`, 6-bit `sc` and `m` per 32 elements).
///
/// Same contract as [`quantize_q2_k`], with 176-byte blocks.
pub fn quantize_q5_k(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    for_super_blocks(
        src,
        importance,
        dst,
        Q5_K_BYTES,
        2.0,
        DefaultWeight::AvAbs,
        false,
        |x, w, out| {
            write_q5_k(&encode_affine_super(x, w, 32, 31, 63), out);
        },
    );
}

/// Writes one Q5_K block (176 bytes) from its stored form.
pub(crate) fn write_q5_k(s: &AffineSuper, out: &mut [u8]) {
    out[0..2].copy_from_slice(&s.d.to_le_bytes());
    out[2..4].copy_from_slice(&s.dmin.to_le_bytes());
    pack_scale_min_k4(&s.ls[..8], &s.lm[..8], &mut out[4..16]);
    let qh = &mut out[16..48];
    qh.fill(0);
    for (e, &q) in s.q.iter().enumerate() {
        qh[e % 32] |= ((q >> 4) & 1) << (e / 32);
    }
    pack_4bit_k(&s.q, &mut out[48..176]);
}

/// Quantizes whole super-blocks of `src` to Q6_K (`y = (d · sc) · q`, 6-bit `q`
/// in -32..=31, signed 8-bit `sc` per 16 elements).
///
/// Same contract as [`quantize_q2_k`], with 210-byte blocks.
pub fn quantize_q6_k(src: &[f32], importance: Option<&[f32]>, dst: &mut [u8]) {
    let grid = Uniform { lo: -32, hi: 31 };
    let sgrid = Uniform { lo: -128, hi: 127 };
    for_super_blocks(
        src,
        importance,
        dst,
        Q6_K_BYTES,
        1.0,
        DefaultWeight::Sqrt,
        true,
        |x, w, out| {
            write_q6_k(&encode_sym_super(x, w, 16, grid, sgrid), out);
        },
    );
}

/// Writes one Q6_K block (210 bytes) from its stored form (quant indices 0..64 for
/// -32..=31, scale indices 0..256 for -128..=127).
pub(crate) fn write_q6_k(s: &SymSuper, out: &mut [u8]) {
    {
        let (ql, rest) = out.split_at_mut(128);
        let (qh, rest) = rest.split_at_mut(64);
        let (scales, d) = rest.split_at_mut(16);
        ql.fill(0);
        qh.fill(0);
        // Index u (0..64) is the quant u - 32, stored as u.
        for (e, &u) in s.q.iter().enumerate() {
            let (n, r) = (e / 128, e % 128);
            let (k, l) = (r / 32, r % 32);
            ql[64 * n + l + 32 * (k % 2)] |= (u & 0x0F) << (4 * (k / 2));
            qh[32 * n + l] |= (u >> 4) << (2 * k);
        }
        for (o, &u) in scales.iter_mut().zip(&s.ls) {
            *o = u ^ 0x80; // index u is the scale u - 128
        }
        d.copy_from_slice(&s.d.to_le_bytes());
    }
}
