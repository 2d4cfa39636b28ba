//! `compress quantize --method gptq|rtn` on the real model with a small
//! calibration set: GPTQ folders the numpy reader unpacks to exactly our
//! weights, GGUF files on the block grids that gguf-py reads and that evaluate
//! better than plain importance-weighted rounding on the layers' outputs,
//! byte-identical reruns, and bad calibration settings refused before any output.

use e2e::*;
use std::path::{Path, PathBuf};

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gptq");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(args: &[&str]) -> String {
    let o = compress(args);
    let text = output_text(&o);
    assert!(o.status.success(), "{args:?} failed:\n{text}");
    text
}

/// `compress quantize` on the real model with 4 samples of 64 calibration tokens.
fn quantize(extra: &[&str], out: &Path, report: &Path) {
    let model = real_model();
    let calib = asset("calib.txt");
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "4",
        "--seq",
        "64",
        "-o",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ok(&args);
}

fn read_report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every block linear is reported once, GPTQ never loses to RTN on the same
/// grid by much on any layer, and wins clearly on average.
fn check_layers(report: &serde_json::Value) {
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30 * 7);
    let (mut rtn, mut gptq) = (0.0, 0.0);
    for l in layers {
        let (r, g) = (
            l["rtn_rel_error"].as_f64().unwrap(),
            l["rel_error"].as_f64().unwrap(),
        );
        assert!(g <= r * 1.05, "{}: GPTQ {g} vs RTN {r}", l["name"]);
        assert!(!l["fell_back_to_rtn"].as_bool().unwrap());
        rtn += r;
        gptq += g;
    }
    assert!(gptq < 0.7 * rtn, "mean GPTQ error {gptq} vs RTN {rtn}");
}

#[test]
fn gptq_folder_unpacks_to_our_weights_with_an_independent_reader() {
    let dir = work_dir().join("int4");
    let report = work_dir().join("int4.json");
    let _ = std::fs::remove_dir_all(&dir);
    quantize(
        &[
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group",
            "64",
            "--act-order",
        ],
        &dir,
        &report,
    );
    let r = read_report(&report);
    check_layers(&r);
    for t in [
        "forward_seconds",
        "hessian_seconds",
        "factor_seconds",
        "loop_seconds",
    ] {
        assert!(r["timings"][t].as_f64().unwrap() > 0.0, "{t}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["quant_method"], "gptq");
    assert_eq!(qc["bits"], 4);
    assert_eq!(qc["group_size"], 64);
    assert_eq!(qc["desc_act"], true);
    // Our reader's dequantization, written out as f32, is what numpy must get
    // from the packed tensors on its own.
    let reference = work_dir().join("int4-reference.safetensors");
    run_ok(&[
        "convert",
        dir.to_str().unwrap(),
        "-o",
        reference.to_str().unwrap(),
    ]);
    let out = run_python("check_gptq.py", &[&dir, &reference]);
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn gptq_on_gguf_grids_is_read_by_gguf_py_and_reruns_identically() {
    let dump = work_dir().join("q4_0-dump");
    let mut files = Vec::new();
    for run in 0..2 {
        let out = work_dir().join(format!("q4_0-{run}.gguf"));
        let report = work_dir().join(format!("q4_0-{run}.json"));
        quantize(&["--method", "gptq", "--type", "Q4_0"], &out, &report);
        if run == 0 {
            check_layers(&read_report(&report));
        }
        files.push(std::fs::read(&out).unwrap());
    }
    assert!(
        files[0] == files[1],
        "same seed, same inputs: different bytes"
    );
    check_gguf_with_gguf_py(
        &work_dir().join("q4_0-0.gguf"),
        &[
            "blk.0.attn_q.weight",
            "blk.29.ffn_down.weight",
            "token_embd.weight",
        ],
        &dump,
    );
    // A different seed picks other samples and gives another file.
    let other = work_dir().join("q4_0-seed.gguf");
    quantize(
        &["--method", "gptq", "--type", "Q4_0", "--seed", "1"],
        &other,
        &work_dir().join("q4_0-seed.json"),
    );
    assert!(std::fs::read(&other).unwrap() != files[0]);
}

#[test]
fn rtn_writes_compressed_tensors_without_calibration() {
    let dir = work_dir().join("rtn-ct");
    let _ = std::fs::remove_dir_all(&dir);
    quantize(
        &[
            "--method",
            "rtn",
            "--bits",
            "8",
            "--group",
            "-1",
            "--format",
            "compressed-tensors",
        ],
        &dir,
        &work_dir().join("rtn-ct.json"),
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"]["quant_method"],
        "compressed-tensors"
    );
    let reference = work_dir().join("rtn-ct-reference.safetensors");
    run_ok(&[
        "convert",
        dir.to_str().unwrap(),
        "-o",
        reference.to_str().unwrap(),
    ]);
    let out = run_python("check_gptq.py", &[&dir, &reference]);
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn bad_calibration_settings_are_refused_before_any_output() {
    let model = real_model();
    let calib = asset("calib.txt");
    let out = work_dir().join("refused");
    let _ = std::fs::remove_dir_all(&out);
    let cases: [(&[&str], &str); 4] = [
        (
            &["--method", "gptq", "--samples", "100000", "--seq", "512"],
            "need at least 51200000",
        ),
        (&["--method", "gptq", "--group", "1000"], "group size 1000"),
        (&["--method", "gptq", "--bits", "5"], "2, 3, 4 or 8"),
        (
            &["--method", "gptq", "--damp", "2"],
            "--damp 2 must be between 0 and 1",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "quantize",
            model.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = compress(&args);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {text}");
        assert!(text.contains(expected), "{extra:?}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(
            !out.join("model.safetensors").exists(),
            "{extra:?} left output"
        );
    }
}
