//! Building blocks shared by every quantizer: rounding, the value grids a block
//! type can store, per-element weights, and the weighted least-squares searches
//! for a group's scale (and min).
//!
//! The searches follow the ideas of ggml's `make_qx_quants`, `make_qkx3_quants`,
//! `make_qp_quants` and the IQ4 scale search: try a fan of candidate scales around
//! "the largest element lands on an end of the grid", re-fit the scale by weighted
//! least squares for each assignment, keep the best, then polish it with
//! alternating re-assignment / re-fit steps (Lloyd iterations) and single-element
//! moves. Every loop is bounded, and NaN or infinite inputs only produce garbage
//! values, never a panic.

use half::f16;

/// Groups whose largest magnitude is below this are stored as all zeros (ggml's
/// `GROUP_MAX_EPS`).
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// Largest group any search handles (a TQ1_0 / TQ2_0 block; legacy blocks,
/// Q2_0 blocks and k-quant sub-blocks are smaller).
pub(crate) const MAX_GROUP: usize = 256;

/// Grids with at most this many levels (and affine fits with at most this many
/// steps) also try every level as the image of the extreme element, so that data
/// already on a coarser grid of the type is found exactly.
const EXACT_LEVELS: usize = 32;

/// Uniform weights, the fallback when a group's weights sum to nothing.
const ONES: [f32; MAX_GROUP] = [1.0; MAX_GROUP];

/// Rounds to the nearest integer, ties to even (ggml's `nearest_int`).
///
/// The input is clamped to ±2^22 first, which keeps the magic-number trick exact;
/// NaN comes out as 0 (its payload bits), so the result is always usable after a
/// clamp.
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let v = x.clamp(-4_194_303.0, 4_194_303.0) + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Rounds `x` to IEEE half (nearest, ties to even): its bits and its value as f32.
#[inline(always)]
pub(crate) fn to_f16(x: f32) -> (u16, f32) {
    let h = f16::from_f32(x);
    (h.to_bits(), h.to_f32())
}

/// The set of values one quant index can stand for, before scaling.
pub(crate) trait Grid: Copy {
    /// The value of index `i`.
    fn level(self, i: u8) -> f32;
    /// The index whose value is nearest to `v` (NaN gives some valid index).
    fn index(self, v: f32) -> u8;
    /// `level(index(v))`, computed without branches or tables so that loops over
    /// it vectorize.
    fn quant(self, v: f32) -> f32;
    /// The values at the two ends of the grid.
    fn ends(self) -> (f32, f32);
    /// The scale search around each end: step and number of steps each side.
    fn fan(self) -> (f32, i32);
    /// Number of levels.
    fn len(self) -> usize;
}

/// The integers `lo..=hi` (`lo <= 0 < hi`, at most 256 of them); index `i` is the
/// integer `lo + i`, which is exactly what the block formats store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Uniform {
    /// Smallest integer.
    pub lo: i32,
    /// Largest integer.
    pub hi: i32,
}

impl Grid for Uniform {
    #[inline(always)]
    fn level(self, i: u8) -> f32 {
        (i as i32 + self.lo) as f32
    }

    #[inline(always)]
    fn index(self, v: f32) -> u8 {
        (nearest_int(v).max(self.lo).min(self.hi) - self.lo) as u8
    }

    #[inline(always)]
    fn quant(self, v: f32) -> f32 {
        // Clamp first (also maps NaN to `lo`), then round to nearest even with the
        // 1.5 · 2^23 trick, exact for these small magnitudes.
        let v = v.max(self.lo as f32).min(self.hi as f32);
        (v + 12_582_912.0) - 12_582_912.0
    }

    fn ends(self) -> (f32, f32) {
        (self.lo as f32, self.hi as f32)
    }

    fn fan(self) -> (f32, i32) {
        (0.1, 9)
    }

    fn len(self) -> usize {
        (self.hi - self.lo + 1) as usize
    }
}

/// The 16-value non-linear grid of IQ4_NL and IQ4_XS.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Iq4;

