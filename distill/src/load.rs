//! Reading a checkpoint into trainable f32 parameters: every tensor of a
//! [`model::Model`] (GGUF of any supported block type, or safetensors, of any
//! described architecture: the biases and per-head norms of qwen2 / qwen3 come
//! with the rest), dequantized whole. The reader already returns Q/K rows in HF order, the order
//! [`crate::ops::rope_forward`] pairs elements in, so the rows are copied as they are.

use crate::params::Params;
use anyhow::{bail, Context, Result};
use model::Model;
use rayon::prelude::*;

/// Rows dequantized per task: enough work to amortise the hand-off, small enough
/// that the embedding (the largest tensor) spreads over every thread.
const ROWS_PER_TASK: usize = 256;

impl Params<f32> {
    /// Every weight of `model` as dense f32, shaped by `model.config` (tied head
    /// when the config ties it).
    pub fn from_model(model: &Model) -> Result<Self> {
        let mut p = Params::<f32>::zeros(&model.config);
        for t in p.tensors_mut() {
            let src = model
                .tensor(&t.name)
                .with_context(|| format!("{}: reading '{}'", model.path.display(), t.name))?;
            if src.shape != t.shape {
                bail!(
                    "{}: tensor '{}' has shape {:?}, expected {:?}",
                    model.path.display(),
                    t.name,
                    src.shape,
                    t.shape
                );
            }
            let w = src.as_weight()?;
            let band = ROWS_PER_TASK * w.cols;
            t.data
                .par_chunks_mut(band)
                .enumerate()
                .try_for_each(|(i, out)| {
                    let r0 = i * ROWS_PER_TASK;
                    w.dequantize_rows(r0, r0 + out.len() / w.cols, out)
                })
                .with_context(|| format!("dequantizing '{}'", t.name))?;
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::forward;
    use std::path::PathBuf;

    /// The cached real model, found as the `compress` binary finds its cache.
    fn real_model_path() -> Option<PathBuf> {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = nonempty("COMPRESS_CACHE")
            .map(PathBuf::from)
            .or_else(|| nonempty("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("compress")))
            .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cache/compress")))?;
        Some(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.exists())
    }

    /// The largest logit difference relative to the largest |logit|.
    fn relative_logit_diff(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        diff / scale
    }

    #[test]
    fn fixture_logits_match_the_inference_path_for_every_architecture() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch");
        let tokens: Vec<u32> = (1..=20).collect();
        for (name, arch) in [
            ("qwen2", &model::arch::QWEN2),
            ("qwen3", &model::arch::QWEN3),
            ("llama3", &model::arch::LLAMA),
        ] {
            for file in ["", "model.gguf"] {
                let path = root.join(name).join(file);
                let m = Model::open(&path).unwrap();
                assert_eq!(m.config.arch, arch, "{}", path.display());
                let p = Params::from_model(&m).unwrap();
                let want = m.logits(&tokens, 0).unwrap();
                let got = forward(&p, &tokens).unwrap().logits;
                let rel = relative_logit_diff(&got, &want);
                println!(
                    "{name} {}: max |Δlogit| / max |logit| = {rel:.2e}",
                    if file.is_empty() { "HF" } else { file }
                );
                assert!(rel < 1e-5, "{}: logits differ by {rel:e}", path.display());
            }
        }
    }

    #[test]
    fn real_model_logits_match_the_inference_path() {
        let Some(path) = real_model_path() else {
            println!("skipped: SmolLM2-135M-Instruct.Q4_1.gguf is not in the cache (run `compress fetch`)");
            return;
        };
        let m = Model::open(&path).unwrap();
        let p = Params::from_model(&m).unwrap();
        assert_eq!(p.output.is_none(), m.config.tie_word_embeddings);
        let tokens = m
            .tokenizer
            .encode("The quick brown fox jumps over the lazy dog")
            .unwrap();
        assert!(tokens.len() >= 5, "{tokens:?}");
        let want = m.logits(&tokens, 0).unwrap();
        let got = forward(&p, &tokens).unwrap().logits;
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        println!(
            "real model, {} tokens: max |Δlogit| {diff:.2e}, logit scale {scale:.1}, relative {:.2e}",
            tokens.len(),
            diff / scale
        );
        assert!(
            diff / scale < 1e-4,
            "logits differ by {diff} at scale {scale}"
        );
        let vocab = m.config.vocab_size;
        for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
            let argmax = |r: &[f32]| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
            assert_eq!(argmax(g), argmax(w), "top-1 token differs");
        }
    }
}
