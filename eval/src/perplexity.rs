//! Perplexity exactly as `llama-perplexity` computes it: tokenize the text once,
//! cut it into chunks of `ctx` tokens, run each chunk from an empty cache (the
//! first token replaced by BOS when the model adds one), score the logits at
//! positions `ctx/2 … ctx−2` against the tokens that follow them, and report
//! `exp(mean NLL)` with its standard error.

use anyhow::{bail, Result};
use model::Model;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks to evaluate; `None` for every whole chunk of the text.
    pub chunks: Option<usize>,
}

/// The result, in the units llama.cpp prints.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// exp(mean NLL).
    pub perplexity: f64,
    /// Standard error of the perplexity (llama.cpp's formula).
    pub perplexity_stderr: f64,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Tokens in the whole text.
    pub text_tokens: usize,
    /// Whether each chunk started with BOS.
    pub bos: bool,
    /// Wall time of the forward passes in seconds.
    pub seconds: f64,
    /// Tokens run through the model per second.
    pub tokens_per_second: f64,
}

/// Progress after each chunk: (chunks done, chunks total, running perplexity).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64);

/// Which chunks of a tokenized text are run and which positions are scored.
#[derive(Debug, Clone)]
pub struct ChunkPlan {
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks to run.
    pub chunks: usize,
    /// First scored position in a chunk (`ctx / 2`).
    pub first: usize,
    /// The token that replaces each chunk's first token, if the model adds BOS.
    pub bos: Option<u32>,
}

impl ChunkPlan {
    /// Validates the options against a text of `n_tokens` tokens.
    pub fn new(n_tokens: usize, opts: &PerplexityOptions, bos: Option<u32>) -> Result<Self> {
        let ctx = opts.ctx;
        if ctx < 4 {
            bail!("--ctx {ctx} is too small: at least 4 tokens are needed to score half a chunk");
        }
        let available = n_tokens / ctx;
        if n_tokens < 2 * ctx {
            bail!(
                "the text has {n_tokens} tokens; at least 2 × ctx = {} are needed (use a longer text or a smaller --ctx)",
                2 * ctx
            );
        }
        let chunks = match opts.chunks {
            Some(0) => bail!("--chunks must be at least 1"),
            Some(n) if n > available => bail!(
                "--chunks {n} asks for more than the {available} whole chunks of {ctx} tokens in the text ({n_tokens} tokens)"
            ),
            Some(n) => n,
            None => available,
        };
        Ok(ChunkPlan {
            ctx,
            chunks,
            first: ctx / 2,
            bos,
        })
    }

    /// The plan for `model`'s BOS convention.
    pub fn for_model(model: &Model, n_tokens: usize, opts: &PerplexityOptions) -> Result<Self> {
        let bos = if model.tokenizer.add_bos() {
            model.tokenizer.bos()
        } else {
            None
        };
        Self::new(n_tokens, opts, bos)
    }

    /// The tokens chunk `c` runs on (BOS substituted).
    pub fn chunk_tokens(&self, tokens: &[u32], c: usize) -> Vec<u32> {
        let mut chunk = tokens[c * self.ctx..(c + 1) * self.ctx].to_vec();
        if let Some(b) = self.bos {
            chunk[0] = b;
        }
        chunk
    }

    /// Scored positions per chunk: logits at `first..ctx-1`, each predicting the next token.
    pub fn scored_per_chunk(&self) -> usize {
        self.ctx - 1 - self.first
    }

    /// The token that logit row `r` (position `first + r`) of chunk `c` predicts.
    pub fn target(&self, tokens: &[u32], c: usize, r: usize) -> usize {
        tokens[c * self.ctx + self.first + r + 1] as usize
    }

    /// Logits of chunk `c`: `scored_per_chunk() × vocab` (the last position, which
    /// predicts nothing inside the chunk, is dropped).
    pub fn logits(&self, model: &Model, tokens: &[u32], c: usize) -> Result<Vec<f32>> {
        let mut logits = model.logits(&self.chunk_tokens(tokens, c), self.first)?;
        logits.truncate(self.scored_per_chunk() * model.config.vocab_size);
        Ok(logits)
    }
}

/// `(max, ln Σ exp(x − max))` of a logit row, so that `log p_i = x_i − max − lse`.
pub fn log_softmax_stats(row: &[f32]) -> (f32, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (max, sum.ln())
}

