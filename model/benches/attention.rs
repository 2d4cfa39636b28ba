//! What a sliding window saves: the attention of one layer (Gemma 3 1B's
//! shape: 4 query heads, 1 key/value head, head width 256) over growing
//! contexts, causal against a 512-position window, median seconds of three
//! runs. A windowed layer's time grows linearly with the context, a causal
//! one's quadratically (and each (head, tile) task's score buffer holds at most
//! window + tile keys per row instead of the context). Prints a table and writes
//! `target/bench/attention.json`.
//!
//! Run: `cargo bench -p model --bench attention`

use model::llama::{attention, AttnMask};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn main() {
    let (heads, kv, d, window, reps) = (4, 1, 256, 512, 3);
    let mut rows = Vec::new();
    println!("| context | causal s | window {window} s | causal / window |");
    println!("|---|---|---|---|");
    for n in [1024, 2048, 4096, 8192] {
        let q = values(n * heads * d, 1);
        let k = values(n * kv * d, 2);
        let v = values(n * kv * d, 3);
        let time = |mask: AttnMask| {
            median(
                (0..reps)
                    .map(|_| {
                        let t = Instant::now();
                        std::hint::black_box(attention(&q, &k, &v, n, heads, kv, d, mask));
                        t.elapsed().as_secs_f64()
                    })
                    .collect(),
            )
        };
        let scale = 1.0 / (d as f32).sqrt();
        let causal = time(AttnMask {
            scale,
            window: None,
            chunk: None,
        });
        let windowed = time(AttnMask {
            scale,
            window: Some(window),
            chunk: None,
        });
        println!(
            "| {n} | {causal:.3} | {windowed:.3} | {:.2} |",
            causal / windowed
        );
        rows.push(
            serde_json::json!({"context": n, "causal_s": causal, "window": window,
                                     "window_s": windowed}),
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let out = serde_json::json!({"heads": heads, "kv_heads": kv, "head_dim": d,
                                 "medians_of": reps, "rows": rows});
    std::fs::write(dir.join("attention.json"), out.to_string()).expect("write the JSON");
    println!("wrote {}", dir.join("attention.json").display());
}
