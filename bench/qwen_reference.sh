#!/usr/bin/env bash
# llama.cpp's reference numbers for Qwen2.5-Coder-0.5B-Instruct (asset:qwen2.5-0.5b):
# the bar `compress quantize` / `compress eval` must meet on the second real model.
#
# Usage: bench/qwen_reference.sh [--chunks N] [--imatrix-chunks N] [--types Q4_K_M,Q3_K_M]
#                                [--sources shipped,f32] [--fresh]
#
# With the protocol of DESIGN.md (ctx 512, 2 threads, first N chunks of eval.txt):
#   a) llama-perplexity on the shipped GGUF: PPL ± error; its log-probabilities are
#      saved with --kl-divergence-base for b);
#   b) llama-imatrix on the first --imatrix-chunks (default 32) chunks of calib.txt,
#      from the shipped GGUF; llama-quantize --imatrix to each type (default Q4_K_M and
#      Q3_K_M) from each source; llama-perplexity --kl-divergence of each against the
#      saved base: PPL, mean KLD, p99 KLD, same top-1 %, file size in MB (1e6 bytes).
# Sources: `shipped` quantizes the shipped GGUF itself (--allow-requantize); note that
# llama-quantize copies a tensor unchanged when the mix asks for the type it already
# has, so the shipped Q4_K_M-like file mostly passes through. `f32` first expands the
# shipped GGUF to F32 (llama-quantize ... F32, itself measured as a row: llama.cpp's
# rounding of activations only) and quantizes every tensor from that, as DESIGN.md's
# SmolLM2 reference does from its f32 base.
# Prints a table and writes bench/results/qwen_llama_cpp.json (with the time of each
# step, the tensor types llama.cpp reports for every file and what llama-quantize
# converted, copied or sent to a fallback type).
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
sources=shipped,f32
fresh=0
while [ $# -gt 0 ]; do
    case "$1" in
        --chunks) chunks="$2"; shift 2 ;;
        --imatrix-chunks) imatrix_chunks="$2"; shift 2 ;;
        --types) types="$2"; shift 2 ;;
        --sources) sources="$2"; shift 2 ;;
        --fresh) fresh=1; shift ;;
        -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
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

# kld NAME FILE: llama-perplexity --kl-divergence of FILE against the saved base.
kld() {
    step "kld-$1-n$chunks" "$work/kld-$1-n$chunks.log" \
        "$bin/llama-perplexity" -m "$2" -c "$ctx" -t "$threads" -lv 4 \
        --kl-divergence-base "$base_kld" --kl-divergence
}

IFS=, read -r -a type_list <<<"$types"
IFS=, read -r -a source_list <<<"$sources"
for src in "${source_list[@]}"; do
    case "$src" in
        shipped) from="$model"; suffix="" ;;
        f32)
            from="$work/f32.gguf"; suffix="-from-f32"
            step "dequantize-f32" "$from" \
                "$bin/llama-quantize" --allow-requantize "$model" "$from" F32 "$threads"
            kld "F32" "$from"
            ;;
        *) echo "qwen_reference: unknown source $src (shipped or f32)" >&2; exit 2 ;;
    esac
    for ty in "${type_list[@]}"; do
        name="$ty-imat$imatrix_chunks$suffix"
        step "quantize-$name" "$work/$name.gguf" \
            "$bin/llama-quantize" --allow-requantize --imatrix "$imatrix" "$from" "$work/$name.gguf" "$ty" "$threads"
        kld "$name" "$work/$name.gguf"
    done
done

python3 - "$work" "$model" "$chunks" "$imatrix_chunks" "$types" "$sources" "$root/bench/results/qwen_llama_cpp.json" <<'EOF'
import json, os, re, sys
from collections import Counter
from pathlib import Path

work, model, chunks, imatrix_chunks, types, sources, result_file = sys.argv[1:]
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
    """What llama-quantize did per tensor: which it converted (from->to), which it
    copied unchanged (their type), and which fell back to another type because
    their row length is not a multiple of the block (wanted->got)."""
    # (A notice such as "====== ...: did not find weights for X" may split a tensor's line.)
    converted, copied = Counter(), Counter()
    for m in re.finditer(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\w+), "
                         r"(?:\n=+ [^\n]*\n)?(?:converting to (\w+)|size)", log):
        src, dst = m.group(2).upper(), m.group(3)
        if dst:
            converted[f"{src}->{dst.upper()}"] += 1
        else:
            copied[src] += 1
    fallback = {}
    for m in re.finditer(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by \d+ "
                         r"\(required for type\s+(\w+)\) -> falling back to\s+(\w+)", log):
        fallback[m.group(1)] = f"{m.group(2).upper()}->{m.group(3).upper()}"
    m = re.search(r"quant size\s+=\s+([0-9.]+) MiB \(([0-9.]+) BPW\)", log)
    return {"converted": dict(sorted(converted.items())), "n_converted": sum(converted.values()),
            "copied_unchanged": dict(sorted(copied.items())), "n_copied": sum(copied.values()),
            "fallbacks": dict(sorted(Counter(fallback.values()).items())), "n_fallback": len(fallback),
            "quant_size_mib": float(m.group(1)) if m else None, "bpw": float(m.group(2)) if m else None}


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

