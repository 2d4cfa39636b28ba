//! Per-layer sparsity at a fixed overall sparsity. Uniform gives every layer the
//! target; OWL (Yin et al., 2024, "outlier-weighted layerwise sparsity") gives
//! layers with more activation outliers a lower sparsity: a layer's outlier
//! ratio is the fraction of its Wanda scores `|W_ij|·‖X_j‖` above `m` times the
//! layer's mean score, and the ratios, spread linearly over `[0, 2λ]` and
//! centred, are subtracted from the target.

/// The fraction of Wanda scores above `m` times their mean: (count, total).
pub fn outliers(scores: &[f32], m: f32) -> (u64, u64) {
    let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
    let cut = m as f64 * mean;
    let count = scores.iter().filter(|&&s| s as f64 > cut).count();
    (count as u64, scores.len() as u64)
}

/// OWL's per-layer sparsities for the layers' outlier ratios, averaging
/// `target` (equal layer sizes assumed, as the reference does per block), each
/// clamped to `[0, 0.99]`.
pub fn owl(ratios: &[f64], target: f64, lambda: f64) -> Vec<f64> {
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    if ratios.is_empty() || hi <= lo {
        return vec![target; ratios.len()];
    }
    let spread: Vec<f64> = ratios
        .iter()
        .map(|&r| (r - lo) / (hi - lo) * 2.0 * lambda)
        .collect();
    let mean = spread.iter().sum::<f64>() / spread.len() as f64;
    spread
        .iter()
        .map(|&d| (target - (d - mean)).clamp(0.0, 0.99))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owl_keeps_the_mean_and_spares_outlier_layers() {
        let ratios = [0.01, 0.05, 0.02, 0.10];
        let s = owl(&ratios, 0.5, 0.08);
        let mean = s.iter().sum::<f64>() / 4.0;
        assert!((mean - 0.5).abs() < 1e-12);
        assert!(s[3] < s[1] && s[1] < s[2] && s[2] < s[0]);
        assert!((s[0] - s[3] - 0.16).abs() < 1e-12);
        assert_eq!(owl(&[0.2, 0.2], 0.5, 0.08), vec![0.5, 0.5]);
    }

    #[test]
    fn outliers_count_scores_far_above_the_mean() {
        let mut s = vec![1.0f32; 99];
        s.push(200.0);
        assert_eq!(outliers(&s, 5.0), (1, 100));
    }
}
