#!/usr/bin/env bash
# Does llama.cpp run the GGUF files we write for every architecture, and compute
# what we compute from them? For each fixture in tests/fixtures/arch/ and
# tests/fixtures/moe/ (tiny random-weight models made by HF transformers), `compress quantize` writes an F32
# and a Q8_0 GGUF from the HF folder; `compress eval` and llama.cpp's own
# `llama-perplexity` then measure each file's perplexity on the first CHUNKS
# chunks of CTX tokens of the evaluation text. Equal perplexities mean llama.cpp
# loaded our metadata and tensors and computes the model we read from them.
#
# Usage: bench/arch_llama_cpp.sh [--ctx 64] [--chunks 8] [--kv f16|f32] [ARCH...]
#
# --kv f16 (the default) is llama.cpp's default KV cache; --kv f32 keeps it in
# f32 with flash attention off, so that what is left is llama.cpp's activation
# rounding (8-bit activations in its Q8_0 dot products; ggml's CPU GELU goes
# through an f16 table). Needs target/release/compress (cargo build --release -p compress), the
# evaluation text (compress fetch) and llama.cpp's tools
# (scripts/build-llama-cpp.sh). Prints a Markdown table and writes
# bench/results/arch_llama_cpp.json (with --kv f32: arch_llama_cpp_kv_f32.json).
# About 1 minute on 2 cores.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ctx=64 chunks=8 kv=f16 arches=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ctx) ctx="$2"; shift 2 ;;
        --chunks) chunks="$2"; shift 2 ;;
        --kv) kv="$2"; shift 2 ;;
        -*) echo "arch_llama_cpp: unknown option $1" >&2; exit 2 ;;
        *) arches+=("$1"); shift ;;
    esac
done
[ ${#arches[@]} -gt 0 ] || arches=(llama3 qwen2 qwen3 mistral smollm3 olmo2 gemma3 qwen3_moe mixtral olmoe llama4 deepseek_v3)

compress="$root/target/release/compress"
llama="${LLAMA_CPP_DIR:-$root/.cache/llama.cpp}/bin/llama-perplexity"
text="${COMPRESS_CACHE:-$HOME/.cache/compress}/eval.txt"
[ -x "$compress" ] || { echo "arch_llama_cpp: $compress missing: cargo build --release -p compress" >&2; exit 1; }
[ -x "$llama" ] || { echo "arch_llama_cpp: $llama missing: scripts/build-llama-cpp.sh" >&2; exit 1; }
[ -f "$text" ] || { echo "arch_llama_cpp: $text missing: compress fetch" >&2; exit 1; }
case "$kv" in
    f32) kv_args=(-ctk f32 -ctv f32 -fa off) ;;
    f16) kv_args=() ;;
    *) echo "arch_llama_cpp: --kv is f32 or f16, not $kv" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
[ -n "${KEEP_WORK:-}" ] && trap - EXIT
rows="$work/rows.jsonl"
: >"$rows"
for arch in "${arches[@]}"; do
    src="tests/fixtures/arch/$arch"
    [ -d "$src" ] || src="tests/fixtures/moe/$arch"
    [ -d "$src" ] || { echo "arch_llama_cpp: no fixture $arch in tests/fixtures/arch or moe" >&2; exit 1; }
    for type in F32 Q8_0; do
        gguf="$work/$arch-$type.gguf"
        "$compress" quantize "$src" --type "$type" -o "$gguf" >"$work/quantize.log" 2>&1 ||
            { cat "$work/quantize.log" >&2; exit 1; }
        ours=$("$compress" eval --text "$text" --ctx "$ctx" --chunks "$chunks" --json "$gguf" 2>/dev/null |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["perplexity"]["perplexity"])')
        log="$work/$arch-$type.log"
        # Seen here on a loaded machine: llama-perplexity exiting 0 after its first
        # chunk, without its final line (dense and MoE files alike); retried.
        theirs=
        for _ in 1 2 3; do
            "$llama" -m "$gguf" -f "$text" -c "$ctx" --chunks "$chunks" -t 2 "${kv_args[@]}" >"$log" 2>&1 ||
                { tail -n 20 "$log" >&2; echo "arch_llama_cpp: llama-perplexity failed on $arch $type" >&2; exit 1; }
            theirs=$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$log")
            [ -z "$theirs" ] || break
        done
        [ -n "$theirs" ] || { tail -n 20 "$log" >&2; echo "arch_llama_cpp: no final estimate for $arch $type" >&2; exit 1; }
        notes=$(grep '^note:' "$work/quantize.log" | tr '\n' ' ' || true)
        python3 - "$arch" "$type" "$ours" "$theirs" "$notes" >>"$rows" <<'EOF'
import json, sys
arch, typ, ours, theirs, notes = sys.argv[1:]
print(json.dumps({"arch": arch, "type": typ, "ppl_ours": float(ours),
                  "ppl_llama_cpp": float(theirs), "notes": notes.strip()}))
EOF
    done
done

mkdir -p bench/results
python3 - "$rows" "$ctx" "$chunks" "$kv" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ctx, chunks, kv = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(f"| fixture | type | PPL ours | PPL llama.cpp | ours / llama.cpp |")
print("|---|---|---|---|---|")
for r in rows:
    r["ratio"] = r["ppl_ours"] / r["ppl_llama_cpp"]
    print(f"| {r['arch']} | {r['type']} | {r['ppl_ours']:.2f} | {r['ppl_llama_cpp']:.2f} | {r['ratio']:.4f} |")
out = {"ctx": ctx, "chunks": chunks, "llama_cpp_kv_cache": kv, "rows": rows}
path = "bench/results/arch_llama_cpp.json" if kv == "f16" else f"bench/results/arch_llama_cpp_kv_{kv}.json"
json.dump(out, open(path, "w"), indent=1)
print(f"wrote {path}")
EOF