/// Natural-log softmax probability of `target` in `row`, accumulated in f64.
pub fn log_prob(row: &[f32], target: usize) -> f64 {
    let (max, lse) = log_softmax_stats(row);
    (row[target] - max) as f64 - lse
}

/// Running sums of negative log-likelihoods, reported as llama.cpp does.
#[derive(Debug, Default, Clone)]
pub struct NllStats {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl NllStats {
    /// Adds one token's NLL.
    pub fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    /// exp(mean NLL) so far.
    pub fn perplexity(&self) -> f64 {
        (self.sum / self.count.max(1) as f64).exp()
    }

    /// The report for `plan` over a text of `text_tokens` tokens run in `seconds`.
    pub fn report(&self, plan: &ChunkPlan, text_tokens: usize, seconds: f64) -> PerplexityReport {
        let n = self.count.max(1) as f64;
        let mean = self.sum / n;
        let ppl = mean.exp();
        let var = self.sum_sq / n - mean * mean;
        let stderr = if var > 0.0 && self.count > 1 {
            (var / (self.count - 1) as f64).sqrt() * ppl
        } else {
            0.0
        };
        PerplexityReport {
            perplexity: ppl,
            perplexity_stderr: stderr,
            mean_nll: mean,
            scored_tokens: self.count,
            chunks: plan.chunks,
            ctx: plan.ctx,
            text_tokens,
            bos: plan.bos.is_some(),
            seconds,
            tokens_per_second: (plan.chunks * plan.ctx) as f64 / seconds.max(1e-9),
        }
    }
}

/// Runs the protocol over `tokens` (the whole text, tokenized once).
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    opts: &PerplexityOptions,
    progress: Progress,
) -> Result<PerplexityReport> {
    let plan = ChunkPlan::for_model(model, tokens.len(), opts)?;
    let vocab = model.config.vocab_size;
    let start = Instant::now();
    let mut stats = NllStats::default();
    for c in 0..plan.chunks {
        let logits = plan.logits(model, tokens, c)?;
        let nlls: Vec<f64> = logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(r, row)| -log_prob(row, plan.target(tokens, c, r)))
            .collect();
        nlls.into_iter().for_each(|v| stats.add(v));
        progress(c + 1, plan.chunks, stats.perplexity());
    }
    Ok(stats.report(&plan, tokens.len(), start.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_is_a_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((log_prob(&row, 2) - (3f64.exp() / z).ln()).abs() < 1e-12);
        // Large logits do not overflow.
        assert!(log_prob(&[1000.0, 1000.0], 0).is_finite());
    }

    #[test]
    fn plan_scores_the_second_half_of_each_chunk() {
        let opts = PerplexityOptions {
            ctx: 8,
            chunks: None,
        };
        let plan = ChunkPlan::new(20, &opts, Some(99)).unwrap();
        assert_eq!(
            (plan.chunks, plan.first, plan.scored_per_chunk()),
            (2, 4, 3)
        );
        let tokens: Vec<u32> = (0..20).collect();
        assert_eq!(
            plan.chunk_tokens(&tokens, 1),
            vec![99, 9, 10, 11, 12, 13, 14, 15]
        );
        // Row 0 of chunk 1 is position 4 (token 12) and predicts token 13.
        assert_eq!(plan.target(&tokens, 1, 0), 13);
        assert!(ChunkPlan::new(15, &opts, None).is_err());
        let too_many = PerplexityOptions {
            ctx: 8,
            chunks: Some(3),
        };
        assert!(ChunkPlan::new(20, &too_many, None).is_err());
    }

    #[test]
    fn stderr_follows_llama_cpp() {
        let mut s = NllStats::default();
        for v in [1.0, 2.0, 3.0] {
            s.add(v);
        }
        let plan = ChunkPlan::new(
            8,
            &PerplexityOptions {
                ctx: 4,
                chunks: None,
            },
            None,
        )
        .unwrap();
        let r = s.report(&plan, 8, 1.0);
        // mean 2, var = 14/3 - 4 = 2/3, stderr = sqrt(2/3 / 2) * e^2.
        assert!((r.perplexity - 2f64.exp()).abs() < 1e-12);
        assert!((r.perplexity_stderr - (1.0f64 / 3.0).sqrt() * 2f64.exp()).abs() < 1e-9);
    }
}
