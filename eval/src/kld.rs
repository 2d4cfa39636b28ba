//! KL divergence and top-1 agreement of a model against a base model on the same
//! tokens, as `llama-perplexity --kl-divergence` reports them: for every scored
//! position, `KL(P_base ‖ P_model) = Σ p_base · (log p_base − log p_model)` over
//! the vocabulary, and whether both put the same token first.

use crate::perplexity::{
    log_softmax_stats, ChunkPlan, NllStats, PerplexityOptions, PerplexityReport,
};
use anyhow::{bail, Result};
use model::Model;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Distribution of per-token KL divergences, in nats.
#[derive(Debug, Clone, Serialize)]
pub struct KldStats {
    /// Mean.
    pub mean: f64,
    /// Standard error of the mean.
    pub mean_stderr: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl KldStats {
    /// Summarises per-token values (not empty).
    pub fn from_values(mut v: Vec<f64>) -> Self {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        KldStats {
            mean,
            mean_stderr: (var / n).sqrt(),
            median: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: *v.last().unwrap_or(&0.0),
        }
    }
}

/// A model compared with its base on the same text.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Perplexity of the model.
    pub perplexity: PerplexityReport,
    /// Perplexity of the base on the same tokens.
    pub base_perplexity: PerplexityReport,
    /// KL(base ‖ model) per scored token.
    pub kld: KldStats,
    /// Fraction of scored tokens where both models rank the same token first.
    pub top1_agreement: f64,
}

/// Per-position KL divergence and whether the argmaxes agree, for one logit row of each.
pub fn kl_and_top1(base: &[f32], model: &[f32]) -> (f64, bool) {
    let (bmax, blse) = log_softmax_stats(base);
    let (mmax, mlse) = log_softmax_stats(model);
    let mut kl = 0f64;
    for (&b, &m) in base.iter().zip(model) {
        let lb = (b - bmax) as f64 - blse;
        let lm = (m - mmax) as f64 - mlse;
        kl += lb.exp() * (lb - lm);
    }
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0
    };
    (kl.max(0.0), argmax(base) == argmax(model))
}

/// Runs `model` and `base` on the same chunks of `tokens` (tokenized with the
/// base's tokenizer) and compares their next-token distributions.
pub fn compare(
    model: &Model,
    base: &Model,
    tokens: &[u32],
    opts: &PerplexityOptions,
    progress: crate::perplexity::Progress,
) -> Result<CompareReport> {
    let vocab = base.config.vocab_size;
    if model.config.vocab_size != vocab {
        bail!(
            "{} has a vocabulary of {} tokens but the base {} has {}: their distributions cannot be compared",
            model.path.display(),
            model.config.vocab_size,
            base.path.display(),
            vocab
        );
    }
    let plan = ChunkPlan::for_model(base, tokens.len(), opts)?;
    let (mut base_secs, mut model_secs) = (0f64, 0f64);
    let (mut nll_model, mut nll_base) = (NllStats::default(), NllStats::default());
    let mut klds = Vec::with_capacity(plan.chunks * plan.scored_per_chunk());
    let mut same_top1 = 0usize;
    for c in 0..plan.chunks {
        let t = Instant::now();
        let base_logits = plan.logits(base, tokens, c)?;
        base_secs += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let model_logits = plan.logits(model, tokens, c)?;
        model_secs += t.elapsed().as_secs_f64();
        let rows: Vec<(f64, bool, f64, f64)> = base_logits
            .par_chunks(vocab)
            .zip(model_logits.par_chunks(vocab))
            .enumerate()
            .map(|(r, (b, m))| {
                let target = plan.target(tokens, c, r);
                let (kl, same) = kl_and_top1(b, m);
                (
                    kl,
                    same,
                    -crate::perplexity::log_prob(m, target),
                    -crate::perplexity::log_prob(b, target),
                )
            })
            .collect();
        for (kl, same, nm, nb) in rows {
            klds.push(kl);
            same_top1 += same as usize;
            nll_model.add(nm);
            nll_base.add(nb);
        }
        progress(c + 1, plan.chunks, nll_model.perplexity());
    }
    let n = klds.len();
    Ok(CompareReport {
        perplexity: nll_model.report(&plan, tokens.len(), model_secs),
        base_perplexity: nll_base.report(&plan, tokens.len(), base_secs),
        kld: KldStats::from_values(klds),
        top1_agreement: same_top1 as f64 / n.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_identical_rows_is_zero_and_positive_otherwise() {
        let a = [0.5f32, 1.5, -2.0, 0.0];
        let (kl, same) = kl_and_top1(&a, &a);
        assert!(kl.abs() < 1e-12 && same);
        let b = [1.5f32, 0.5, -2.0, 0.0];
        let (kl, same) = kl_and_top1(&a, &b);
        // Direct computation.
        let p = |r: &[f32]| {
            let z: f64 = r.iter().map(|&x| (x as f64).exp()).sum();
            r.iter().map(|&x| (x as f64).exp() / z).collect::<Vec<_>>()
        };
        let (pa, pb) = (p(&a), p(&b));
        let want: f64 = pa.iter().zip(&pb).map(|(x, y)| x * (x / y).ln()).sum();
        assert!((kl - want).abs() < 1e-9 && !same);
    }

    #[test]
    fn stats_quantiles() {
        let s = KldStats::from_values((0..101).map(|i| i as f64).collect());
        assert_eq!((s.median, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert!((s.mean - 50.0).abs() < 1e-12);
    }
}
