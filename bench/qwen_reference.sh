#!/usr/bin/env bash
# llama.cpp's reference numbers for Qwen2.5-Coder-0.5B-Instruct (asset:qwen2.5-0.5b):
# the bar `compress quantize` / `compress eval` must meet on the second real model.
#
# Usage: bench/qwen_reference.sh [--chunks N] [--imatrix-chunks N] [--types Q4_K_M,Q3_K_M] [--fresh]
#
# With the protocol of DESIGN.md (ctx 512, 2 threads, first N chunks of eval.txt):
#   a) llama-perplexity on the shipped GGUF: PPL ± error; its log-probabilities are
#      saved with --kl-divergence-base for b);
#   b) llama-imatrix on the first --imatrix-chunks (default 32) chunks of calib.txt,
#      from the shipped GGUF; llama-quantize --allow-requantize --imatrix to each type
#      (default Q4_K_M and Q3_K_M); llama-perplexity --kl-divergence of each against the
#      saved base: PPL, mean KLD, p99 KLD, same top-1 %, file size in MB (1e6 bytes).
# Prints a table and writes bench/results/qwen_llama_cpp.json (with the time of each
# step and the tensor-type counts llama.cpp reports for every file).
#
# llama-perplexity --kl-divergence takes the chunk count from the base file, so
# --chunks sets both the base run and the KLD runs.
#
# Work files (base log-probabilities: ~3.1 GB for 40 chunks, imatrix, quantized
# GGUFs, logs) go to $COMPRESS_CACHE/bench/qwen-llama-cpp. A step whose outputs and
# timing are there from an earlier run with the same settings is reused (its time
# is the recorded one); --fresh redoes every step.
#
# Needs: `compress fetch` (the Qwen GGUF, calib.txt, eval.txt in the cache) and
# scripts/build-llama-cpp.sh (binaries in ${LLAMA_CPP_DIR:-.cache/llama.cpp}/bin).
# Takes about 25 minutes on 2 cores (40 chunks).
set -euo pipefail

chunks=40
imatrix_chunks=32
types=Q4_K_M,Q3_K_M
fresh=0
while [ $# -gt 0 ]; do
    case "$1" in
        --chunks) chunks="$2"; shift 2 ;;
        --imatrix-chunks) imatrix_chunks="$2"; shift 2 ;;
        --types) types="$2"; shift 2 ;;
        --fresh) fresh=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "qwen_reference: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
bin="$dir/bin"
cache="${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress}"
model="$cache/Qwen2.5-Coder-0.5B-Instruct.gguf"
eval_text="$cache/eval.txt"
calib_text="$cache/calib.txt"
work="$cache/bench/qwen-llama-cpp"
threads=2
ctx=512
# -lv 4 makes llama.cpp print the model loader's lines (tensor types, file type, BPW).

for t in llama-perplexity llama-imatrix llama-quantize; do
    [ -x "$bin/$t" ] || { echo "qwen_reference: $bin/$t missing; run scripts/build-llama-cpp.sh" >&2; exit 1; }
done
for f in "$model" "$eval_text" "$calib_text"; do
    [ -f "$f" ] || { echo "qwen_reference: $f not found; run \`compress fetch\`" >&2; exit 1; }
done
mkdir -p "$work"

# step NAME OUTPUT CMD...: runs CMD with its output in $work/NAME.log and its wall
# time (seconds) in $work/NAME.secs; skipped when both and OUTPUT are there already.
step() {
    local name="$1" output="$2"
    shift 2
    local log="$work/$name.log" secs="$work/$name.secs"
    if [ "$fresh" = 0 ] && [ -s "$secs" ] && [ -e "$output" ]; then
        echo "qwen_reference: $name: reusing $(basename "$output") ($(cat "$secs") s then)" >&2
        return 0
    fi
    rm -f "$secs"
    echo "+ $*" >&2
    local t0 t1
    t0=$(date +%s.%N)
    if ! "$@" >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "qwen_reference: $name failed; full log in $log" >&2
        exit 1
    fi
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 1))" >"$secs"
    echo "qwen_reference: $name took $(cat "$secs") s" >&2
}

# a) perplexity of the shipped GGUF, saving its log-probabilities.
base_kld="$work/base-c$ctx-n$chunks.kld"
step "base-ppl-n$chunks" "$base_kld" \
    "$bin/llama-perplexity" -m "$model" -f "$eval_text" -c "$ctx" --chunks "$chunks" -t "$threads" -lv 4 \
    --kl-divergence-base "$base_kld"

