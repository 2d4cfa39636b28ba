#!/usr/bin/env bash
# Usage: scripts/llama-perplexity.sh MODEL.gguf [CHUNKS] [extra llama-perplexity args...]
#
# Runs llama.cpp's llama-perplexity on the project's evaluation text
# (${COMPRESS_CACHE:-$HOME/.cache/compress}/eval.txt) with the protocol of
# DESIGN.md: ctx 512, first CHUNKS (default 40) chunks, 2 threads, and prints its
# "Final estimate: PPL = ..." line. The full log goes to
# ${TMPDIR:-/tmp}/llama-perplexity.<model name>.log.
#
# The binary comes from scripts/build-llama-cpp.sh (${LLAMA_CPP_DIR:-.cache/llama.cpp}/bin);
# build it first. Takes about 5 minutes for 40 chunks of SmolLM2-135M (Q4_1 or f32)
# on 2 busy cores.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 MODEL.gguf [CHUNKS] [extra llama-perplexity args...]" >&2
    exit 2
fi
model="$1"
chunks="${2:-40}"
shift
[ $# -gt 0 ] && shift

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
exe="$dir/bin/llama-perplexity"
text="${COMPRESS_CACHE:-$HOME/.cache/compress}/eval.txt"

[ -x "$exe" ] || { echo "llama-perplexity: $exe missing; run scripts/build-llama-cpp.sh" >&2; exit 1; }
[ -f "$model" ] || { echo "llama-perplexity: model $model not found" >&2; exit 1; }
[ -f "$text" ] || { echo "llama-perplexity: evaluation text $text not found (run compress fetch)" >&2; exit 1; }

log="${TMPDIR:-/tmp}/llama-perplexity.$(basename "$model" .gguf).log"
if ! "$exe" -m "$model" -f "$text" -c 512 --chunks "$chunks" -t 2 "$@" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "llama-perplexity: failed, full log in $log" >&2
    exit 1
fi
if ! grep -m1 'Final estimate' "$log" | sed 's/^.*Final estimate/Final estimate/'; then
    # Modes such as --kl-divergence print a statistics block instead.
    tail -n 40 "$log"
fi
