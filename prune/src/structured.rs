//! Structured pruning that changes shapes: which attention heads, FFN channels,
//! decoder blocks and hidden channels to keep, from activation-based importance
//! (as NVIDIA's Minitron and ShortGPT score them). The caller slices the tensors
//! and rewrites the config; nothing here knows tensor names.

use anyhow::{bail, Result};

/// The indices of `scores` left after removing the `remove` lowest (ties towards
/// the higher index removed first, so the choice is deterministic), ascending.
pub fn keep_highest(scores: &[f64], remove: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep = idx[..scores.len().saturating_sub(remove)].to_vec();
    keep.sort_unstable();
    keep
}

/// Importance of each input channel of a linear layer `w` (`rows × cols`) on
/// inputs with `diag H` (`Σ x_j²` up to a constant): `‖X_j‖² · ‖W[:, j]‖²`, the
/// energy that channel puts into the layer's output if the inputs were
/// uncorrelated. Used for FFN channels (the down projection's inputs) and for
/// attention heads (the output projection's inputs, summed per head).
pub fn input_channel_scores(w: &[f32], diag: &[f32]) -> Vec<f64> {
    let cols = diag.len();
    let mut col_sq = vec![0f64; cols];
    for row in w.chunks(cols) {
        for (s, &v) in col_sq.iter_mut().zip(row) {
            *s += v as f64 * v as f64;
        }
    }
    col_sq
        .iter()
        .zip(diag)
        .map(|(s, &d)| s * d.max(0.0) as f64)
        .collect()
}

/// The query heads to keep when `remove` of `n_heads` are removed from a layer
/// with `n_kv` key/value groups, GQA-consistent: every group loses the same
/// number of its own heads (`remove / n_kv`, the lowest-scoring), so the kept
/// heads still split evenly over the unchanged K/V heads. `scores` are per head.
pub fn heads_to_keep(scores: &[f64], n_kv: usize, remove: usize) -> Result<Vec<usize>> {
    let n_heads = scores.len();
    if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        bail!("{n_heads} query heads do not split over {n_kv} key/value heads");
    }
    let per_group = n_heads / n_kv;
    if !remove.is_multiple_of(n_kv) {
        bail!(
            "removing {remove} of {n_heads} query heads cannot keep the {n_kv} key/value groups equal: give a multiple of {n_kv}"
        );
    }
    if remove / n_kv >= per_group {
        bail!(
            "removing {remove} of {n_heads} query heads would empty the key/value groups ({per_group} heads each); at most {} can go",
            (per_group - 1) * n_kv
        );
    }
    let mut keep = Vec::with_capacity(n_heads - remove);
    for g in 0..n_kv {
        let group = &scores[g * per_group..(g + 1) * per_group];
        keep.extend(
            keep_highest(group, remove / n_kv)
                .into_iter()
                .map(|h| g * per_group + h),
        );
    }
    Ok(keep)
}

/// ShortGPT's block influence from the per-block mean cosine similarity of each
/// token's block input and output: the `remove` blocks that change their input
/// least (highest similarity) go; returns the kept blocks, ascending.
pub fn blocks_to_keep(similarity: &[f64], remove: usize) -> Result<Vec<usize>> {
    if remove >= similarity.len() {
        bail!(
            "removing {remove} of {} blocks would leave none",
            similarity.len()
        );
    }
    let influence: Vec<f64> = similarity.iter().map(|s| 1.0 - s).collect();
    Ok(keep_highest(&influence, remove))
}

/// Mean cosine similarity of the rows of `a` and `b` (`n × width`).
pub fn mean_row_cosine(a: &[f32], b: &[f32], width: usize) -> f64 {
    let rows = a.len() / width;
    a.chunks(width)
        .zip(b.chunks(width))
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| *p as f64 * *p as f64).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| *q as f64 * *q as f64).sum::<f64>().sqrt();
            if nx > 0.0 && ny > 0.0 {
                dot / (nx * ny)
            } else {
                1.0
            }
        })
        .sum::<f64>()
        / rows.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_highest_in_order() {
        assert_eq!(keep_highest(&[0.5, 3.0, 1.0, 2.0], 2), vec![1, 3]);
        assert_eq!(keep_highest(&[1.0, 1.0, 1.0], 1), vec![0, 1]);
        assert_eq!(keep_highest(&[1.0], 0), vec![0]);
    }

    #[test]
    fn heads_leave_every_group_the_same_size() {
        // 9 heads in 3 groups of 3; the lowest of each group goes.
        let scores = [3.0, 1.0, 2.0, 0.1, 5.0, 4.0, 9.0, 8.0, 0.5];
        assert_eq!(
            heads_to_keep(&scores, 3, 3).unwrap(),
            vec![0, 2, 4, 5, 6, 7]
        );
        assert!(heads_to_keep(&scores, 3, 2)
            .unwrap_err()
            .to_string()
            .contains("multiple of 3"));
        assert!(heads_to_keep(&scores, 3, 9)
            .unwrap_err()
            .to_string()
            .contains("at most 6"));
    }

    #[test]
    fn the_blocks_that_change_least_go() {
        assert_eq!(
            blocks_to_keep(&[0.9, 0.99, 0.5, 0.98], 2).unwrap(),
            vec![0, 2]
        );
        assert!(blocks_to_keep(&[0.9, 0.8], 2).is_err());
        let a = [1.0f32, 0.0, 0.0, 1.0];
        assert!((mean_row_cosine(&a, &[2.0, 0.0, 0.0, -1.0], 2) - 0.0).abs() < 1e-12);
    }

    #[test]
    fn channel_scores_weigh_column_energy_by_input_energy() {
        let w = [1.0f32, 2.0, 1.0, 0.0]; // 2x2: columns (1,1) and (2,0)
        assert_eq!(input_channel_scores(&w, &[1.0, 0.25]), vec![2.0, 1.0]);
    }
}
