#!/usr/bin/env bash
# Larger than memory: a synthetic Llama-3-8B-shaped checkpoint (sharded bf16
# safetensors, about 16 GB; bench/gen_llama8b.py) through the streaming stages,
# each measured for wall time and peak anonymous memory (RssAnon, not counting
# the memory-mapped weights) by bench/peak_anon.py. Writes
# bench/results/larger_than_memory.json (…-Nlayer.json for --layers N) and deletes the checkpoint and the
# outputs afterwards (--keep keeps them). Not part of the default tests.
#
# usage: bench/larger_than_memory.sh [--layers N] [--only q4km,imatrix,wanda,gptq]
#                                     [--dir DIR] [--keep]
# (--layers 1: the embedding, one 8B-shaped block and the head, 2.5 GB: a quick check)
set -euo pipefail
cd "$(dirname "$0")/.."
layers=32
only="q4km,imatrix,wanda,gptq"
dir="${TMPDIR:-/tmp}/compress-llama8b"
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
py=.cache/venv/bin/python
[ -x "$py" ] || py=python3
cargo build --release -q -p compress
bin=target/release/compress
calib=asset:calib
model="$dir/model-$layers"
if [ ! -f "$model/config.json" ] || ! grep -q "\"num_hidden_layers\": $layers" "$model/config.json"; then
  rm -rf "$model" "$dir/tokenizer"
  mkdir -p "$dir/tokenizer"
  # A real tokenizer for the synthetic weights: SmolLM2's, exported by convert.
  $bin convert asset:smollm2 -o "$dir/tokenizer/model.safetensors" --dtype bf16 2>/dev/null
  $py bench/gen_llama8b.py "$model" "$dir/tokenizer" --layers "$layers"
fi
out="$dir/out"
rm -rf "$out" && mkdir -p "$out" bench/results
results=()
run() {
  local label="$1"; shift
  if [[ ",$only," == *",$label,"* ]]; then
    results+=("$($py bench/peak_anon.py "$label" -- "$@")")
    echo "${results[-1]}"
  fi
}
run q4km $bin quantize "$model" --type Q4_K_M -o "$out/q4km.gguf"
run imatrix $bin imatrix "$model" --text "$calib" --chunks 16 --ctx 256 -o "$out/imatrix.gguf"
run wanda $bin prune "$model" --method wanda --sparsity 0.5 --calib "$calib" --samples 16 --seq 256 -o "$out/wanda"
run gptq $bin quantize "$model" --method gptq --bits 4 --group 128 --calib "$calib" --samples 16 --seq 256 -o "$out/gptq"
size=$(du -sb "$model" | cut -f1)
json=bench/results/larger_than_memory.json
[ "$layers" = 32 ] || json="bench/results/larger_than_memory-${layers}layer.json"
printf '%s\n' "${results[@]}" | $py -c "
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
# A partial run (--only) keeps the earlier results of the stages it did not rerun.
try:
    old = json.load(open('$json'))
    if old.get('layers') == $layers:
        rerun = {r['label'] for r in rows}
        rows = [r for r in old['runs'] if r['label'] not in rerun] + rows
except FileNotFoundError:
    pass
print(f\"{'stage':10} {'seconds':>9} {'RssAnon GB':>11} {'RSS GB':>8}\")
for r in rows:
    print(f\"{r['label']:10} {r['seconds']:9.1f} {r['peak_rss_anon_bytes']/1e9:11.2f} {r['peak_rss_bytes']/1e9:8.2f}\")
json.dump({'layers': $layers, 'checkpoint_bytes': $size, 'runs': rows},
          open('$json', 'w'), indent=1)
"
if [ "$keep" = 0 ]; then rm -rf "$dir"; fi
