//! Cross-checks `kernels::quants::quantize` against gguf-py and the real model.
//!
//! * `synthetic_rows_against_gguf_py`: seeded Gaussian rows (with and without
//!   outliers) are quantized to every type, with and without a random importance
//!   vector; `scripts/check_quantize.py`, run in the project's venv, decodes our
//!   bytes with gguf-py (must match our decoder bit for bit), requires byte
//!   identity with gguf-py's own quantizer for F32/F16/BF16/Q8_0, an error no
//!   larger than gguf-py's reference rounding for Q4_0/Q4_1/Q5_0/Q5_1, and a lower
//!   weighted error with importance for every block type.
//! * `real_weights`: the same check on rows of the real model's `ffn_down`
//!   (a k-quant-sized matrix), and the real model's own grid reproduced exactly:
//!   its Q4_1 tensors re-encode losslessly to Q4_1 and Q5_1, its Q8_0 tensor to
//!   Q8_0.
//!
//! The venv comes from `scripts/setup-python.sh`, the model from `compress fetch`.
//! With `QUANTIZE_CHECK_DIR` set, the inputs and our outputs are written to
//! `$QUANTIZE_CHECK_DIR/{synthetic,real}` and kept (for other checkers), instead
//! of a temporary directory.

use e2e::{real_model, run_python};
use kernels::quants::{dequantize, quantize_to_vec};
use kernels::GgmlType;
use model::gguf::GgufFile;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// A standard normal sample (Box-Muller).
fn gauss(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(1e-12..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut y = vec![0f32; n];
    dequantize(ty, bytes, &mut y).unwrap();
    y
}

/// Quantizes `x` (rows of `row_len`) to every type with and without
/// `importance`, writes what `check_quantize.py` reads into `dir`, runs it and
/// requires every type to pass.
fn check_against_gguf_py(dir: &Path, x: &[f32], row_len: usize, importance: &[f32]) {
    std::fs::write(dir.join("input.f32"), f32_bytes(x)).unwrap();
    std::fs::write(dir.join("importance.f32"), f32_bytes(importance)).unwrap();
    let types: Vec<_> = e2e::gguf_py_decodable().collect();
    let names: Vec<&str> = types.iter().map(|t| t.name()).collect();
    let meta = serde_json::json!({ "row_len": row_len, "types": names });
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    for &ty in &types {
        let plain = quantize_to_vec(ty, x, row_len, None).unwrap();
        let weighted = quantize_to_vec(ty, x, row_len, Some(importance)).unwrap();
        let deq = decode(ty, &plain, x.len());
        std::fs::write(dir.join(format!("{}.bin", ty.name())), &plain).unwrap();
        std::fs::write(dir.join(format!("{}.imat.bin", ty.name())), &weighted).unwrap();
        std::fs::write(dir.join(format!("{}.f32", ty.name())), f32_bytes(&deq)).unwrap();
    }
    let report = run_python("check_quantize.py", &[dir]);
    println!("{report}");
    for ty in &types {
        assert!(
            report.contains(&format!("{}: OK", ty.name())),
            "{ty} not OK:\n{report}"
        );
    }
}

/// A directory for one check: `$QUANTIZE_CHECK_DIR/<name>` when set (kept),
/// else a temporary one (removed when the guard drops).
fn check_dir(name: &str) -> (std::path::PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("QUANTIZE_CHECK_DIR") {
        Some(root) => {
            let d = std::path::PathBuf::from(root).join(name);
            std::fs::create_dir_all(&d).unwrap();
            (d, None)
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// Log-normal importance, one per column.
fn random_importance(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (1.5 * gauss(rng)).exp()).collect()
}

#[test]
fn synthetic_rows_against_gguf_py() {
    const ROWS: usize = 96;
    const COLS: usize = 1536;
    let mut rng = StdRng::seed_from_u64(0x9_0a7_1ce);
    let mut x = Vec::with_capacity(ROWS * COLS);
    for r in 0..ROWS {
        let sigma = 0.02 * (0.5 + rng.gen::<f32>());
        for _ in 0..COLS {
            let mut v = sigma * gauss(&mut rng);
            // Every other row has about 1% outliers 5-15 σ out.
            if r % 2 == 1 && rng.gen::<f32>() < 0.01 {
                v *= rng.gen_range(5.0..15.0);
            }
            x.push(v);
        }
    }
    let importance = random_importance(&mut rng, COLS);
    let (dir, _guard) = check_dir("synthetic");
    check_against_gguf_py(&dir, &x, COLS, &importance);
}

#[test]
fn real_weights() {
    let gguf = GgufFile::open(&real_model()).expect("open the real model");
    let load = |name: &str| {
        let info = gguf
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let n = info.n_elements() as usize;
        (
            info.ty,
            info.dims[0] as usize,
            decode(info.ty, gguf.tensor_data(info), n),
        )
    };

    // ffn_down has 1536 columns: every type, k-quants included, fits its rows.
    let (_, row_len, down) = load("blk.0.ffn_down.weight");
    assert_eq!(row_len, 1536);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let importance = random_importance(&mut rng, row_len);
    let (dir, _guard) = check_dir("real");
    check_against_gguf_py(&dir, &down[..256 * row_len], row_len, &importance);

    // The model's own grids come back exactly, with or without importance.
    let mut checked = 0;
    for info in &gguf.tensors {
        let targets: &[GgmlType] = match info.ty {
            GgmlType::Q4_1
                if info.name.starts_with("blk.0.") || info.name.starts_with("blk.29.") =>
            {
                &[GgmlType::Q4_1, GgmlType::Q5_1]
            }
            GgmlType::Q8_0 => &[GgmlType::Q8_0],
            _ => continue,
        };
        let (_, row_len, x) = load(&info.name);
        let qw = random_importance(&mut rng, row_len);
        for &to in targets {
            for imp in [None, Some(&qw[..])] {
                // Q8_0's unweighted form is the reference rounding, exact on its
                // own grid; with importance it searches and stays exact too.
                // (Values, not bits: a search may pick a negative scale, which
                // turns a zero into -0.0.)
                let bytes = quantize_to_vec(to, &x, row_len, imp).unwrap();
                let y = decode(to, &bytes, x.len());
                let bad = x.iter().zip(&y).filter(|(a, b)| a != b).count();
                assert_eq!(
                    bad,
                    0,
                    "{} ({}) as {to} (importance {}): {bad} of {} values differ",
                    info.name,
                    info.ty,
                    imp.is_some(),
                    x.len()
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} tensors checked");
}
