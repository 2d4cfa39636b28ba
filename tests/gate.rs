//! `compress eval` reports and `compress gate` on the real model: the same
//! thresholds pass a Q8_0 artifact and fail a Q2_K one; JUnit XML, Markdown,
//! TOML thresholds, and every kind of bad input exits 2.

use e2e::*;
use serde_json::Value;
use std::path::Path;

fn run_ok(args: &[&str]) -> String {
    let out = compress(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `compress gate` and returns (exit code, combined output).
fn gate(args: &[&str]) -> (i32, String) {
    let mut all = vec!["gate"];
    all.extend_from_slice(args);
    let o = compress(&all);
    let text = output_text(&o);
    assert!(!text.contains("panicked"), "{text}");
    (o.status.code().expect("exit code"), text)
}

const THRESHOLDS: [&str; 8] = [
    "--max-kld",
    "0.05",
    "--max-ppl-increase",
    "5%",
    "--min-top1",
    "0.9",
    "--min-compression",
    "3.0",
];

#[test]
fn gate_passes_q8_0_and_fails_q2_k_with_the_same_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let real = real_model();
    // The f32 expansion is the base, so compression ratios are against 32 bits.
    run_ok(&[
        "convert",
        real.to_str().unwrap(),
        "-o",
        &p("f32"),
        "--dtype",
        "f32",
    ]);
    let base = p("f32/model.safetensors");
    let (eval, calib) = (eval_text(), asset("calib.txt"));
    let mut reports = Vec::new();
    for ty in ["Q8_0", "Q2_K"] {
        let q = p(&format!("{ty}.gguf"));
        run_ok(&["quantize", &base, "--type", ty, "-o", &q]);
        let json = run_ok(&[
            "eval",
            &q,
            "--base",
            &base,
            "--text",
            eval.to_str().unwrap(),
            "--ctx",
            "512",
            "--chunks",
            "3",
            "--calib",
            calib.to_str().unwrap(),
            "--calib-tokens",
            "512",
            "--json",
        ]);
        let path = p(&format!("{ty}.report.json"));
        std::fs::write(&path, &json).unwrap();
        reports.push((ty, path, serde_json::from_str::<Value>(&json).unwrap()));
    }

    let (_, _, q8) = &reports[0];
    let ratio = q8["base_bytes"].as_f64().unwrap() / q8["model_bytes"].as_f64().unwrap();
    assert!((q8["compression_ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);
    assert!(ratio > 3.5 && q8["param_ratio"] == 1.0, "{ratio}");
    assert_eq!(q8["base_sha256"].as_str().unwrap().len(), 64);
    let tensors = q8["tensors"].as_array().unwrap();
    let down = tensors
        .iter()
        .find(|t| t["name"] == "blk.7.ffn_down.weight")
        .unwrap();
    assert_eq!(down["type"], "Q8_0");
    assert!((down["bits_per_weight"].as_f64().unwrap() - 8.5).abs() < 1e-9);
    // Per-layer fidelity of every block linear: Q8_0 is nearly exact.
    let linears: Vec<&Value> = tensors
        .iter()
        .filter(|t| t["output_cosine"].is_number())
        .collect();
    assert_eq!(linears.len(), 30 * 7);
    for t in &linears {
        assert!(t["output_cosine"].as_f64().unwrap() > 0.999, "{t}");
        assert!(t["weight_rel_error"].as_f64().unwrap() < 0.02, "{t}");
    }
    let q2_worst = reports[1].2["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["output_rel_error"].as_f64())
        .fold(0.0, f64::max);
    assert!(q2_worst > 0.1, "{q2_worst}");

    // Same thresholds: Q8_0 passes (exit 0), Q2_K fails (exit 1).
    for ((ty, path, _), want) in reports.iter().zip([0, 1]) {
        let junit = p(&format!("{ty}.junit.xml"));
        let md = p(&format!("{ty}.md"));
        let mut args = vec![path.as_str()];
        args.extend(THRESHOLDS);
        args.extend(["--junit", &junit, "--markdown", &md]);
        let (code, text) = gate(&args);
        assert_eq!(code, want, "{ty}: {text}");
        let xml = std::fs::read_to_string(&junit).unwrap();
        assert_eq!(xml.matches("<testcase").count(), 4, "{xml}");
        assert_eq!(xml.matches("<failure").count() > 0, want == 1, "{xml}");
        let summary = std::fs::read_to_string(&md).unwrap();
        assert_eq!(summary.contains("FAIL"), want == 1, "{summary}");
        // The same thresholds from a TOML file give the same verdict.
        let toml = p("gate.toml");
        std::fs::write(
            &toml,
            "[gate]\nmax_kld = 0.05\nmax_ppl_increase = \"5%\"\nmin_top1 = 0.9\nmin_compression = 3.0\n",
        )
        .unwrap();
        assert_eq!(gate(&[path, "--config", &toml]).0, want, "{ty} via TOML");
    }
    // The JUnit file is well-formed XML with one failure per failed threshold.
    let checked = run_python("check_junit.py", &[Path::new(&p("Q2_K.junit.xml"))]);
    assert!(checked.contains("failures"), "{checked}");

    // Gating against the wrong base (the Q4_1 file, not the f32 expansion) is bad input.
    let (code, text) = gate(&[
        &reports[0].1,
        "--max-kld",
        "0.05",
        "--base",
        real.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("another base"), "{text}");
}

#[test]
fn bad_gate_input_exits_2_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let report = p("r.json");
    std::fs::write(
        &report,
        r#"{"model": "m.gguf", "kld": {"mean": 0.01, "p99": 0.05}, "perplexity": {"perplexity": 41.5},
            "base_perplexity": {"perplexity": 41.0}, "top1_agreement": 0.95, "compression_ratio": 3.7}"#,
    )
    .unwrap();
    assert_eq!(gate(&[&report, "--max-kld", "0.05"]).0, 0);
    for (args, needle) in [
        (vec!["--min-top1", "150%"], "makes no sense"),
        (vec!["--max-kld", "-0.1"], "cannot be negative"),
        (vec!["--max-ppl-increase", "-5%"], "makes no sense"),
        (vec!["--min-compression", "0"], "positive"),
        (vec!["--max-kld", "small"], "not a number"),
        (vec![], "no thresholds"),
    ] {
        let mut all = vec![report.as_str()];
        all.extend(args.iter().copied());
        let (code, text) = gate(&all);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    // A report without the measured field a threshold needs (made without --base).
    let no_base = p("nobase.json");
    std::fs::write(
        &no_base,
        r#"{"model": "m.gguf", "perplexity": {"perplexity": 41.5}}"#,
    )
    .unwrap();
    let (code, text) = gate(&[&no_base, "--max-kld", "0.05"]);
    assert!(
        code == 2 && text.contains("kld.mean") && text.contains("--base"),
        "{text}"
    );
    // Not JSON, missing, and a thresholds file with an unknown key.
    let junk = p("junk.json");
    std::fs::write(&junk, "PPL = 41").unwrap();
    let (code, text) = gate(&[&junk, "--max-kld", "0.05"]);
    assert!(code == 2 && text.contains("junk.json"), "{text}");
    let (code, text) = gate(&[&p("missing.json"), "--max-kld", "0.05"]);
    assert!(code == 2 && text.contains("missing.json"), "{text}");
    let toml = p("g.toml");
    std::fs::write(&toml, "max_kdl = 0.05\n").unwrap();
    let (code, text) = gate(&[&report, "--config", &toml]);
    assert!(
        code == 2 && text.contains("max_kdl") && text.contains("g.toml"),
        "{text}"
    );

    // An artifact that cannot be a compressed form of the base (another head
    // size; a base smaller than the artifact) is refused before any evaluation.
    let tiny = dir.path().join("tiny.gguf");
    write_tiny_llama(&tiny, 2, 64, 3, &|_| 1.0);
    let (real, text) = (real_model(), eval_text());
    for (artifact, base, needle) in [(&tiny, &real, "head size"), (&real, &tiny, "head size")] {
        let o = compress(&[
            "eval",
            artifact.to_str().unwrap(),
            "--base",
            base.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "1",
        ]);
        let msg = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{msg}");
        assert!(
            msg.contains(needle) && msg.contains("not a compressed form"),
            "{msg}"
        );
    }

    // An empty evaluation text is refused by eval and sensitivity alike.
    let empty = p("empty.txt");
    std::fs::write(&empty, "").unwrap();
    for args in [
        vec![
            "eval",
            real.to_str().unwrap(),
            "--base",
            real.to_str().unwrap(),
            "--text",
            &empty,
        ],
        vec![
            "sensitivity",
            real.to_str().unwrap(),
            "--calib",
            &empty,
            "--text",
            &empty,
            "-o",
            &report,
        ],
    ] {
        let o = compress(&args);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains("empty.txt") && text.contains("empty"),
            "{text}"
        );
    }
}
