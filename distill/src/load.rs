//! Reading a checkpoint into trainable f32 parameters: every tensor of a
//! [`model::Model`] (GGUF of any supported block type, or safetensors, of any
//! described architecture: the biases and q/k norms of qwen2 / qwen3, the
//! post-norms of gemma3 / olmo2 come with the rest, as the description's block
//! table lists them; a pre-norm the description lacks stays empty), dequantized
//! whole. Gemma's HF `(1 + w)` gains arrive as the gains themselves (the reader
//! adds the offset). The reader already returns Q/K rows in HF order, the order
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
        crate::params::refuse_untrainable(&model.config)?;
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
    use std::path::{Path, PathBuf};

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
        // A Mistral GGUF is a `llama` one: llama.cpp reads no window from it.
        for (name, hf_arch, gguf_arch) in [
            ("qwen2", &model::arch::QWEN2, &model::arch::QWEN2),
            ("qwen3", &model::arch::QWEN3, &model::arch::QWEN3),
            ("llama3", &model::arch::LLAMA, &model::arch::LLAMA),
            ("mistral", &model::arch::MISTRAL, &model::arch::LLAMA),
            ("smollm3", &model::arch::SMOLLM3, &model::arch::SMOLLM3),
            ("olmo2", &model::arch::OLMO2, &model::arch::OLMO2),
            ("gemma3", &model::arch::GEMMA3, &model::arch::GEMMA3),
            (
                "../moe/qwen3_moe",
                &model::arch::QWEN3_MOE,
                &model::arch::QWEN3_MOE,
            ),
            (
                "../moe/mixtral",
                &model::arch::MIXTRAL,
                &model::arch::MIXTRAL,
            ),
            ("../moe/olmoe", &model::arch::OLMOE, &model::arch::OLMOE),
            ("../yarn/qwen3", &model::arch::QWEN3, &model::arch::QWEN3),
        ] {
            for (file, arch) in [("", hf_arch), ("model.gguf", gguf_arch)] {
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
    fn models_the_training_forward_lacks_are_refused_by_name() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/moe");
        for (name, what) in [
            ("llama4", "chunked attention"),
            ("deepseek_v3", "latent attention"),
        ] {
            let m = Model::open(&root.join(name)).unwrap();
            let e = Params::from_model(&m).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains(m.config.arch.name), "{e}");
        }
    }

    /// A model of config `c` whose weights are `p`, read from an HF-layout
    /// safetensors file in `dir` written from `p` the way the dense writer does
    /// (HF names, norm gains less the description's offset). The tiny configs
    /// have no `config.json`, so the model is put together here instead of
    /// opened from a folder.
    fn model_holding(c: &model::ModelConfig, p: &Params<f32>, dir: &Path) -> Model {
        use model::checkpoint::Checkpoint;
        use model::safetensors_file::{Dtype, SafetensorsSet, SafetensorsWriter};
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("model.safetensors");
        let tensors = p.tensors();
        let decls: Vec<(String, Dtype, Vec<usize>)> = tensors
            .iter()
            .map(|t| {
                (
                    c.arch.hf_name(&t.name).unwrap(),
                    Dtype::F32,
                    t.shape.clone(),
                )
            })
            .collect();
        let mut w = SafetensorsWriter::create(&file, &decls, &Default::default()).unwrap();
        for (t, (hf, ..)) in tensors.iter().zip(&decls) {
            let stored = c.arch.hf_values(&t.name, t.data);
            let bytes: Vec<u8> = stored.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write(hf, &bytes).unwrap();
        }
        w.finish().unwrap();
        let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch");
        Model {
            path: file.clone(),
            config: c.clone(),
            tokenizer: model::tokenizer::Tokenizer::from_file(
                &fixtures.join("llama3/tokenizer.json"),
            )
            .unwrap(),
            checkpoint: Checkpoint::Safetensors(SafetensorsSet::open(&file).unwrap()),
            quantized: None,
            sparse: None,
            layer_map: None,
        }
    }

    #[test]
    fn newer_family_shapes_load_and_match_the_inference_path() {
        // Gemma-like (pre+post norms, GELU-tanh, embedding scale, attention
        // scalar, a sliding layer with its own RoPE base), OLMo-like (no
        // pre-norms, whole-projection q/k norms), SmolLM3/Mistral-like (NoPE
        // layer, windows): Model::logits is the inference graph itself.
        let tokens: Vec<u32> = vec![3, 7, 1, 3, 10, 2, 5, 9, 0, 4];
        let root = std::env::temp_dir().join(format!("distill-load-{}", std::process::id()));
        for c in crate::testutil::newer_family_configs() {
            let name = format!(
                "{}-{}",
                c.arch.name,
                if c.tie_word_embeddings {
                    "tied"
                } else {
                    "untied"
                }
            );
            let written = crate::testutil::random_params::<f32>(&c, 9);
            let m = model_holding(&c, &written, &root.join(&name));
            let p = Params::from_model(&m).unwrap();
            // Every tensor comes back (norms through HF's `g − offset` and back,
            // so within rounding), post-norms included, absent pre-norms empty.
            for (a, b) in p.tensors().iter().zip(written.tensors()) {
                assert_eq!(a.name, b.name);
                let err = a
                    .data
                    .iter()
                    .zip(b.data)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(err <= 1e-6, "{name}: '{}' read back off by {err}", a.name);
            }
            for (b, w) in p.blocks.iter().zip(&written.blocks) {
                for slot in [
                    model::arch::Slot::AttnNorm,
                    model::arch::Slot::FfnNorm,
                    model::arch::Slot::AttnPostNorm,
                    model::arch::Slot::FfnPostNorm,
                ] {
                    assert_eq!(b.slot(slot).len(), w.slot(slot).len(), "{name}: {slot:?}");
                    assert_eq!(
                        b.slot(slot).is_empty(),
                        c.arch.slot(slot).is_none(),
                        "{name}: {slot:?}"
                    );
                }
            }
            let want = m.logits(&tokens, 0).unwrap();
            let got = forward(&p, &tokens).unwrap().logits;
            let rel = relative_logit_diff(&got, &want);
            println!("{name}: max |Δlogit| / max |logit| = {rel:.2e}");
            assert!(rel < 1e-5, "{name}: logits differ by {rel:e}");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn real_model_logits_match_the_inference_path() {
        // The test command fetches the model first (scripts/test.sh), so a
        // missing model is a failure, not a pass that checked nothing.
        let path = real_model_path()
            .expect("SmolLM2-135M-Instruct.Q4_1.gguf is not in the cache: run `compress fetch` (scripts/test.sh does)");
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
