//! `compress prune` on the real model with a small calibration set: exact
//! sparsity patterns, SparseGPT and Wanda well ahead of magnitude on the KL
//! divergence, GPTQ that keeps a pruned model's zeros, GGUF and safetensors
//! outputs that hold the same weights, byte-identical reruns, and bad settings
//! refused before any output.

use e2e::*;
use model::{names, Model};
use std::path::{Path, PathBuf};

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("prune");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(args: &[&str]) -> String {
    let o = compress(args);
    let text = output_text(&o);
    assert!(o.status.success(), "{args:?} failed:\n{text}");
    text
}

/// `compress prune` on the real model with 8 samples of 128 calibration tokens.
fn prune(extra: &[&str], out: &Path) {
    let (model, calib) = (real_model(), asset("calib.txt"));
    let mut args = vec![
        "prune",
        model.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "8",
        "--seq",
        "128",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ok(&args);
}

/// Every block linear of `model` as f32.
fn linears(model: &Model) -> Vec<(String, usize, Vec<f32>)> {
    (0..model.config.num_hidden_layers)
        .flat_map(|l| model.config.arch.linears().map(move |s| names::block(l, s)))
        .map(|n| {
            let t = model.tensor(&n).unwrap();
            let cols = t.shape[1];
            (n, cols, t.to_f32().unwrap())
        })
        .collect()
}

fn mean_kld(models: &[&Path]) -> Vec<f64> {
    let mut args = vec!["eval"];
    args.extend(models.iter().map(|m| m.to_str().unwrap()));
    let (base, text) = (real_model(), eval_text());
    args.extend([
        "--base",
        base.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "256",
        "--chunks",
        "4",
        "--json",
    ]);
    let o = compress(&args);
    assert!(o.status.success(), "{}", output_text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["kld"]["mean"].as_f64().unwrap())
        .collect()
}

#[test]
fn sparsegpt_2_4_holds_the_pattern_and_gptq_keeps_its_zeros() {
    let dir = work_dir().join("sparsegpt-2-4");
    let _ = std::fs::remove_dir_all(&dir);
    prune(&["--method", "sparsegpt", "--nm", "2:4"], &dir);
    let pruned = Model::open(&dir).unwrap();
    let base = Model::open(&real_model()).unwrap();
    assert!(dir.join("config.json").exists() && dir.join("tokenizer.json").exists());
    for (name, _, w) in linears(&pruned) {
        for (g, group) in w.chunks(4).enumerate() {
            let zeros = group.iter().filter(|&&v| v == 0.0).count();
            assert!(zeros >= 2, "{name}: group {g} has {zeros} zeros");
        }
    }
    // Everything that is not a block linear is carried over unchanged.
    for n in [
        "token_embd.weight",
        "blk.3.attn_norm.weight",
        "output_norm.weight",
    ] {
        assert_eq!(
            pruned.tensor(n).unwrap().to_f32().unwrap(),
            base.tensor(n).unwrap().to_f32().unwrap(),
            "{n}"
        );
    }

    // GPTQ on the pruned model: every pruned weight is still exactly zero.
    let q = work_dir().join("sparsegpt-2-4-gptq");
    let report = work_dir().join("sparsegpt-2-4-gptq.json");
    let _ = std::fs::remove_dir_all(&q);
    let calib = asset("calib.txt");
    run_ok(&[
        "quantize",
        dir.to_str().unwrap(),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group",
        "64",
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "4",
        "--seq",
        "64",
        "-o",
        q.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let quantized = Model::open(&q).unwrap();
    for ((name, _, p), (_, _, qv)) in linears(&pruned).iter().zip(linears(&quantized)) {
        for (k, (a, b)) in p.iter().zip(&qv).enumerate() {
            if *a == 0.0 {
                assert_eq!(*b, 0.0, "{name}[{k}] was pruned but GPTQ made it {b}");
            }
        }
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for l in r["layers"].as_array().unwrap() {
        assert!(l["kept_zeros"].as_u64().unwrap() > 0, "{}", l["name"]);
        assert_eq!(l["zeros_lost"].as_u64(), Some(0), "{}", l["name"]);
    }
}

#[test]
fn sparsegpt_and_wanda_beat_magnitude_at_half_sparsity() {
    let mut outs = Vec::new();
    for method in ["magnitude", "wanda", "sparsegpt"] {
        let out = work_dir().join(format!("{method}-50.gguf"));
        let report = work_dir().join(format!("{method}-50.json"));
        prune(
            &[
                "--method",
                method,
                "--sparsity",
                "0.5",
                "--dtype",
                "f16",
                "--report",
                report.to_str().unwrap(),
            ],
            &out,
        );
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        // Per-row (Wanda, SparseGPT) or per-matrix (magnitude) counts are exact:
        // half of every layer, up to rounding of the 128-column blocks' halves.
        for l in r["layers"].as_array().unwrap() {
            let s = l["sparsity"].as_f64().unwrap();
            assert!((s - 0.5).abs() < 1e-3, "{method} {}: {s}", l["name"]);
        }
        outs.push(out);
    }
    let kld = mean_kld(&[&outs[0], &outs[1], &outs[2]]);
    let (magnitude, wanda, sparsegpt) = (kld[0], kld[1], kld[2]);
    assert!(
        wanda < 0.7 * magnitude,
        "Wanda {wanda} vs magnitude {magnitude}"
    );
    assert!(
        sparsegpt < 0.7 * magnitude,
        "SparseGPT {sparsegpt} vs magnitude {magnitude}"
    );
}

#[test]
fn gguf_and_safetensors_outputs_hold_the_same_weights_and_reruns_are_identical() {
    let st = work_dir().join("magnitude-4-8");
    let gguf = work_dir().join("magnitude-4-8.gguf");
    let again = work_dir().join("magnitude-4-8-again.gguf");
    let _ = std::fs::remove_dir_all(&st);
    for out in [&st, &gguf, &again] {
        prune(&["--method", "magnitude", "--nm", "4:8"], out);
    }
    assert_eq!(
        std::fs::read(&gguf).unwrap(),
        std::fs::read(&again).unwrap()
    );
    let (a, b) = (Model::open(&st).unwrap(), Model::open(&gguf).unwrap());
    for ((name, _, x), (_, _, y)) in linears(&a).iter().zip(linears(&b)) {
        assert_eq!(x, &y, "{name}");
        assert!(x
            .chunks(8)
            .all(|g| g.iter().filter(|&&v| v == 0.0).count() >= 4));
    }
    // gguf-py and the safetensors package see the same pattern in both files.
    for file in [&gguf, &st] {
        let v: serde_json::Value = serde_json::from_str(&run_python(
            "check_sparsity.py",
            &[file.as_path(), Path::new("4:8")],
        ))
        .unwrap();
        let layers = v.as_object().unwrap();
        assert_eq!(layers.len(), 30 * 7, "{}", file.display());
        for (name, l) in layers {
            assert_eq!(l["nm_ok"].as_bool(), Some(true), "{name}");
            // Half of each row, plus the few weights that were zero already.
            let z = l["zero_fraction"].as_f64().unwrap();
            assert!((0.5..0.501).contains(&z), "{name}: {z}");
        }
    }
}

#[test]
fn bad_settings_are_refused_before_any_output() {
    let model = real_model();
    let m = model.to_str().unwrap();
    let out = work_dir().join("refused");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--sparsity", "1.0"], "outside [0, 1)"),
        (vec!["--sparsity", "-0.2"], "outside [0, 1)"),
        (vec!["--nm", "4:4"], "0 < N < M"),
        (vec!["--nm", "2:5"], "multiple of 5"),
        (vec!["--nm", "2:4", "--schedule", "owl"], "unstructured"),
        (
            vec![
                "--sparsity",
                "0.5",
                "--method",
                "magnitude",
                "--schedule",
                "owl",
            ],
            "activation statistics",
        ),
        (
            vec!["--sparsity", "0.5", "--samples", "100000"],
            "calibration text",
        ),
    ] {
        let mut full = vec!["prune", m, "-o", o];
        full.extend(args.iter());
        let r = compress(&full);
        let text = output_text(&r);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

#[test]
fn structured_cuts_write_smaller_models_that_load_and_run() {
    let base = Model::open(&real_model()).unwrap();
    let c = &base.config;
    let mut outs = Vec::new();
    for (args, name) in [
        (vec!["--ffn", "0.25"], "ffn"),
        (vec!["--heads", "3"], "heads"),
        (vec!["--layers", "4"], "layers"),
        (vec!["--width", "0.25", "--heads", "3"], "width-heads"),
    ] {
        let out = work_dir().join(format!("structured-{name}"));
        let _ = std::fs::remove_dir_all(&out);
        let report = work_dir().join(format!("structured-{name}.json"));
        let mut full = args.clone();
        full.extend(["--dtype", "f16", "--report", report.to_str().unwrap()]);
        prune(&full, &out);
        let m = Model::open(&out).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let n = &m.config;
        match name {
            "ffn" => assert_eq!(n.intermediate_size, 1152),
            "heads" => {
                assert_eq!((n.num_attention_heads, n.num_key_value_heads), (6, 3));
                // Every K/V group keeps two of its own three query heads.
                for kept in r["kept_heads"].as_array().unwrap() {
                    let heads: Vec<u64> = kept
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| h.as_u64().unwrap())
                        .collect();
                    for g in 0..3 {
                        assert_eq!(
                            heads.iter().filter(|&&h| h / 3 == g).count(),
                            2,
                            "{heads:?}"
                        );
                    }
                }
            }
            "layers" => {
                assert_eq!(n.num_hidden_layers, 26);
                assert_eq!(r["removed_blocks"].as_array().unwrap().len(), 4);
            }
            // 576 × 0.75 = 432, a multiple of 6 heads × 8: HF transformers needs
            // the hidden size divisible by the query heads.
            _ => assert_eq!((n.hidden_size, n.num_attention_heads), (432, 6)),
        }
        assert_eq!(n.head_dim, c.head_dim);
        // HF transformers accepts the rewritten config and derives the same shapes.
        let hf: serde_json::Value =
            serde_json::from_str(&run_python("check_hf_config.py", &[out.as_path()])).unwrap();
        assert_eq!(hf["model_type"], "llama");
        for (key, ours) in [
            ("hidden_size", n.hidden_size),
            ("intermediate_size", n.intermediate_size),
            ("num_hidden_layers", n.num_hidden_layers),
            ("num_attention_heads", n.num_attention_heads),
            ("num_key_value_heads", n.num_key_value_heads),
            ("head_dim", n.head_dim),
        ] {
            assert_eq!(hf[key].as_u64(), Some(ours as u64), "{name}: {key}");
        }
        // Shapes agree with the config and the parameter count is what the report says.
        let mut params = 0u64;
        for t in m.tensor_names() {
            let (_, shape) = m.tensor_meta(&t).unwrap();
            assert_eq!(Some(shape.clone()), m.expected_shape(&t), "{name}: {t}");
            params += shape.iter().product::<usize>() as u64;
        }
        assert_eq!(r["params_after"].as_u64(), Some(params));
        assert!(params < base.n_params().unwrap());
        outs.push(out);
    }
    // All of them run through the evaluator against the base.
    let kld = mean_kld(&outs.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(kld.iter().all(|k| k.is_finite() && *k > 0.0), "{kld:?}");
}

#[test]
fn impossible_structured_cuts_are_refused_before_any_output() {
    let model = real_model();
    let m = model.to_str().unwrap();
    let out = work_dir().join("refused-structured");
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["--heads", "2"], "multiple of 3"),
        (vec!["--heads", "9"], "at most 6"),
        (vec!["--layers", "30"], "leave none"),
        (vec!["--ffn", "1.0"], "outside [0, 1)"),
        (vec!["--width", "0.99"], "leaves no width"),
        (vec!["--ffn", "0.25", "--sparsity", "0.5"], "separate runs"),
    ] {
        let mut full = vec!["prune", m, "-o", o];
        full.extend(args.iter());
        let r = compress(&full);
        let text = output_text(&r);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(text.contains(needle), "{args:?}: {text}");
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

#[test]
fn compressed_tensors_sparse_folders_decompress_to_the_dense_weights() {
    for (pattern, format) in [
        (["--nm", "2:4"], "sparse-24-bitmask"),
        (["--sparsity", "0.5"], "sparse-bitmask"),
    ] {
        let tag = format.replace('-', "_");
        let (dense, packed) = (
            work_dir().join(format!("{tag}-dense")),
            work_dir().join(format!("{tag}-ct")),
        );
        for (out, extra) in [
            (&dense, vec![]),
            (&packed, vec!["--format", "compressed-tensors"]),
        ] {
            let _ = std::fs::remove_dir_all(out);
            let mut args = vec!["--method", "magnitude", "--dtype", "f16"];
            args.extend(pattern);
            args.extend(extra);
            prune(&args, out);
        }
        let v: serde_json::Value = serde_json::from_str(&run_python(
            "check_sparse_ct.py",
            &[packed.as_path(), dense.as_path()],
        ))
        .unwrap();
        assert_eq!(v["format"], format);
        assert_eq!(v["tensors"], 272);
        assert_eq!(v["mismatches"], serde_json::json!([]), "{format}");
        // Half the block linears' values are gone, so the file is about a third smaller.
        let size = |d: &Path| {
            std::fs::metadata(d.join("model.safetensors"))
                .unwrap()
                .len() as f64
        };
        assert!(size(&packed) < 0.7 * size(&dense), "{format}");
        // Nothing is left over from staging the dense weights.
        let entries: Vec<_> = std::fs::read_dir(&packed)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries.len(), 4, "{entries:?}");
        // Our reader opens the sparse folder to exactly the dense weights, and
        // `eval` runs on it: zero KLD against the dense model, fewer bits per weight.
        let (p, d) = (
            Model::open(&packed.join("model.safetensors")).unwrap(),
            Model::open(&dense.join("model.safetensors")).unwrap(),
        );
        assert!(p.sparse.is_some(), "{format}");
        for name in d.tensor_names() {
            let (a, b) = (p.tensor(&name).unwrap(), d.tensor(&name).unwrap());
            assert_eq!(a.shape, b.shape, "{name}");
            assert!(
                a.to_f32().unwrap() == b.to_f32().unwrap(),
                "{format}: {name}"
            );
        }
        let text = eval_text();
        let o = compress(&[
            "eval",
            packed.to_str().unwrap(),
            "--base",
            dense.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "64",
            "--chunks",
            "1",
            "--json",
        ]);
        assert!(o.status.success(), "{}", output_text(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["kld"]["max"], 0.0, "{format}");
        assert!(r["compression_ratio"].as_f64().unwrap() > 1.4, "{format}");
        let down = r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "blk.3.ffn_down.weight")
            .unwrap();
        assert!(down["bits_per_weight"].as_f64().unwrap() < 10.0, "{down}");
    }
}
