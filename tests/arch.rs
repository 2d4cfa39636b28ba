//! Architecture descriptions against an independent implementation: tiny
//! random-weight Llama 3 (llama3 rope scaling), Qwen2 and Qwen3 models made by HF
//! transformers (`scripts/make-arch-fixtures.py`, committed under
//! `tests/fixtures/arch/`), read from their HF folders and from the GGUF files
//! llama.cpp's own `convert_hf_to_gguf.py` made of them. Our logits must match
//! transformers' to 1e-4 of the largest logit, and every stage must run on each.

use e2e::{compress, output_text, rel_max_error, repo_root};
use model::safetensors_file::SafetensorsSet;
use model::Model;
use std::path::{Path, PathBuf};

const ARCHES: [&str; 7] = [
    "llama3", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "gemma3",
];

/// The reference a GGUF of fixture `name` is compared with: transformers'
/// logits, or, where llama.cpp computes something else from the GGUF than the
/// HF config says (Mistral's window, which a `llama` GGUF cannot carry; the
/// Gemma fixture's query_pre_attn_scalar, which llama.cpp never reads), the
/// logits transformers gives with the config changed to what llama.cpp reads.
fn gguf_reference_key(name: &str) -> &'static str {
    match name {
        "mistral" | "gemma3" => "logits_as_gguf",
        _ => "logits",
    }
}

/// The base a GGUF artifact of fixture `name` is evaluated against: the HF
/// folder, or llama.cpp's GGUF where the two compute different functions.
fn gguf_base(name: &str) -> PathBuf {
    match gguf_reference_key(name) {
        "logits" => fixture(name),
        _ => fixture(name).join("model.gguf"),
    }
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/arch").join(name)
}

/// The reference tokens and the logits stored under `key`.
fn reference_of(name: &str, key: &str) -> (Vec<u32>, Vec<f32>) {
    let set = SafetensorsSet::open(&fixture(name).join("reference.safetensors")).unwrap();
    let (_, tok) = set.get("tokens").unwrap();
    let tokens = tok
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let (_, lg) = set.get(key).unwrap();
    let logits = lg
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (tokens, logits)
}

fn logits_error(path: &Path, name: &str) -> f64 {
    logits_error_of(path, name, "logits")
}

/// [`logits_error`] against the reference logits stored under `key`.
fn logits_error_of(path: &Path, name: &str, key: &str) -> f64 {
    let model = Model::open(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let (tokens, want) = reference_of(name, key);
    let got = model.logits(&tokens, 0).unwrap();
    rel_max_error(&got, &want)
}

#[test]
fn logits_match_transformers_from_hf_and_from_llama_cpp_gguf() {
    for name in ARCHES {
        for (path, key) in [
            (fixture(name), "logits"),
            (fixture(name).join("model.gguf"), gguf_reference_key(name)),
        ] {
            let err = logits_error_of(&path, name, key);
            eprintln!(
                "{name} {}: max error / max logit = {err:.2e} against {key}",
                path.display()
            );
            assert!(err < 1e-4, "{}: {err:e}", path.display());
        }
    }
}

#[test]
fn transformers_4_config_layout_reads_the_same() {
    // The fixtures made with a transformers 4 `config.v4.json` beside the v5 one.
    for name in ARCHES.into_iter().filter(|n| !n.starts_with("qwen")) {
        let dir = tempfile::tempdir().unwrap();
        let src = fixture(name);
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
        assert_eq!(v4.config, v5.config, "{name}");
        let err = logits_error(dir.path(), name);
        assert!(err < 1e-4, "{name}: {err:e}");
    }
    let llama3 = Model::open(&fixture("llama3")).unwrap();
    assert!(llama3.config.rope_scaling.is_some());
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
        v["rope_parameters"]["rope_type"] = "longrope".into()
    });
    let e = err_of(d.path());
    assert!(e.contains("'longrope' is not supported"), "{e}");
    // A YaRN factor that is no positive number.
    edit_config(d.path(), &|v| {
        v["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0,
            "factor": -2.0, "original_max_position_embeddings": 16})
    });
    let e = err_of(d.path());
    assert!(e.contains("rope_scaling") && e.contains("factor -2"), "{e}");

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

