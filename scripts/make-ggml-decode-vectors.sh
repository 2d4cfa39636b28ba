#!/usr/bin/env bash
# Writes kernels/tests/data/ggml_decode_vectors.bin: blocks of the GGUF types that
# PyPI's gguf-py cannot decode (NVFP4 = 40, Q1_0 = 41, Q2_0 = 42), each decoded by
# ggml's own `to_float` from the llama.cpp that scripts/build-llama-cpp.sh builds.
# The kernels crate's tests decode the same blocks and must match bit for bit, so
# CI checks against llama.cpp without building it.
#
# Usage: scripts/make-ggml-decode-vectors.sh [REAL.gguf ...]
#
# Blocks: NVFP4 64 blocks whose 256 sub-block scales are the bytes 0..=255 in
# order, random nibbles; Q1_0 and Q2_0 32 blocks each with random finite f16
# scales (either sign, some zero or subnormal) and random codes. Seeded: the file
# is the same on every run. Each REAL.gguf given (e.g. SmolLM2 quantized by
# `compress quantize --type NVFP4|Q1_0|Q2_0`) adds the first 64 blocks of its first
# tensor of each of those types not found in an earlier file: real blocks, as our
# encoder writes them.
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
python3 - "$work" "$@" <<'PY'
import random, struct, subprocess, sys
work = sys.argv[1]
real = sys.argv[2:]
rng = random.Random(20261207)
def f16_scale():
    sign = 0x8000 if rng.random() < 0.5 else 0
    r = rng.randrange(64)
    mag = 0 if r == 0 else rng.randrange(1, 0x400) if r == 1 else (rng.randrange(2, 12) << 10) | rng.randrange(0x400)
    return struct.pack('<H', sign | mag)
GEOMETRY = {40: (64, 36), 41: (128, 18), 42: (64, 18)}
records = []
for ty, blocks in [(40, 64), (41, 32), (42, 32)]:
    data = bytearray()
    for b in range(blocks):
        if ty == 40:
            data += bytes((4 * b + s) & 0xFF for s in range(4))
            data += bytes(rng.randrange(256) for _ in range(32))
        else:
            data += f16_scale() + bytes(rng.randrange(256) for _ in range(16))
    records.append((ty, blocks, bytes(data)))
def gguf_tensors(path):
    # (name, type, data offset) of each tensor: just enough of GGUF v3 to find them.
    f = open(path, "rb").read()
    assert f[:4] == b"GGUF", path
    n_t, n_kv = struct.unpack_from("<QQ", f, 8)
    o = 24
    def string(o):
        n, = struct.unpack_from("<Q", f, o)
        return f[o + 8:o + 8 + n].decode(), o + 8 + n
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def value(t, o):
        if t == 8:
            return string(o)[1]
        if t == 9:
            et, n = struct.unpack_from("<IQ", f, o)
            o += 12
            for _ in range(n):
                o = value(et, o)
            return o
        return o + sizes[t]
    align = 32
    for _ in range(n_kv):
        k, o = string(o)
        t, = struct.unpack_from("<I", f, o)
        if k == "general.alignment":
            align, = struct.unpack_from("<I", f, o + 4)
        o = value(t, o + 4)
    infos = []
    for _ in range(n_t):
        name, o = string(o)
        nd, = struct.unpack_from("<I", f, o)
        o += 4 + 8 * nd
        t, off = struct.unpack_from("<IQ", f, o)
        o += 12
        infos.append((name, t, off))
    start = (o + align - 1) // align * align
    return f, [(n, t, start + off) for n, t, off in infos]
done = set()
for path in real:
    f, infos = gguf_tensors(path)
    for ty in GEOMETRY:
        hit = next(((n, off) for n, t, off in infos if t == ty), None)
        if hit and ty not in done:
            done.add(ty)
            nbytes = GEOMETRY[ty][1]
            records.append((ty, 64, f[hit[1]:hit[1] + 64 * nbytes]))
            print(f"{path}: 64 blocks of {hit[0]} ({ty})")
out = bytearray()
for ty, blocks, data in records:
    elems = GEOMETRY[ty][0]
    open(f"{work}/in", "wb").write(data)
    n = blocks * elems
    subprocess.run([f"{work}/ggml_dequant", str(ty), str(n), f"{work}/in", f"{work}/out"], check=True)
    floats = open(f"{work}/out", "rb").read()
    assert len(floats) == 4 * n
    out += struct.pack('<II', ty, blocks) + data + floats
open("kernels/tests/data/ggml_decode_vectors.bin", "wb").write(out)
print(f"wrote kernels/tests/data/ggml_decode_vectors.bin ({len(out)} bytes)")
PY
