"""Independent check of an integer-quantized HF folder (GPTQ v1 or compressed-tensors
pack-quantized) written by `model::hf_quant::HfQuantWriter`, with numpy only.

Usage: check_gptq.py FOLDER REFERENCE.safetensors

Reads FOLDER/config.json and FOLDER/model.safetensors, checks the
quantization_config fields, unpacks every quantized linear following the
published conventions (GPTQ: AutoGPTQ's qweight/qzeros layout, zero points stored
minus one, 3-bit values straddling int32 words; compressed-tensors: pack_to_int32
along rows, offset 2^(bits-1), zero points packed along the output dimension),
dequantizes each in f32 as f32(scale) * (code - zero) and compares the result
bit for bit with REFERENCE, an f32 safetensors holding the expected dequantized
weight of every linear under its HF name (`<prefix>.weight`).

Prints one summary line, then OK, or FAIL with the problems and exit status 1.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

folder, reference = Path(sys.argv[1]), sys.argv[2]
cfg = json.loads((folder / "config.json").read_text())
qc = cfg.get("quantization_config")
failures = []


def fail(msg):
    failures.append(msg)


def finish(summary):
    print(summary)
    if failures:
        print(f"FAIL ({len(failures)} problems): " + "; ".join(failures[:12]))
        sys.exit(1)
    print("OK")
    sys.exit(0)


if not isinstance(qc, dict):
    fail("config.json has no quantization_config object")
    finish("nothing checked")


def want(key, ok, what, obj=qc, where="quantization_config"):
    if key not in obj:
        fail(f"{where}.{key} is missing")
        return None
    if not ok(obj[key]):
        fail(f"{where}.{key} is {obj[key]!r}, expected {what}")
    return obj[key]


is_bool = lambda v: isinstance(v, bool)  # noqa: E731
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731

method = qc.get("quant_method")
if method == "gptq":
    fmt = "gptq"
    bits = want("bits", lambda v: v in (2, 3, 4, 8), "2, 3, 4 or 8")
    group_size = want("group_size", lambda v: is_int(v) and (v == -1 or v > 0), "-1 or positive")
    desc_act = want("desc_act", is_bool, "a bool")
    sym = want("sym", is_bool, "a bool")
    want("damp_percent", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a fraction")
    want("true_sequential", is_bool, "a bool")
    static_groups = want("static_groups", is_bool, "a bool")
    want("checkpoint_format", lambda v: v == "gptq", "'gptq' (v1)")
    permuted = bool(desc_act) and not static_groups
    per_channel = group_size == -1
elif method == "compressed-tensors":
    fmt = "compressed-tensors"
    want("format", lambda v: v == "pack-quantized", "'pack-quantized'")
    want("quantization_status", lambda v: v == "compressed", "'compressed'")
    want("ignore", lambda v: isinstance(v, list) and "lm_head" in v, "a list with lm_head")
    want("sparsity_config", lambda v: v is None or v == {}, "null")
    groups = want("config_groups", lambda v: isinstance(v, dict) and len(v) == 1, "one group") or {}
    group = next(iter(groups.values()), {})
    want("targets", lambda v: v == ["Linear"], "['Linear']", group, "config_groups.group")
    for act in ("input_activations", "output_activations"):
        if group.get(act) is not None:
            fail(f"{act} is set: not a weight-only scheme")
    w = group.get("weights") or {}
    bits = want("num_bits", lambda v: v in (2, 4, 8), "2, 4 or 8", w, "weights")
    want("type", lambda v: v == "int", "'int'", w, "weights")
    sym = want("symmetric", is_bool, "a bool", w, "weights")
    strategy = want("strategy", lambda v: v in ("group", "channel"), "group or channel", w, "weights")
    per_channel = strategy == "channel"
    if per_channel:
        group_size = want("group_size", lambda v: v is None or v == -1, "null", w, "weights")
    else:
        group_size = want("group_size", lambda v: is_int(v) and v > 0, "positive", w, "weights")
    actorder = want("actorder", lambda v: v in (None, "group", "weight"), "null, group or weight", w, "weights")
    desc_act = actorder is not None
    permuted = actorder == "group"
    if permuted and per_channel:
        fail("actorder group with strategy channel")
else:
    fail(f"quant_method {method!r} is neither gptq nor compressed-tensors")
    finish("nothing checked")

if failures:
    finish(f"format={fmt}: quantization_config is inconsistent")
mask = (1 << bits) - 1
half = 1 << (bits - 1)

# AutoGPTQ's shift table for 3-bit: 32 values in 3 words, value 10 and 21 split.
WF3 = np.array(
    [
        [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
        [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
        [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0],
    ],
    dtype=np.uint32,
)


def gptq_unpack_dim0(words):
    """GPTQ: int32 [R, C] packed along dim 0, LSB first -> uint32 [R*32/bits, C]."""
    words = words.view(np.uint32)
    rows, cols = words.shape
    if bits == 3:
        w = words.reshape(rows // 3, 3, 1, cols) >> WF3.reshape(1, 3, 12, 1)
        w[:, 0, 10] = (w[:, 0, 10] & 0x3) | ((w[:, 1, 0] << 2) & 0x4)
        w[:, 1, 11] = (w[:, 1, 11] & 0x1) | ((w[:, 2, 0] << 1) & 0x6)
        w &= 0x7
        w = np.concatenate([w[:, 0, :11], w[:, 1, 1:12], w[:, 2, 1:11]], axis=1)
        return w.reshape(rows // 3 * 32, cols)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, 1)
    return ((words.reshape(rows, 1, cols) >> shifts) & mask).reshape(rows * per, cols)


def ct_unpack_dim1(words, n):
    """compressed-tensors pack_to_int32: int32 [R, W] packed along dim 1 -> unsigned [R, n]."""
    words = words.view(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, 1, per)
    vals = (words[:, :, None] >> shifts) & mask
    return vals.reshape(words.shape[0], -1)[:, :n]


st = safe_open(str(folder / "model.safetensors"), framework="numpy")
ref = safe_open(reference, framework="numpy")
names = set(st.keys())
marker = ".qweight" if fmt == "gptq" else ".weight_packed"
prefixes = sorted(n[: -len(marker)] for n in names if n.endswith(marker))
ref_names = set(ref.keys())
# REFERENCE may also hold the dense tensors (as `compress convert` writes a whole
# model): those are checked below against the folder's f16 copies.
expected_prefixes = sorted(n[: -len(".weight")] for n in ref_names if n not in names)
if prefixes != expected_prefixes:
    fail(f"quantized linears {len(prefixes)} differ from REFERENCE's {len(expected_prefixes)}: "
         f"{sorted(set(prefixes) ^ set(expected_prefixes))[:4]}")
if not prefixes:
    fail("no quantized linear found")

parts = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}[fmt]
used = set()
compared = 0
for p in prefixes:
    t = {s: st.get_tensor(f"{p}.{s}") for s in parts if f"{p}.{s}" in names}
    used.update(f"{p}.{s}" for s in t)
    try:
        if fmt == "gptq":
            qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
            assert qweight.dtype == np.int32 and qzeros.dtype == np.int32, "qweight/qzeros not int32"
            assert scales.dtype == np.float16 and g_idx.dtype == np.int32, "scales not f16 or g_idx not int32"
            n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
            n_groups = 1 if per_channel else math.ceil(n_in / group_size)
            assert g_idx.shape == (n_in,), f"g_idx {g_idx.shape} for {n_in} inputs"
            assert scales.shape == (n_groups, n_out), f"scales {scales.shape}, expected {(n_groups, n_out)}"
            assert qzeros.shape == (n_groups, n_out * bits // 32), f"qzeros {qzeros.shape}"
            codes = gptq_unpack_dim0(qweight)  # [in, out]
            stored = gptq_unpack_dim0(np.ascontiguousarray(qzeros.T)).T  # [groups, out]
            assert not (stored == mask).any(), "a stored zero - 1 is 2^bits - 1 (zero point 0)"
            zeros = stored + 1
            if sym:
                assert (zeros == half).all(), "symmetric but a zero point is not 2^(bits-1)"
            assert ((g_idx >= 0) & (g_idx < n_groups)).all(), "g_idx out of range"
            g = g_idx.astype(np.int64)
            trivial = np.array_equal(g, np.arange(n_in) // (n_in if per_channel else group_size))
            assert permuted or trivial, "g_idx is permuted but desc_act/static_groups say it is not"
            w = scales[g, :].astype(np.float32) * (codes.astype(np.int32) - zeros[g, :].astype(np.int32)).astype(np.float32)
            got = np.ascontiguousarray(w.T)
        else:
            packed, scale, shape = t["weight_packed"], t["weight_scale"], t["weight_shape"]
            assert packed.dtype == np.int32 and scale.dtype == np.float16, "weight_packed/weight_scale dtypes"
            assert shape.shape == (2,), "weight_shape is not [2]"
            n_out, n_in = (int(x) for x in shape)
            n_groups = 1 if per_channel else math.ceil(n_in / group_size)
            assert packed.shape == (n_out, math.ceil(n_in * bits / 32)), f"weight_packed {packed.shape}"
            assert scale.shape == (n_out, n_groups), f"weight_scale {scale.shape}"
            q = ct_unpack_dim1(packed, n_in).astype(np.int32) - half  # signed, as compressed-tensors
            if sym:
                assert "weight_zero_point" not in t, "symmetric scheme stores a zero point"
                zp = np.zeros((n_out, n_groups), dtype=np.int32)
            else:
                zpp = t["weight_zero_point"]
                assert zpp.dtype == np.int32 and zpp.shape == (math.ceil(n_out * bits / 32), n_groups), \
                    f"weight_zero_point {zpp.dtype} {zpp.shape}"
                zp = ct_unpack_dim1(np.ascontiguousarray(zpp.T), n_out).T.astype(np.int32) - half
            if permuted:
                g_idx = t.get("weight_g_idx")
                assert g_idx is not None and g_idx.dtype == np.int32 and g_idx.shape == (n_in,), "weight_g_idx"
                assert ((g_idx >= 0) & (g_idx < n_groups)).all(), "weight_g_idx out of range"
                g = g_idx.astype(np.int64)
            else:
                assert "weight_g_idx" not in t, "weight_g_idx without actorder group"
                g = np.arange(n_in) // (n_in if per_channel else group_size)
            got = scale[:, g].astype(np.float32) * (q - zp[:, g]).astype(np.float32)
        want_w = ref.get_tensor(f"{p}.weight")
        assert want_w.dtype == np.float32 and want_w.shape == got.shape, \
            f"REFERENCE is {want_w.dtype} {want_w.shape}, unpacked {got.shape}"
        diff = got.view(np.uint32) != want_w.view(np.uint32)
        if diff.any():
            o, i = np.argwhere(diff)[0]
            raise AssertionError(f"{int(diff.sum())} values differ, first at ({o}, {i}): "
                                 f"{got[o, i]!r} vs REFERENCE {want_w[o, i]!r}")
        compared += 1
    except (AssertionError, KeyError) as e:
        fail(f"{p}: {e}")

# Everything else is a dense f16 tensor under an HF name.
dense_compared = 0
for n in sorted(names - used):
    meta = st.get_slice(n)
    if meta.get_dtype() != "F16" or not n.endswith(".weight"):
        fail(f"{n} is {meta.get_dtype()}, expected a dense F16 weight")
    elif n in ref_names:
        got, want_ = st.get_tensor(n).astype(np.float32), ref.get_tensor(n)
        if got.shape != want_.shape or not np.array_equal(got.view(np.uint32), want_.astype(np.float32).view(np.uint32)):
            fail(f"{n}: dense weight differs from REFERENCE")
        else:
            dense_compared += 1

finish(
    f"format={fmt} bits={bits} group_size={group_size} sym={sym} desc_act={desc_act} "
    f"permuted_g_idx={permuted}: {compared} of {len(prefixes)} linears equal REFERENCE exactly"
    + (f", and {dense_compared} dense tensors" if dense_compared else "")
)
