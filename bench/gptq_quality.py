#!/usr/bin/env python3
"""GPTQ against round-to-nearest (and imatrix-only GGUF) on SmolLM2, with the
wall time and peak memory of calibration + GPTQ.

Quantizes the model with `compress quantize --method gptq|rtn` (128 samples x
512 tokens of the calibration text, seed 0) into 4-bit and 3-bit group-128 GPTQ
folders and onto the Q4_0 / Q4_K_M / Q3_K_M GGUF grids, evaluates every artifact
against the base in one `compress eval --base` pass (ctx 512, 40 chunks of the
evaluation text), prints a table and writes bench/results/gptq_quality.json.
The imatrix-only GGUF rows reuse bench/gguf_quality.py's artifacts when present.

Usage: bench/gptq_quality.py [--chunks 40] [--samples 128] [--only NAME,...] [--fresh]
Needs: `cargo build --release -p compress` and `compress fetch` done first.
Takes about an hour on 2 cores.
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
work = cache / "bench/gptq"
base = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (output, quantize arguments)
CONFIGS = {
    "int4-g128-rtn": ("int4-g128-rtn", ["--method", "rtn", "--bits", "4", "--group", "128"]),
    "int4-g128-gptq": ("int4-g128-gptq", ["--method", "gptq", "--bits", "4", "--group", "128", "--clip", "false"]),
    "int4-g128-gptq-act": ("int4-g128-gptq-act", ["--method", "gptq", "--bits", "4", "--group", "128", "--act-order", "--clip", "false"]),
    "int4-g128-gptq-clip": ("int4-g128-gptq-clip", ["--method", "gptq", "--bits", "4", "--group", "128"]),
    "int4-g128-gptq-act-clip": ("int4-g128-gptq-act-clip", ["--method", "gptq", "--bits", "4", "--group", "128",
                                                            "--act-order"]),
    "int4-g128-awq": ("int4-g128-awq", ["--method", "awq", "--bits", "4", "--group", "128"]),
    "int3-g128-rtn": ("int3-g128-rtn", ["--method", "rtn", "--bits", "3", "--group", "128"]),
    "int3-g128-gptq": ("int3-g128-gptq", ["--method", "gptq", "--bits", "3", "--group", "128"]),
    "int3-g128-awq": ("int3-g128-awq", ["--method", "awq", "--bits", "3", "--group", "128"]),
    "Q4_0-gptq": ("Q4_0-gptq.gguf", ["--method", "gptq", "--type", "Q4_0"]),
    "Q4_K_M-gptq": ("Q4_K_M-gptq.gguf", ["--method", "gptq", "--type", "Q4_K_M"]),
    "Q3_K_M-gptq": ("Q3_K_M-gptq.gguf", ["--method", "gptq", "--type", "Q3_K_M"]),
    "Q4_0-awq": ("Q4_0-awq.gguf", ["--method", "awq", "--type", "Q4_0"]),
    "Q4_K_M-awq": ("Q4_K_M-awq.gguf", ["--method", "awq", "--type", "Q4_K_M"]),
    "Q3_K_M-awq": ("Q3_K_M-awq.gguf", ["--method", "awq", "--type", "Q3_K_M"]),
}
# GGUF artifacts of bench/gguf_quality.py (no calibration: "plain"; imatrix-weighted: "imatrix"), evaluated alongside.
IMATRIX_ONLY = {"Q4_0-plain": "Q4_0.gguf", "Q4_K_M-plain": "Q4_K_M.gguf", "Q3_K_M-plain": "Q3_K_M.gguf",
                "Q4_0-imatrix": "Q4_0-imat.gguf", "Q4_K_M-imatrix": "Q4_K_M-imat.gguf", "Q3_K_M-imatrix": "Q3_K_M-imat.gguf"}
# llama.cpp's imatrix-weighted figures (DESIGN.md) and GPTQModel 7.7.0's (the issue).
REFERENCE = {
    "Q4_0-imatrix": "llama.cpp KLD 0.1563",
    "Q4_K_M-imatrix": "llama.cpp KLD 0.0314",
    "Q3_K_M-imatrix": "llama.cpp KLD 0.0780",
    "int4-g128-rtn": "RTN (issue) KLD 0.471",
    "int4-g128-gptq": "GPTQModel KLD 0.321, 678 s, 1.56 GB",
    "int4-g128-gptq-act": "GPTQModel KLD 0.203, 810 s",
}

ap = argparse.ArgumentParser()
ap.add_argument("--chunks", type=int, default=40)
ap.add_argument("--samples", type=int, default=128)
ap.add_argument("--only", help="comma-separated config names")
ap.add_argument("--fresh", action="store_true", help="re-quantize even if the artifact exists")
args = ap.parse_args()
if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
names = args.only.split(",") if args.only else list(CONFIGS)
work.mkdir(parents=True, exist_ok=True)


def run_measured(cmd):
    """Runs cmd; returns (seconds, stdout, stderr)."""
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr)
    t = time.time()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {cmd}\n{p.stdout}\n{p.stderr}")
    return time.time() - t, p.stdout, p.stderr


rows = {}
for name in names:
    out_name, extra = CONFIGS[name]
    out = work / out_name
    report = work / f"{name}.json"
    if args.fresh or not report.exists():
        cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M", binary, "quantize", base, "--samples", str(args.samples),
               "--seq", "512", "-o", out, "--report", report, *extra]
        seconds, _, err = run_measured(cmd)
        rss = next((int(l.split("=")[1]) for l in err.splitlines() if l.startswith("peak_rss_kb=")), 0)
        r = json.loads(report.read_text())
        r["bench"] = {"wall_seconds": round(seconds, 1), "peak_rss_mb": round(rss / 1024, 1)}
        report.write_text(json.dumps(r, indent=2))
    r = json.loads(report.read_text())
    rows[name] = {"path": out, "report": r}
for name, file in IMATRIX_ONLY.items():
    path = cache / "bench/gguf" / file
    if path.exists() and (not args.only or name in names or any(n.split("-")[0] == name.split("-")[0] for n in names)):
        rows[name] = {"path": path, "report": None}

order = [n for n in list(CONFIGS) + list(IMATRIX_ONLY) if n in rows]
t = time.time()
res = subprocess.run([str(binary), "eval", *[str(rows[n]["path"]) for n in order], "--base", str(base), "--text",
                      str(cache / "eval.txt"), "--ctx", "512", "--chunks", str(args.chunks), "--json"],
                     check=True, capture_output=True, text=True)
eval_seconds = time.time() - t
results = json.loads(res.stdout)
if isinstance(results, dict):
    results = [results]

table = []
for n, e in zip(order, results):
    rep = rows[n]["report"] or {}
    b = rep.get("bench", {})
    t = rep.get("timings", {})
    table.append({
        "name": n, "mb": e["model_bytes"] / 1e6, "ppl": e["perplexity"]["perplexity"], "kld_mean": e["kld"]["mean"],
        "kld_p99": e["kld"]["p99"], "top1": 100 * e["top1_agreement"], "wall_s": b.get("wall_seconds"),
        "peak_rss_mb": b.get("peak_rss_mb"), "forward_s": t.get("forward_seconds"), "hessian_s": t.get("hessian_seconds"),
        "cholesky_s": t.get("factor_seconds"), "loop_s": t.get("loop_seconds"), "report_s": t.get("report_seconds"),
        "reference": REFERENCE.get(n),
    })

print(f"\nSmolLM2-135M against the f32 base (PPL {results[0]['base_perplexity']['perplexity']:.2f}), ctx 512, "
      f"{args.chunks} chunks; calibration {args.samples} x 512 tokens")
print(f"{'artifact':<20}{'MB':>7}{'PPL':>8}{'KLD':>8}{'p99':>8}{'top1%':>7}{'wall s':>8}{'RSS MB':>8}  reference")
for r in table:
    wall = f"{r['wall_s']:>8.0f}" if r["wall_s"] else f"{'':>8}"
    rss = f"{r['peak_rss_mb']:>8.0f}" if r["peak_rss_mb"] else f"{'':>8}"
    print(f"{r['name']:<20}{r['mb']:>7.1f}{r['ppl']:>8.2f}{r['kld_mean']:>8.4f}{r['kld_p99']:>8.3f}{r['top1']:>7.1f}"
          f"{wall}{rss}  {r['reference'] or ''}")
out_dir = root / "bench/results"
out_dir.mkdir(parents=True, exist_ok=True)
result_file = out_dir / "gptq_quality.json"
# A partial run (--only) replaces its rows in the result file and keeps the others.
if result_file.exists():
    old = json.loads(result_file.read_text())
    if old.get("chunks") == args.chunks and old.get("samples") == args.samples:
        fresh = {r["name"]: r for r in table}
        merged = {r["name"]: r for r in old["rows"]} | fresh
        table = [merged[n] for n in list(CONFIGS) + list(IMATRIX_ONLY) if n in merged]
result_file.write_text(json.dumps({"chunks": args.chunks, "samples": args.samples, "seq": 512, "rows": table,
                                   "eval_seconds": round(eval_seconds, 1)}, indent=2))
print(f"wrote {result_file}")
