//! Which weights a mask may remove: a fraction of each row, or N of every M
//! consecutive weights of a row.

use anyhow::{bail, Result};
use std::fmt;

/// A sparsity pattern.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pattern {
    /// This fraction of the weights is removed, in `[0, 1)`.
    Unstructured(f64),
    /// `n` of every `m` consecutive weights along a row are removed (as the
    /// SparseGPT and Wanda references count it: `2:4` leaves two of four).
    NM {
        /// Weights removed per group.
        n: usize,
        /// Group length.
        m: usize,
    },
}

impl Pattern {
    /// An unstructured sparsity, checked to lie in `[0, 1)`.
    pub fn unstructured(sparsity: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&sparsity) {
            bail!("sparsity {sparsity} is outside [0, 1)");
        }
        Ok(Pattern::Unstructured(sparsity))
    }

    /// Parses `N:M` (e.g. `2:4`, `4:8`), checking `0 < N < M`.
    pub fn parse_nm(s: &str) -> Result<Self> {
        let parsed = s.split_once(':').and_then(|(n, m)| {
            Some((
                n.trim().parse::<usize>().ok()?,
                m.trim().parse::<usize>().ok()?,
            ))
        });
        let Some((n, m)) = parsed else {
            bail!("N:M pattern '{s}' is not two whole numbers separated by ':' (e.g. 2:4)");
        };
        if n == 0 || n >= m {
            bail!("N:M pattern '{s}' needs 0 < N < M");
        }
        Ok(Pattern::NM { n, m })
    }

    /// The fraction of weights removed.
    pub fn sparsity(&self) -> f64 {
        match *self {
            Pattern::Unstructured(s) => s,
            Pattern::NM { n, m } => n as f64 / m as f64,
        }
    }

    /// Checks the pattern fits rows of `cols` weights of tensor `name`.
    pub fn check(&self, cols: usize, name: &str) -> Result<()> {
        if let Pattern::NM { n, m } = *self {
            if !cols.is_multiple_of(m) {
                bail!("{n}:{m} needs rows whose length is a multiple of {m}; '{name}' has {cols} columns");
            }
        }
        Ok(())
    }

    /// How many of `len` scored weights to remove: the `n` of an N:M group, or
    /// the unstructured fraction of `len`, rounded to nearest.
    pub fn count(&self, len: usize) -> usize {
        match *self {
            Pattern::Unstructured(s) => ((s * len as f64).round() as usize).min(len),
            Pattern::NM { n, .. } => n.min(len),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pattern::Unstructured(s) => write!(f, "{:.0}% unstructured", s * 100.0),
            Pattern::NM { n, m } => write!(f, "{n}:{m}"),
        }
    }
}

/// Marks the `k` lowest of `scores` in `pruned` (ties broken towards the lower
/// index, so the choice is deterministic).
pub fn mark_lowest(scores: &[f32], k: usize, pruned: &mut [bool]) {
    debug_assert_eq!(scores.len(), pruned.len());
    if k == 0 {
        return;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let by_score = |a: &usize, b: &usize| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_score);
    }
    for &i in &idx[..k.min(idx.len())] {
        pruned[i] = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_patterns() {
        assert_eq!(
            Pattern::parse_nm("2:4").unwrap(),
            Pattern::NM { n: 2, m: 4 }
        );
        assert_eq!(Pattern::parse_nm("4:8").unwrap().sparsity(), 0.5);
        for bad in ["4:4", "5:4", "0:4", "2-4", "a:b", "2:"] {
            assert!(Pattern::parse_nm(bad).is_err(), "{bad}");
        }
        assert!(Pattern::unstructured(1.0).is_err());
        assert!(Pattern::unstructured(-0.1).is_err());
        assert!(Pattern::unstructured(f64::NAN).is_err());
        assert!(Pattern::unstructured(0.0).is_ok());
        let e = Pattern::NM { n: 2, m: 8 }.check(36, "blk.0.x").unwrap_err();
        assert!(e.to_string().contains("blk.0.x"));
    }

    #[test]
    fn marks_exactly_the_lowest() {
        let scores = [3.0, 1.0, 2.0, 1.0, 5.0];
        let mut pruned = [false; 5];
        mark_lowest(&scores, 2, &mut pruned);
        assert_eq!(pruned, [false, true, false, true, false]);
        let mut all = [false; 5];
        mark_lowest(&scores, 5, &mut all);
        assert!(all.iter().all(|&p| p));
    }
}
