//! KL divergence and top-1 agreement of a model against a base model on the same
//! tokens, as `llama-perplexity --kl-divergence` reports them: for every scored
//! position, `KL(P_base ‖ P_model) = Σ p_base · (log p_base − log p_model)` over
//! the vocabulary, and whether both put the same token first.

use crate::perplexity::{
    log_prob, log_softmax_stats, ChunkPlan, NllStats, PerplexityOptions, PerplexityReport,
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
    Ok(compare_many(&[model], base, tokens, opts, progress)?.remove(0))
}

/// Per-model accumulators of [`compare_many`].
#[derive(Default)]
struct Running {
    nll: NllStats,
    klds: Vec<f64>,
    same_top1: usize,
    seconds: f64,
}

/// [`compare`] for several models against one base: the base runs once per chunk.
pub fn compare_many(
    models: &[&Model],
    base: &Model,
    tokens: &[u32],
    opts: &PerplexityOptions,
    progress: crate::perplexity::Progress,
) -> Result<Vec<CompareReport>> {
    let vocab = base.config.vocab_size;
    for m in models {
        if m.config.vocab_size != vocab {
            bail!(
                "{} has a vocabulary of {} tokens but the base {} has {}: their distributions cannot be compared",
                m.path.display(),
                m.config.vocab_size,
                base.path.display(),
                vocab
            );
        }
    }
    let plan = ChunkPlan::for_model(base, tokens.len(), opts)?;
    let mut base_run = Running::default();
    let mut runs: Vec<Running> = models.iter().map(|_| Running::default()).collect();
    for c in 0..plan.chunks {
        let t = Instant::now();
        let base_logits = plan.logits(base, tokens, c)?;
        base_run.seconds += t.elapsed().as_secs_f64();
        let base_nlls: Vec<f64> = base_logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(r, b)| -log_prob(b, plan.target(tokens, c, r)))
            .collect();
        for r in base_nlls {
            base_run.nll.add(r);
        }
        for (m, run) in models.iter().zip(runs.iter_mut()) {
            let t = Instant::now();
            let logits = plan.logits(m, tokens, c)?;
            run.seconds += t.elapsed().as_secs_f64();
            let rows: Vec<(f64, bool, f64)> = base_logits
                .par_chunks(vocab)
                .zip(logits.par_chunks(vocab))
                .enumerate()
                .map(|(r, (b, m))| {
                    let (kl, same) = kl_and_top1(b, m);
                    (kl, same, -log_prob(m, plan.target(tokens, c, r)))
                })
                .collect();
            for (kl, same, nll) in rows {
                run.klds.push(kl);
                run.same_top1 += same as usize;
                run.nll.add(nll);
            }
        }
        progress(
            c + 1,
            plan.chunks,
            runs.first()
                .map_or(base_run.nll.perplexity(), |r| r.nll.perplexity()),
        );
    }
    let base_report = base_run.nll.report(&plan, tokens.len(), base_run.seconds);
    Ok(runs
        .into_iter()
        .map(|run| {
            let n = run.klds.len().max(1);
            CompareReport {
                perplexity: run.nll.report(&plan, tokens.len(), run.seconds),
                base_perplexity: base_report.clone(),
                top1_agreement: run.same_top1 as f64 / n as f64,
                kld: KldStats::from_values(run.klds),
            }
        })
        .collect())
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
