#!/usr/bin/env bash
# Our stages on the second real model, Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v
# biases, 24 blocks, hidden 896, mostly Q5_0), against llama.cpp and against the
# simple baselines, with the protocol of DESIGN.md (ctx 512, 2 threads).
#
# Usage: bench/qwen_quality.sh [--chunks N] [--kld-chunks N] [--samples N]
#
#   a) `compress imatrix` on 32 chunks of calib.txt, `compress quantize --type
#      Q4_K_M|Q3_K_M --imatrix`, each judged by llama-perplexity --kl-divergence
#      against the base log-probabilities bench/qwen_reference.sh saved (run it
#      first: same chunks, same base); beside llama-quantize's files of the same mix;
#   b) `compress quantize --method rtn|gptq --bits 4 --group 128` (GPTQ on --samples
#      × 512 calibration tokens) and `compress prune --method magnitude|wanda|sparsegpt
#      --sparsity 0.5`, each evaluated by `compress eval --base` on --kld-chunks chunks.
# Prints a table and writes bench/results/qwen_quality.json.
#
# Work files go to $COMPRESS_CACHE/bench/qwen-ours; the binary is target/release/compress.
set -euo pipefail

chunks=40
kld_chunks=10
samples=32
while [ $# -gt 0 ]; do
    case "$1" in
        --chunks) chunks="$2"; shift 2 ;;
        --kld-chunks) kld_chunks="$2"; shift 2 ;;
        --samples) samples="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "qwen_quality: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
bin="$dir/bin"
cache="${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress}"
export COMPRESS_CACHE="$cache"
model="$cache/Qwen2.5-Coder-0.5B-Instruct.gguf"
base_kld="$cache/bench/qwen-llama-cpp/base-c512-n$chunks.kld"
work="$cache/bench/qwen-ours"
c="$root/target/release/compress"
mkdir -p "$work" "$root/bench/results"
[ -x "$c" ] || { echo "qwen_quality: build first: cargo build --release -p compress" >&2; exit 1; }
[ -f "$base_kld" ] || { echo "qwen_quality: $base_kld missing: run bench/qwen_reference.sh --chunks $chunks first" >&2; exit 1; }

timed() { # timed NAME CMD...: runs CMD, logs to $work/NAME.log, prints seconds
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    "$@" >"$work/$name.log" 2>&1 || { echo "qwen_quality: $name failed, see $work/$name.log" >&2; tail -5 "$work/$name.log" >&2; exit 1; }
    echo "$(date +%s.%N) - $t0" | bc
}

declare -A secs
secs[imatrix]=$(timed imatrix "$c" imatrix "$model" --text "$cache/calib.txt" --ctx 512 --chunks 32 -o "$work/imatrix.gguf")
for t in Q4_K_M Q3_K_M; do
    secs[$t]=$(timed "quantize-$t" "$c" quantize "$model" --type "$t" --imatrix "$work/imatrix.gguf" -o "$work/$t.gguf")
    timed "kld-$t" "$bin/llama-perplexity" -m "$work/$t.gguf" -c 512 -t 2 --kl-divergence-base "$base_kld" --kl-divergence >/dev/null
done

calib=(--calib "$cache/calib.txt" --samples "$samples" --seq 512)
secs[rtn]=$(timed rtn "$c" quantize "$model" --method rtn --bits 4 --group 128 -o "$work/rtn")
secs[gptq]=$(timed gptq "$c" quantize "$model" --method gptq --bits 4 --group 128 "${calib[@]}" -o "$work/gptq")
for m in magnitude wanda sparsegpt; do
    secs[$m]=$(timed "prune-$m" "$c" prune "$model" --method "$m" --sparsity 0.5 "${calib[@]}" -o "$work/$m.gguf")
done
for a in rtn gptq magnitude.gguf wanda.gguf sparsegpt.gguf; do
    n="${a%.gguf}"
    timed "eval-$n" "$c" eval "$work/$a" --base "$model" --text "$cache/eval.txt" --ctx 512 --chunks "$kld_chunks" --json >/dev/null
    sed -n '/^{/,$p' "$work/eval-$n.log" > "$work/eval-$n.json"
done

python3 - "$work" "$root/bench/results/qwen_quality.json" "$cache/bench/qwen-llama-cpp" "$chunks" "$kld_chunks" "$samples" <<'PY'
import json, os, re, sys
work, out, ref, chunks, kld_chunks, samples = sys.argv[1:7]
def llama_kld(log):
    t = open(log).read()
    g = lambda pat: float(re.search(pat, t).group(1))
    return {"ppl": g(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), "mean_kld": g(r"Mean\s+KLD:\s*([\d.]+)"),
            "p99_kld": g(r"99\.0%\s+KLD:\s*([\d.]+)"), "same_top1_pct": g(r"Same top p:\s*([\d.]+)")}
rows = []
for t in ["Q4_K_M", "Q3_K_M"]:
    ours = llama_kld(f"{work}/kld-{t}.log") | {"mb": os.path.getsize(f"{work}/{t}.gguf") / 1e6}
    theirs = llama_kld(f"{ref}/kld-{t}-imat32-n{chunks}.log") | {"mb": os.path.getsize(f"{ref}/{t}-imat32.gguf") / 1e6}
    rows.append({"what": t, "judge": "llama-perplexity --kl-divergence", "ours": ours, "llama_quantize": theirs})
ev = {}
for n in ["rtn", "gptq", "magnitude", "wanda", "sparsegpt"]:
    v = json.load(open(f"{work}/eval-{n}.json"))
    v = v[0] if isinstance(v, list) else v
    ev[n] = {"ppl": v["perplexity"]["perplexity"], "mean_kld": v["kld"]["mean"], "p99_kld": v["kld"]["p99"], "top1": v["top1_agreement"]}
res = {"model": "Qwen2.5-Coder-0.5B-Instruct", "chunks": int(chunks), "kld_chunks": int(kld_chunks),
       "samples": int(samples), "mixes": rows, "ours_eval": ev,
       "gptq_over_rtn": ev["gptq"]["mean_kld"] / ev["rtn"]["mean_kld"],
       "wanda_over_magnitude": ev["wanda"]["mean_kld"] / ev["magnitude"]["mean_kld"],
       "sparsegpt_over_magnitude": ev["sparsegpt"]["mean_kld"] / ev["magnitude"]["mean_kld"]}
json.dump(res, open(out, "w"), indent=2)
print("| mix | who | MB | PPL | mean KLD | p99 KLD | same top-1 % |\n|---|---|---|---|---|---|---|")
for r in rows:
    for who in ["ours", "llama_quantize"]:
        x = r[who]
        print(f"| {r['what']} | {who} | {x['mb']:.1f} | {x['ppl']:.3f} | {x['mean_kld']:.4f} | {x['p99_kld']:.3f} | {x['same_top1_pct']:.1f} |")
print(f"\n| artifact | PPL | mean KLD | p99 KLD | top-1 |\n|---|---|---|---|---|")
for n, x in ev.items():
    print(f"| {n} | {x['ppl']:.3f} | {x['mean_kld']:.4f} | {x['p99_kld']:.3f} | {100*x['top1']:.1f}% |")
print(f"\nGPTQ/RTN KLD {res['gptq_over_rtn']:.3f}; Wanda/magnitude {res['wanda_over_magnitude']:.3f}; SparseGPT/magnitude {res['sparsegpt_over_magnitude']:.3f}")
PY
for k in "${!secs[@]}"; do echo "time $k: ${secs[$k]} s"; done
