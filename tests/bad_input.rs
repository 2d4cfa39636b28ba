//! Broken inputs through the `compress` binary: each gets one clear error naming the
//! file and the problem, a non-zero exit code, no panic, and no output file.

use e2e::*;
use std::path::Path;

/// Runs `compress args…`, expects failure without a panic, and returns the text.
fn fails(args: &[&str]) -> String {
    let out = compress(args);
    let text = output_text(&out);
    assert!(
        !out.status.success(),
        "expected failure of {args:?}, got success:\n{text}"
    );
    assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
    assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
    text
}

fn eval_args<'a>(model: &'a str, text: &'a str) -> Vec<&'a str> {
    vec![
        "eval", model, "--text", text, "--ctx", "64", "--chunks", "1",
    ]
}

/// A small, valid llama GGUF header with one f32 tensor (enough to reach tensor checks).
fn tiny() -> GgufBuilder {
    GgufBuilder::default()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .tensor("token_embd.weight", &[32, 4], 0, f32_bytes(128, 0.0, 0.01))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn truncated_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(real_model()).unwrap();
    let text = write(dir.path(), "t.txt", b"hello world");
    for (name, cut) in [("head.gguf", 2000usize), ("half.gguf", real.len() / 2)] {
        let p = write(dir.path(), name, &real[..cut]);
        let msg = fails(&eval_args(&p, &text));
        assert!(msg.contains(name), "{msg}");
        assert!(
            msg.contains("truncated") || msg.contains("past the end"),
            "{msg}"
        );
    }
}

#[test]
fn tensor_offset_past_end_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "offset.gguf", &tiny().bytes_with(1 << 20));
    let text = write(dir.path(), "t.txt", b"hello world");
    let msg = fails(&eval_args(&p, &text));
    assert!(
        msg.contains("offset.gguf")
            && msg.contains("token_embd.weight")
            && msg.contains("past the end"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let b = tiny().tensor("blk.0.weird", &[32], 99, vec![0; 64]);
    let p = write(dir.path(), "type.gguf", &b.bytes());
    let text = write(dir.path(), "t.txt", b"hello world");
    let msg = fails(&eval_args(&p, &text));
    assert!(
        msg.contains("type.gguf") && msg.contains("blk.0.weird") && msg.contains("unknown"),
        "{msg}"
    );
}

#[test]
fn gguf_missing_hyperparameter_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "cfg.gguf", &tiny().bytes());
    let text = write(dir.path(), "t.txt", b"hello world");
    let msg = fails(&eval_args(&p, &text));
    assert!(msg.contains("cfg.gguf") && msg.contains("missing"), "{msg}");
}

