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

/// Largest group any search handles (a legacy block or a k-quant sub-block).
pub(crate) const MAX_GROUP: usize = 32;

/// Uniform weights, the fallback when a group's weights sum to nothing.
const ONES: [f32; MAX_GROUP] = [1.0; MAX_GROUP];

/// Rounds to the nearest integer, ties to even (ggml's `nearest_int`).
///
/// The input is clamped to ±2^22 first, which keeps the magic-number trick exact
/// and maps NaN to a finite value, so the result is always usable after a clamp.
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let v = x.max(-4_194_303.0).min(4_194_303.0) + 12_582_912.0;
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
    /// The values at the two ends of the grid.
    fn ends(self) -> (f32, f32);
    /// The scale search around each end: step and number of steps each side.
    fn fan(self) -> (f32, i32);
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

    fn ends(self) -> (f32, f32) {
        (self.lo as f32, self.hi as f32)
    }

    fn fan(self) -> (f32, i32) {
        (0.1, 9)
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

    fn ends(self) -> (f32, f32) {
        (IQ4_LEVELS[0], IQ4_LEVELS[15])
    }

    fn fan(self) -> (f32, i32) {
        (1.0, 7)
    }
}

/// How a quantizer weighs the squared error of each element when the caller gave
/// no importance (llama.cpp's defaults for the type).
#[derive(Clone, Copy, Debug)]
pub(crate) enum DefaultWeight {
    /// `x²`: favours the large elements (`make_qx_quants` with `rmse_type = 1`).
    Square,
    /// `sqrt(σ²) + |x|` with `σ²` the caller's spread (the k-quants' `av_x + |x|`).
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
            DefaultWeight::Square => {
                for (w, &x) in w.iter_mut().zip(x) {
                    *w = x * x;
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
fn usable(w: &[f32]) -> &[f32] {
    let s: f32 = w.iter().sum();
    if s > 0.0 && s.is_finite() {
        w
    } else {
        &ONES[..w.len()]
    }
}

/// Running sums of a symmetric fit: `Σ w x q` and `Σ w q²`.
#[derive(Clone, Copy)]
struct Sums {
    sxq: f32,
    sq2: f32,
    score: f64,
}

impl Sums {
    const NONE: Sums = Sums {
        sxq: 0.0,
        sq2: 0.0,
        score: f64::NEG_INFINITY,
    };

    /// The sums with their score `(Σ w x q)² / Σ w q²`: the weighted error the
    /// least-squares scale removes (higher is better). `None` when undefined.
    #[inline]
    fn new(sxq: f32, sq2: f32) -> Option<Sums> {
        if sq2 > 0.0 {
            let score = (sxq as f64) * (sxq as f64) / sq2 as f64;
            score.is_finite().then_some(Sums { sxq, sq2, score })
        } else {
            None
        }
    }
}

/// Assigns every element to its nearest level at inverse scale `iscale`; returns
/// `(Σ w x q, Σ w q²)`.
#[inline(always)]
fn assign<G: Grid>(x: &[f32], w: &[f32], grid: G, iscale: f32, idx: &mut [u8]) -> (f32, f32) {
    let (mut sxq, mut sq2) = (0f32, 0f32);
    for ((i, &x), &w) in idx.iter_mut().zip(x).zip(w) {
        *i = grid.index(iscale * x);
        let q = grid.level(*i);
        sxq += w * x * q;
        sq2 += w * q * q;
    }
    (sxq, sq2)
}

/// Weighted least-squares fit of `x ≈ d · grid[idx]` (up to [`MAX_GROUP`]
/// elements): writes the chosen indices to `idx` and returns `d` (0 for an
/// all-zero group, whose indices are then those of value 0).
pub(crate) fn fit_scale<G: Grid>(x: &[f32], w: &[f32], grid: G, idx: &mut [u8]) -> f32 {
    let n = x.len();
    debug_assert!(n <= MAX_GROUP && w.len() == n && idx.len() == n);
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

    let mut best = Sums::NONE;
    let mut aux = [0u8; MAX_GROUP];
    let aux = &mut aux[..n];
    let (step, count) = grid.fan();
    let (first, last) = grid.ends();
    for end in [first, last] {
        if end == 0.0 {
            continue;
        }
        for k in -count..=count {
            let t = end + step * k as f32;
            if t * end <= 0.0 {
                continue;
            }
            let (sxq, sq2) = assign(x, w, grid, t / max, aux);
            if let Some(s) = Sums::new(sxq, sq2) {
                if s.score > best.score {
                    best = s;
                    idx.copy_from_slice(aux);
                }
            }
        }
    }
    if best.score == f64::NEG_INFINITY {
        idx.fill(grid.index(0.0));
        return 0.0;
    }

    // Lloyd: re-assign at the fitted scale, re-fit, while it helps.
    for _ in 0..4 {
        let d = best.sxq / best.sq2;
        if !(d != 0.0 && d.is_finite()) {
            break;
        }
        let (sxq, sq2) = assign(x, w, grid, 1.0 / d, aux);
        match Sums::new(sxq, sq2) {
            Some(s) if s.score > best.score => {
                best = s;
                idx.copy_from_slice(aux);
            }
            _ => break,
        }
    }

    // Single-element moves: put one element where the scale fitted to the others
    // wants it, keep the move if the whole group's fit improves.
    for _ in 0..3 {
        let mut changed = false;
        for i in 0..n {
            let q = grid.level(idx[i]);
            let sxq = best.sxq - w[i] * x[i] * q;
            let sq2 = best.sq2 - w[i] * q * q;
            if sxq == 0.0 || !(sq2 > 0.0) {
                continue;
            }
            let ni = grid.index(x[i] * sq2 / sxq);
            if ni == idx[i] {
                continue;
            }
            let nq = grid.level(ni);
            if let Some(s) = Sums::new(sxq + w[i] * x[i] * nq, sq2 + w[i] * nq * nq) {
                if s.score > best.score {
                    best = s;
                    idx[i] = ni;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    best.sxq / best.sq2
}

/// Weighted least-squares `(d, m)` of `x ≈ d · l + m` for fixed integer levels `l`;
/// `m` is kept `<= 0` unless `free_min`. Also returns the weighted error.
#[inline]
fn affine_ls(x: &[f32], w: &[f32], l: &[u8], sw: f32, sx: f32, free_min: bool) -> (f32, f32, f32) {
    let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
    for ((&x, &w), &l) in x.iter().zip(w).zip(l) {
        let l = l as f32;
        sl += w * l;
        sl2 += w * l * l;
        sxl += w * l * x;
    }
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
    let mut err = 0f32;
    for ((&x, &w), &l) in x.iter().zip(w).zip(l) {
        let diff = d * l as f32 + m - x;
        err += w * diff * diff;
    }
    (d, m, err)
}

/// Assigns levels `0..=nmax` for `x ≈ d · l + m` at inverse scale `iscale`.
#[inline(always)]
fn assign_affine(x: &[f32], iscale: f32, m: f32, nmax: i32, l: &mut [u8]) {
    for (l, &x) in l.iter_mut().zip(x) {
        *l = nearest_int(iscale * (x - m)).max(0).min(nmax) as u8;
    }
}

/// Weighted least-squares fit of `x ≈ d · l + m` with integer `l` in `0..=nmax`
/// (up to [`MAX_GROUP`] elements): writes `l` and returns `(d, m)`.
///
/// `m <= 0` unless `free_min` (the k-quants store `-m` unsigned; Q4_1/Q5_1 store
/// `m` as a signed half, so they may use a positive min).
pub(crate) fn fit_affine(x: &[f32], w: &[f32], nmax: i32, free_min: bool, l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    debug_assert!(n <= MAX_GROUP && w.len() == n && l.len() == n);
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
    let (mut sw, mut sx) = (0f32, 0f32);
    for (&x, &w) in x.iter().zip(w) {
        sw += w;
        sx += w * x;
    }

    let range = hi - lo;
    let mut aux = [0u8; MAX_GROUP];
    let aux = &mut aux[..n];
    let (mut best_d, mut best_m, mut best_err) = (0f32, 0f32, f32::INFINITY);
    // Offsets of `nmax` for the inverse scale: 0 first (plain min/max rounding),
    // then the fan -0.9, -0.85, ..., +0.9 of ggml's `make_qkx3_quants`.
    for k in -1..=36 {
        let off = if k < 0 { 0.0 } else { -0.9 + 0.05 * k as f32 };
        assign_affine(x, (nmax as f32 + off) / range, lo, nmax, aux);
        let (d, m, err) = affine_ls(x, w, aux, sw, sx, free_min);
        if err < best_err {
            (best_d, best_m, best_err) = (d, m, err);
            l.copy_from_slice(aux);
        }
    }
    if best_err == f32::INFINITY {
        l.fill(0);
        return (0.0, lo);
    }
    // Lloyd: re-assign at the fitted (d, m), re-fit, while it helps.
    for _ in 0..4 {
        if !(best_d > 0.0 && best_d.is_finite()) {
            break;
        }
        assign_affine(x, 1.0 / best_d, best_m, nmax, aux);
        let (d, m, err) = affine_ls(x, w, aux, sw, sx, free_min);
        if err < best_err {
            (best_d, best_m, best_err) = (d, m, err);
            l.copy_from_slice(aux);
        } else {
            break;
        }
    }
    (best_d, best_m)
}

/// `Σ w (x - y)²` in f64.
#[inline]
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
