#!/usr/bin/env python3
"""Distillation recovery on SmolLM2-135M (2 threads).

For three pruned students (2:4 SparseGPT, 25% of the FFN channels, 4 of 30 blocks
removed; made as bench/prune_quality.py makes them, from 64 x 512 calibration
tokens, when missing), measures the held-out KL divergence and perplexity against
the base on the evaluation text (ctx 512, --chunks chunks) before and after
`compress distill` on --tokens tokens of the calibration text (never the
evaluation text), with the training throughput and peak RSS from its report.
Prints a table and writes bench/results/distill_recovery.json.

A fourth student, `q3_k_m` (the base quantized to Q3_K_M, no imatrix), is run
only when named in --only: it trains through its codecs (straight-through) and is
written back as Q3_K_M.

Usage: bench/distill_recovery.py [--tokens 16384] [--lr 1e-4] [--batch 2] [--seq 256]
                                 [--chunks 20] [--train all|blocks|norms|lora]
                                 [--hidden 0] [--lora-rank 16] [--only NAME,...]
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
students = cache / "bench/prune"
work = cache / "bench/distill"
base = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"

# name: (student folder in bench/prune, its prune arguments)
STUDENTS = {
    "sparsegpt-2:4": ("sparsegpt-2-4", ["--method", "sparsegpt", "--nm", "2:4"]),
    "ffn-25%": ("ffn-25", ["--ffn", "0.25"]),
    "blocks-4of30": ("blocks-4", ["--layers", "4"]),
    "q3_k_m": ("q3_k_m.gguf", None),
}

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=16384)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--chunks", type=int, default=20)
ap.add_argument("--train", default="all")
ap.add_argument("--hidden", type=float, default=0.0)
ap.add_argument("--lora-rank", type=int, default=16)
ap.add_argument("--only", help="comma-separated student names")
args = ap.parse_args()
if not binary.exists():
    sys.exit(f"{binary} is missing: run `cargo build --release -p compress`")
names = args.only.split(",") if args.only else [n for n in STUDENTS if n != "q3_k_m"]
work.mkdir(parents=True, exist_ok=True)


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def evaluate(model):
    out = run([binary, "eval", model, "--base", base, "--text", "asset:eval", "--ctx", "512",
               "--chunks", str(args.chunks), "--json"])
    r = json.loads(out)
    return {"ppl": r["perplexity"]["perplexity"], "kld": r["kld"]["mean"],
            "kld_p99": r["kld"]["p99"], "top1": r["top1_agreement"]}


rows = {}
base_eval = evaluate(base)
for name in names:
    folder, prune_args = STUDENTS[name]
    student = students / folder
    if not student.exists():
        students.mkdir(parents=True, exist_ok=True)
        if prune_args is None:
            run([binary, "quantize", base, "--type", "Q3_K_M", "-o", student])
        else:
            run([binary, "prune", base, "--samples", "64", "--seq", "512", *prune_args, "-o", student])
    tag = f"{folder}-{args.tokens}-{args.lr:g}-{args.train}"
    extra = []
    if args.train == "lora":
        tag += f"{args.lora_rank}"
        extra += ["--lora-rank", str(args.lora_rank)]
    if args.hidden > 0:
        tag += f"-hidden{args.hidden:g}"
        extra += ["--hidden", str(args.hidden)]
    out = work / (tag + ".gguf" if prune_args is None else tag)
    report = work / f"{tag}.json"
    before = evaluate(student)
    t0 = time.time()
    run([binary, "distill", "--teacher", base, "--student", student, "--text", "asset:calib",
         "--tokens", str(args.tokens), "--lr", str(args.lr), "--batch", str(args.batch),
         "--seq", str(args.seq), "--train", args.train, *extra, "-o", out, "--report", report])
    seconds = time.time() - t0
    after = evaluate(out)
    r = json.loads(report.read_text())
    removed = (before["kld"] - after["kld"]) / before["kld"]
    rows[name] = {"before": before, "after": after, "kld_removed": removed,
                  "tokens": r["tokens"], "steps": r["steps"], "tokens_per_second": r["tokens_per_second"],
                  "train_seconds": r["train_seconds"], "wall_seconds": seconds,
                  "peak_rss_bytes": r["peak_rss_bytes"], "masked_zeros": r["masked_zeros"]}
    print(f"{name}: KLD {before['kld']:.4f} -> {after['kld']:.4f} ({100 * removed:.0f}% removed), "
          f"PPL {before['ppl']:.2f} -> {after['ppl']:.2f}, {r['tokens_per_second']:.0f} tok/s", flush=True)

print()
print(f"base PPL {base_eval['ppl']:.3f}; {args.tokens} training tokens of the calibration text, lr {args.lr:g}, "
      f"batch {args.batch} x {args.seq}, train {args.train}; evaluation ctx 512 x {args.chunks} chunks")
print(f"{'student':<14} {'KLD before':>10} {'KLD after':>10} {'removed':>8} {'PPL before':>10} {'PPL after':>10} "
      f"{'top-1 before':>12} {'top-1 after':>11} {'tok/s':>6} {'peak RSS':>9}")
for name, r in rows.items():
    b, a = r["before"], r["after"]
    print(f"{name:<14} {b['kld']:>10.4f} {a['kld']:>10.4f} {100 * r['kld_removed']:>7.0f}% {b['ppl']:>10.2f} "
          f"{a['ppl']:>10.2f} {100 * b['top1']:>11.1f}% {100 * a['top1']:>10.1f}% {r['tokens_per_second']:>6.0f} "
          f"{r['peak_rss_bytes'] / 1e9:>7.2f} GB")

results = root / "bench/results/distill_recovery.json"
results.parent.mkdir(parents=True, exist_ok=True)
prev = json.loads(results.read_text()) if results.exists() else {"runs": {}}
key = f"{args.tokens}-{args.lr:g}-{args.train}-{args.batch}x{args.seq}-c{args.chunks}"
if args.train == "lora":
    key += f"-r{args.lora_rank}"
if args.hidden > 0:
    key += f"-hidden{args.hidden:g}"
prev["runs"][key] = {
    "args": vars(args), "base": base_eval, "students": rows}
results.write_text(json.dumps(prev, indent=2) + "\n")
print(f"wrote {results}")
