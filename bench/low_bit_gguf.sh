#!/usr/bin/env bash
# NVFP4, Q1_0 and Q2_0 GGUFs from `compress quantize` beside llama-quantize's, judged
# by llama.cpp itself: llama-perplexity --kl-divergence against the f32 base (ctx 512,
# 2 threads, the first --chunks chunks of the evaluation text), plus `compress eval`'s
# perplexity of each of our files (it must agree with llama-perplexity's).
#
# Usage: bench/low_bit_gguf.sh [--model smollm2|qwen] [--chunks 20] [--samples 32]
#                              [--only NAME,NAME...]
#
# Rows (NAME: what is made):
#   q2_0-imat        compress quantize --type Q2_0 --imatrix
#   q2_0-gptq        compress quantize --method gptq --type Q2_0 (--samples × 512
#                    calibration tokens)
#   nvfp4-gptq       compress quantize --method gptq --type NVFP4 (the same)
#   q1_0-gptq        compress quantize --method gptq --type Q1_0 (the same)
#   q2_0-llama       llama-quantize --imatrix … Q2_0 (it ignores the imatrix)
#   nvfp4-imat       compress quantize --type NVFP4 --imatrix (llama-quantize cannot
#                    make NVFP4)
#   q4_0-llama       llama-quantize --imatrix … Q4_0 (NVFP4's size class)
#   q1_0-imat        compress quantize --type Q1_0 --imatrix
#   q1_0-llama       llama-quantize --imatrix … Q1_0 (refuses rows that are not
#                    multiples of 128, e.g. SmolLM2's 576: the row says so)
#   tq1_0-imat, tq2_0-imat   compress quantize --type TQ1_0|TQ2_0 --imatrix
#   tq1_0-gptq, tq2_0-gptq   compress quantize --method gptq --type TQ1_0|TQ2_0
#   tq1_0-llama, tq2_0-llama llama-quantize --imatrix … TQ1_0|TQ2_0 (it ignores the
#                    imatrix; rows no 256-block divides fall back to Q4_0 in both)
# The base is the model's f32 expansion (`compress quantize --type F32`), the imatrix
# `compress imatrix` on 64 chunks of calib.txt. Results: a table on stdout and
# bench/results/low_bit_gguf-MODEL.json; work files in $COMPRESS_CACHE/bench/low-bit-MODEL.
# Needs scripts/build-llama-cpp.sh and `cargo build --release -p compress` first.
# SmolLM2, 20 chunks, every row: about 35 minutes on 2 cores.
set -euo pipefail

model_name=smollm2
chunks=20
samples=32
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model_name="$2"; shift 2 ;;
        --chunks) chunks="$2"; shift 2 ;;
        --samples) samples="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "low_bit_gguf: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
bin="$dir/bin"
cache="${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress}"
export COMPRESS_CACHE="$cache"
case "$model_name" in
    smollm2) src="$cache/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    qwen) src="$cache/Qwen2.5-Coder-0.5B-Instruct.gguf" ;;
    *) echo "low_bit_gguf: --model smollm2|qwen" >&2; exit 2 ;;
esac
work="$cache/bench/low-bit-$model_name"
c="$root/target/release/compress"
mkdir -p "$work" "$root/bench/results"
[ -x "$c" ] || { echo "low_bit_gguf: build first: cargo build --release -p compress" >&2; exit 1; }
[ -x "$bin/llama-perplexity" ] || { echo "low_bit_gguf: run scripts/build-llama-cpp.sh first" >&2; exit 1; }
rows="q2_0-imat,q2_0-gptq,q2_0-llama,nvfp4-imat,nvfp4-gptq,q4_0-llama,q1_0-imat,q1_0-gptq,q1_0-llama"
[ -n "$only" ] && rows="$only"

run() { # run NAME CMD...: logs to $work/NAME.log, stops with its tail on failure
    local name="$1"; shift
    "$@" >"$work/$name.log" 2>&1 || { echo "low_bit_gguf: $name failed, see $work/$name.log" >&2; tail -5 "$work/$name.log" >&2; return 1; }
}

base="$work/base-f32.gguf"
[ -f "$base" ] || run base "$c" quantize "$src" --type F32 -o "$base"
[ -f "$work/imatrix.gguf" ] || run imatrix "$c" imatrix "$base" --text "$cache/calib.txt" --chunks 64 -o "$work/imatrix.gguf"
kld_base="$work/base-c512-n$chunks.kld"
[ -f "$kld_base" ] || run base-logits "$bin/llama-perplexity" -m "$base" -f "$cache/eval.txt" -c 512 --chunks "$chunks" -t 2 --kl-divergence-base "$kld_base"