runs = []  # (label, source, imatrix, file stem, quantize step or None)
for src in sources.split(","):
    suffix = "" if src == "shipped" else f"-from-{src}"
    if src == "f32":
        runs.append(("F32", "f32", False, "f32", "dequantize-f32", "F32"))
    for ty in types.split(","):
        stem = f"{ty}-imat{imatrix_chunks}{suffix}"
        runs.append((ty, src, True, stem, f"quantize-{stem}", stem))

rows = []
for ty, src, imat_used, stem, q, kname in runs:
    k = f"kld-{kname}-n{chunks}"
    qlog, klog = read(q), read(k)
    path = work / f"{stem}.gguf"
    p, pe = find(r"Mean PPL\(Q\)\s*:\s*" + NUM + r"\s*±\s*" + NUM, klog, "Mean PPL(Q)")
    pb, _ = find(r"Mean PPL\(base\)\s*:\s*" + NUM + r"\s*±\s*" + NUM, klog, "Mean PPL(base)")
    kl, kle = find(r"Mean\s+KLD:\s*" + NUM + r"\s*±\s*" + NUM, klog, "Mean KLD")
    (p99,) = find(r"99\.0%\s+KLD:\s*" + NUM, klog, "99.0% KLD")
    (kmax,) = find(r"Maximum KLD:\s*" + NUM, klog, "Maximum KLD")
    (kmed,) = find(r"Median\s+KLD:\s*" + NUM, klog, "Median KLD")
    top, tope = find(r"Same top p:\s*" + NUM + r"\s*±\s*" + NUM + " %", klog, "Same top p")
    rms, _ = find(r"RMS Δp\s*:\s*" + NUM + r"\s*±\s*" + NUM + " %", klog, "RMS Δp")
    timings[q.replace("-", "_") + "_s"] = secs(q)
    timings[k.replace("-", "_") + "_s"] = secs(k)
    rows.append({
        "type": ty, "source": src, "imatrix": imat_used, "file": path.name,
        "bytes": path.stat().st_size, "mb": path.stat().st_size / 1e6, "kld_step": k,
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
                 "note_ppl_base_in_kld_run": "llama-perplexity stores the base log-probabilities as 16-bit "
                                             "codes clamped at max logit - 16, so the PPL(base) a KLD run reports "
                                             "is a little lower than the base run's exact Final estimate; "
                                             "each row's ppl is its own exact value",
                 "quantize": "llama-quantize --allow-requantize --imatrix; source `shipped`: the shipped "
                             "GGUF (tensors already of the target type are copied unchanged), source `f32`: "
                             "the shipped GGUF expanded to F32 by llama-quantize"},
    "base": {"ppl": ppl, "ppl_err": ppl_err},
    "imatrix": imat,
    "rows": rows,
    "timings_s": timings,
}
result_file.parent.mkdir(parents=True, exist_ok=True)
result_file.write_text(json.dumps(result, indent=2) + "\n")

print(f"\nQwen2.5-Coder-0.5B-Instruct, llama.cpp, ctx 512, {chunks} chunks of eval.txt, 2 threads; "
      f"imatrix from {imatrix_chunks} chunks of calib.txt")
print(f"{'type':<8}{'from':<9}{'imat':<6}{'MB':>8}{'PPL':>17}{'mean KLD':>10}{'p99 KLD':>9}{'top1 %':>8}"
      f"{'quant s':>8}{'KLD s':>7}")
print(f"{'(base)':<8}{'shipped':<9}{'-':<6}{result['model']['mb']:>8.1f}{ppl:>9.4f} ±{ppl_err:>6.3f}"
      f"{'':>10}{'':>9}{'':>8}{'':>8}{timings['base_perplexity_and_logits_s']:>7.0f}")
for r in rows:
    qs = timings[f"quantize_{r['file'][:-5]}_s".replace("-", "_")] if r["imatrix"] else timings["dequantize_f32_s"]
    print(f"{r['type']:<8}{r['source']:<9}{'yes' if r['imatrix'] else 'no':<6}{r['mb']:>8.1f}{r['ppl']:>9.4f} "
          f"±{r['ppl_err']:>6.3f}{r['kld_mean']:>10.4f}{r['kld_p99']:>9.3f}{r['top1']:>8.1f}{qs:>8.0f}"
          f"{timings[r['kld_step'].replace('-', '_') + '_s']:>7.0f}")
print(f"tensor types (shipped): {result['model']['tensor_types']}")
for r in rows:
    qi = r["quantize"]
    print(f"{r['type']} from {r['source']}: types {r['tensor_types']}; converted {qi['n_converted']} "
          f"{qi['converted']}; copied {qi['n_copied']} {qi['copied_unchanged']}; fallbacks {qi['fallbacks']}")
print(f"wrote {result_file}; timings (s) {timings}")
EOF