# b) imatrix from the shipped GGUF, then each type with it, then KLD against the base.
imatrix="$work/imatrix-c$ctx-n$imatrix_chunks.gguf"
step "imatrix-n$imatrix_chunks" "$imatrix" \
    "$bin/llama-imatrix" -m "$model" -f "$calib_text" -c "$ctx" --chunks "$imatrix_chunks" -t "$threads" -lv 4 \
    -o "$imatrix"

IFS=, read -r -a type_list <<<"$types"
for ty in "${type_list[@]}"; do
    out="$work/$ty-imat$imatrix_chunks.gguf"
    step "quantize-$ty-imat$imatrix_chunks" "$out" \
        "$bin/llama-quantize" --allow-requantize --imatrix "$imatrix" "$model" "$out" "$ty" "$threads"
    step "kld-$ty-imat$imatrix_chunks-n$chunks" "$work/kld-$ty-imat$imatrix_chunks-n$chunks.log" \
        "$bin/llama-perplexity" -m "$out" -c "$ctx" -t "$threads" -lv 4 \
        --kl-divergence-base "$base_kld" --kl-divergence
done

python3 - "$work" "$model" "$chunks" "$imatrix_chunks" "$types" "$root/bench/results/qwen_llama_cpp.json" <<'EOF'
import json, os, re, sys
from collections import Counter
from pathlib import Path

work, model, chunks, imatrix_chunks, types, result_file = sys.argv[1:]
work, model, result_file = Path(work), Path(model), Path(result_file)
chunks, imatrix_chunks = int(chunks), int(imatrix_chunks)
NUM = r"([-+]?[0-9.]+(?:e[-+]?\d+)?|nan|inf)"


def read(name):
    return (work / f"{name}.log").read_text(errors="replace")


def secs(name):
    return float((work / f"{name}.secs").read_text())


def find(pattern, text, what):
    m = re.search(pattern, text)
    if not m:
        sys.exit(f"qwen_reference: no `{what}` in the llama.cpp log")
    return [float(g) for g in m.groups()]


def model_info(log):
    """Tensor types and file facts as llama.cpp's loader prints them."""
    types = {m.group(1).upper(): int(m.group(2))
             for m in re.finditer(r"llama_model_loader: - type\s+(\w+):\s+(\d+) tensors", log)}
    info = {"tensor_types": types}
    m = re.search(r"file type\s+=\s+(.+)", log)
    if m:
        info["file_type"] = m.group(1).strip()
    m = re.search(r"file size\s+=\s+([0-9.]+) MiB \(([0-9.]+) BPW\)", log)
    if m:
        info["file_size_mib"], info["bpw"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"model params\s+=\s+([0-9.]+) M", log)
    if m:
        info["params_m"] = float(m.group(1))
    return info


def quantize_info(log):
    """What llama-quantize did per tensor: target types and shape fallbacks."""
    targets = Counter(m.group(1).upper() for m in re.finditer(r"converting to (\w+)", log))
    copied = len(re.findall(r"size =\s+[0-9.]+ MB$", log, re.M))
    fallbacks = Counter(
        f"{m.group(1).upper()}->{m.group(2).upper()}"
        for m in re.finditer(r"required for (\w+) - using fallback quantization (\w+)", log))
    return {"converted_to": dict(sorted(targets.items())), "fallbacks": dict(sorted(fallbacks.items())),
            "n_fallback_total": sum(fallbacks.values()), "copied_or_kept": copied}


base_name = f"base-ppl-n{chunks}"
base_log = read(base_name)
ppl, ppl_err = find(r"Final estimate: PPL = " + NUM + r" \+/- " + NUM, base_log, "Final estimate")
timings = {"base_perplexity_and_logits_s": secs(base_name)}
imat_name = f"imatrix-n{imatrix_chunks}"
imat_log = read(imat_name)
timings["imatrix_s"] = secs(imat_name)
m = re.search(r"Final estimate: PPL = " + NUM + r" \+/- " + NUM, imat_log)
imat = {"chunks": imatrix_chunks, "text": "calib.txt", "from": model.name,
        "calib_ppl": float(m.group(1)) if m else None,
        "calib_ppl_err": float(m.group(2)) if m else None}

