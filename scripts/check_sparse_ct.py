"""Independent decompression of a compressed-tensors sparse folder (sparse-bitmask
or sparse-24-bitmask), written from the format's description with numpy and the
safetensors package, compared with a dense folder of the same weights.

Usage: check_sparse_ct.py COMPRESSED_DIR DENSE_DIR   (f32 or f16 weights: numpy has no bfloat16)

Prints JSON {"format", "tensors", "mismatches": [...]}; every dense tensor must
equal the decompressed one bit for bit.
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

comp_dir, dense_dir = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((comp_dir / "config.json").read_text())
sparsity = config["quantization_config"]["sparsity_config"]
fmt = sparsity["format"]
comp = load_file(str(comp_dir / "model.safetensors"))
dense = load_file(str(dense_dir / "model.safetensors"))


def decompress(prefix):
    shape = [int(v) for v in comp[prefix + ".shape"].reshape(-1)]
    values = comp[prefix + ".compressed"].reshape(-1)
    bits = np.unpackbits(comp[prefix + ".bitmask"], axis=-1, count=shape[-1], bitorder="little").astype(bool)
    if fmt == "sparse-bitmask":
        counts = bits.sum(axis=1)
        offsets = np.cumsum(counts) - counts
        assert (offsets == comp[prefix + ".row_offsets"]).all(), prefix + ": row_offsets"
    else:
        assert comp[prefix + ".compressed"].shape == (shape[0], shape[1] // 2), prefix + ": 2:4 values shape"
        assert (bits.reshape(shape[0], -1, 4).sum(axis=2) == 2).all(), prefix + ": not two per group"
    out = np.zeros(shape, dtype=values.dtype)
    out[bits] = values
    return out


mismatches = []
for name, want in dense.items():
    prefix = name[: -len(".weight")] if name.endswith(".weight") else name
    got = decompress(prefix) if prefix + ".compressed" in comp else comp.get(name)
    if got is None or got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != want.tobytes():
        mismatches.append(name)
print(json.dumps({"format": fmt, "structure": sparsity["sparsity_structure"], "tensors": len(dense),
                  "mismatches": mismatches}))
