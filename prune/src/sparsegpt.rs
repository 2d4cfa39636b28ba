//! SparseGPT (Frantar & Alistarh, 2023): prune one column at a time and move each
//! removed weight's contribution onto the columns not yet visited, using the
//! input Hessian's inverse, exactly as GPTQ does for rounding error.
//!
//! With `U` the upper Cholesky factor of `(H + λI)⁻¹`, column `i` is visited in
//! order; a removed weight `w_ri` leaves the error `e_r = w_ri / U_ii`, and every
//! later column `j` of that row takes `w_rj −= U_ij · e_r`. Masks are chosen
//! with the OBS saliency `w² / U_ii²` on the current (already compensated)
//! weights: for unstructured sparsity once per block of `block_size` columns,
//! for N:M at the start of every group of `m` columns. Updates inside a block go
//! column by column; the rest of the row gets the block's errors in one GEMM
//! (the "lazy batch" of the reference).
//!
//! The reference chooses an unstructured block's mask over all rows at once; here
//! each row removes the same fraction of every block (Wanda's per-output
//! comparison group, which the Wanda paper found better for LLMs), so rows are
//! independent and run in parallel.

use crate::pattern::{mark_lowest, Pattern};
use model::calib::factor::UpperFactor;
use rayon::prelude::*;

/// Prunes `w` (`rows × cols`, row-major) in place to `pattern` with
/// compensating updates. `u` is the upper Cholesky factor of the damped inverse
/// Hessian (`cols × cols`, natural column order). Removed weights become
/// exactly zero. For N:M, `block_size` must be a multiple of `m`.
pub fn sparsegpt(w: &mut [f32], cols: usize, u: &UpperFactor, pattern: Pattern, block_size: usize) {
    assert_eq!(u.n(), cols, "SparseGPT: U is not cols × cols");
    if let Pattern::NM { m, .. } = pattern {
        assert!(
            block_size.is_multiple_of(m),
            "SparseGPT: block {block_size} is not a multiple of {m}"
        );
        assert!(
            cols.is_multiple_of(m),
            "SparseGPT: {cols} columns are not a multiple of {m}"
        );
    }
    let rows = w.len() / cols;
    let per_task = rows.div_ceil(2 * rayon::current_num_threads()).max(16);
    w.par_chunks_mut(per_task * cols)
        .for_each(|chunk| prune_rows(chunk, cols, u, pattern, block_size));
}

