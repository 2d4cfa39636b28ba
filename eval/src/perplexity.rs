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

/// Natural-log softmax probability of `target` in `row`, accumulated in f64.
pub fn log_prob(row: &[f32], target: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (row[target] - max) as f64 - sum.ln()
}

/// Runs the protocol over `tokens` (the whole text, tokenized once).
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    opts: &PerplexityOptions,
    progress: Progress,
) -> Result<PerplexityReport> {
    let ctx = opts.ctx;
    if ctx < 4 {
        bail!("--ctx {ctx} is too small: at least 4 tokens are needed to score half a chunk");
    }
    let available = tokens.len() / ctx;
    if available < 1 || tokens.len() < 2 * ctx {
        bail!(
            "the text has {} tokens; at least 2 × ctx = {} are needed (use a longer text or a smaller --ctx)",
            tokens.len(),
            2 * ctx
        );
    }
    let chunks = match opts.chunks {
        Some(0) => bail!("--chunks must be at least 1"),
        Some(n) if n > available => bail!(
            "--chunks {n} asks for more than the {available} whole chunks of {ctx} tokens in the text ({} tokens)",
            tokens.len()
        ),
        Some(n) => n,
        None => available,
    };
    let bos = if model.tokenizer.add_bos() {
        model.tokenizer.bos()
    } else {
        None
    };
    let vocab = model.config.vocab_size;
    let first = ctx / 2;
    let start_time = Instant::now();
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        // Logits at positions first..ctx-1; the last one predicts nothing in the chunk.
        let logits = model.logits(&chunk, first)?;
        let nlls: Vec<f64> = (first..ctx - 1)
            .into_par_iter()
            .map(|j| {
                let row = &logits[(j - first) * vocab..(j - first + 1) * vocab];
                -log_prob(row, tokens[c * ctx + j + 1] as usize)
            })
            .collect();
        for v in nlls {
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        progress(c + 1, chunks, (nll / count as f64).exp());
    }
    let seconds = start_time.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PerplexityReport {
        perplexity: ppl,
        perplexity_stderr: stderr,
        mean_nll: mean,
        scored_tokens: count,
        chunks,
        ctx,
        text_tokens: tokens.len(),
        bos: bos.is_some(),
        seconds,
        tokens_per_second: (chunks * ctx) as f64 / seconds.max(1e-9),
    })
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
}
