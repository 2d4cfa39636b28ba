//! `compress sensitivity` on a synthetic model built so that one block matters
//! far more than the others, and the report driving `compress quantize
//! --sensitivity`.

use e2e::*;
use serde_json::Value;
use std::path::Path;

fn run_ok(args: &[&str]) -> String {
    let out = compress(args);
    let text = output_text(&out);
    assert!(out.status.success(), "{args:?} failed:\n{text}");
    text
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Block 2's FFN writes a residual component ~100× larger than every other
/// block's, so the direction of the final hidden state (and the logits) is
/// mostly block 2's work: quantizing or pruning it must move the distribution
/// most, by a wide margin.
fn amplified_block_scale(name: &str) -> f32 {
    match name {
        "token_embd.weight" => 0.5,
        "blk.2.ffn_down.weight" => 80.0,
        n if n.ends_with("attn_output.weight") || n.ends_with("ffn_down.weight") => 0.02,
        _ => 1.0,
    }
}

#[test]
fn ranks_the_amplified_block_first_and_writes_every_report() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    write_tiny_llama(&tiny, 4, 64, 7, &amplified_block_scale);
    let (calib, text) = (asset("calib.txt"), eval_text());
    let report = dir.path().join("blocks.json");
    let tiny_s = tiny.to_str().unwrap();
    let args = [
        "sensitivity",
        tiny_s,
        "--calib",
        calib.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--types",
        "Q4_0,Q2_K",
        "--sparsity",
        "0.5",
        "--granularity",
        "block",
        "--ctx",
        "128",
        "--chunks",
        "2",
        "--calib-chunks",
        "2",
        "-o",
        report.to_str().unwrap(),
    ];
    run_ok(&args);
    let r = read_json(&report);
    let units = r["units"].as_array().unwrap();
    assert_eq!(units.len(), 4);
    let first = units.iter().find(|u| u["rank"] == 1).unwrap();
    assert_eq!(first["name"], "blk.2", "{units:#?}");
    // Every setting on its own ranks block 2 first, by a wide margin.
    for s in 0..3 {
        let kld = |b: u64| {
            r["cells"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["unit"] == b && c["setting"] == s)
                .unwrap()["shift"]["kld"]
                .as_f64()
                .unwrap()
        };
        let others = [0, 1, 3].map(kld);
        assert!(
            others.iter().all(|&k| kld(2) > 5.0 * k),
            "setting {s}: block 2 {} vs {others:?}",
            kld(2)
        );
    }
    // Q2_K blocks do not fit 64-wide rows: llama.cpp's fallback is applied and said.
    let q2 = &r["cells"].as_array().unwrap()[1];
    assert_eq!(q2["applied"], "IQ4_NL", "{q2}");
    let md = std::fs::read_to_string(report.with_extension("md")).unwrap();
    assert!(md.contains("blk.2"), "{md}");
    let html = std::fs::read_to_string(report.with_extension("html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg"));
    assert_eq!(html.matches("class=\"hm-cell\"").count(), 4 * 3);
    assert!(report.with_extension("imatrix.gguf").exists());

    // The same run again gives the same measurements (the report differs only
    // in timings).
    let report2 = dir.path().join("blocks2.json");
    let mut args2 = args.to_vec();
    *args2.last_mut().unwrap() = report2.to_str().unwrap();
    run_ok(&args2);
    assert_eq!(read_json(&report2)["cells"], r["cells"]);
}

#[test]
fn tensor_report_drives_the_allocator_and_refuses_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    write_tiny_llama(&tiny, 3, 64, 11, &amplified_block_scale);
    let calib = asset("calib.txt");
    let report = dir.path().join("tensors.json");
    run_ok(&[
        "sensitivity",
        tiny.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--text",
        eval_text().to_str().unwrap(),
        "--types",
        "Q4_0,Q8_0",
        "--ctx",
        "128",
        "--chunks",
        "1",
        "--calib-chunks",
        "1",
        "-o",
        report.to_str().unwrap(),
    ]);
    let r = read_json(&report);
    // 3 blocks × 7 linears + the tied embedding.
    assert_eq!(r["units"].as_array().unwrap().len(), 22);
    assert!(!r["pareto"].as_array().unwrap().is_empty());
    let uniform = r["uniform"].as_array().unwrap();
    assert_eq!(uniform.len(), 2);

    // A budget a little above all-Q4_0 (the embedding is 99% of the weights)
    // buys Q8_0 for a few small tensors.
    let bpw = uniform[0]["bits_per_weight"].as_f64().unwrap() + 0.02;
    let out = dir.path().join("alloc.gguf");
    let imatrix = report.with_extension("imatrix.gguf");
    let text = run_ok(&[
        "quantize",
        tiny.to_str().unwrap(),
        "--sensitivity",
        report.to_str().unwrap(),
        "--target-bpw",
        &format!("{bpw}"),
        "--imatrix",
        imatrix.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--report",
        dir.path().join("q.json").to_str().unwrap(),
    ]);
    assert!(text.contains("predicted KLD"), "{text}");
    let q = read_json(&dir.path().join("q.json"));
    let upgraded: Vec<&str> = q["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["ty"] == "Q8_0")
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    // Block 2's down projection, the most sensitive tensor, gets bits; no FFN
    // tensor of the other blocks (the same size) does.
    assert!(upgraded.contains(&"blk.2.ffn_down.weight"), "{upgraded:?}");
    assert!(
        !upgraded
            .iter()
            .any(|n| n.contains("ffn_") && !n.starts_with("blk.2.")),
        "{upgraded:?}"
    );
    // The embedding (also the tied head) may rank above everything; among the
    // block tensors, block 2's FFN comes first.
    let ranked_first = r["units"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["block"].is_number())
        .min_by_key(|u| u["rank"].as_u64())
        .unwrap();
    assert!(
        ranked_first["name"]
            .as_str()
            .unwrap()
            .starts_with("blk.2.ffn_"),
        "{ranked_first}"
    );

    // A hand-edited report whose cell points past its settings is refused
    // naming the cell (once an index panic).
    let mut edited = read_json(&report);
    let n_settings = edited["settings"].as_array().unwrap().len();
    edited["cells"][0]["setting"] = serde_json::json!(n_settings + 5);
    let bad = dir.path().join("edited.json");
    std::fs::write(&bad, edited.to_string()).unwrap();
    let o = compress(&[
        "quantize",
        tiny.to_str().unwrap(),
        "--sensitivity",
        bad.to_str().unwrap(),
        "--target-bpw",
        "6.0",
        "-o",
        dir.path().join("y.gguf").to_str().unwrap(),
    ]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("cell 0 names unit") && !text.contains("panicked"),
        "{text}"
    );
    assert!(!dir.path().join("y.gguf").exists());

    // A report measured on another model is refused before any work.
    let other = dir.path().join("other.gguf");
    write_tiny_llama(&other, 3, 64, 12, &amplified_block_scale);
    let o = compress(&[
        "quantize",
        other.to_str().unwrap(),
        "--sensitivity",
        report.to_str().unwrap(),
        "--target-bpw",
        "6.0",
        "-o",
        dir.path().join("x.gguf").to_str().unwrap(),
    ]);
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("another model") && text.contains("sha256"),
        "{text}"
    );
    assert!(!dir.path().join("x.gguf").exists());
}
