//! End-to-end on the real SmolLM2-135M-Instruct Q4_1 GGUF and the Brown evaluation
//! text: our readers against independent ones (gguf-py, safetensors), the
//! tokenizer round trip, and perplexity against llama.cpp's reference figures.

use e2e::*;
use model::gguf::GgufFile;
use model::Model;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// llama.cpp's `llama-perplexity` on the evaluation text, ctx 512, 40 chunks
/// (the build of scripts/build-llama-cpp.sh, 0c1e570: "Final estimate: PPL =
/// 41.2010"; its Q4_1 dot product rounds activations to 8 bits).
const LLAMA_CPP_PPL_Q4_1: f64 = 41.2010;
/// The same for the f32 expansion of the Q4_1 model (an F32 GGUF: 41.0884).
const LLAMA_CPP_PPL_F32: f64 = 41.0884;

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real_model");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `compress convert` of `input` to `out` (a folder), once per test run.
fn convert(input: &Path, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    let o = compress(&[
        "convert",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "convert failed:\n{}", output_text(&o));
}

/// The real model converted to f32 safetensors, and that converted again.
fn converted() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let (a, b) = (work_dir().join("f32"), work_dir().join("f32-again"));
        convert(&real_model(), &a);
        convert(&a, &b);
        (a, b)
    })
}

#[test]
fn gguf_reader_agrees_with_gguf_py() {
    let path = real_model();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.tensors.len(), 272);
    // One tensor of each stored type, Q/K in storage order, and the largest one.
    let tensors = [
        "token_embd.weight",
        "blk.0.attn_q.weight",
        "blk.7.attn_k.weight",
        "blk.29.ffn_down.weight",
        "output_norm.weight",
    ];
    check_gguf_with_gguf_py(&path, &tensors, &work_dir().join("gguf-dump"));
}

