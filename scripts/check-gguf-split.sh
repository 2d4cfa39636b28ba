#!/usr/bin/env bash
# Usage: scripts/check-gguf-split.sh [TYPE] [SIZE]
#
# Checks `compress quantize --split-max-size` against llama.cpp's own
# llama-gguf-split on SmolLM2 (default Q8_0 in files of at most 60M): our split
# files must be byte-identical to llama-gguf-split's split of our single file,
# `llama-gguf-split --merge` of ours must equal its merge of its own, and
# llama-perplexity must load our split and give the single file's perplexity
# (2 chunks). Prints one line per check; exit 1 on the first that fails.
#
# Needs scripts/build-llama-cpp.sh (llama-gguf-split, llama-perplexity) and
# `cargo build --release -p compress` and `compress fetch` done first. About
# one minute on 2 cores.
set -euo pipefail
type="${1:-Q8_0}"
size="${2:-60M}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
split="$dir/bin/llama-gguf-split"
[ -x "$split" ] || { echo "check-gguf-split: $split missing; run scripts/build-llama-cpp.sh" >&2; exit 1; }
bin="$root/target/release/compress"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

"$bin" quantize asset:smollm2 --type "$type" -o single.gguf >/dev/null 2>&1
"$bin" quantize asset:smollm2 --type "$type" --split-max-size "$size" -o ours.gguf >/dev/null 2>&1
if ! "$split" --split --split-max-size "$size" single.gguf theirs >/dev/null 2>&1; then
    echo "FAIL: llama-gguf-split refused to split at $size (it stops when a tensor is larger than the limit; ours gives such a tensor a file of its own)"
    exit 1
fi
n=$(ls ours-*.gguf | wc -l)
[ "$n" = "$(ls theirs-*.gguf | wc -l)" ] || { echo "FAIL: $n files of ours, $(ls theirs-*.gguf | wc -l) of llama-gguf-split's"; exit 1; }
for f in ours-*.gguf; do
    cmp -s "$f" "theirs${f#ours}" || { echo "FAIL: $f differs from theirs${f#ours}"; exit 1; }
done
echo "ok: $n split files byte-identical to llama-gguf-split --split-max-size $size"
"$split" --merge ours-00001-of-*.gguf merged-ours.gguf >/dev/null 2>&1
"$split" --merge theirs-00001-of-*.gguf merged-theirs.gguf >/dev/null 2>&1
cmp -s merged-ours.gguf merged-theirs.gguf || { echo "FAIL: the merges differ"; exit 1; }
echo "ok: llama-gguf-split --merge of ours = its merge of its own ($(stat -c %s merged-ours.gguf) bytes, the single file $(stat -c %s single.gguf): the merge adds split.no, split.tensors.count and split.count = 0)"
ppl() { "$root/scripts/llama-perplexity.sh" "$1" 2 | grep -o 'PPL = [0-9.]*'; }
a="$(ppl single.gguf)"; b="$(ppl ours-00001-of-*.gguf)"
[ "$a" = "$b" ] || { echo "FAIL: llama-perplexity single $a, split $b"; exit 1; }
echo "ok: llama-perplexity loads our split: $b, as the single file"
