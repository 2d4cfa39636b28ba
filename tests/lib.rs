//! Shared helpers of the end-to-end tests: where the cached real assets, the
//! built `compress` binary and the independent Python readers are, and a tiny
//! GGUF builder for synthetic (and deliberately broken) files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The asset cache, as `compress fetch` resolves it.
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("COMPRESS_CACHE") {
        return PathBuf::from(c);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("compress");
    }
    PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/compress")
}

/// A cached asset file; panics with the command to run when it is missing.
pub fn asset(name: &str) -> PathBuf {
    let p = cache_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `compress fetch` (scripts/test.sh does) before the tests",
        p.display()
    );
    p
}

/// The real model, SmolLM2-135M-Instruct Q4_1.
pub fn real_model() -> PathBuf {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The evaluation text (last 400,000 bytes of the prepared Brown corpus).
pub fn eval_text() -> PathBuf {
    asset("eval.txt")
}

/// Copies the HF fixture folder `src` (weights, tokenizer) into `dst` with its
/// `config.json` changed by `edit`: a bad config beside good weights.
pub fn copy_with_config(src: &Path, dst: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut v);
    std::fs::write(dst.join("config.json"), v.to_string()).unwrap();
}

/// max |ours − reference| / max |reference|: how far logits are from a
/// reference, relative to its largest logit.
pub fn rel_max_error(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let err = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
    err / scale
}

