//! Architecture descriptions against an independent implementation: tiny
//! random-weight Llama 3 (llama3 rope scaling), Qwen2 and Qwen3 models made by HF
//! transformers (`scripts/make-arch-fixtures.py`, committed under
//! `tests/fixtures/arch/`), read from their HF folders and from the GGUF files
//! llama.cpp's own `convert_hf_to_gguf.py` made of them. Our logits must match
//! transformers' to 1e-4 of the largest logit, and every stage must run on each.

use e2e::{compress, output_text, repo_root};
use model::safetensors_file::SafetensorsSet;
use model::Model;
use std::path::{Path, PathBuf};

const ARCHES: [&str; 3] = ["llama3", "qwen2", "qwen3"];

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/arch").join(name)
}

/// The reference tokens and transformers' logits (`[T, vocab]`).
fn reference(name: &str) -> (Vec<u32>, Vec<f32>) {
    let set = SafetensorsSet::open(&fixture(name).join("reference.safetensors")).unwrap();
    let (_, tok) = set.get("tokens").unwrap();
    let tokens = tok
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let (_, lg) = set.get("logits").unwrap();
    let logits = lg
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (tokens, logits)
}

/// max |ours − reference| / max |reference|.
fn rel_max_error(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let err = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
    err / scale
}

fn logits_error(path: &Path, name: &str) -> f64 {
    let model = Model::open(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let (tokens, want) = reference(name);
    let got = model.logits(&tokens, 0).unwrap();
    rel_max_error(&got, &want)
}

#[test]
fn logits_match_transformers_from_hf_and_from_llama_cpp_gguf() {
    for name in ARCHES {
        for path in [fixture(name), fixture(name).join("model.gguf")] {
            let err = logits_error(&path, name);
            eprintln!(
                "{name} {}: max error / max logit = {err:.2e}",
                path.display()
            );
            assert!(err < 1e-4, "{}: {err:e}", path.display());
        }
    }
}

#[test]
fn transformers_4_config_layout_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("llama3");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(src.join("config.v4.json"), dir.path().join("config.json")).unwrap();
    let v4 = Model::open(dir.path()).unwrap();
    let v5 = Model::open(&src).unwrap();
    assert_eq!(v4.config, v5.config);
    assert!(v5.config.rope_scaling.is_some());
    let err = logits_error(dir.path(), "llama3");
    assert!(err < 1e-4, "{err:e}");
}

#[test]
fn llama3_rope_factors_from_gguf_equal_the_ones_hf_config_implies() {
    let hf = Model::open(&fixture("llama3")).unwrap();
    let gguf = Model::open(&fixture("llama3").join("model.gguf")).unwrap();
    let a = hf.config.rope_frequencies();
    let b = gguf.config.rope_frequencies();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?} vs {b:?}");
    }
}

#[test]
fn unknown_rope_scaling_unknown_tensors_and_architectures_are_refused() {
    let src = fixture("llama3");
    let copy = |dir: &Path| {
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "config.json",
        ] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    };
    let edit_config = |dir: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let err_of = |dir: &Path| {
        let text = repo_root().join("README.md");
        let o = compress(&[
            "eval",
            dir.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
        output_text(&o)
    };

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    edit_config(d.path(), &|v| {
        v["rope_parameters"]["rope_type"] = "yarn".into()
    });
    let e = err_of(d.path());
    assert!(e.contains("'yarn' is not supported"), "{e}");

    let d = tempfile::tempdir().unwrap();
    copy(d.path());
    edit_config(d.path(), &|v| v["model_type"] = "gemma3".into());
    let e = err_of(d.path());
    assert!(
        e.contains("'gemma3'") && e.contains("llama, qwen2, qwen3"),
        "{e}"
    );

    // A qwen2 checkpoint described as llama: its biases are unknown tensors.
    let q = fixture("qwen2");
    let d = tempfile::tempdir().unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
    ] {
        std::fs::copy(q.join(f), d.path().join(f)).unwrap();
    }
    edit_config(d.path(), &|v| v["model_type"] = "llama".into());
    let e = err_of(d.path());
    assert!(
        e.contains("self_attn.")
            && e.contains(".bias")
            && e.contains("not part of a 'llama' model"),
        "{e}"
    );
}