/// Sums of neighbouring IQ4 grid values: `v` picks index `j` once `2v` reaches
/// `SUMS[j] = grid[j-1] + grid[j]`.
const IQ4_SUMS: [f32; 16] = {
    let g = crate::quants::iq4::KVALUES_IQ4NL;
    let mut out = [0f32; 16];
    let mut j = 1;
    while j < 16 {
        out[j] = (g[j - 1] as i32 + g[j] as i32) as f32;
        j += 1;
    }
    out
};

/// Differences of neighbouring IQ4 grid values (`STEPS[j] = grid[j] - grid[j-1]`).
const IQ4_STEPS: [f32; 16] = {
    let g = crate::quants::iq4::KVALUES_IQ4NL;
    let mut out = [0f32; 16];
    let mut j = 1;
    while j < 16 {
        out[j] = (g[j] as i32 - g[j - 1] as i32) as f32;
        j += 1;
    }
    out
};

/// The IQ4 grid as f32.
const IQ4_LEVELS: [f32; 16] = {
    let g = crate::quants::iq4::KVALUES_IQ4NL;
    let mut out = [0f32; 16];
    let mut j = 0;
    while j < 16 {
        out[j] = g[j] as f32;
        j += 1;
    }
    out
};

impl Grid for Iq4 {
    #[inline(always)]
    fn level(self, i: u8) -> f32 {
        IQ4_LEVELS[(i & 15) as usize]
    }

    #[inline(always)]
    fn index(self, v: f32) -> u8 {
        // Branch-free binary search over the sorted grid (NaN compares false: 0).
        let v2 = v + v;
        let mut idx = 0usize;
        for step in [8, 4, 2, 1] {
            let j = idx + step;
            if v2 >= IQ4_SUMS[j] {
                idx = j;
            }
        }
        idx as u8
    }

    #[inline(always)]
    fn quant(self, v: f32) -> f32 {
        // The first level plus every step whose midpoint `v` reaches.
        let v2 = v + v;
        let mut q = IQ4_LEVELS[0];
        for j in 1..16 {
            q += if v2 >= IQ4_SUMS[j] { IQ4_STEPS[j] } else { 0.0 };
        }
        q
    }

    fn ends(self) -> (f32, f32) {
        (IQ4_LEVELS[0], IQ4_LEVELS[15])
    }

    fn fan(self) -> (f32, i32) {
        (1.0, 7)
    }

    fn len(self) -> usize {
        16
    }
}

/// How a quantizer weighs the squared error of each element when the caller gave
/// no importance.
///
/// llama.cpp's `x²` default (`make_qx_quants` with `rmse_type = 1`, used for
/// Q3_K, Q6_K and IQ4) favours large elements so much that on rows with outliers
/// the plain squared error of our search under it ended up above that of plain
/// max-abs rounding (by 0.6-7% MSE for Q4_0, Q5_0, Q3_K, IQ4_NL and IQ4_XS in this
/// crate's tests), so it is not used.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DefaultWeight {
    /// `sqrt(σ² + x²)`: the importance formula with all-ones importance.
    Sqrt,
    /// `sqrt(σ²) + |x|`: llama.cpp's default for Q4_K/Q5_K (`av_x + |x|`).
    AvAbs,
}

/// Per-element weights of one group: `qw · sqrt(σ² + x²)` with importance `qw`
/// (ggml's `_impl` quantizers), else the type's default.
pub(crate) fn weights(
    x: &[f32],
    qw: Option<&[f32]>,
    sigma2: f32,
    default: DefaultWeight,
    w: &mut [f32],
) {
    match qw {
        Some(qw) => {
            for ((w, &x), &q) in w.iter_mut().zip(x).zip(qw) {
                *w = q * (sigma2 + x * x).sqrt();
            }
        }
        None => match default {
            DefaultWeight::Sqrt => {
                for (w, &x) in w.iter_mut().zip(x) {
                    *w = (sigma2 + x * x).sqrt();
                }
            }
            DefaultWeight::AvAbs => {
                let av = sigma2.sqrt();
                for (w, &x) in w.iter_mut().zip(x) {
                    *w = av + x.abs();
                }
            }
        },
    }
}

/// Mean of `x²`.
pub(crate) fn mean_square(x: &[f32]) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32
}

/// `w` itself when its sum is positive and finite, else uniform weights: a group
/// whose weights are all zero still gets a sensible fit.
#[inline]
pub(crate) fn usable(w: &[f32]) -> &[f32] {
    let s: f32 = w.iter().sum();
    if s > 0.0 && s.is_finite() {
        w
    } else {
        &ONES[..w.len()]
    }
}