/// SparseGPT on one chunk of rows, in place.
fn prune_rows(w: &mut [f32], cols: usize, u: &UpperFactor, pattern: Pattern, block_size: usize) {
    let m = w.len() / cols;
    // Columns as contiguous rows: wt[j·m + r] is row r's weight in column j.
    let mut wt = vec![0f32; cols * m];
    for r in 0..m {
        for j in 0..cols {
            wt[j * m + r] = w[r * cols + j];
        }
    }
    let out = w;
    let mut err = vec![0f32; block_size * m];
    let mut pruned = vec![false; block_size * m];
    let saliency = |wt: &[f32], j: usize, r: usize| {
        let d = u.get(j, j);
        wt[j * m + r] * wt[j * m + r] / (d * d)
    };
    let mut scores = Vec::new();
    let mut marks = Vec::new();
    for i1 in (0..cols).step_by(block_size) {
        let i2 = (i1 + block_size).min(cols);
        let b = i2 - i1;
        pruned[..b * m].fill(false);
        // Chooses, per row, `pattern.count(len)` of columns a..a+len to remove.
        let mut choose = |wt: &[f32], a: usize, len: usize, pruned: &mut [bool]| {
            for r in 0..m {
                scores.clear();
                scores.extend((a..a + len).map(|j| saliency(wt, j, r)));
                marks.clear();
                marks.resize(len, false);
                mark_lowest(&scores, pattern.count(len), &mut marks);
                for (k, &p) in marks.iter().enumerate() {
                    pruned[(a + k - i1) * m + r] = p;
                }
            }
        };
        if let Pattern::Unstructured(_) = pattern {
            choose(&wt, i1, b, &mut pruned);
        }
        for i in i1..i2 {
            if let Pattern::NM { m: group, .. } = pattern {
                if i.is_multiple_of(group) {
                    choose(&wt, i, group, &mut pruned);
                }
            }
            let d = u.get(i, i);
            for r in 0..m {
                let x = wt[i * m + r];
                let q = if pruned[(i - i1) * m + r] { 0.0 } else { x };
                out[r * cols + i] = q;
                err[(i - i1) * m + r] = (x - q) / d;
            }
            let (_, rest) = wt.split_at_mut((i + 1) * m);
            let e = &err[(i - i1) * m..(i - i1 + 1) * m];
            for j in i + 1..i2 {
                let uij = u.get(i, j);
                if uij != 0.0 {
                    for (x, &e) in rest[(j - i - 1) * m..(j - i) * m].iter_mut().zip(e) {
                        *x -= uij * e;
                    }
                }
            }
        }
        if i2 < cols {
            u.subtract_lazy_batch(i1, i2, &err[..b * m], m, &mut wt[i2 * m..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{apply, magnitude_scores, mask, satisfies_nm, zero_fraction};

    /// Correlated inputs (a few shared factors plus noise) and their Hessian.
    fn problem(rows: usize, cols: usize, tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let mut s = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next() as f32).collect();
        let mut x = vec![0f64; tokens * cols];
        for t in 0..tokens {
            let f = [next(), next(), next()];
            for j in 0..cols {
                x[t * cols + j] = f[j % 3] * (1.0 + j as f64 / cols as f64) + 0.2 * next();
            }
        }
        let mut h = vec![0f64; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += 2.0 * x[t * cols + i] * x[t * cols + j] / tokens as f64;
                }
            }
        }
        (w, h.iter().map(|&v| v as f32).collect())
    }

    /// Upper Cholesky factor of the inverse of `h + damp·mean(diag)·I`, in f64 by hand.
    fn upper_inverse_factor(h: &[f32], n: usize) -> UpperFactor {
        let mut a: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        let mean = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            a[i * n + i] += 0.01 * mean;
        }
        // Inverse by Gauss-Jordan.
        let mut inv = vec![0f64; n * n];
        for i in 0..n {
            inv[i * n + i] = 1.0;
        }
        for c in 0..n {
            let p = a[c * n + c];
            for k in 0..n {
                a[c * n + k] /= p;
                inv[c * n + k] /= p;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for k in 0..n {
                        a[r * n + k] -= f * a[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        // inv = Uᵀ U with U upper: U = Lᵀ of the lower Cholesky factor L.
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
                l[i * n + j] = if i == j {
                    (inv[i * n + i] - s).sqrt()
                } else {
                    (inv[i * n + j] - s) / l[j * n + j]
                };
            }
        }
        let mut u = vec![0f32; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = l[j * n + i] as f32;
            }
        }
        UpperFactor::from_dense(u, n)
    }

    /// `Σ_rows (a − b) H (a − b)ᵀ`.
    fn output_error(a: &[f32], b: &[f32], h: &[f32], cols: usize) -> f64 {
        a.chunks(cols)
            .zip(b.chunks(cols))
            .map(|(ra, rb)| {
                let d: Vec<f64> = ra.iter().zip(rb).map(|(x, y)| (x - y) as f64).collect();
                (0..cols)
                    .map(|i| {
                        (0..cols)
                            .map(|j| d[i] * h[i * cols + j] as f64 * d[j])
                            .sum::<f64>()
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn compensation_beats_plain_masks_and_keeps_the_pattern() {
        let (rows, cols) = (24, 48);
        let (w, h) = problem(rows, cols, 400);
        let u = upper_inverse_factor(&h, cols);
        for pattern in [Pattern::Unstructured(0.5), Pattern::NM { n: 2, m: 4 }] {
            let mut s = w.clone();
            sparsegpt(&mut s, cols, &u, pattern, 16);
            let mut plain = w.clone();
            apply(
                &mut plain,
                &mask(&magnitude_scores(&w), cols, pattern, true),
            );
            let (e_sparse, e_plain) = (
                output_error(&w, &s, &h, cols),
                output_error(&w, &plain, &h, cols),
            );
            assert!(
                e_sparse < 0.6 * e_plain,
                "{pattern}: SparseGPT {e_sparse} vs magnitude {e_plain}"
            );
            assert_eq!(zero_fraction(&s), 0.5, "{pattern}");
            if let Pattern::NM { n, m } = pattern {
                assert!(satisfies_nm(&s, n, m));
            }
            for row in s.chunks(cols) {
                assert_eq!(row.iter().filter(|&&v| v == 0.0).count(), cols / 2);
            }
        }
    }

    #[test]
    fn zero_sparsity_changes_nothing() {
        let (rows, cols) = (4, 16);
        let (w, h) = problem(rows, cols, 100);
        let u = upper_inverse_factor(&h, cols);
        let mut s = w.clone();
        sparsegpt(&mut s, cols, &u, Pattern::Unstructured(0.0), 8);
        assert_eq!(s, w);
    }
}
