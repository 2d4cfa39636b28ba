#!/usr/bin/env python3
"""Quality per bit of `compress quantize` on SmolLM2, beside llama.cpp's figures.

Makes an imatrix from the first 64 chunks of the calibration text (as the
reference in DESIGN.md), quantizes the model to each GGUF mix with and without
it, evaluates every artifact against the base (the shipped Q4_1, whose f32
expansion gives bit-identical logits) in one `compress eval --base` pass
(ctx 512, 40 chunks of the evaluation text), prints a table with llama.cpp's
numbers beside ours, and writes bench/results/gguf_quality.json.

Usage: bench/gguf_quality.py [--chunks 40] [--types Q8_0,Q4_K_M,...] [--fresh]
Needs: `cargo build --release -p compress` and `compress fetch` done first.
Takes about 25 minutes on 2 cores for the default set.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
binary = root / "target/release/compress"
cache = Path(os.environ.get("COMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress")
work = cache / "bench/gguf"

# llama.cpp (llama-quantize + llama-perplexity --kl-divergence, imatrix from 64
# calibration chunks): MB, PPL, mean KLD, p99 KLD, same top-1 %. From DESIGN.md.
LLAMA_CPP = {
    ("Q8_0", False): (144.8, 41.26, 0.0038, 0.016, 95.4),
    ("Q6_K", False): (138.4, 41.63, 0.0088, 0.042, 93.7),
    ("Q5_K_M", False): (112.1, 45.28, 0.0745, 0.349, 83.0),
    ("Q5_1", False): (111.6, 47.19, 0.1127, 0.485, 78.9),
    ("Q4_K_M", False): (105.5, 43.46, 0.0495, 0.234, 85.2),
    ("Q4_K_M", True): (105.5, 42.08, 0.0314, 0.156, 87.8),
    ("Q4_1", False): (98.4, 41.18, 0.0027, 0.011, 96.2),
    ("Q4_0", False): (91.7, 49.31, 0.2781, 1.157, 67.2),
    ("Q4_0", True): (91.9, 43.96, 0.1563, 0.729, 74.6),
    ("IQ4_NL", True): (91.7, 44.30, 0.0799, 0.414, 82.3),
    ("IQ4_XS", True): (90.9, 44.53, 0.0814, 0.426, 81.9),
    ("Q3_K_M", False): (93.5, 46.58, 0.1248, 0.645, 77.4),
    ("Q3_K_M", True): (93.5, 43.85, 0.0780, 0.376, 81.6),
    ("Q3_K_S", True): (88.2, 47.31, 0.2447, 1.190, 69.8),
    ("Q2_K", True): (88.2, 47.31, 0.2447, 1.190, 69.8),
}
DEFAULT = [(t, i) for (t, i) in LLAMA_CPP]

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=40)
ap.add_argument("--types", help="comma-separated mixes; each is run with and without imatrix")
ap.add_argument("--fresh", action="store_true", help="re-quantize even if the artifact exists")
args = ap.parse_args()
if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
configs = DEFAULT if not args.types else [(t, i) for t in args.types.split(",") for i in (False, True)]

work.mkdir(parents=True, exist_ok=True)
base = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
imatrix = work / "imatrix-64.gguf"


def run(cmd):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)


timings = {}
if not imatrix.exists():
    t = time.time()
    run([binary, "imatrix", base, "--text", cache / "calib.txt", "--chunks", "64", "-o", imatrix])
    timings["imatrix_64_chunks_s"] = round(time.time() - t, 1)

artifacts = []
for mix, imat in configs:
    out = work / f"{mix}{'-imat' if imat else ''}.gguf"
    if args.fresh or not out.exists():
        t = time.time()
        cmd = [binary, "quantize", base, "--type", mix, "-o", out, "--report", out.with_suffix(".json")]
        if imat:
            cmd += ["--imatrix", imatrix]
        run(cmd)
        timings[f"quantize_{out.stem}_s"] = round(time.time() - t, 1)
    artifacts.append((mix, imat, out))

t = time.time()
res = run([binary, "eval", *[a[2] for a in artifacts], "--base", base, "--text", cache / "eval.txt",
           "--ctx", "512", "--chunks", str(args.chunks), "--json"])
timings["eval_s"] = round(time.time() - t, 1)
results = json.loads(res.stdout)
if isinstance(results, dict):
    results = [results]

rows = []
for (mix, imat, path), r in zip(artifacts, results):
    report = json.loads(path.with_suffix(".json").read_text())
    rows.append({
        "type": mix, "imatrix": imat, "mb": r["model_bytes"] / 1e6, "bpw": report["bits_per_weight"],
        "ppl": r["perplexity"]["perplexity"], "kld_mean": r["kld"]["mean"], "kld_p99": r["kld"]["p99"],
        "top1": 100 * r["top1_agreement"], "llama_cpp": LLAMA_CPP.get((mix, imat)),
    })

print(f"\nSmolLM2-135M, base = f32 of the shipped Q4_1 (PPL {results[0]['base_perplexity']['perplexity']:.2f}), "
      f"ctx 512, {args.chunks} chunks; ours | llama.cpp")
print(f"{'type':<8}{'imat':<6}{'MB':>7}{'bpw':>7}{'PPL':>8}{'KLD':>9}{'p99':>8}{'top1%':>7}  |{'MB':>7}{'PPL':>8}{'KLD':>9}{'p99':>8}{'top1%':>7}")
for r in rows:
    ref = r["llama_cpp"]
    theirs = f"{ref[0]:>7.1f}{ref[1]:>8.2f}{ref[2]:>9.4f}{ref[3]:>8.3f}{ref[4]:>7.1f}" if ref else ""
    print(f"{r['type']:<8}{'yes' if r['imatrix'] else 'no':<6}{r['mb']:>7.1f}{r['bpw']:>7.3f}{r['ppl']:>8.2f}"
          f"{r['kld_mean']:>9.4f}{r['kld_p99']:>8.3f}{r['top1']:>7.1f}  |{theirs}")
out_dir = root / "bench/results"
out_dir.mkdir(parents=True, exist_ok=True)
result_file = out_dir / "gguf_quality.json"
if args.types and result_file.exists():
    # A partial run adds to (or replaces rows of) the full table rather than erasing it.
    previous = json.loads(result_file.read_text())
    if previous.get("chunks") == args.chunks:
        fresh = {(r["type"], r["imatrix"]) for r in rows}
        rows = [r for r in previous["rows"] if (r["type"], r["imatrix"]) not in fresh] + rows
        timings = {**previous.get("timings", {}), **timings}
result_file.write_text(json.dumps({"chunks": args.chunks, "rows": rows, "timings": timings}, indent=2))
print(f"wrote {result_file}; timings {timings}")