fn run_ok(args: &[&str]) -> String {
    let o = compress(args);
    let text = output_text(&o);
    assert!(o.status.success(), "{args:?} failed:\n{text}");
    text
}

/// `compress eval ARTIFACT --base BASE` on the fixture's context: (PPL, KLD).
fn eval_against(artifact: &Path, base: &Path) -> (f64, f64) {
    let text = e2e::eval_text();
    let out = run_ok(&[
        "eval",
        artifact.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "64",
        "--chunks",
        "4",
        "--json",
    ]);
    let start = out.find('{').expect("a JSON report");
    let v: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    let ppl = v["perplexity"]["perplexity"]
        .as_f64()
        .unwrap_or_else(|| panic!("no perplexity in {v}"));
    let kld = v["kld"]["mean"]
        .as_f64()
        .unwrap_or_else(|| panic!("no kld in {v}"));
    assert!(ppl.is_finite() && kld.is_finite() && kld >= 0.0, "{v}");
    (ppl, kld)
}

/// Every 1-D tensor the description keeps in float is F32 in a written GGUF.
fn assert_kept_float(path: &Path) {
    let m = Model::open(path).unwrap();
    for name in m.tensor_names() {
        let role = m.role(&name).unwrap();
        if role.kept_float().is_some() {
            let (ty, _) = m.tensor_meta(&name).unwrap();
            assert_eq!(ty, kernels::GgmlType::F32, "{}: {name}", path.display());
        }
    }
}

