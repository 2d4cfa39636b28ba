#!/usr/bin/env python3
"""Cross-checks our dequantization against gguf-py, bit for bit.

Usage: check_dequant.py DIR

DIR holds, per GGML type name TYPE (e.g. Q4_K), `TYPE.bin` (raw blocks of that
type) and `TYPE.f32` (our dequantization of them, little-endian f32). Each .bin is
dequantized with `gguf.quants.dequantize` and compared as uint32 bit patterns (so
NaNs and signed zeros compare exactly). Prints one line per type; exits 1 on any
mismatch or missing pair, 2 on bad usage.
"""

import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


def check(bin_path: Path) -> bool:
    name = bin_path.stem
    ours_path = bin_path.with_suffix(".f32")
    try:
        qtype = GGMLQuantizationType[name]
    except KeyError:
        print(f"{name}: FAIL unknown GGML type name")
        return False
    if not ours_path.exists():
        print(f"{name}: FAIL missing {ours_path.name}")
        return False
    raw = np.frombuffer(bin_path.read_bytes(), dtype=np.uint8)
    ours = np.frombuffer(ours_path.read_bytes(), dtype="<f4")
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if raw.size % block_bytes != 0:
        print(f"{name}: FAIL {raw.size} bytes is not a whole number of {block_bytes}-byte blocks")
        return False
    ref = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(-1)
    if ref.size != ours.size:
        print(f"{name}: FAIL element count: gguf-py {ref.size}, ours {ours.size}")
        return False
    ref_bits = ref.astype("<f4").view(np.uint32)
    our_bits = ours.view(np.uint32)
    bad = np.flatnonzero(ref_bits != our_bits)
    blocks = raw.size // block_bytes
    if bad.size:
        i = int(bad[0])
        print(
            f"{name}: FAIL {bad.size} of {ref.size} elements differ; first at {i} "
            f"(block {i // block_elems}): gguf-py {ref[i]!r} (0x{int(ref_bits[i]):08x}), "
            f"ours {ours[i]!r} (0x{int(our_bits[i]):08x})"
        )
        return False
    print(f"{name}: OK {ref.size} elements ({blocks} blocks) bit-identical")
    return True


def main() -> int:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: check_dequant.py DIR", file=sys.stderr)
        return 2
    bins = sorted(Path(sys.argv[1]).glob("*.bin"))
    if not bins:
        print(f"FAIL no *.bin files in {sys.argv[1]}")
        return 1
    print(f"gguf-py {version('gguf')}, numpy {np.__version__}")
    results = [check(b) for b in bins]
    ok = sum(results)
    print(f"{ok} of {len(results)} types bit-identical")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
