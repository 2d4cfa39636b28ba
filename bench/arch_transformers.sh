#!/usr/bin/env bash
# Does HF transformers load the HF folders we write for every architecture, and
# compute what we compute from them? For each fixture in tests/fixtures/arch/,
# `compress` writes four folders whose config.json and tensors our writer makes
# (for the mixtures of experts in tests/fixtures/moe/: the first, with the
# experts split back into one tensor each, and `experts`):
#   convert  the llama.cpp GGUF converted back to HF (`compress convert`; llama3's
#            GGUF carries its rope scaling as a tensor HF cannot hold, so its
#            HF folder is converted instead);
#   heads    2 query heads cut from every block (`compress prune --heads 2`);
#   layers   one block cut (`--layers 1`: layer types, windows and NoPE layers
#            renumbered);
#   width    a quarter of the hidden width cut (`--width 0.25`: Gemma 3's
#            embedding scale compensated);
#   experts  half the routed experts of every block cut (`--experts E/2`, by
#            REAP saliency; the router keeps the survivors' rows);
#   distilled  (Qwen3-MoE, Mixtral, OLMoE) the fixture pruned to 50% by
#            magnitude, then distilled from it with the router frozen
#            (`compress distill`, 4096 tokens);
# then `compress eval` and transformers (scripts/check_transformers_ppl.py, eager
# attention, f32) measure each folder's perplexity with llama-perplexity's
# protocol on the first CHUNKS chunks of CTX tokens of the evaluation text. CTX
# (64) is longer than the fixtures' windows (8), so the windows count.
#
# Usage: bench/arch_transformers.sh [--ctx 64] [--chunks 8] [ARCH...]
#
# Needs target/release/compress, the assets (compress fetch) and the torch venv
# (scripts/setup-torch-venv.sh). Prints a Markdown table and writes
# bench/results/arch_transformers.json. About 2 minutes on 2 cores.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ctx=64 chunks=8 arches=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ctx) ctx="$2"; shift 2 ;;
        --chunks) chunks="$2"; shift 2 ;;
        -*) echo "arch_transformers: unknown option $1" >&2; exit 2 ;;
        *) arches+=("$1"); shift ;;
    esac
done
[ ${#arches[@]} -gt 0 ] || arches=(llama3 qwen2 qwen3 mistral smollm3 olmo2 gemma3 qwen3_moe mixtral olmoe llama4 deepseek_v3)

compress="$root/target/release/compress"
python="${COMPRESS_TORCH_VENV:-$root/.cache/venv-torch}/bin/python"
cache="${COMPRESS_CACHE:-$HOME/.cache/compress}"
[ -x "$compress" ] || { echo "arch_transformers: $compress missing: cargo build --release -p compress" >&2; exit 1; }
[ -x "$python" ] || { echo "arch_transformers: $python missing: scripts/setup-torch-venv.sh" >&2; exit 1; }
for f in eval.txt calib.txt; do
    [ -f "$cache/$f" ] || { echo "arch_transformers: $cache/$f missing: compress fetch" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rows="$work/rows.jsonl"
: >"$rows"
calib=(--calib "$cache/calib.txt" --samples 4 --seq 64)
for arch in "${arches[@]}"; do
    src="tests/fixtures/arch/$arch"
    kinds=(convert heads layers width)
    if [ ! -d "$src" ]; then
        src="tests/fixtures/moe/$arch"
        kinds=(convert experts distilled)
        # Distillation lacks Llama 4's chunked attention and DeepSeek's latent
        # attention; DeepSeek's fixture has expert groups of 2, of which none
        # may go.
        [ "$arch" = llama4 ] && kinds=(convert experts)
        [ "$arch" = deepseek_v3 ] && kinds=(convert)
    fi
    [ -d "$src" ] || { echo "arch_transformers: no fixture $arch in tests/fixtures/arch or moe" >&2; exit 1; }
    run() { "$compress" "$@" >"$work/stage.log" 2>&1 || { cat "$work/stage.log" >&2; exit 1; }; }
    if [ "$arch" = llama3 ]; then
        run convert "$src" -o "$work/$arch-convert"
    else
        run convert "$src/model.gguf" -o "$work/$arch-convert"
    fi
    if [ "${#kinds[@]}" -eq 1 ]; then
        :
    elif [ "${kinds[1]}" = experts ]; then
        half=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print((c.get("num_experts") or c.get("n_routed_experts") or c["num_local_experts"]) // 2)' "$src/config.json")
        run prune "$src" --experts "$half" "${calib[@]}" -o "$work/$arch-experts"
        if [ "${kinds[2]:-}" = distilled ]; then
            run prune "$src" --method magnitude --sparsity 0.5 -o "$work/$arch-pruned"
            run distill --teacher "$src" --student "$work/$arch-pruned" --text "$cache/calib.txt" \
                --tokens 4096 --seq 64 --batch 2 --lr 3e-3 -o "$work/$arch-distilled"
        fi
    else
        run prune "$src" --heads 2 "${calib[@]}" -o "$work/$arch-heads"
        run prune "$src" --layers 1 "${calib[@]}" -o "$work/$arch-layers"
        run prune "$src" --width 0.25 "${calib[@]}" -o "$work/$arch-width"
    fi
    for kind in "${kinds[@]}"; do
        dir="$work/$arch-$kind"
        ours=$("$compress" eval --text "$cache/eval.txt" --ctx "$ctx" --chunks "$chunks" --json "$dir" 2>/dev/null)
        theirs=$("$python" scripts/check_transformers_ppl.py --text "$cache/eval.txt" --ctx "$ctx" --chunks "$chunks" "$dir")
        python3 - "$arch" "$kind" "$ours" "$theirs" >>"$rows" <<'EOF'
import json, sys
arch, kind, ours, theirs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
p = ours["perplexity"]
if p["bos"]:
    sys.exit(f"{arch} {kind}: the model adds BOS; check_transformers_ppl.py does not")
if p["text_tokens"] != theirs["text_tokens"]:
    sys.exit(f"{arch} {kind}: {p['text_tokens']} tokens ours, {theirs['text_tokens']} transformers'")
print(json.dumps({"arch": arch, "artifact": kind, "model_type": theirs["model_type"],
                  "ppl_ours": p["perplexity"], "ppl_transformers": theirs["perplexity"]}))
EOF
    done
done

mkdir -p bench/results
python3 - "$rows" "$ctx" "$chunks" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| fixture | artifact | HF model_type | PPL ours | PPL transformers | relative difference |")
print("|---|---|---|---|---|---|")
for r in rows:
    r["rel_diff"] = abs(r["ppl_ours"] - r["ppl_transformers"]) / r["ppl_transformers"]
    print(f"| {r['arch']} | {r['artifact']} | {r['model_type']} | {r['ppl_ours']:.3f} | "
          f"{r['ppl_transformers']:.3f} | {r['rel_diff']:.1e} |")
json.dump({"ctx": int(sys.argv[2]), "chunks": int(sys.argv[3]), "rows": rows},
          open("bench/results/arch_transformers.json", "w"), indent=1)
print("wrote bench/results/arch_transformers.json")
EOF