/// Each stage on each architecture: quantize (mixes, target bpw, GPTQ/AWQ/RTN
/// folders and GGUF grids), prune (unstructured, N:M, structured), distill,
/// sensitivity and the allocation from it, convert; every artifact opens and evaluates against its base.
#[test]
fn every_stage_runs_on_every_architecture() {
    let calib = e2e::asset("calib.txt");
    let calib = calib.to_str().unwrap();
    let eval = e2e::eval_text();
    // COMPRESS_TEST_ARCH=NAME runs one fixture (while working on it).
    let only = std::env::var("COMPRESS_TEST_ARCH").ok();
    for name in ARCHES
        .into_iter()
        .filter(|n| only.as_deref().is_none_or(|o| o == *n))
    {
        let dir = tempfile::tempdir().unwrap();
        let out = |f: &str| dir.path().join(f);
        let base = fixture(name);
        let b = base.to_str().unwrap();
        let cal = ["--calib", calib, "--samples", "4", "--seq", "64"];
        // The Gemma fixture's rows of 48 split into no GGUF block (32 or 256
        // wide), so most of its tensors fall back to F16: budgets sit above that.
        let (bpw_target, alloc_target) = match name {
            "gemma3" => ("13.5", "14"),
            _ => ("5", "6"),
        };
        // A GGUF is compared with what llama.cpp computes from one.
        let base_of = |artifact: &Path| match artifact.extension() {
            Some(e) if e == "gguf" => gguf_base(name),
            _ => base.clone(),
        };

        // Our GGUF writer: the HF folder written as F32 GGUF reads back to the
        // reference logits (Q/K layout, rope factors and metadata as llama.cpp's).
        let f32_gguf = out("f32.gguf");
        run_ok(&[
            "quantize",
            b,
            "--type",
            "F32",
            "-o",
            f32_gguf.to_str().unwrap(),
        ]);
        let gguf_key = gguf_reference_key(name);
        assert!(logits_error_of(&f32_gguf, name, gguf_key) < 1e-4, "{name}");
        // And the llama.cpp GGUF converted to HF reads back the same.
        let conv = out("conv");
        let src_gguf = base.join("model.gguf");
        let conv_out = run_ok_or_refused(&[
            "convert",
            src_gguf.to_str().unwrap(),
            "-o",
            conv.to_str().unwrap(),
        ]);
        match conv_out {
            Ok(_) => assert!(logits_error_of(&conv, name, gguf_key) < 1e-4, "{name}"),
            Err(e) => {
                assert_eq!(name, "llama3", "{e}");
                assert!(e.contains("rope_freqs.weight"), "{e}");
            }
        }

        let imatrix = out("im.gguf");
        run_ok(&[
            "imatrix",
            b,
            "--text",
            calib,
            "--ctx",
            "64",
            "--chunks",
            "4",
            "-o",
            imatrix.to_str().unwrap(),
        ]);
        let q4 = out("q4km.gguf");
        let said = run_ok(&[
            "quantize",
            b,
            "--type",
            "Q4_K_M",
            "--imatrix",
            imatrix.to_str().unwrap(),
            "-o",
            q4.to_str().unwrap(),
        ]);
        assert!(said.contains("kept in F32, never quantized"), "{said}");
        assert_kept_float(&q4);
        let extra = match name {
            "qwen2" => "blk.1.attn_k.bias",
            "qwen3" => "blk.1.attn_q_norm.weight",
            "llama3" => "rope_freqs.weight",
            "olmo2" => "blk.1.post_ffw_norm.weight",
            "gemma3" => "blk.5.post_attention_norm.weight",
            _ => "output_norm.weight",
        };
        e2e::check_gguf_with_gguf_py(
            &q4,
            &["blk.0.attn_q.weight", "blk.1.ffn_down.weight", extra],
            &out("dump"),
        );
        let (_, kld_q4) = eval_against(&q4, &base_of(&q4));
        assert!(kld_q4 > 0.0, "{name}");
        let bpw = out("bpw.gguf");
        run_ok(&[
            "quantize",
            b,
            "--target-bpw",
            bpw_target,
            "-o",
            bpw.to_str().unwrap(),
        ]);
        eval_against(&bpw, &base_of(&bpw));

        // Calibrated integer quantization: GPTQ beats round-to-nearest.
        let rtn = out("rtn");
        let gptq = out("gptq");
        let int4 = ["--bits", "4", "--group", "32"];
        let mut args = vec![
            "quantize",
            b,
            "--method",
            "rtn",
            "-o",
            rtn.to_str().unwrap(),
        ];
        args.extend(int4);
        run_ok(&args);
        let mut args = vec![
            "quantize",
            b,
            "--method",
            "gptq",
            "-o",
            gptq.to_str().unwrap(),
        ];
        args.extend(int4);
        args.extend(cal);
        run_ok(&args);
        let (_, kld_rtn) = eval_against(&rtn, &base_of(&rtn));
        let (_, kld_gptq) = eval_against(&gptq, &base_of(&gptq));
        assert!(
            kld_gptq < kld_rtn,
            "{name}: GPTQ {kld_gptq} vs RTN {kld_rtn}"
        );
        for (method, format) in [("awq", "gptq"), ("gptq", "compressed-tensors")] {
            let o = out(&format!("{method}-{format}"));
            let mut args = vec![
                "quantize",
                b,
                "--method",
                method,
                "--format",
                format,
                "-o",
                o.to_str().unwrap(),
            ];
            // compressed-tensors needs a group that divides every layer's input
            // columns (gemma3's fixture has 48): 16 does, in every fixture.
            let group = if format == "compressed-tensors" {
                "16"
            } else {
                "32"
            };
            args.extend(["--bits", "4", "--group", group]);
            args.extend(cal);
            run_ok(&args);
            eval_against(&o, &base_of(&o));
        }
        let grid = out("gptq-q4_0.gguf");
        let mut args = vec![
            "quantize",
            b,
            "--method",
            "gptq",
            "--type",
            "Q4_0",
            "-o",
            grid.to_str().unwrap(),
        ];
        args.extend(cal);
        run_ok(&args);
        assert_kept_float(&grid);
        eval_against(&grid, &base_of(&grid));

        // Pruning: unstructured and N:M into folders and GGUF, then structured cuts.
        for (i, extra) in [
            vec!["--method", "magnitude", "--sparsity", "0.5"],
            vec!["--method", "wanda", "--sparsity", "0.5"],
            vec!["--method", "sparsegpt", "--nm", "2:4"],
            vec![
                "--method",
                "wanda",
                "--nm",
                "2:4",
                "--format",
                "compressed-tensors",
            ],
            vec!["--heads", "2"],
            vec!["--ffn", "0.25"],
            vec!["--layers", "1"],
            vec!["--width", "0.25"],
        ]
        .into_iter()
        .enumerate()
        {
            let o = if i == 2 {
                out("p2.gguf")
            } else {
                out(&format!("p{i}"))
            };
            let mut args = vec!["prune", b, "-o", o.to_str().unwrap()];
            args.extend(extra.iter());
            args.extend(cal);
            run_ok(&args);
            let pruned = Model::open(&o).unwrap();
            let base_arch = Model::open(&base_of(&o)).unwrap().config.arch;
            assert_eq!(pruned.config.arch, base_arch);
            eval_against(&o, &base_of(&o));
        }

        // Distillation lowers the magnitude-pruned student's KLD (forward and
        // backward through biases, q/k norms and scaled RoPE).
        let pruned = out("p0");
        let (_, kld_pruned) = eval_against(&pruned, &base_of(&pruned));
        let distilled = out("distilled");
        run_ok(&[
            "distill",
            "--teacher",
            b,
            "--student",
            pruned.to_str().unwrap(),
            "--text",
            calib,
            "--tokens",
            "4096",
            "--seq",
            "64",
            "--lr",
            "2e-3",
            "-o",
            distilled.to_str().unwrap(),
        ]);
        let (_, kld_distilled) = eval_against(&distilled, &base_of(&distilled));
        assert!(
            kld_distilled < 0.9 * kld_pruned,
            "{name}: distilled {kld_distilled} vs pruned {kld_pruned}"
        );

        // Sensitivity: one tensor at a time.
        let report = out("sens.json");
        run_ok(&[
            "sensitivity",
            b,
            "--calib",
            calib,
            "--text",
            eval.to_str().unwrap(),
            "--types",
            "Q4_0,Q8_0",
            "--sparsity",
            "0.5",
            "--ctx",
            "64",
            "-o",
            report.to_str().unwrap(),
        ]);
        assert!(report.exists());
        // ... and the measured-KLD allocation from it.
        let alloc = out("alloc.gguf");
        run_ok(&[
            "quantize",
            b,
            "--sensitivity",
            report.to_str().unwrap(),
            "--target-bpw",
            alloc_target,
            "-o",
            alloc.to_str().unwrap(),
        ]);
        assert_kept_float(&alloc);
        eval_against(&alloc, &base_of(&alloc));
    }
}