rows = []
for ty in types.split(","):
    q = f"quantize-{ty}-imat{imatrix_chunks}"
    k = f"kld-{ty}-imat{imatrix_chunks}-n{chunks}"
    qlog, klog = read(q), read(k)
    path = work / f"{ty}-imat{imatrix_chunks}.gguf"
    p, pe = find(r"Mean PPL\(Q\)\s*:\s*" + NUM + r" ± " + NUM, klog, "Mean PPL(Q)")
    pb, _ = find(r"Mean PPL\(base\)\s*:\s*" + NUM + r" ± " + NUM, klog, "Mean PPL(base)")
    kl, kle = find(r"Mean\s+KLD:\s*" + NUM + r" ± " + NUM, klog, "Mean KLD")
    (p99,) = find(r"99\.0%\s+KLD:\s*" + NUM, klog, "99.0% KLD")
    (kmax,) = find(r"Maximum KLD:\s*" + NUM, klog, "Maximum KLD")
    (kmed,) = find(r"Median\s+KLD:\s*" + NUM, klog, "Median KLD")
    top, tope = find(r"Same top p:\s*" + NUM + r" ± " + NUM + " %", klog, "Same top p")
    rms, _ = find(r"RMS Δp\s*:\s*" + NUM + r" ± " + NUM + " %", klog, "RMS Δp")
    timings[f"quantize_{ty}_s"] = secs(q)
    timings[f"kld_{ty}_s"] = secs(k)
    rows.append({
        "type": ty, "imatrix": True, "bytes": path.stat().st_size, "mb": path.stat().st_size / 1e6,
        "ppl": p, "ppl_err": pe, "ppl_base_in_kld_run": pb, "kld_mean": kl, "kld_mean_err": kle,
        "kld_median": kmed, "kld_p99": p99, "kld_max": kmax, "top1": top, "top1_err": tope,
        "rms_dp_pct": rms, **model_info(klog), "quantize": quantize_info(qlog),
    })

result = {
    "model": {"file": model.name, "asset": "asset:qwen2.5-0.5b", "bytes": model.stat().st_size,
              "mb": model.stat().st_size / 1e6, **model_info(base_log)},
    "protocol": {"tool": "llama.cpp@0c1e57098 (scripts/build-llama-cpp.sh, CPU AVX2)", "ctx": 512,
                 "threads": 2, "eval_text": "eval.txt", "chunks": chunks,
                 "scored_tokens": chunks * 255,
                 "base": "the shipped GGUF (its own log-probabilities)",
                 "quantize": "llama-quantize --allow-requantize --imatrix, from the shipped GGUF"},
    "base": {"ppl": ppl, "ppl_err": ppl_err},
    "imatrix": imat,
    "rows": rows,
    "timings_s": timings,
}
result_file.parent.mkdir(parents=True, exist_ok=True)
result_file.write_text(json.dumps(result, indent=2) + "\n")

print(f"\nQwen2.5-Coder-0.5B-Instruct, llama.cpp, ctx 512, {chunks} chunks of eval.txt, 2 threads; "
      f"imatrix from {imatrix_chunks} chunks of calib.txt")
print(f"{'type':<10}{'imat':<6}{'MB':>8}{'PPL':>16}{'mean KLD':>10}{'p99 KLD':>9}{'top1 %':>8}{'time s':>8}")
print(f"{'shipped':<10}{'-':<6}{result['model']['mb']:>8.1f}{ppl:>9.4f} ±{ppl_err:>5.3f}"
      f"{'':>10}{'':>9}{'':>8}{timings['base_perplexity_and_logits_s']:>8.0f}")
for r in rows:
    print(f"{r['type']:<10}{'yes':<6}{r['mb']:>8.1f}{r['ppl']:>9.4f} ±{r['ppl_err']:>5.3f}{r['kld_mean']:>10.4f}"
          f"{r['kld_p99']:>9.3f}{r['top1']:>8.1f}{timings['kld_' + r['type'] + '_s']:>8.0f}")
print(f"tensor types (shipped): {result['model']['tensor_types']}")
for r in rows:
    print(f"tensor types ({r['type']}): {r['tensor_types']}; fallbacks {r['quantize']['fallbacks']}")
print(f"wrote {result_file}; timings (s) {timings}")
EOF
