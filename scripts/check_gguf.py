"""Independent check of our GGUF reader with gguf-py (the `gguf` PyPI package).

Usage: check_gguf.py MODEL.gguf DUMP_DIR

DUMP_DIR holds what our reader saw: `tensors.json` (name, type id, dims innermost
first, data offset relative to the data section, metadata keys with their value
type ids) and `<name>.f32` files with our dequantization of some tensors in GGUF
storage order. Everything must match gguf-py exactly (floats bit for bit).
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

model, dump = sys.argv[1], Path(sys.argv[2])
reader = GGUFReader(model)
ours = json.loads((dump / "tensors.json").read_text())
failures = []

data_start = min(int(t.data_offset) for t in reader.tensors)
theirs = [
    {"name": t.name, "type": int(t.tensor_type), "dims": [int(d) for d in t.shape],
     "offset": int(t.data_offset) - data_start}
    for t in reader.tensors
]
if ours["tensors"] != theirs:
    failures.append("tensor infos differ")
keys = {k: [int(x) for x in f.types] for k, f in reader.fields.items() if not k.startswith("GGUF.")}
if ours["metadata"] != keys:
    failures.append(f"metadata keys/types differ: ours {len(ours['metadata'])}, theirs {len(keys)}")

by_name = {t.name: t for t in reader.tensors}
for f in sorted(dump.glob("*.f32")):
    name = f.name[: -len(".f32")]
    t = by_name[name]
    ref = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    got = np.fromfile(f, dtype="<f4")
    same = got.shape == ref.shape and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    print(f"{name:28s} {t.tensor_type.name:5s} {ref.size:9d} values {'bit-exact' if same else 'DIFFER'}")
    if not same:
        failures.append(f"{name} values differ")

print(f"{len(theirs)} tensors, {len(keys)} metadata keys compared")
if failures:
    print("FAIL: " + "; ".join(failures))
    sys.exit(1)
print("OK")
