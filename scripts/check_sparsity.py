"""Independent check of a pruned model's sparsity with gguf-py or the safetensors
package (numpy), not our reader.

Usage: check_sparsity.py MODEL(.gguf | folder with model.safetensors) [N:M]

Prints JSON: per block linear (q/k/v/o/gate/up/down projections) its fraction of
exact zeros and, with N:M, whether every group of M consecutive weights along a
row holds at least N zeros.
"""
import json
import sys
from pathlib import Path

import numpy as np

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
           "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

path = Path(sys.argv[1])
nm = tuple(int(v) for v in sys.argv[2].split(":")) if len(sys.argv) > 2 else None


def tensors():
    if path.suffix == ".gguf":
        from gguf import GGUFReader
        from gguf.quants import dequantize
        for t in GGUFReader(str(path)).tensors:
            yield t.name, np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    else:
        from safetensors.numpy import load_file
        for name, v in load_file(str(path / "model.safetensors")).items():
            yield name, v.astype(np.float32)


out = {}
for name, v in tensors():
    if v.ndim != 2 or not any(f".{k}." in name for k in LINEARS):
        continue
    entry = {"zero_fraction": float(np.mean(v == 0.0))}
    if nm:
        n, m = nm
        groups = (v.reshape(v.shape[0], -1, m) == 0.0).sum(axis=2)
        entry["nm_ok"] = bool((groups >= n).all())
    out[name] = entry
print(json.dumps(out))
