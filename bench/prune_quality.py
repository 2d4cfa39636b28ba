#!/usr/bin/env python3
"""Pruning quality, time and memory on SmolLM2-135M (2 threads).

Prunes the model with `compress prune` (magnitude, Wanda and SparseGPT at 50%
unstructured and 2:4; Wanda with the OWL schedule; structured cuts of 25% of the
FFN channels, 3 of 9 query heads per block and 4 of 30 blocks), each from
--samples x 512 calibration tokens of the calibration text, timing every run with
its peak RSS, then evaluates all of them against the f32 base in one
`compress eval` run (llama.cpp's protocol: ctx 512, --chunks chunks of the
evaluation text). Prints a table and writes bench/results/prune_quality.json.

Usage: bench/prune_quality.py [--chunks 40] [--samples 64] [--only NAME,...] [--fresh]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
binary = Path(os.environ.get("COMPRESS_BIN") or root / "target/release/compress")
cache = Path(os.environ.get("COMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress")
work = cache / "bench/prune"
base = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (output, prune arguments)
CONFIGS = {
    "magnitude-50": ("magnitude-50", ["--method", "magnitude", "--sparsity", "0.5"]),
    "wanda-50": ("wanda-50", ["--method", "wanda", "--sparsity", "0.5"]),
    "wanda-50-owl": ("wanda-50-owl", ["--method", "wanda", "--sparsity", "0.5", "--schedule", "owl"]),
    "sparsegpt-50": ("sparsegpt-50", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "magnitude-2:4": ("magnitude-2-4", ["--method", "magnitude", "--nm", "2:4"]),
    "wanda-2:4": ("wanda-2-4", ["--method", "wanda", "--nm", "2:4"]),
    "sparsegpt-2:4": ("sparsegpt-2-4", ["--method", "sparsegpt", "--nm", "2:4"]),
    "ffn-25%": ("ffn-25", ["--ffn", "0.25"]),
    "heads-3of9": ("heads-3", ["--heads", "3"]),
    "blocks-4of30": ("blocks-4", ["--layers", "4"]),
}

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=40)
ap.add_argument("--samples", type=int, default=64)
ap.add_argument("--only", help="comma-separated config names")
ap.add_argument("--fresh", action="store_true", help="prune again even if the artifact exists")
args = ap.parse_args()
if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
names = args.only.split(",") if args.only else list(CONFIGS)
work.mkdir(parents=True, exist_ok=True)

rows = {}
for name in names:
    out_name, extra = CONFIGS[name]
    out = work / out_name
    meta = work / f"{out_name}.bench.json"
    if args.fresh or not meta.exists():
        report = work / f"{out_name}.json"
        cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M", binary, "prune", base, "--samples", str(args.samples),
               "--seq", "512", "--dtype", "f16", "-o", out, "--report", report, *extra]
        print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
        t = time.time()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"failed: {cmd}\n{p.stdout}\n{p.stderr}")
        rss = next((int(l.split("=")[1]) for l in p.stderr.splitlines() if l.startswith("peak_rss_kb=")), 0)
        r = json.loads(report.read_text())
        meta.write_text(json.dumps({"wall_seconds": round(time.time() - t, 1), "peak_rss_mb": round(rss / 1024, 1),
                                    "report": r}, indent=2))
    rows[name] = {"path": out, "meta": json.loads(meta.read_text())}

order = [n for n in CONFIGS if n in rows]
res = subprocess.run([str(binary), "eval", *[str(rows[n]["path"]) for n in order], "--base", str(base), "--text",
                      str(cache / "eval.txt"), "--ctx", "512", "--chunks", str(args.chunks), "--json"],
                     check=True, capture_output=True, text=True)
results = json.loads(res.stdout)
if isinstance(results, dict):
    results = [results]

table = []
for n, e in zip(order, results):
    m = rows[n]["meta"]
    r = m["report"]
    params = r.get("params_after")
    table.append({
        "name": n, "mb": e["model_bytes"] / 1e6, "ppl": e["perplexity"]["perplexity"], "kld_mean": e["kld"]["mean"],
        "kld_p99": e["kld"]["p99"], "top1": 100 * e["top1_agreement"], "wall_s": m["wall_seconds"],
        "peak_rss_mb": m["peak_rss_mb"], "sparsity": r.get("sparsity"), "params_m": params / 1e6 if params else None,
        "timings": r.get("timings"),
    })

print(f"\nSmolLM2-135M against the base (PPL {results[0]['base_perplexity']['perplexity']:.2f}), ctx 512, "
      f"{args.chunks} chunks; calibration {args.samples} x 512 tokens; f16 outputs")
print(f"{'artifact':<16}{'MB':>7}{'params M':>9}{'zeros':>7}{'PPL':>9}{'KLD':>8}{'p99':>8}{'top1%':>7}{'wall s':>8}{'RSS MB':>8}")
for r in table:
    params = f"{r['params_m']:>9.1f}" if r["params_m"] else f"{'134.5':>9}"
    zeros = f"{100 * r['sparsity']:>6.1f}%" if r["sparsity"] is not None else f"{'-':>7}"
    print(f"{r['name']:<16}{r['mb']:>7.1f}{params}{zeros}{r['ppl']:>9.2f}{r['kld_mean']:>8.4f}{r['kld_p99']:>8.3f}"
          f"{r['top1']:>7.1f}{r['wall_s']:>8.0f}{r['peak_rss_mb']:>8.0f}")
out_dir = root / "bench/results"
out_dir.mkdir(parents=True, exist_ok=True)
result_file = out_dir / "prune_quality.json"
if result_file.exists():
    old = json.loads(result_file.read_text())
    if old.get("chunks") == args.chunks and old.get("samples") == args.samples:
        merged = {r["name"]: r for r in old["rows"]} | {r["name"]: r for r in table}
        table = [merged[n] for n in CONFIGS if n in merged]
result_file.write_text(json.dumps({"chunks": args.chunks, "samples": args.samples, "seq": 512, "rows": table}, indent=2))
print(f"wrote {result_file}")
