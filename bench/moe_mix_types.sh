#!/usr/bin/env bash
# Do our GGUF mixes pick llama.cpp's types for a mixture of exactly 8 experts
# (`llama_tensor_get_type`'s `n_expert == 8` rules: attn_k and attn_v in Q8_0,
# attn_output in Q5_K for the low-bit mixes)? Makes an 8-expert Mixtral from the
# 4-expert fixture (experts 4–7 perturbed copies, router rows added), writes it
# as an F32 GGUF with `compress quantize --type F32`, quantizes that with
# llama.cpp's `llama-quantize` and with `compress quantize` to each mix, and
# lists every tensor whose type differs (gguf-py reads both).
#
# Usage: bench/moe_mix_types.sh [MIX...]   (default Q4_0 Q4_K_M Q3_K_S Q2_K)
#
# Needs target/release/compress, the project venv (scripts/setup-python.sh) and
# llama.cpp's tools (scripts/build-llama-cpp.sh). A few seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mixes=("$@")
[ ${#mixes[@]} -gt 0 ] || mixes=(Q4_0 Q4_K_M Q3_K_S Q2_K)
compress="$root/target/release/compress"
python="$root/.cache/venv/bin/python"
quantize="${LLAMA_CPP_DIR:-$root/.cache/llama.cpp}/bin/llama-quantize"
for tool in "$compress" "$python" "$quantize"; do
    [ -x "$tool" ] || { echo "moe_mix_types: $tool missing (see the header)" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" - "$work/hf" <<'PY'
import json, os, shutil, sys
import numpy as np
from safetensors.numpy import load_file, save_file
src, dst = "tests/fixtures/moe/mixtral", sys.argv[1]
os.makedirs(dst)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{src}/{f}", dst)
rng = np.random.default_rng(0)
out = {}
for k, v in load_file(f"{src}/model.safetensors").items():
    out[k] = v
    if ".experts." in k:
        pre, rest = k.split(".experts.")
        e, tail = rest.split(".", 1)
        out[f"{pre}.experts.{int(e) + 4}.{tail}"] = (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype)
    if k.endswith("block_sparse_moe.gate.weight"):
        out[k] = np.concatenate([v, v[::-1] + rng.normal(0, 0.3, v.shape)]).astype(v.dtype)
save_file(out, f"{dst}/model.safetensors", metadata={"format": "pt"})
c = json.load(open(f"{src}/config.json"))
c["num_local_experts"] = 8
json.dump(c, open(f"{dst}/config.json", "w"))
PY
"$compress" quantize "$work/hf" --type F32 -o "$work/f32.gguf" >/dev/null 2>&1
for mix in "${mixes[@]}"; do
    "$quantize" "$work/f32.gguf" "$work/llama-$mix.gguf" "$mix" >"$work/lq.log" 2>&1 ||
        { cat "$work/lq.log" >&2; exit 1; }
    "$compress" quantize "$work/f32.gguf" --type "$mix" -o "$work/ours-$mix.gguf" >/dev/null 2>&1
done
"$python" - "$work" "${mixes[@]}" <<'PY'
import sys
from gguf import GGUFReader
work, mixes = sys.argv[1], sys.argv[2:]
print("| mix | attn_k · attn_v · attn_output (llama.cpp) | tensors | differing (llama.cpp → ours) |")
print("|---|---|---|---|")
for mix in mixes:
    a = {t.name: t.tensor_type.name for t in GGUFReader(f"{work}/llama-{mix}.gguf").tensors}
    b = {t.name: t.tensor_type.name for t in GGUFReader(f"{work}/ours-{mix}.gguf").tensors}
    diff = sorted({f"{a[n]} → {b.get(n)}" for n in a if a[n] != b.get(n)})
    count = sum(a[n] != b.get(n) for n in a)
    kvo = " · ".join(a[f"blk.0.{t}.weight"] for t in ("attn_k", "attn_v", "attn_output"))
    print(f"| {mix} | {kvo} | {len(a)} | {count}{': ' + ', '.join(diff) if diff else ''} |")
PY
