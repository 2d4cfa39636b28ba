#!/usr/bin/env bash
# Real loaders, not our readers: every kind of compressed-tensors folder that
# `compress` writes, loaded by HF transformers with the compressed-tensors
# package (CPU torch, the venv of scripts/setup-torch-venv.sh), and its
# perplexity on the evaluation text computed by transformers beside `compress
# eval` on the same folder. Both run the dequantized weights in f32, so the two
# must agree to 0.1% (float summation order is the only difference).
#
# Not part of the default test run (several minutes on 2 cores; needs the torch
# venv): bash scripts/check-engines.sh [CHUNKS]   (default 8 chunks of 512)
# Prints a table and writes bench/results/check_engines.json.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
chunks="${1:-8}"
py="${COMPRESS_TORCH_VENV:-.cache/venv-torch}/bin/python"
[[ -x $py ]] || { echo "check-engines: $py is missing: run scripts/setup-torch-venv.sh" >&2; exit 1; }
cargo build --release -q -p compress
compress="$repo/target/release/compress"
text="$("$compress" fetch --json | "$py" -c 'import json,sys; print(json.load(sys.stdin)["eval"])')"
work="$repo/.cache/check-engines"
rm -rf "$work"
mkdir -p "$work" bench/results

# name | why transformers refuses it, when that is upstream's doing | the
# command's arguments after the model
cases=(
    "rtn-w4-g64||quantize --method rtn --bits 4 --format compressed-tensors"
    "rtn-w4-asym-g32|transformers 5.23 with compressed-tensors 0.20 expects the zero points unpacked though the pack-quantized compressor packs them (llm-compressor issue 1618: its own asymmetric folders fail alike)|quantize --method rtn --bits 4 --group 32 --asym --format compressed-tensors"
    "rtn-w8-channel||quantize --method rtn --bits 8 --group -1 --format compressed-tensors"
    "gptq-w4-g64-actorder||quantize --method gptq --bits 4 --group 64 --act-order --samples 16 --seq 256 --format compressed-tensors"
    "awq-w4-g64||quantize --method awq --bits 4 --group 64 --samples 16 --seq 256 --format compressed-tensors"
    "wanda-sparse-bitmask-50|compressed-tensors 0.15 and later no longer decompress sparse-bitmask folders: transformers leaves the block linears uninitialised, with no error|prune --method wanda --sparsity 0.5 --samples 16 --seq 256 --format compressed-tensors"
    "sparsegpt-sparse-24|compressed-tensors 0.15 and later no longer decompress sparse-bitmask folders: transformers leaves the block linears uninitialised, with no error|prune --method sparsegpt --nm 2:4 --samples 16 --seq 256 --format compressed-tensors"
)
rows=()
for c in "${cases[@]}"; do
    name="${c%%|*}"
    rest="${c#*|}"
    known="${rest%%|*}"
    read -r -a args <<<"${rest#*|}"
    out="$work/$name"
    echo "check-engines: $name: compress ${args[*]}" >&2
    "$compress" "${args[0]}" asset:smollm2 "${args[@]:1}" -o "$out" 2>"$work/$name.log"
    ours=$("$compress" eval "$out" --text "$text" --ctx 512 --chunks "$chunks" --json 2>/dev/null |
        "$py" -c 'import json,sys; print(json.load(sys.stdin)["perplexity"]["perplexity"])')
    theirs=$("$py" scripts/check_transformers_ppl.py --text "$text" --ctx 512 --chunks "$chunks" "$out" 2>"$work/$name.transformers.log" |
        "$py" -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])' 2>/dev/null) || theirs="refused"
    format=$("$py" -c 'import json,sys; q=json.load(open(sys.argv[1]))["quantization_config"]; print((q.get("sparsity_config") or {}).get("format") or q.get("format"))' "$out/config.json")
    rows+=("$name|$format|$ours|$theirs|$known")
done

"$py" - "$chunks" "${rows[@]}" <<'EOF'
import json, sys
chunks, rows = int(sys.argv[1]), [r.split("|") for r in sys.argv[2:]]
out, failed = [], 0
print(f"{'folder':<26} {'format':<18} {'compress eval':>13} {'transformers':>13} {'ratio':>9}")
for name, fmt, ours, theirs, known in rows:
    ratio = None if theirs == "refused" else float(theirs) / float(ours)
    agrees = ratio is not None and abs(ratio - 1) <= 1e-3
    # A folder upstream cannot load is no failure of ours, however it fails.
    ok = agrees or bool(known)
    if agrees:
        status = "ok"
    elif known:
        status = f"{'refused' if ratio is None else 'misloaded'} (upstream: {known})"
    else:
        status = "FAIL"
    failed += not ok
    shown = "refused" if ratio is None else f"{float(theirs):.4f}"
    print(f"{name:<26} {fmt:<18} {float(ours):>13.4f} {shown:>13} {'-' if ratio is None else f'{ratio:.6f}':>9} {status}")
    out.append({"folder": name, "format": fmt, "compress_ppl": float(ours),
                "transformers_ppl": None if ratio is None else float(theirs), "ratio": ratio,
                "ok": ok, "upstream_refusal": (known or None) if not agrees else None})
json.dump({"model": "SmolLM2-135M-Instruct", "ctx": 512, "chunks": chunks, "folders": out},
          open("bench/results/check_engines.json", "w"), indent=1)
agreed = sum(r["ok"] and not r["upstream_refusal"] for r in out)
print(f"{agreed} of {len(rows)} folders loaded by transformers with the same perplexity (0.1%); "
      f"{len(rows) - agreed - failed} known upstream gaps; {failed} failures")
sys.exit(1 if failed else 0)
EOF