/// Lanes of the accumulators: the sums over a group are kept in 8 partial sums so
/// that the loops vectorize (every group is a multiple of 8 elements).
const LANES: usize = 8;

/// `(Σ w x q, Σ w q²)` with `q = grid.quant(iscale · x)`; `wx` is `w · x`.
#[inline(always)]
fn score_sums<G: Grid>(x: &[f32], w: &[f32], wx: &[f32], grid: G, iscale: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    for ((x, w), wx) in x
        .chunks_exact(LANES)
        .zip(w.chunks_exact(LANES))
        .zip(wx.chunks_exact(LANES))
    {
        for k in 0..LANES {
            let q = grid.quant(iscale * x[k]);
            a[k] += wx[k] * q;
            b[k] += w[k] * q * q;
        }
    }
    (a.iter().sum(), b.iter().sum())
}

/// The score `(Σ w x q)² / Σ w q²` of a symmetric fit: the weighted error its
/// least-squares scale removes (higher is better); `None` when undefined.
#[inline]
fn score(sxq: f32, sq2: f32) -> Option<f64> {
    if sq2 > 0.0 {
        let s = (sxq as f64) * (sxq as f64) / sq2 as f64;
        s.is_finite().then_some(s)
    } else {
        None
    }
}

/// Weighted least-squares fit of `x ≈ d · grid[idx]` (a multiple of 8 elements,
/// at most [`MAX_GROUP`]): writes the chosen indices to `idx` and returns `d` (0
/// for an all-zero group, whose indices are then those of value 0).
pub(crate) fn fit_scale<G: Grid>(x: &[f32], w: &[f32], grid: G, idx: &mut [u8]) -> f32 {
    let n = x.len();
    debug_assert!(n <= MAX_GROUP && n.is_multiple_of(LANES) && w.len() == n && idx.len() == n);
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if !(amax >= GROUP_MAX_EPS && amax.is_finite()) {
        idx.fill(grid.index(0.0));
        return 0.0;
    }
    let w = usable(w);
    let mut wx = [0f32; MAX_GROUP];
    let wx = &mut wx[..n];
    for ((o, &x), &w) in wx.iter_mut().zip(x).zip(w) {
        *o = w * x;
    }

    // Candidate inverse scales: the largest element on (near) either end of the
    // grid, and on every level of a small grid (which finds the exact scale of
    // data that already sits on a coarser grid of this type).
    let (mut best, mut best_iscale) = (f64::NEG_INFINITY, 0f32);
    let mut try_iscale = |iscale: f32| {
        let (sxq, sq2) = score_sums(x, w, wx, grid, iscale);
        if let Some(s) = score(sxq, sq2) {
            if s > best {
                best = s;
                best_iscale = iscale;
            }
        }
    };
    let (step, count) = grid.fan();
    let (first, last) = grid.ends();
    for end in [first, last] {
        if end == 0.0 {
            continue;
        }
        for k in -count..=count {
            let t = end + step * k as f32;
            if t * end > 0.0 {
                try_iscale(t / max);
            }
        }
    }
    if grid.len() <= EXACT_LEVELS {
        for i in 0..grid.len() as u8 {
            let t = grid.level(i);
            if t.abs() >= 1.0 {
                try_iscale(t / max);
            }
        }
    }
    if best == f64::NEG_INFINITY {
        idx.fill(grid.index(0.0));
        return 0.0;
    }

    // Lloyd: re-assign at the fitted scale, re-fit, while it helps.
    for _ in 0..4 {
        let (sxq, sq2) = score_sums(x, w, wx, grid, best_iscale);
        let d = sxq / sq2;
        if !(d != 0.0 && d.is_finite()) {
            break;
        }
        match score_sums(x, w, wx, grid, 1.0 / d) {
            (a, b) if score(a, b).is_some_and(|s| s > best) => {
                best = score(a, b).unwrap_or(best);
                best_iscale = 1.0 / d;
            }
            _ => break,
        }
    }

    let (mut sxq, mut sq2) = (0f32, 0f32);
    for i in 0..n {
        idx[i] = grid.index(best_iscale * x[i]);
        let q = grid.level(idx[i]);
        sxq += wx[i] * q;
        sq2 += w[i] * q * q;
    }
    // Single-element moves: put one element where the scale fitted to the others
    // wants it, keep the move if the whole group's fit improves.
    let mut best = score(sxq, sq2).unwrap_or(f64::NEG_INFINITY);
    for _ in 0..2 {
        let mut changed = false;
        for i in 0..n {
            let q = grid.level(idx[i]);
            let (sxq_i, sq2_i) = (sxq - wx[i] * q, sq2 - w[i] * q * q);
            if sxq_i == 0.0 || !(sq2_i > 0.0) {
                continue;
            }
            let ni = grid.index(x[i] * sq2_i / sxq_i);
            if ni == idx[i] {
                continue;
            }
            let nq = grid.level(ni);
            let (a, b) = (sxq_i + wx[i] * nq, sq2_i + w[i] * nq * nq);
            if let Some(s) = score(a, b) {
                if s > best {
                    (best, sxq, sq2) = (s, a, b);
                    idx[i] = ni;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    if sq2 > 0.0 {
        sxq / sq2
    } else {
        0.0
    }
}

/// `(Σ w l, Σ w l², Σ w x l)` for `l = round(clamp(iscale · (x - off), 0, nmax))`.
#[inline(always)]
fn affine_sums(
    x: &[f32],
    w: &[f32],
    wx: &[f32],
    iscale: f32,
    off: f32,
    nmax: f32,
) -> (f32, f32, f32) {
    let (mut a, mut b, mut c) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for ((x, w), wx) in x
        .chunks_exact(LANES)
        .zip(w.chunks_exact(LANES))
        .zip(wx.chunks_exact(LANES))
    {
        for k in 0..LANES {
            let v = (iscale * (x[k] - off)).max(0.0).min(nmax);
            let l = (v + 12_582_912.0) - 12_582_912.0;
            a[k] += w[k] * l;
            b[k] += w[k] * l * l;
            c[k] += wx[k] * l;
        }
    }
    (a.iter().sum(), b.iter().sum(), c.iter().sum())
}

/// The weighted least-squares `(d, m)` of `x ≈ d · l + m` from the sums of a
/// level assignment (`m` kept `<= 0` unless `free_min`), with its weighted error
/// less the constant `Σ w x²` (lower is better).
#[inline]
fn affine_fit(
    sw: f32,
    sx: f32,
    (sl, sl2, sxl): (f32, f32, f32),
    free_min: bool,
) -> (f32, f32, f64) {
    let det = sw * sl2 - sl * sl;
    let (mut d, mut m) = if det > 0.0 {
        ((sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det)
    } else {
        (0.0, sx / sw)
    };
    if !free_min && m > 0.0 {
        m = 0.0;
        d = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
    }
    let (df, mf) = (d as f64, m as f64);
    let err = df * df * sl2 as f64 + mf * mf * sw as f64 + 2.0 * df * mf * sl as f64
        - 2.0 * df * sxl as f64
        - 2.0 * mf * sx as f64;
    (d, m, if err.is_finite() { err } else { f64::INFINITY })
}

/// Weighted least-squares fit of `x ≈ d · l + m` with integer `l` in `0..=nmax`
/// (a multiple of 8 elements, at most [`MAX_GROUP`]): writes `l` and returns
/// `(d, m)`.
///
/// `m <= 0` unless `free_min` (the k-quants store `-m` unsigned; Q4_1/Q5_1 store
/// `m` as a signed half, so they may use a positive min).
pub(crate) fn fit_affine(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    free_min: bool,
    l: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    debug_assert!(n <= MAX_GROUP && n.is_multiple_of(LANES) && w.len() == n && l.len() == n);
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
    }
    if !free_min && lo > 0.0 {
        lo = 0.0;
    }
    if !(hi > lo && (hi - lo).is_finite()) {
        l.fill(0);
        return (0.0, if lo.is_finite() { lo } else { 0.0 });
    }
    let w = usable(w);
    let mut wx = [0f32; MAX_GROUP];
    let wx = &mut wx[..n];
    let (mut sw, mut sx) = (0f32, 0f32);
    for ((o, &x), &w) in wx.iter_mut().zip(x).zip(w) {
        *o = w * x;
        sw += w;
        sx += w * x;
    }
    let nmaxf = nmax as f32;

    // Steps across the range: nmax first (plain min/max rounding), then the fan
    // nmax - 0.9, nmax - 0.85, ..., nmax + 0.9 of ggml's `make_qkx3_quants`, then
    // every whole number of steps below nmax (exact for data on a coarser grid).
    let range = hi - lo;
    let exact = if nmax as usize <= EXACT_LEVELS {
        nmax - 1
    } else {
        0
    };
    let (mut best, mut best_is, mut best_off) = (f64::INFINITY, 0f32, lo);
    let (mut best_d, mut best_m) = (0f32, lo);
    for k in -1..=36 + exact {
        let steps = match k {
            -1 => nmaxf,
            0..=36 => nmaxf - 0.9 + 0.05 * k as f32,
            _ => (k - 36) as f32,
        };
        let iscale = steps / range;
        let (d, m, err) = affine_fit(sw, sx, affine_sums(x, w, wx, iscale, lo, nmaxf), free_min);
        if err < best {
            (best, best_is, best_off, best_d, best_m) = (err, iscale, lo, d, m);
        }
    }
    if best == f64::INFINITY {
        l.fill(0);
        return (0.0, lo);
    }
    // Lloyd: re-assign at the fitted (d, m), re-fit, while it helps.
    for _ in 0..4 {
        if !(best_d > 0.0 && best_d.is_finite()) {
            break;
        }
        let iscale = 1.0 / best_d;
        let (d, m, err) = affine_fit(
            sw,
            sx,
            affine_sums(x, w, wx, iscale, best_m, nmaxf),
            free_min,
        );
        if err < best {
            (best, best_is, best_off, best_d, best_m) = (err, iscale, best_m, d, m);
        } else {
            break;
        }
    }
    for (l, &x) in l.iter_mut().zip(x) {
        *l = nearest_int(best_is * (x - best_off)).max(0).min(nmax) as u8;
    }
    (best_d, best_m)
}

/// `Σ w (x - y)²` in f64.
#[cfg(test)]
pub(crate) fn weighted_err(x: &[f32], w: &[f32], y: &[f32]) -> f64 {
    let mut e = 0f64;
    for ((&x, &w), &y) in x.iter().zip(w).zip(y) {
        let d = (x - y) as f64;
        e += w as f64 * d * d;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_ties_to_even_and_survives_nan() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(1e30), 4_194_303);
        assert_eq!(nearest_int(f32::NEG_INFINITY), -4_194_303);
        let _ = nearest_int(f32::NAN);
    }

    #[test]
    fn iq4_index_is_nearest() {
        let g = Iq4;
        for k in -1400..1400 {
            let v = k as f32 * 0.1;
            let i = g.index(v);
            let best = (0..16u8)
                .min_by(|&a, &b| {
                    (g.level(a) - v)
                        .abs()
                        .partial_cmp(&(g.level(b) - v).abs())
                        .unwrap()
                })
                .unwrap();
            assert!(
                (g.level(i) - v).abs() <= (g.level(best) - v).abs(),
                "v {v}: {i} vs {best}"
            );
        }
    }

    #[test]
    fn fit_scale_exact_on_grid() {
        // Values exactly on a scaled grid come back exactly.
        let g = Uniform { lo: -8, hi: 7 };
        let x: Vec<f32> = (0..32).map(|i| ((i % 16) as f32 - 8.0) * 0.25).collect();
        let w = vec![1.0; 32];
        let mut idx = [0u8; 32];
        let d = fit_scale(&x, &w, g, &mut idx);
        for (i, &v) in x.iter().enumerate() {
            assert_eq!(d * g.level(idx[i]), v);
        }
    }

    #[test]
    fn fit_affine_exact_on_grid() {
        let x: Vec<f32> = (0..32).map(|i| 0.5 * (i % 16) as f32 + 3.0).collect();
        let w = vec![1.0; 32];
        let mut l = [0u8; 32];
        let (d, m) = fit_affine(&x, &w, 15, true, &mut l);
        for (i, &v) in x.iter().enumerate() {
            assert!((d * l[i] as f32 + m - v).abs() < 1e-5);
        }
    }
}
