#!/usr/bin/env python3
"""Evaluation throughput and peak memory of `compress eval` on the real model.

Runs `compress eval --json` on the shipped Q4_1 GGUF and on its f32 safetensors
conversion (made with `compress convert` if missing), several times each,
alternating, and reports the median tokens/s and the peak RSS. Prints a table and
writes bench/results/eval_throughput.json.

Usage: bench/eval_throughput.py [--chunks 8] [--reps 3]
Needs: `cargo build --release -p compress` and `compress fetch` done first.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
binary = root / "target/release/compress"
cache = Path(os.environ.get("COMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress")

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=8)
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()

if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
gguf = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
st_dir = cache / "bench/smollm2-f32"
if not (st_dir / "model.safetensors").exists():
    subprocess.run([binary, "convert", gguf, "-o", st_dir], check=True)

models = {"Q4_1 GGUF": gguf, "f32 safetensors": st_dir}
runs = {name: [] for name in models}
for rep in range(args.reps):
    for name, path in models.items():
        out = subprocess.run(
            [binary, "eval", path, "--text", cache / "eval.txt", "--ctx", "512", "--chunks", str(args.chunks), "--json"],
            check=True, capture_output=True, text=True,
        )
        runs[name].append(json.loads(out.stdout))
        print(f"  rep {rep + 1}/{args.reps} {name}: {runs[name][-1]['perplexity']['tokens_per_second']:.1f} tokens/s", file=sys.stderr)

rows = []
for name, rs in runs.items():
    rows.append({
        "model": name,
        "file_mb": rs[0]["model_bytes"] / 1e6,
        "chunks": args.chunks,
        "ctx": 512,
        "tokens_per_second_median": statistics.median(r["perplexity"]["tokens_per_second"] for r in rs),
        "tokens_per_second_all": [round(r["perplexity"]["tokens_per_second"], 1) for r in rs],
        "peak_rss_mb": max(r["peak_rss_bytes"] for r in rs) / 1e6,
        "perplexity": rs[0]["perplexity"]["perplexity"],
        "threads": os.cpu_count(),
    })

print(f"\ncompress eval, ctx 512, {args.chunks} chunks, {args.reps} runs each, {os.cpu_count()} threads")
print(f"{'model':<18} {'file MB':>8} {'tokens/s (median)':>18} {'peak RSS MB':>12} {'PPL':>9}")
for r in rows:
    print(f"{r['model']:<18} {r['file_mb']:>8.1f} {r['tokens_per_second_median']:>18.1f} {r['peak_rss_mb']:>12.1f} {r['perplexity']:>9.4f}")
ratio = rows[0]["tokens_per_second_median"] / rows[1]["tokens_per_second_median"]
print(f"Q4_1 / f32 throughput ratio: {ratio:.2f}")
out_dir = root / "bench/results"
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "eval_throughput.json").write_text(json.dumps({"rows": rows, "q4_1_over_f32": ratio}, indent=2))
print(f"wrote {out_dir / 'eval_throughput.json'}")