results="$work/results-n$chunks.tsv"
touch "$results"
for row in ${rows//,/ }; do
    out="$work/$row.gguf"
    rm -f "$out"
    t0=$(date +%s.%N)
    ok=1
    case "$row" in
        q2_0-imat|nvfp4-imat|q1_0-imat|tq1_0-imat|tq2_0-imat)
            ty=$(echo "${row%-imat}" | tr a-z A-Z)
            run "$row" "$c" quantize "$base" --type "$ty" --imatrix "$work/imatrix.gguf" -o "$out" --report "$work/$row.json" || ok=0 ;;
        q2_0-gptq|nvfp4-gptq|q1_0-gptq|tq1_0-gptq|tq2_0-gptq)
            ty=$(echo "${row%-gptq}" | tr a-z A-Z)
            run "$row" "$c" quantize "$base" --method gptq --type "$ty" --calib "$cache/calib.txt" --samples "$samples" --seq 512 -o "$out" --report "$work/$row.json" || ok=0 ;;
        *-llama)
            ty=$(echo "${row%-llama}" | tr a-z A-Z)
            run "$row" "$bin/llama-quantize" --imatrix "$work/imatrix.gguf" "$base" "$out" "$ty" 2 || ok=0 ;;
        *) echo "low_bit_gguf: unknown row $row" >&2; exit 2 ;;
    esac
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    sed -i "/^$row\t/d" "$results"
    if [ "$ok" = 0 ]; then
        why=$(grep -m1 -io "no tensor type fallback[^\"]*\|error[^\"]*" "$work/$row.log" | head -c 200 || true)
        printf '%s\tfailed\t%s\n' "$row" "${why:-see $work/$row.log}" >>"$results"
        continue
    fi
    run "kld-$row" "$bin/llama-perplexity" -m "$out" -f "$cache/eval.txt" -c 512 --chunks "$chunks" -t 2 \
        --kl-divergence-base "$kld_base" --kl-divergence
    ours_ppl=""
    if [[ "$row" != *-llama ]]; then
        "$c" eval "$out" --text "$cache/eval.txt" --chunks "$chunks" --json >"$work/eval-$row.json" 2>"$work/eval-$row.log"
        ours_ppl=$(python3 -c "import json,sys; v=json.load(open(sys.argv[1])); v=v[0] if isinstance(v,list) else v; print(v['perplexity']['perplexity'])" "$work/eval-$row.json")
    fi
    log="$work/kld-$row.log"
    ppl=$(grep -m1 "Mean PPL(Q)  " "$log" | awk '{print $4}')
    kld=$(grep -m1 "Mean    KLD:" "$log" | awk '{print $3}')
    p99=$(grep -m1 "99.0%   KLD:" "$log" | awk '{print $3}')
    top=$(grep -m1 "Same top p:" "$log" | awk '{print $4}')
    printf '%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$(stat -c %s "$out")" "$ppl" "$kld" "$p99" "$top" "$ours_ppl" "$secs" >>"$results"
done

python3 - "$results" "$root/bench/results/low_bit_gguf-$model_name.json" "$model_name" "$chunks" "$samples" <<'PY'
import json, sys
results, out, model, chunks, samples = sys.argv[1:]
rows = {}
for line in open(results):
    f = line.rstrip("\n").split("\t")
    if f[1] == "failed":
        rows[f[0]] = {"failed": f[2]}
        continue
    r = dict(zip(["bytes", "llama_ppl", "mean_kld", "p99_kld", "same_top1_pct", "compress_eval_ppl", "make_seconds"], f[2:]))
    r = {k: (float(v) if v else None) for k, v in r.items()}
    if r["compress_eval_ppl"]:
        r["ppl_diff_pct"] = round(100 * (r["compress_eval_ppl"] / r["llama_ppl"] - 1), 3)
    rows[f[0]] = r
order = ["q2_0-imat", "q2_0-gptq", "q2_0-llama", "nvfp4-imat", "nvfp4-gptq", "q4_0-llama", "q1_0-imat", "q1_0-gptq", "q1_0-llama",
         "tq2_0-imat", "tq2_0-gptq", "tq2_0-llama", "tq1_0-imat", "tq1_0-gptq", "tq1_0-llama"]
print(f"{model}, llama-perplexity --kl-divergence vs the f32 base, ctx 512, {chunks} chunks")
print(f"{'row':<12} {'MB':>7} {'PPL':>10} {'mean KLD':>9} {'p99 KLD':>8} {'top-1 %':>8} {'eval PPL':>10} {'Δ%':>7}")
for name in order:
    r = rows.get(name)
    if r is None:
        continue
    if "failed" in r:
        print(f"{name:<12} failed: {r['failed']}")
        continue
    d = r.get("ppl_diff_pct")
    print(f"{name:<12} {r['bytes']/1e6:7.1f} {r['llama_ppl']:10.2f} {r['mean_kld']:9.4f} {r['p99_kld']:8.3f} {r['same_top1_pct']:8.2f} "
          f"{(r['compress_eval_ppl'] or float('nan')):10.2f} {(d if d is not None else float('nan')):7.3f}")
def ratio(a, b):
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if "mean_kld" in ra and "mean_kld" in rb:
        return round(ra["mean_kld"] / rb["mean_kld"], 3)
ratios = {"q2_0-imat/q2_0-llama": ratio("q2_0-imat", "q2_0-llama"),
          "q2_0-gptq/q2_0-llama": ratio("q2_0-gptq", "q2_0-llama"),
          "nvfp4-imat/q4_0-llama": ratio("nvfp4-imat", "q4_0-llama"),
          "nvfp4-gptq/q4_0-llama": ratio("nvfp4-gptq", "q4_0-llama"),
          "q1_0-imat/q1_0-llama": ratio("q1_0-imat", "q1_0-llama"),
          "q1_0-gptq/q1_0-llama": ratio("q1_0-gptq", "q1_0-llama"),
          "tq2_0-imat/tq2_0-llama": ratio("tq2_0-imat", "tq2_0-llama"),
          "tq1_0-imat/tq1_0-llama": ratio("tq1_0-imat", "tq1_0-llama"),
          "tq2_0-gptq/tq2_0-llama": ratio("tq2_0-gptq", "tq2_0-llama"),
          "tq1_0-gptq/tq1_0-llama": ratio("tq1_0-gptq", "tq1_0-llama")}
print("KLD ratios:", {k: v for k, v in ratios.items() if v is not None})
json.dump({"model": model, "chunks": int(chunks), "gptq_samples": int(samples),
           "command": f"bench/low_bit_gguf.sh --model {model} --chunks {chunks} --samples {samples}",
           "rows": rows, "kld_ratios": ratios}, open(out, "w"), indent=1)
print("wrote", out)
PY