/// Runs `compress`; Ok(output) on success, Err(output) on exit code 2.
fn run_ok_or_refused(args: &[&str]) -> Result<String, String> {
    let o = compress(args);
    let text = output_text(&o);
    match o.status.code() {
        Some(0) => Ok(text),
        Some(2) => Err(text),
        _ => panic!("{args:?}:\n{text}"),
    }
}

/// Bad hyperparameters of the Gemma 3, SmolLM3 and Mistral families are refused before anything
/// is written, with one error naming the key: `layer_types` of the wrong
/// length, a window of 0, a Gemma GGUF without the sliding layers' RoPE base.
#[test]
fn bad_layer_settings_are_refused_naming_the_key() {
    let refused = |input: &Path, says: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.gguf");
        let o = compress(&[
            "quantize",
            input.to_str().unwrap(),
            "--type",
            "Q8_0",
            "-o",
            out.to_str().unwrap(),
        ]);
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{text}");
        assert!(text.contains(says), "expected '{says}' in: {text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(!out.exists(), "an artifact was written: {text}");
    };
    let with_config = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let d = tempfile::tempdir().unwrap();
        e2e::copy_with_config(&fixture(name), d.path(), edit);
        d
    };
    let d = with_config("gemma3", &|v| {
        v["layer_types"].as_array_mut().unwrap().pop();
    });
    refused(
        d.path(),
        "'layer_types' lists 5 layers but num_hidden_layers is 6",
    );
    let d = with_config("smollm3", &|v| {
        v["no_rope_layers"] = serde_json::json!([1, 0])
    });
    refused(
        d.path(),
        "'no_rope_layers' lists 2 layers but num_hidden_layers is 4",
    );
    for name in ["gemma3", "mistral"] {
        let d = with_config(name, &|v| v["sliding_window"] = 0.into());
        refused(d.path(), "'sliding_window' is 0");
    }
    // The GGUF with its local base key renamed to one nobody reads.
    let d = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(fixture("gemma3").join("model.gguf")).unwrap();
    let key = b"gemma3.rope.freq_base_swa";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the converter wrote the local base");
    bytes[at + key.len() - 3..at + key.len()].copy_from_slice(b"xyz");
    let gguf = d.path().join("no-local-base.gguf");
    std::fs::write(&gguf, bytes).unwrap();
    refused(
        &gguf,
        "'gemma3.rope.freq_base_swa' (the sliding layers' RoPE base) is missing",
    );
}

