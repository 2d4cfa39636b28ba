#!/usr/bin/env python3
"""Sensitivity-driven bit allocation against llama.cpp's fixed mixes on SmolLM2.

1. `compress sensitivity` measures, per tensor, the KL divergence added by
   quantizing only that tensor to each of --types (llama.cpp's fallbacks where a
   type does not fit the 576-column rows), with the 64-chunk imatrix.
2. For each fixed mix (Q4_K_M, Q3_K_M, with the same imatrix) at its exact bits
   per weight: `compress quantize --sensitivity R --target-bpw X` (measured-KLD
   allocation) and `compress quantize --target-bpw X` (weight-error proxy).
3. One `compress eval --base` pass over all of them (ctx 512, 40 chunks).
Prints a table and writes bench/results/sensitivity_alloc.json.

The candidate types exclude Q4_1 / Q5_1 / Q5_K (whose 576-column fallback is
Q5_1): the base sits on a Q4_1 grid, so those reproduce it and say nothing.

Usage: bench/sensitivity_alloc.py [--chunks 40] [--sens-ctx 256] [--sens-chunks 1] [--fresh]
Needs: `cargo build --release -p compress`, `compress fetch`.
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
work = cache / "bench/sensitivity"

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=40)
ap.add_argument("--sens-ctx", type=int, default=256)
ap.add_argument("--sens-chunks", type=int, default=1)
ap.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q6_K")
ap.add_argument("--mixes", default="Q4_K_M,Q3_K_M")
ap.add_argument("--methods", default="fixed,sensitivity,proxy",
                help="which rows to evaluate: fixed mixes, measured-KLD and weight-error allocations")
ap.add_argument("--fresh", action="store_true", help="redo every step even if its output exists")
args = ap.parse_args()
if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
work.mkdir(parents=True, exist_ok=True)
base = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
imatrix = work / "imatrix-64.gguf"
timings = {}


def run(cmd, key=None):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)
    if key:
        timings[key] = round(time.time() - t, 1)
    return r


if args.fresh or not imatrix.exists():
    run([binary, "imatrix", base, "--text", cache / "calib.txt", "--chunks", "64", "-o", imatrix], "imatrix_s")
tag = f"{args.types.replace(',', '-')}-{args.sens_ctx}x{args.sens_chunks}"
report = work / f"sens-{tag}.json"
if args.fresh or not report.exists():
    run([binary, "sensitivity", base, "--calib", cache / "calib.txt", "--text", cache / "eval.txt",
         "--types", args.types, "--ctx", args.sens_ctx, "--chunks", args.sens_chunks,
         "--imatrix", imatrix, "-o", report], "sensitivity_s")
sens = json.loads(report.read_text())

artifacts = []  # (label, mix, method, path)
for mix in args.mixes.split(","):
    fixed = work / f"{mix}-imat.gguf"
    if args.fresh or not fixed.exists():
        run([binary, "quantize", base, "--type", mix, "--imatrix", imatrix, "-o", fixed,
             "--report", fixed.with_suffix(".json")], f"quantize_{mix}_s")
    bpw = json.loads(fixed.with_suffix(".json").read_text())["bits_per_weight"]
    methods = args.methods.split(",")
    if "fixed" in methods:
        artifacts.append((f"{mix} (llama.cpp's mix)", mix, "fixed", fixed))
    for method in [m for m in ("sensitivity", "proxy") if m in methods]:
        out = work / f"{method}-{mix}-{tag}.gguf"
        if args.fresh or not out.exists():
            cmd = [binary, "quantize", base, "--target-bpw", f"{bpw:.6f}", "--imatrix", imatrix,
                   "-o", out, "--report", out.with_suffix(".json")]
            if method == "sensitivity":
                cmd += ["--sensitivity", report]
            else:
                # The same candidate types as the sensitivity run (fallbacks included).
                cmd += ["--candidates", args.types]
            run(cmd, f"quantize_{method}_{mix}_s")
        label = "measured-KLD allocation" if method == "sensitivity" else "weight-error allocation"
        artifacts.append((f"{label} at {mix}'s size", mix, method, out))

res = run([binary, "eval", *[a[3] for a in artifacts], "--base", base, "--text", cache / "eval.txt",
           "--ctx", "512", "--chunks", str(args.chunks), "--json"], "eval_s")
results = json.loads(res.stdout)
if isinstance(results, dict):
    results = [results]

rows = []
for (label, mix, method, path), r in zip(artifacts, results):
    q = json.loads(path.with_suffix(".json").read_text())
    rows.append({
        "artifact": label, "mix": mix, "method": method, "bytes": r["model_bytes"],
        "bpw": q["bits_per_weight"], "ppl": r["perplexity"]["perplexity"],
        "kld_mean": r["kld"]["mean"], "kld_stderr": r["kld"]["mean_stderr"], "kld_p99": r["kld"]["p99"],
        "top1": 100 * r["top1_agreement"],
    })

print(f"\nSmolLM2-135M, imatrix 64 chunks; sensitivity {args.sens_chunks} x {args.sens_ctx} tokens, "
      f"types {args.types} ({sens['seconds']:.0f} s); eval ctx 512, {args.chunks} chunks")
print(f"{'artifact':<46}{'MB':>8}{'bpw':>7}{'PPL':>8}{'KLD':>10}{'± se':>8}{'p99':>8}{'top1%':>7}")
for r in rows:
    print(f"{r['artifact']:<46}{r['bytes'] / 1e6:>8.2f}{r['bpw']:>7.3f}{r['ppl']:>8.2f}{r['kld_mean']:>10.4f}"
          f"{r['kld_stderr']:>8.4f}{r['kld_p99']:>8.3f}{r['top1']:>7.1f}")
out_dir = root / "bench/results"
out_dir.mkdir(parents=True, exist_ok=True)
result_file = out_dir / "sensitivity_alloc.json"
# One entry per sensitivity setting, so runs at several sizes sit side by side.
runs = json.loads(result_file.read_text()).get("runs", {}) if result_file.exists() else {}
previous = runs.get(tag, {})
fresh = {r["artifact"] for r in rows}
rows = [r for r in previous.get("rows", []) if r["artifact"] not in fresh] + rows
runs[tag] = {
    "chunks": args.chunks, "sensitivity": {"ctx": args.sens_ctx, "chunks": args.sens_chunks, "types": args.types,
                                           "seconds": sens["seconds"], "scored_tokens": sens["scored_tokens"]},
    "rows": rows, "timings": {**previous.get("timings", {}), **timings}}
result_file.write_text(json.dumps({"runs": runs}, indent=2))
print(f"wrote {result_file}; timings {timings}")
