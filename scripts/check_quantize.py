#!/usr/bin/env python3
"""Checks our quantizers against gguf-py's.

Usage: check_quantize.py DIR

DIR holds `input.f32` (little-endian f32 rows), `meta.json` ({"row_len": N,
"types": [...]}), `importance.f32` (one weight per column) and, per GGML type name
TYPE, `TYPE.bin` (our quantization without importance), `TYPE.imat.bin` (with
the importance) and `TYPE.f32` (our own dequantization of TYPE.bin).

Per type:
  * gguf-py's `dequantize` of TYPE.bin must equal TYPE.f32 bit for bit (our bytes
    decode the same under an independent reader);
  * where gguf-py can quantize the type: for F32, F16, BF16 and Q8_0 (no search
    in either) our bytes must equal gguf-py's; for the others (Q4_0, Q4_1, Q5_0,
    Q5_1: gguf-py implements ggml's `_ref` rounding) our squared error must not
    exceed gguf-py's, summed over all rows;
  * for block types, the importance-weighted squared error of TYPE.imat.bin must
    be lower than that of TYPE.bin (or zero too, when TYPE.bin is lossless: data
    that already sits on the type's grid).

Prints one line per type ("TYPE: OK ..." or "TYPE: FAIL ..."); exits 1 on any
failure, 2 on bad usage.
"""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

# Types whose gguf-py quantization has no search: ours must match byte for byte.
EXACT = {"F32", "F16", "BF16", "Q8_0"}
FLOATS = {"F32", "F16", "BF16"}


def decode(raw: bytes, qtype: GGMLQuantizationType, shape) -> np.ndarray:
    data = np.frombuffer(raw, dtype=np.uint8)
    return np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(shape)


def check(d: Path, name: str, x: np.ndarray, imp: np.ndarray) -> bool:
    qtype = GGMLQuantizationType[name]
    ours = (d / f"{name}.bin").read_bytes()
    our_deq = np.frombuffer((d / f"{name}.f32").read_bytes(), dtype="<f4").reshape(x.shape)
    deq = decode(ours, qtype, x.shape)
    if not np.array_equal(deq.view(np.uint32), our_deq.view(np.uint32)):
        bad = int(np.count_nonzero(deq.view(np.uint32) != our_deq.view(np.uint32)))
        print(f"{name}: FAIL gguf-py decodes our bytes differently ({bad} elements)")
        return False
    err = float(np.sum((x.astype(np.float64) - deq) ** 2))
    scale = float(np.sqrt(np.sum(x.astype(np.float64) ** 2)))
    line = f"rel RMSE ours {np.sqrt(err) / scale:.5f}"
    ok = True

    try:
        ref = quantize(x, qtype)
    except NotImplementedError:
        ref = None
        line += " (gguf-py cannot quantize it)"
    if ref is not None:
        ref_bytes = np.ascontiguousarray(ref).tobytes()
        if name in EXACT:
            if ref_bytes != ours:
                a = np.frombuffer(ref_bytes, dtype=np.uint8)
                b = np.frombuffer(ours, dtype=np.uint8)
                first = int(np.flatnonzero(a != b)[0]) if a.size == b.size else -1
                print(f"{name}: FAIL bytes differ from gguf-py (first at byte {first})")
                return False
            line += ", bytes identical to gguf-py"
        else:
            ref_err = float(np.sum((x.astype(np.float64) - decode(ref_bytes, qtype, x.shape)) ** 2))
            line += f", gguf-py {np.sqrt(ref_err) / scale:.5f}"
            if ref_err > 0:
                line += f" ({100 * (err / ref_err - 1):+.1f}% MSE)"
            if err > ref_err:
                line += " WORSE than gguf-py"
                ok = False

    if name not in FLOATS:
        deq_w = decode((d / f"{name}.imat.bin").read_bytes(), qtype, x.shape)
        w = imp.astype(np.float64)[None, :]
        e_plain = float(np.sum(w * (x - deq) ** 2))
        e_w = float(np.sum(w * (x - deq_w) ** 2))
        if e_plain == 0:
            # Lossless without importance (data already on this grid): stay lossless.
            line += f", weighted error {e_w:.3g} with importance (0 without)"
            if e_w != 0:
                line += " NOT LOSSLESS"
                ok = False
        else:
            line += f", weighted error {100 * (e_w / e_plain - 1):+.1f}% with importance"
        if e_plain > 0 and not e_w < e_plain:
            line += " NOT LOWER"
            ok = False

    print(f"{name}: {'OK' if ok else 'FAIL'} {line}")
    return ok


def main() -> int:
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: check_quantize.py DIR", file=sys.stderr)
        return 2
    d = Path(sys.argv[1])
    meta = json.loads((d / "meta.json").read_text())
    row_len = int(meta["row_len"])
    x = np.frombuffer((d / "input.f32").read_bytes(), dtype="<f4").reshape(-1, row_len)
    imp = np.frombuffer((d / "importance.f32").read_bytes(), dtype="<f4")
    print(f"gguf-py {version('gguf')}, numpy {np.__version__}: {x.shape[0]} rows of {row_len}")
    results = [check(d, name, x, imp) for name in meta["types"]]
    print(f"{sum(results)} of {len(results)} types OK")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