/// Converts the real model to a folder of f16 safetensors once per test that needs it.
fn converted(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("st");
    let o = compress(&[
        "convert",
        real_model().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    out
}

#[test]
fn safetensors_header_that_lies_and_config_missing_a_field() {
    let dir = tempfile::tempdir().unwrap();
    let st = converted(dir.path());
    let text = write(dir.path(), "t.txt", b"hello world");
    let model_file = st.join("model.safetensors");
    let original = std::fs::read(&model_file).unwrap();

    // Header length larger than the file.
    let mut lying = original.clone();
    let header_len = u64::from_le_bytes(lying[..8].try_into().unwrap());
    lying[..8].copy_from_slice(&(header_len + 1_000_000_000).to_le_bytes());
    std::fs::write(&model_file, &lying).unwrap();
    let msg = fails(&eval_args(st.to_str().unwrap(), &text));
    assert!(
        msg.contains("model.safetensors") && msg.contains("header length"),
        "{msg}"
    );

    // Data cut short: the last tensor runs past the end.
    std::fs::write(&model_file, &original[..original.len() - 1000]).unwrap();
    let msg = fails(&eval_args(st.to_str().unwrap(), &text));
    assert!(
        msg.contains("model.safetensors") && msg.contains("past the end"),
        "{msg}"
    );
    std::fs::write(&model_file, &original).unwrap();

    // config.json without intermediate_size.
    let cfg_path = st.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let msg = fails(&eval_args(st.to_str().unwrap(), &text));
    assert!(
        msg.contains("config.json") && msg.contains("'intermediate_size' is missing"),
        "{msg}"
    );
}

#[test]
fn empty_or_non_utf8_text_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = real_model();
    let empty = write(dir.path(), "empty.txt", b"");
    let msg = fails(&eval_args(model.to_str().unwrap(), &empty));
    assert!(msg.contains("empty.txt") && msg.contains("empty"), "{msg}");
    let latin = write(dir.path(), "latin1.txt", b"na\xefve caf\xe9");
    let msg = fails(&eval_args(model.to_str().unwrap(), &latin));
    assert!(
        msg.contains("latin1.txt") && msg.contains("not UTF-8"),
        "{msg}"
    );
    let short = write(dir.path(), "short.txt", b"too short");
    let msg = fails(&eval_args(model.to_str().unwrap(), &short));
    assert!(msg.contains("tokens") && msg.contains("at least"), "{msg}");
}

#[test]
fn convert_refuses_to_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let st = converted(dir.path());
    let before = std::fs::read(st.join("config.json")).unwrap();
    let out = st.join("again.safetensors");
    let msg = fails(&["convert", st.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(msg.contains("input"), "{msg}");
    assert!(!out.exists());
    assert_eq!(std::fs::read(st.join("config.json")).unwrap(), before);
}

#[test]
fn missing_file_is_named() {
    let msg = fails(&eval_args("/nonexistent/model.gguf", "/nonexistent/t.txt"));
    assert!(msg.contains("/nonexistent/"), "{msg}");
}

#[test]
fn outputs_in_missing_folders_are_prepared_before_the_work() {
    // Once: `sensitivity … -o missing-dir/R.json` computed for minutes, then
    // failed on the folder. Every command now makes the output's folder first.
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("tests/fixtures/arch/qwen3");
    let calib = asset("calib.txt");
    let out = |p: &str| dir.path().join(p).to_str().unwrap().to_owned();
    for args in [
        vec![
            "quantize",
            src.to_str().unwrap(),
            "--type",
            "Q8_0",
            "-o",
            &out("a/b/q.gguf"),
            "--report",
            &out("c/d/q.json"),
        ],
        vec![
            "imatrix",
            src.to_str().unwrap(),
            "--text",
            calib.to_str().unwrap(),
            "--chunks",
            "1",
            "-o",
            &out("e/f/i.gguf"),
        ],
        vec![
            "convert",
            src.to_str().unwrap(),
            "-o",
            &out("g/h/m.safetensors"),
        ],
    ] {
        let o = compress(&args);
        assert!(o.status.success(), "{args:?}: {}", output_text(&o));
    }
    for f in [
        "a/b/q.gguf",
        "c/d/q.json",
        "e/f/i.gguf",
        "g/h/m.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // The folder comes first: a run that then fails on its model leaves the
    // folder, and says what is wrong with the model.
    let text = fails(&[
        "sensitivity",
        dir.path().join("nothing.gguf").to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--text",
        calib.to_str().unwrap(),
        "-o",
        &out("s/t/r.json"),
    ]);
    assert!(text.contains("nothing.gguf"), "{text}");
    assert!(dir.path().join("s/t").is_dir());
}

/// Overwrites the bytes of tensor `name` in safetensors file `file` (same length).
fn patch_tensor(file: &Path, name: &str, bytes: &[u8]) {
    let mut data = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let offsets = header[name]["data_offsets"].as_array().unwrap();
    let (a, b) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    assert_eq!(b - a, bytes.len(), "{name}");
    data[8 + n + a..8 + n + b].copy_from_slice(bytes);
    std::fs::write(file, data).unwrap();
}

#[test]
fn packed_and_sparse_shapes_no_model_has_are_refused() {
    // A compressed-tensors `weight_shape` (and a sparse folder's `.shape`) of
    // 2⁴⁰ rows once went into unchecked size arithmetic.
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("tests/fixtures/arch/qwen3");
    let calib = asset("calib.txt");
    let text = eval_text();
    let ct = dir.path().join("ct");
    let o = compress(&[
        "quantize",
        src.to_str().unwrap(),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group",
        "32",
        "--format",
        "compressed-tensors",
        "-o",
        ct.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    let huge: Vec<u8> = [1i64 << 40, 64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    patch_tensor(
        &ct.join("model.safetensors"),
        "model.layers.0.self_attn.q_proj.weight_shape",
        &huge,
    );
    let e = fails(&eval_args(ct.to_str().unwrap(), text.to_str().unwrap()));
    assert!(e.contains("weight_shape") && e.contains("2^24"), "{e}");

    let sparse = dir.path().join("sparse");
    let o = compress(&[
        "prune",
        src.to_str().unwrap(),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--format",
        "compressed-tensors",
        "--calib",
        calib.to_str().unwrap(),
        "--samples",
        "2",
        "--seq",
        "32",
        "-o",
        sparse.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", output_text(&o));
    patch_tensor(
        &sparse.join("model.safetensors"),
        "model.layers.0.self_attn.q_proj.shape",
        &huge,
    );
    let e = fails(&eval_args(sparse.to_str().unwrap(), text.to_str().unwrap()));
    assert!(e.contains(".shape") && e.contains("2^24"), "{e}");
}

/// Overwrites element `index` of F32 tensor `name` in GGUF file `file`.
fn patch_gguf_f32(file: &Path, name: &str, index: usize, value: f32) {
    let g = model::gguf::GgufFile::open(file).unwrap();
    let t = g.tensor(name).unwrap();
    assert_eq!(t.ty, kernels::GgmlType::F32, "{name}");
    let at = (g.data_offset + t.offset) as usize + 4 * index;
    drop(g);
    let mut data = std::fs::read(file).unwrap();
    data[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(file, data).unwrap();
}

/// The input problems of issue 21 point 5, each by its documented rule:
/// - an all-zero tensor quantizes and prunes to finite zeros, and the layer
///   reading its (all-zero) output reports every input column dead;
/// - a NaN weight is refused by every command that reads it, naming the
///   tensor, with no output;
/// - activations that overflow to NaN stop a calibrated stage naming the
///   layer, with no output.
#[test]
fn input_problems_follow_their_rules() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let zero = p("zero.gguf");
    write_tiny_llama(Path::new(&zero), 2, 64, 5, &|name| {
        if name == "blk.0.attn_v.weight" {
            0.0
        } else {
            1.0
        }
    });
    let calib = asset("calib.txt");
    let calib = calib.to_str().unwrap();
    let calibrated = |out: &str| -> Vec<String> {
        ["--calib", calib, "--samples", "4", "--seq", "64", "-o", out]
            .map(str::to_owned)
            .to_vec()
    };
    let run_ok = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = compress(&args);
        assert!(o.status.success(), "{args:?}: {}", output_text(&o));
    };
    let mut q4 = vec![
        "quantize".to_owned(),
        zero.clone(),
        "--type".into(),
        "Q4_K_M".into(),
    ];
    q4.extend(["-o".into(), p("zero-q4.gguf")]);
    run_ok(q4);
    let finite = |file: &str| {
        let g = model::gguf::GgufFile::open(Path::new(file)).unwrap();
        for t in &g.tensors {
            assert_eq!(
                kernels::quants::first_nonfinite(t.ty, g.tensor_data(t)).unwrap(),
                None,
                "{file}: {}",
                t.name
            );
        }
    };
    finite(&p("zero-q4.gguf"));
    let dead_columns = |report: &str, key: &str| -> u64 {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "blk.0.attn_output.weight")
            .unwrap_or_else(|| panic!("{report}: no blk.0.attn_output"))[key]
            .as_u64()
            .unwrap_or(0)
    };
    for (method, out) in [("gptq", "zero-gptq.gguf"), ("awq", "zero-awq.gguf")] {
        let mut args = vec![
            "quantize".to_owned(),
            zero.clone(),
            "--method".into(),
            method.into(),
        ];
        args.extend([
            "--type".into(),
            "Q4_0".into(),
            "--report".into(),
            p(&format!("{method}.json")),
        ]);
        args.extend(calibrated(&p(out)));
        run_ok(args);
        finite(&p(out));
    }
    assert_eq!(dead_columns(&p("gptq.json"), "dead_columns"), 64);
    let mut args = vec![
        "prune".to_owned(),
        zero.clone(),
        "--method".into(),
        "sparsegpt".into(),
    ];
    args.extend([
        "--sparsity".into(),
        "0.5".into(),
        "--report".into(),
        p("sgpt.json"),
    ]);
    args.extend(calibrated(&p("zero-sgpt.gguf")));
    run_ok(args);
    finite(&p("zero-sgpt.gguf"));
    assert_eq!(dead_columns(&p("sgpt.json"), "dead_columns"), 64);

    // One NaN weight: refused by name everywhere, nothing written.
    let nan = p("nan.gguf");
    std::fs::copy(&zero, &nan).unwrap();
    patch_gguf_f32(Path::new(&nan), "blk.1.ffn_up.weight", 17, f32::NAN);
    let before = std::fs::read(&nan).unwrap();
    let out = p("refused.gguf");
    let cases: Vec<Vec<String>> = vec![
        vec![
            "quantize".into(),
            nan.clone(),
            "--type".into(),
            "Q4_0".into(),
            "-o".into(),
            out.clone(),
        ],
        [
            vec![
                "quantize".into(),
                nan.clone(),
                "--method".into(),
                "gptq".into(),
                "--type".into(),
                "Q4_0".into(),
            ],
            calibrated(&out),
        ]
        .concat(),
        [
            vec![
                "quantize".into(),
                nan.clone(),
                "--method".into(),
                "awq".into(),
                "--type".into(),
                "Q4_0".into(),
            ],
            calibrated(&out),
        ]
        .concat(),
        [
            vec![
                "prune".into(),
                nan.clone(),
                "--method".into(),
                "wanda".into(),
                "--sparsity".into(),
                "0.5".into(),
            ],
            calibrated(&out),
        ]
        .concat(),
        vec![
            "prune".into(),
            nan.clone(),
            "--method".into(),
            "magnitude".into(),
            "--sparsity".into(),
            "0.5".into(),
            "-o".into(),
            out.clone(),
        ],
        vec![
            "convert".into(),
            nan.clone(),
            "-o".into(),
            p("refused.safetensors"),
        ],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let text = fails(&args);
        assert!(
            text.contains("blk.1.ffn_up.weight") && text.contains("NaN"),
            "{args:?}: {text}"
        );
        assert!(!Path::new(&out).exists() && !Path::new(&p("refused.safetensors")).exists());
    }
    assert!(
        std::fs::read(&nan).unwrap() == before,
        "the input is unchanged"
    );

    // Activations that overflow: block 1's attention norm gain of 1e30 makes
    // its attention scores infinite, so attn_output's input is NaN everywhere.
    // (GGUF output keeps the gain in f32; an f16 folder refuses it as Inf.)
    let hot = p("hot.gguf");
    std::fs::copy(&zero, &hot).unwrap();
    for i in 0..64 {
        patch_gguf_f32(Path::new(&hot), "blk.1.attn_norm.weight", i, 1e30);
    }
    let args = [
        vec![
            "quantize".into(),
            hot.clone(),
            "--method".into(),
            "gptq".into(),
            "--type".into(),
            "Q4_0".into(),
        ],
        calibrated(&p("hot-q4.gguf")),
    ]
    .concat();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = fails(&args);
    assert!(
        text.contains("blk.1.attn_output.weight") && text.contains("NaN or Inf activations"),
        "{text}"
    );
    assert!(!Path::new(&p("hot-q4.gguf")).exists());
}
