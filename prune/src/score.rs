//! Importance scores and the masks chosen from them: magnitude `|W_ij|`, and
//! Wanda's `|W_ij| · ‖X_j‖₂` (weight times the norm of its input feature over the
//! calibration tokens).

use crate::pattern::{mark_lowest, Pattern};
use rayon::prelude::*;

/// Magnitude scores `|W_ij|`.
pub fn magnitude_scores(w: &[f32]) -> Vec<f32> {
    w.iter().map(|v| v.abs()).collect()
}

/// Wanda scores `|W_ij| · ‖X_j‖₂` for `w` (`rows × cols`) and the input
/// feature norms `col_norms` (any positive multiple of them ranks the same).
pub fn wanda_scores(w: &[f32], col_norms: &[f32]) -> Vec<f32> {
    let cols = col_norms.len();
    w.chunks(cols)
        .flat_map(|row| row.iter().zip(col_norms).map(|(v, n)| v.abs() * n))
        .collect()
}

/// Wanda in place: zeroes the weights of `w` (`rows × cols`) with the lowest
/// scores `|W_ij| · ‖X_j‖₂` of each row (unstructured) or of each group of `m`
/// along a row (N:M): what [`mask`] of [`wanda_scores`] with `per_row` removes,
/// row by row, without a matrix of scores beside the weights.
pub fn wanda_prune(w: &mut [f32], col_norms: &[f32], pattern: Pattern) {
    let cols = col_norms.len();
    w.par_chunks_mut(cols).for_each(|row| {
        let scores: Vec<f32> = row
            .iter()
            .zip(col_norms)
            .map(|(v, n)| v.abs() * n)
            .collect();
        let mut pruned = vec![false; cols];
        match pattern {
            Pattern::NM { m, .. } => pruned
                .chunks_mut(m)
                .zip(scores.chunks(m))
                .for_each(|(p, s)| mark_lowest(s, pattern.count(m), p)),
            Pattern::Unstructured(_) => mark_lowest(&scores, pattern.count(cols), &mut pruned),
        }
        apply(row, &pruned);
    });
}

/// Which weights to remove (`true`) from `scores` (`rows × cols`): N:M picks the
/// `n` lowest of every group of `m` along a row; unstructured picks the lowest
/// fraction of each row (`per_row`, Wanda's comparison group) or of the whole
/// matrix (the classic magnitude baseline).
pub fn mask(scores: &[f32], cols: usize, pattern: Pattern, per_row: bool) -> Vec<bool> {
    let mut pruned = vec![false; scores.len()];
    match pattern {
        Pattern::NM { m, .. } => {
            pruned
                .par_chunks_mut(m)
                .zip(scores.par_chunks(m))
                .for_each(|(p, s)| mark_lowest(s, pattern.count(m), p));
        }
        Pattern::Unstructured(_) if per_row => {
            pruned
                .par_chunks_mut(cols)
                .zip(scores.par_chunks(cols))
                .for_each(|(p, s)| mark_lowest(s, pattern.count(cols), p));
        }
        Pattern::Unstructured(_) => mark_lowest(scores, pattern.count(scores.len()), &mut pruned),
    }
    pruned
}

/// Sets the weights marked in `pruned` to zero.
pub fn apply(w: &mut [f32], pruned: &[bool]) {
    for (v, &p) in w.iter_mut().zip(pruned) {
        if p {
            *v = 0.0;
        }
    }
}

/// Fraction of exactly-zero weights.
pub fn zero_fraction(w: &[f32]) -> f64 {
    w.iter().filter(|&&v| v == 0.0).count() as f64 / w.len().max(1) as f64
}

/// Whether every group of `m` consecutive weights along each row of `w`
/// (`rows × cols`, `m` dividing `cols`) holds at least `n` zeros.
pub fn satisfies_nm(w: &[f32], n: usize, m: usize) -> bool {
    w.chunks(m)
        .all(|g| g.iter().filter(|&&v| v == 0.0).count() >= n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut s = 0x2545F4914F6CDD1Du64;
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn nm_masks_leave_the_pattern_exactly() {
        let (rows, cols) = (7, 64);
        let w = weights(rows, cols);
        for (n, m) in [(2, 4), (4, 8), (1, 4)] {
            let mut p = w.clone();
            apply(
                &mut p,
                &mask(&magnitude_scores(&w), cols, Pattern::NM { n, m }, true),
            );
            assert!(satisfies_nm(&p, n, m));
            assert_eq!(zero_fraction(&p), n as f64 / m as f64);
            // The kept weights of each group are its largest.
            for (g, o) in p.chunks(m).zip(w.chunks(m)) {
                let kept_min = g
                    .iter()
                    .zip(o)
                    .filter(|(v, _)| **v != 0.0)
                    .map(|(_, o)| o.abs())
                    .fold(f32::MAX, f32::min);
                let cut_max = g
                    .iter()
                    .zip(o)
                    .filter(|(v, _)| **v == 0.0)
                    .map(|(_, o)| o.abs())
                    .fold(0.0, f32::max);
                assert!(kept_min >= cut_max);
            }
        }
    }

    #[test]
    fn unstructured_masks_hit_the_sparsity_per_row_or_per_matrix() {
        let (rows, cols) = (9, 50);
        let w = weights(rows, cols);
        let per_row = mask(
            &magnitude_scores(&w),
            cols,
            Pattern::Unstructured(0.3),
            true,
        );
        for r in per_row.chunks(cols) {
            assert_eq!(r.iter().filter(|&&p| p).count(), 15);
        }
        let whole = mask(
            &magnitude_scores(&w),
            cols,
            Pattern::Unstructured(0.3),
            false,
        );
        assert_eq!(whole.iter().filter(|&&p| p).count(), 135);
        let cut = w
            .iter()
            .zip(&whole)
            .filter(|(_, &p)| p)
            .map(|(v, _)| v.abs())
            .fold(0.0, f32::max);
        let kept = w
            .iter()
            .zip(&whole)
            .filter(|(_, &p)| !p)
            .map(|(v, _)| v.abs())
            .fold(f32::MAX, f32::min);
        assert!(cut <= kept);
    }

    #[test]
    fn wanda_prefers_weights_on_loud_inputs() {
        // Equal weights: the column with the larger input norm survives.
        let w = vec![1.0f32, 1.0, -1.0, 1.0];
        let pruned = mask(
            &wanda_scores(&w, &[10.0, 0.1]),
            2,
            Pattern::Unstructured(0.5),
            true,
        );
        assert_eq!(pruned, vec![false, true, false, true]);
    }

    #[test]
    fn wanda_in_place_removes_what_the_score_mask_removes() {
        let (rows, cols) = (9, 48);
        let w: Vec<f32> = (0..rows * cols)
            .map(|k| ((k * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let norms: Vec<f32> = (0..cols).map(|j| 0.1 + (j * 37 % 17) as f32).collect();
        for pattern in [
            Pattern::Unstructured(0.5),
            Pattern::Unstructured(0.3),
            Pattern::NM { n: 2, m: 4 },
        ] {
            let mut want = w.clone();
            apply(
                &mut want,
                &mask(&wanda_scores(&w, &norms), cols, pattern, true),
            );
            let mut got = w.clone();
            wanda_prune(&mut got, &norms, pattern);
            assert_eq!(got, want, "{pattern}");
            assert_ne!(got, w, "{pattern}");
        }
    }
}