/// The `compress` binary built with the same profile as the tests.
pub fn bin() -> PathBuf {
    // target/<profile>/deps/<test-binary> -> target/<profile>/compress
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("compress");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --release -p compress`; scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs `compress` with `args`.
pub fn compress(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run compress")
}

/// Python of the project venv holding the independent readers (gguf, safetensors, numpy).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("COMPRESS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/venv"));
    let py = venv.join("bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup-python.sh",
        py.display()
    );
    py
}

/// Runs a script from `scripts/` with the venv's Python; panics with its output on failure.
pub fn run_python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(venv_python())
        .arg(repo_root().join("scripts").join(script))
        .args(args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The weight types gguf-py 0.19 (PyPI) can decode: all of ours but Q1_0 (it
/// knows the type, with no decoder) and Q2_0 (unknown to it). Those two are
/// checked against ggml's own decoder instead (known-answer vectors in the
/// kernels crate, `scripts/make-ggml-decode-vectors.sh`).
pub fn gguf_py_decodable() -> impl Iterator<Item = kernels::GgmlType> {
    use kernels::GgmlType;
    kernels::types::ALL_TYPES
        .into_iter()
        .filter(|t| !matches!(t, GgmlType::Q1_0 | GgmlType::Q2_0))
}

/// Builds small GGUF v3 files byte by byte, including broken ones.
#[derive(Default)]
pub struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufBuilder {
    /// A string metadata entry.
    pub fn string(mut self, key: &str, v: &str) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(8u32.to_le_bytes());
        put_str(&mut self.kv, v);
        self.n_kv += 1;
        self
    }

    /// A u32 metadata entry.
    pub fn u32(mut self, key: &str, v: u32) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    /// An f32 metadata entry.
    pub fn f32(mut self, key: &str, v: f32) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(6u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    /// A tensor with GGUF dims (innermost first), type id and raw bytes.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.infos.push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }

    /// The file bytes; `offset_bump` is added to the last tensor's offset (to
    /// point it past the end of the file).
    pub fn bytes_with(&self, offset_bump: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.infos.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut data = Vec::new();
        for (i, (name, dims, ty, bytes)) in self.infos.iter().enumerate() {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            let bump = if i + 1 == self.infos.len() {
                offset_bump
            } else {
                0
            };
            out.extend((offset + bump).to_le_bytes());
            data.extend(bytes);
            while data.len() % 32 != 0 {
                data.push(0);
            }
            offset = data.len() as u64;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend(data);
        out
    }

    /// The file bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes_with(0)
    }
}

/// Bytes of `n` f32 values `start, start+step, …`.
pub fn f32_bytes(n: usize, start: f32, step: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (start + step * i as f32).to_le_bytes())
        .collect()
}

/// The combined stdout and stderr of a run, for assertions.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Checks a GGUF file with gguf-py (`scripts/check_gguf.py`): our reader's tensor
/// infos and metadata types must equal gguf-py's, and our dequantization of the
/// named tensors (storage order) must equal gguf-py's bit for bit. `dump` is a
/// scratch folder for the comparison files.
pub fn check_gguf_with_gguf_py(path: &Path, tensors: &[&str], dump: &Path) {
    use model::gguf::{GgufFile, MetaValue};
    let g = GgufFile::open(path).expect("our reader opens the file");
    let _ = std::fs::remove_dir_all(dump);
    std::fs::create_dir_all(dump).expect("dump folder");
    let infos: Vec<_> = g
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "type": t.ty.id(), "dims": t.dims, "offset": t.offset}))
        .collect();
    let metadata: serde_json::Map<String, serde_json::Value> = g
        .metadata
        .iter()
        .map(|(k, v)| {
            let types = match v {
                MetaValue::Array(item, _) => vec![9, *item],
                other => vec![other.type_id()],
            };
            (k.clone(), serde_json::json!(types))
        })
        .collect();
    let summary = serde_json::json!({"tensors": infos, "metadata": metadata});
    std::fs::write(
        dump.join("tensors.json"),
        serde_json::to_vec(&summary).expect("json"),
    )
    .expect("write");
    for name in tensors {
        let info = g
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor '{name}'"));
        let mut out = vec![0f32; info.n_elements() as usize];
        kernels::quants::dequantize(info.ty, g.tensor_data(info), &mut out).expect("dequantize");
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dump.join(format!("{name}.f32")), bytes).expect("write");
    }
    let report = run_python("check_gguf.py", &[path, dump]);
    assert!(report.contains("OK"), "{report}");
}

/// A small random Llama model in GGUF (F32) that borrows the real model's
/// tokenizer: `layers` blocks of width `hidden` (heads of 16, half as many K/V
/// heads), FFN `2 × hidden`, tied embeddings. Weights are Gaussian with standard
/// deviation `scale(name) / √(input width)` (the embedding: `scale(name)`), so a
/// test can make one part of the model matter more than the rest. Norm gains are 1.
pub fn write_tiny_llama(
    path: &Path,
    layers: usize,
    hidden: usize,
    seed: u64,
    scale: &dyn Fn(&str) -> f32,
) {
    use model::gguf::{GgufWriter, MetaValue};
    use model::gguf_export::{metadata, tensor_decl};
    let real = model::Model::open(&real_model()).expect("real model opens");
    let heads = hidden / 16;
    let (kv, ffn, vocab) = (hidden / 32 * 16, 2 * hidden, real.config.vocab_size);
    let mut kvs: Vec<(String, MetaValue)> = metadata(&real, 0)
        .expect("metadata")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("llama."))
        .collect();
    for (k, v) in [
        ("llama.context_length", MetaValue::U32(2048)),
        ("llama.embedding_length", MetaValue::U32(hidden as u32)),
        ("llama.block_count", MetaValue::U32(layers as u32)),
        ("llama.feed_forward_length", MetaValue::U32(ffn as u32)),
        ("llama.rope.dimension_count", MetaValue::U32(16)),
        ("llama.attention.head_count", MetaValue::U32(heads as u32)),
        (
            "llama.attention.head_count_kv",
            MetaValue::U32(heads as u32 / 2),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        ),
        ("llama.rope.freq_base", MetaValue::F32(10000.0)),
    ] {
        kvs.push((k.to_owned(), v));
    }
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![vocab, hidden])];
    for b in 0..layers {
        for (s, shape) in [
            ("attn_norm.weight", vec![hidden]),
            ("attn_q.weight", vec![hidden, hidden]),
            ("attn_k.weight", vec![kv, hidden]),
            ("attn_v.weight", vec![kv, hidden]),
            ("attn_output.weight", vec![hidden, hidden]),
            ("ffn_norm.weight", vec![hidden]),
            ("ffn_gate.weight", vec![ffn, hidden]),
            ("ffn_up.weight", vec![ffn, hidden]),
            ("ffn_down.weight", vec![hidden, ffn]),
        ] {
            shapes.push((format!("blk.{b}.{s}"), shape));
        }
    }
    shapes.push(("output_norm.weight".into(), vec![hidden]));
    let decls: Vec<_> = shapes
        .iter()
        .map(|(n, s)| tensor_decl(n, s, kernels::GgmlType::F32))
        .collect();
    let mut w = GgufWriter::create(path, &kvs, &decls).expect("create tiny model");
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        // splitmix64: reproducible without a dependency on rand's stream stability.
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if shape.len() == 1 {
            vec![1.0; n]
        } else {
            let std = if name == "token_embd.weight" {
                scale(name)
            } else {
                scale(name) / (shape[1] as f32).sqrt()
            };
            (0..n)
                .map(|_| {
                    // Box–Muller.
                    let (u1, u2) = (uniform().max(1e-12), uniform());
                    let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    g as f32 * std
                })
                .collect()
        };
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_tensor(name, &bytes).expect("write tensor");
    }
    w.finish().expect("finish tiny model");
}
