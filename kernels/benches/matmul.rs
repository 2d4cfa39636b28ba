//! Matmul throughput of every weight type on the shapes of SmolLM2's forward pass
//! (512 tokens), in GFLOP/s, medians of repeated runs. Prints a table and writes
//! `target/bench/matmul.json`.
//!
//! Run: `cargo bench -p kernels --bench matmul`

use kernels::matmul::{matmul, WeightRef};
use kernels::GgmlType;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Random-looking but valid bytes for `rows × cols` weights of `ty`: f32 values
/// converted through the float types, or bytes with small f16 scales for blocks.
fn weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    match ty {
        GgmlType::F32 => (0..n)
            .flat_map(|_| ((next() % 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
            .collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32((next() % 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32((next() % 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
            .collect(),
        _ => {
            let bytes = ty.bytes_for(n).unwrap();
            let mut out: Vec<u8> = (0..bytes).map(|_| next() as u8).collect();
            // Every 2-byte field read as f16 must be finite: clear the exponent's top bit.
            for pair in out.chunks_mut(2) {
                pair[1] &= 0x3b;
            }
            out
        }
    }
}

fn main() {
    let tokens = 512;
    let shapes = [
        ("attn_q 576→576", 576, 576),
        ("ffn_up 576→1536", 1536, 576),
        ("ffn_down 1536→576", 576, 1536),
    ];
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q6_K,
        GgmlType::Q4_K,
    ];
    let x: Vec<f32> = (0..tokens * 1536)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let threads = rayon::current_num_threads();
    println!("matmul, {tokens} tokens, {threads} threads: GFLOP/s (median of 15)");
    print!("{:<8}", "type");
    for (name, _, _) in &shapes {
        print!(" {name:>20}");
    }
    println!();
    let mut rows_json = Vec::new();
    for ty in types {
        print!("{:<8}", ty.name());
        for &(name, rows, cols) in &shapes {
            if cols % ty.block_elems() != 0 {
                print!(" {:>20}", "-");
                continue;
            }
            let data = weights(ty, rows, cols);
            let w = WeightRef::new(ty, rows, cols, &data).unwrap();
            let xs = &x[..tokens * cols];
            let mut out = vec![0f32; tokens * rows];
            matmul(xs, tokens, &w, &mut out).unwrap();
            let times: Vec<f64> = (0..15)
                .map(|_| {
                    let t = Instant::now();
                    matmul(xs, tokens, &w, &mut out).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let gflops = 2.0 * (tokens * rows * cols) as f64 / median(times) / 1e9;
            print!(" {gflops:>20.1}");
            rows_json.push(format!(
                "{{\"type\":\"{}\",\"shape\":\"{name}\",\"tokens\":{tokens},\"gflops\":{gflops:.2}}}",
                ty.name()
            ));
        }
        println!();
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let json = format!(
        "{{\"threads\":{threads},\"results\":[{}]}}",
        rows_json.join(",")
    );
    std::fs::write(dir.join("matmul.json"), json).unwrap();
    println!("wrote target/bench/matmul.json");
}
