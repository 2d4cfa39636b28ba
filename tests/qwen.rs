//! The second real model, Qwen2.5-Coder-0.5B-Instruct (`asset:qwen2.5-0.5b`,
//! architecture `qwen2`: q/k/v biases, untied head, vocabulary 151,936, mostly
//! Q5_0): perplexity with llama.cpp's protocol against llama-perplexity's own on the
//! same chunks, and one quantize → eval round trip. The full comparison (40 chunks,
//! mixes judged by llama.cpp, GPTQ and pruning against their baselines) is
//! `bench/qwen_quality.sh`; CI keeps this short.

use e2e::*;
use model::Model;

/// llama-perplexity (llama.cpp 0c1e570, `-c 512 -t 2`) on the first 2 chunks of the
/// evaluation text (`bench/qwen_reference.sh` prints it as `[2]108.3090`).
const LLAMA_CPP_PPL_2_CHUNKS: f64 = 108.3090;

fn qwen() -> std::path::PathBuf {
    asset("Qwen2.5-Coder-0.5B-Instruct.gguf")
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let o = compress(args);
    assert!(o.status.success(), "{args:?}:\n{}", output_text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn qwen_is_read_as_qwen2_and_matches_llama_cpp_perplexity() {
    let m = Model::open(&qwen()).unwrap();
    assert_eq!(m.config.arch.gguf_name, "qwen2");
    assert_eq!(
        (
            m.config.num_hidden_layers,
            m.config.hidden_size,
            m.config.vocab_size
        ),
        (24, 896, 151936)
    );
    assert!(m.tensor_names().contains(&"blk.23.attn_v.bias".to_owned()));
    let text = eval_text();
    let v = run_json(&[
        "eval",
        qwen().to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "512",
        "--chunks",
        "2",
        "--json",
    ]);
    let ppl = v["perplexity"]["perplexity"].as_f64().unwrap();
    let rel = (ppl - LLAMA_CPP_PPL_2_CHUNKS).abs() / LLAMA_CPP_PPL_2_CHUNKS;
    eprintln!("Qwen2.5 2 chunks: ours {ppl:.4}, llama.cpp {LLAMA_CPP_PPL_2_CHUNKS}");
    assert!(
        rel < 0.005,
        "ours {ppl} vs llama.cpp {LLAMA_CPP_PPL_2_CHUNKS}"
    );
}

#[test]
fn qwen_quantized_to_q8_0_keeps_biases_in_f32_and_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let o = compress(&[
        "quantize",
        qwen().to_str().unwrap(),
        "--type",
        "Q8_0",
        "-o",
        out.to_str().unwrap(),
    ]);
    let said = output_text(&o);
    assert!(o.status.success(), "{said}");
    assert!(said.contains("72 × bias"), "{said}");
    let q = Model::open(&out).unwrap();
    assert_eq!(
        q.tensor_meta("blk.0.attn_q.bias").unwrap().0,
        kernels::GgmlType::F32
    );
    let text = eval_text();
    let v = run_json(&[
        "eval",
        out.to_str().unwrap(),
        "--base",
        qwen().to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "512",
        "--chunks",
        "1",
        "--json",
    ]);
    let kld = v["kld"]["mean"].as_f64().unwrap();
    eprintln!("Qwen2.5 Q8_0: mean KLD {kld:.5} on 1 chunk");
    assert!(kld > 0.0 && kld < 0.01, "{kld}");
}
