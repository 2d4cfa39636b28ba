#!/usr/bin/env bash
# Writes kernels/tests/data/ggml_decode_vectors.bin: blocks of the GGUF types that
# PyPI's gguf-py cannot decode (NVFP4 = 40, Q1_0 = 41, Q2_0 = 42), each decoded by
# ggml's own `to_float` from the llama.cpp that scripts/build-llama-cpp.sh builds.
# The kernels crate's tests decode the same blocks and must match bit for bit, so
# CI checks against llama.cpp without building it.
#
# Blocks: NVFP4 64 blocks whose 256 sub-block scales are the bytes 0..=255 in
# order, random nibbles; Q1_0 and Q2_0 32 blocks each with random finite f16
# scales (either sign, some zero or subnormal) and random codes. Seeded: the file
# is the same on every run.
#
# File layout, per type: u32 type id, u32 block count, the blocks' bytes, then
# ggml's f32 output (little-endian).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/build-llama-cpp.sh >/dev/null
dir="${LLAMA_CPP_DIR:-.cache/llama.cpp}"
src="$dir/src/llama_cpp_python-0.3.36/vendor/llama.cpp"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cc -O1 -I"$src/ggml/include" scripts/ggml/ggml_dequant.c "$dir/build/ggml/src/libggml-base.a" \
    -lm -lpthread -lstdc++ -fopenmp -o "$work/ggml_dequant"
python3 - "$work" <<'PY'
import random, struct, subprocess, sys
work = sys.argv[1]
rng = random.Random(20261207)
def f16_scale():
    sign = 0x8000 if rng.random() < 0.5 else 0
    r = rng.randrange(64)
    mag = 0 if r == 0 else rng.randrange(1, 0x400) if r == 1 else (rng.randrange(2, 12) << 10) | rng.randrange(0x400)
    return struct.pack('<H', sign | mag)
out = bytearray()
for ty, elems, nbytes, blocks in [(40, 64, 36, 64), (41, 128, 18, 32), (42, 64, 18, 32)]:
    data = bytearray()
    for b in range(blocks):
        if ty == 40:
            data += bytes((4 * b + s) & 0xFF for s in range(4))
            data += bytes(rng.randrange(256) for _ in range(32))
        else:
            data += f16_scale() + bytes(rng.randrange(256) for _ in range(16))
    open(f"{work}/in", "wb").write(data)
    n = blocks * elems
    subprocess.run([f"{work}/ggml_dequant", str(ty), str(n), f"{work}/in", f"{work}/out"], check=True)
    floats = open(f"{work}/out", "rb").read()
    assert len(floats) == 4 * n
    out += struct.pack('<II', ty, blocks) + data + floats
open("kernels/tests/data/ggml_decode_vectors.bin", "wb").write(out)
print(f"wrote kernels/tests/data/ggml_decode_vectors.bin ({len(out)} bytes)")
PY