#[test]
fn converted_safetensors_agree_with_gguf_py_and_the_safetensors_package() {
    let (f32_dir, again) = converted();
    for dir in [f32_dir, again] {
        let report = run_python("check_safetensors.py", &[dir, &real_model()]);
        assert!(
            report.contains("272 tensors compared") && report.contains("OK"),
            "{report}"
        );
    }
    // Converting the converted model changes nothing.
    assert_eq!(
        std::fs::read(f32_dir.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
}

/// llama.cpp's own tokenizer on the real GGUF and the evaluation text
/// (`llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -f eval.txt --ids
/// --no-bos --no-parse-special`, the build of scripts/build-llama-cpp.sh):
/// the id count and the sha256 of the ids as little-endian u32.
const LLAMA_TOKENIZE_IDS: (usize, &str) = (
    95_429,
    "0e281709c16d246708162714b080fdfa5b5aef04e2aacdd1485eba5d3e636671",
);

/// `(count, sha256 of the little-endian u32 bytes)` of a list of ids.
fn ids_digest(ids: &[u32]) -> (usize, String) {
    use sha2::{Digest, Sha256};
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let hex = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (ids.len(), hex)
}

#[test]
fn gguf_tokenizer_and_exported_tokenizer_json_agree_on_the_whole_eval_text() {
    let (f32_dir, _) = converted();
    let text = std::fs::read_to_string(eval_text()).unwrap();
    let gguf = Model::open(&real_model()).unwrap();
    let st = Model::open(f32_dir).unwrap();
    let a = gguf.tokenizer.encode(&text).unwrap();
    let b = st.tokenizer.encode(&text).unwrap();
    assert!(a.len() > 80_000, "only {} tokens", a.len());
    assert_eq!(a, b);
    // Against independent tokenizers: llama.cpp's on the GGUF, and HF's
    // `tokenizers` package on the tokenizer.json we exported.
    let ours = ids_digest(&a);
    assert_eq!(
        (ours.0, ours.1.as_str()),
        LLAMA_TOKENIZE_IDS,
        "our ids differ from llama-tokenize's"
    );
    let hf = run_python(
        "check_tokenizer_ids.py",
        &[&f32_dir.join("tokenizer.json"), &eval_text()],
    );
    assert_eq!(
        hf.trim(),
        format!("{} {}", ours.0, ours.1),
        "HF tokenizers' ids differ"
    );
    assert_eq!(gguf.tokenizer.add_bos(), st.tokenizer.add_bos());
    assert_eq!(gguf.tokenizer.decode(&a).unwrap(), text);
    assert_eq!(st.tokenizer.decode(&b).unwrap(), text);
}

#[test]
fn smollm2_tokenizer_matches_independent_references() {
    let t = Model::open(&real_model()).unwrap().tokenizer;
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!((t.bos(), t.eos(), t.add_bos()), (Some(1), Some(2), false));
    // Ids checked against a pure-Python re-implementation of llama.cpp's smollm
    // tokenizer and against HF transformers on the exported tokenizer.json:
    // Hello, Ġworld, Ġ, 2, 0, 2, 4 (digits split individually, no prefix space).
    assert_eq!(
        t.encode("Hello world 2024").unwrap(),
        [19556, 905, 216, 34, 32, 34, 36]
    );
    // Control tokens written in the text are plain text, as llama-perplexity
    // tokenizes (parse_special = false).
    assert_eq!(
        t.encode("<|im_start|>user\nHi<|im_end|>").unwrap(),
        [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 26843, 44, 108, 306, 79, 486, 108, 46]
    );
}

fn eval_ppl(model: &Path) -> f64 {
    let o = compress(&[
        "eval",
        model.to_str().unwrap(),
        "--text",
        eval_text().to_str().unwrap(),
        "--ctx",
        "512",
        "--chunks",
        "40",
        "--json",
    ]);
    assert!(o.status.success(), "eval failed:\n{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["perplexity"];
    assert_eq!(r["scored_tokens"], 40 * 255);
    r["perplexity"].as_f64().unwrap()
}

#[test]
fn perplexity_matches_llama_cpp_for_gguf_and_both_conversions() {
    let (f32_dir, again) = converted();
    let gguf = eval_ppl(&real_model());
    let st = eval_ppl(f32_dir);
    let back = eval_ppl(again);
    eprintln!("perplexity: gguf {gguf:.4}, f32 safetensors {st:.4}, converted again {back:.4}");
    let rel = |a: f64, b: f64| (a - b).abs() / b;
    assert!(
        rel(gguf, st) < 0.001 && rel(st, back) < 0.001,
        "{gguf} {st} {back}"
    );
    assert!(
        rel(gguf, LLAMA_CPP_PPL_Q4_1) < 0.005,
        "gguf {gguf} vs llama.cpp {LLAMA_CPP_PPL_Q4_1}"
    );
    // In f32 the two compute the same function: agreement to the fourth digit.
    assert!(
        rel(st, LLAMA_CPP_PPL_F32) < 1e-4,
        "f32 {st} vs llama.cpp {LLAMA_CPP_PPL_F32}"
    );
}

fn eval_against_base(model: &Path, base: &Path) -> serde_json::Value {
    let o = compress(&[
        "eval",
        model.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--text",
        eval_text().to_str().unwrap(),
        "--chunks",
        "2",
        "--json",
    ]);
    assert!(
        o.status.success(),
        "eval --base failed:\n{}",
        output_text(&o)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn kl_divergence_against_the_base() {
    let (f32_dir, _) = converted();
    // The f32 expansion holds exactly the GGUF's dequantized values: identical logits.
    let same = eval_against_base(f32_dir, &real_model());
    assert_eq!(same["kld"]["max"].as_f64(), Some(0.0), "{same}");
    assert_eq!(same["top1_agreement"].as_f64(), Some(1.0));
    assert_eq!(
        same["perplexity"]["perplexity"],
        same["base_perplexity"]["perplexity"]
    );
    // bf16 rounding of the same weights: small but non-zero divergence.
    let bf16 = work_dir().join("bf16");
    let _ = std::fs::remove_dir_all(&bf16);
    let o = compress(&[
        "convert",
        f32_dir.to_str().unwrap(),
        "-o",
        bf16.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let r = eval_against_base(&bf16, &real_model());
    let mean = r["kld"]["mean"].as_f64().unwrap();
    assert!(mean > 1e-7 && mean < 1e-3, "bf16 mean KLD {mean}");
    assert!(r["top1_agreement"].as_f64().unwrap() > 0.95, "{r}");
    assert_eq!(r["perplexity"]["scored_tokens"], 2 * 255);
}
