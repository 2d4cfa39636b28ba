//! Cross-checks `kernels::quants::dequantize` against gguf-py, bit for bit, for
//! every weight type: random blocks (seeded) are dequantized here, written with
//! their raw bytes to a temporary directory, and `scripts/check_dequant.py` run in
//! the project's Python venv dequantizes them again with `gguf.quants` and compares.
//!
//! The venv comes from `scripts/setup-python.sh`; without it this test fails.
//!
//! gguf-py 0.19 from PyPI decodes NVFP4, MXFP4, TQ1_0 and TQ2_0 but not Q1_0 or Q2_0; those two are
//! checked against ggml's own decoder instead ([`e2e::gguf_py_decodable`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use kernels::GgmlType;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Blocks generated per type.
const BLOCKS: usize = 4096;

/// The repository root.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv's python: `$COMPRESS_VENV/bin/python` (relative to the repository
/// root when relative), else `<root>/.cache/venv/bin/python`.
fn venv_python() -> PathBuf {
    let root = repo_root();
    let venv = match std::env::var_os("COMPRESS_VENV") {
        Some(v) if !v.is_empty() => root.join(v),
        _ => root.join(".cache/venv"),
    };
    venv.join("bin/python")
}

/// Byte offsets of the f16 scale fields (d, dmin, m) inside one block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        GgmlType::Q1_0 | GgmlType::Q2_0 => &[0],
        GgmlType::TQ1_0 => &[52],
        GgmlType::TQ2_0 => &[64],
        // NVFP4's UE4M3 and MXFP4's E8M0 scales are bytes: every value is valid.
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::NVFP4 | GgmlType::MXFP4 => &[],
    }
}

/// The bits of a finite f16 scale, random sign: mostly 2^-13..2^-3 (about
/// 1e-4..1e-1, log-uniform), sometimes zero or a subnormal, so that signed zeros
/// and tiny products are exercised too.
fn random_scale(rng: &mut StdRng) -> u16 {
    let sign = if rng.gen::<bool>() { 0x8000u16 } else { 0 };
    let magnitude = match rng.gen_range(0..64) {
        0 => 0,
        1 => rng.gen_range(1..0x400u16),
        _ => (rng.gen_range(2..=11u16) << 10) | rng.gen_range(0..0x400u16),
    };
    sign | magnitude
}

/// `BLOCKS` random blocks of `ty`: random bytes with finite scales (or, for the
/// float types, finite values).
fn random_blocks(ty: GgmlType, rng: &mut StdRng) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut src = vec![0u8; BLOCKS * bb];
    rng.fill_bytes(&mut src);
    match ty {
        GgmlType::F32 => {
            for c in src.chunks_exact_mut(4) {
                let v: f32 = rng.gen_range(-4.0..4.0);
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 | GgmlType::BF16 => {
            // All-ones exponent (Inf/NaN) in either format has bit 14 set: clear it.
            let exp_mask = if ty == GgmlType::F16 { 0x7C00 } else { 0x7F80 };
            for c in src.chunks_exact_mut(2) {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                if bits & exp_mask == exp_mask {
                    c.copy_from_slice(&(bits & 0xBFFF).to_le_bytes());
                }
            }
        }
        _ => {
            for block in src.chunks_exact_mut(bb) {
                for &off in f16_fields(ty) {
                    let s = random_scale(rng).to_le_bytes();
                    block[off..off + 2].copy_from_slice(&s);
                }
            }
        }
    }
    src
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let python = venv_python();
    assert!(
        python.exists(),
        "no Python venv at {}: run `scripts/setup-python.sh` (it installs gguf-py, the \
         independent checker this test needs)",
        python.display()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = StdRng::seed_from_u64(0x5eed_d0e5);
    for ty in e2e::gguf_py_decodable() {
        let src = random_blocks(ty, &mut rng);
        let elems = src.len() / ty.block_bytes() * ty.block_elems();
        let mut dst = vec![0f32; elems];
        kernels::quants::dequantize(ty, &src, &mut dst)
            .unwrap_or_else(|e| panic!("dequantize {ty}: {e}"));
        let out: Vec<u8> = dst.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join(format!("{}.bin", ty.name())), &src).unwrap();
        std::fs::write(dir.path().join(format!("{}.f32", ty.name())), &out).unwrap();
    }

    let script = repo_root().join("scripts/check_dequant.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("running {} {}: {e}", python.display(), script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "check_dequant.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // Every type must have been compared.
    for ty in e2e::gguf_py_decodable() {
        assert!(
            stdout.contains(&format!("{}: OK", ty.name())),
            "{ty} not reported OK:\n{stdout}"
        );
    }
}