/// The YaRN fixtures (`scripts/make-yarn-fixtures.py`): Qwen3 and DeepSeek-V3
/// with YaRN over a quarter of their context.
fn yarn_fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/yarn").join(name)
}

#[test]
fn yarn_logits_match_transformers_from_hf_gguf_and_both_conversions() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["qwen3", "deepseek_v3"] {
        let src = yarn_fixture(name);
        let set = SafetensorsSet::open(&src.join("reference.safetensors")).unwrap();
        let floats = |key: &str| -> Vec<f32> {
            let (_, b) = set.get(key).unwrap();
            b.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        let (_, tok) = set.get("tokens").unwrap();
        let tokens: Vec<u32> = tok
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let (want, unscaled) = (floats("logits"), floats("logits_unscaled"));
        // Ours from HF and llama.cpp's GGUF, and from each converted by us to
        // the other format (YaRN carried in config.json and in GGUF keys).
        let to_hf = dir.path().join(format!("{name}-hf"));
        let to_gguf = dir.path().join(format!("{name}.gguf"));
        // `convert` writes HF only, and says so for a .gguf output.
        let o = compress(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            to_gguf.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
        assert!(
            output_text(&o).contains("--type F32"),
            "{}",
            output_text(&o)
        );
        assert!(!to_gguf.exists());
        run_ok(&[
            "convert",
            src.join("model.gguf").to_str().unwrap(),
            "-o",
            to_hf.to_str().unwrap(),
        ]);
        run_ok(&[
            "quantize",
            src.to_str().unwrap(),
            "--type",
            "F32",
            "-o",
            to_gguf.to_str().unwrap(),
        ]);
        assert!(to_gguf.is_file(), "{}", to_gguf.display());
        for path in [src.clone(), src.join("model.gguf"), to_hf, to_gguf] {
            let model = Model::open(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let Some(model::config::RopeScaling::Yarn(y)) = &model.config.rope_scaling else {
                panic!(
                    "{}: no YaRN read: {:?}",
                    path.display(),
                    model.config.rope_scaling
                );
            };
            assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 16.0));
            let got = model.logits(&tokens, 0).unwrap();
            let err = rel_max_error(&got, &want);
            let off = rel_max_error(&got, &unscaled);
            eprintln!(
                "{name} {}: max |Δlogit| / max |logit| = {err:.2e} (unscaled RoPE: {off:.2e})",
                path.display()
            );
            assert!(err < 1e-4, "{}: logits differ by {err:e}", path.display());
            assert!(off > 1e-2, "{}: YaRN changes nothing", path.display());
        }
    }
}
