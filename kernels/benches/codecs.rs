//! Codec throughput on 2 threads (rayon's pool), medians of repeated runs:
//! - quantization: MB/s of f32 input per type, without and with importance;
//! - dequantizing GEMV (one token, `y = W·x`): GB/s of stored weight bytes read,
//!   beside a plain memory copy measured in the same run.
//!
//! Prints tables and writes `target/bench/codecs.json`.
//! Run: `cargo bench -p kernels --bench codecs`

use kernels::matmul::{matmul, WeightRef};
use kernels::quants::quantize_to_vec;
use kernels::GgmlType;
use rayon::prelude::*;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Gaussian-ish weights (sum of uniforms) with a few outliers, like trained weights.
fn weights(n: usize) -> Vec<f32> {
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32
    };
    (0..n)
        .map(|i| {
            let g = (0..4).map(|_| u()).sum::<f32>() - 2.0;
            if i % 997 == 0 {
                g * 8.0
            } else {
                g * 0.05
            }
        })
        .collect()
}

const TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q6_K,
    GgmlType::Q5_K,
    GgmlType::Q5_1,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q4_1,
    GgmlType::Q4_0,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::Q3_K,
    GgmlType::Q2_K,
];

fn main() {
    let threads = rayon::current_num_threads();
    let (rows, cols) = (1536, 1536);
    let w = weights(rows * cols);
    let imp: Vec<f32> = weights(cols).iter().map(|x| x * x + 1e-3).collect();
    let mb = (w.len() * 4) as f64 / 1e6;
    let mut json = Vec::new();

    // Memory-copy bandwidth over a buffer far larger than the caches (read + write counted).
    let big = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; big.len()];
    let copy_s = time(5, || {
        dst.par_chunks_mut(1 << 20)
            .zip(big.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
    let copy_gbs = big.len() as f64 / copy_s / 1e9;
    drop((big, dst));

    println!("codecs, {rows}×{cols} weights, {threads} threads (median)");
    println!("memory copy: {copy_gbs:.1} GB/s read (+ as much written)");
    println!(
        "{:<8} {:>14} {:>14} {:>16} {:>10}",
        "type", "quant MB/s", "+imat MB/s", "GEMV GB/s read", "vs copy"
    );
    for ty in TYPES {
        let q_s = time(3, || {
            std::hint::black_box(quantize_to_vec(ty, &w, cols, None).unwrap());
        });
        let qi_s = time(3, || {
            std::hint::black_box(quantize_to_vec(ty, &w, cols, Some(&imp)).unwrap());
        });
        let bytes = quantize_to_vec(ty, &w, cols, None).unwrap();
        // Rotate over several copies so the weights come from memory, not L2.
        let copies: Vec<Vec<u8>> = (0..16).map(|_| bytes.clone()).collect();
        let x = weights(cols);
        let mut y = vec![0f32; rows];
        let mut i = 0;
        let g_s = time(31, || {
            let wr = WeightRef::new(ty, rows, cols, &copies[i % copies.len()]).unwrap();
            matmul(&x, 1, &wr, &mut y).unwrap();
            i += 1;
        });
        let gbs = bytes.len() as f64 / g_s / 1e9;
        println!(
            "{:<8} {:>14.1} {:>14.1} {:>16.2} {:>9.0}%",
            ty.name(),
            mb / q_s,
            mb / qi_s,
            gbs,
            100.0 * gbs / copy_gbs
        );
        json.push(format!(
            "{{\"type\":\"{}\",\"quantize_mb_s\":{:.2},\"quantize_imatrix_mb_s\":{:.2},\"gemv_gb_s\":{:.3}}}",
            ty.name(),
            mb / q_s,
            mb / qi_s,
            gbs
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out = format!(
        "{{\"threads\":{threads},\"copy_gb_s\":{copy_gbs:.2},\"types\":[{}]}}",
        json.join(",")
    );
    std::fs::write(dir.join("codecs.json"), out).unwrap();
    println!("wrote target/bench/codecs.json");
}
