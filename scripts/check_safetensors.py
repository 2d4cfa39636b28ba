"""Independent check of `compress convert` output with the `safetensors` and
`gguf` PyPI packages.

Usage: check_safetensors.py OUT_DIR SOURCE.gguf

Loads OUT_DIR/model.safetensors with safetensors.numpy, dequantizes every tensor
of the GGUF with gguf-py, undoes llama.cpp's Q/K row permutation, and checks
that names (HF scheme), shapes and f32 values agree exactly, and that
config.json matches the GGUF hyperparameters.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

out, source = Path(sys.argv[1]), sys.argv[2]
st = load_file(out / "model.safetensors")
cfg = json.loads((out / "config.json").read_text())
reader = GGUFReader(source)
meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
expect_cfg = {
    "hidden_size": meta["llama.embedding_length"],
    "intermediate_size": meta["llama.feed_forward_length"],
    "num_hidden_layers": meta["llama.block_count"],
    "num_attention_heads": meta["llama.attention.head_count"],
    "num_key_value_heads": meta["llama.attention.head_count_kv"],
    "vocab_size": len(meta["tokenizer.ggml.tokens"]),
}
failures = [f"config {k}={cfg.get(k)} expected {v}" for k, v in expect_cfg.items() if cfg.get(k) != v]
if abs(cfg["rope_theta"] - meta["llama.rope.freq_base"]) > 1e-3:
    failures.append("rope_theta differs")

hf_of = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"model.layers.{layer}.{hf_of[kind]}.weight"


def unpermute(w, n_head):
    # llama.cpp's convert: w.reshape(n_head, 2, d/2, in).swapaxes(1, 2); invert it.
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


seen = set()
for t in reader.tensors:
    name = hf_name(t.name)
    seen.add(name)
    ref = dequantize(t.data, t.tensor_type).astype(np.float32)
    if t.name.endswith("attn_q.weight"):
        ref = unpermute(ref, heads)
    elif t.name.endswith("attn_k.weight"):
        ref = unpermute(ref, kv_heads)
    got = st.get(name)
    if got is None:
        failures.append(f"{name} missing")
        continue
    if got.dtype != np.float32 or got.shape != ref.shape or not np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
        failures.append(f"{name}: {got.dtype} {got.shape} differs from the GGUF's {ref.shape}")
extra = set(st) - seen
if extra:
    failures.append(f"unexpected tensors {sorted(extra)[:5]}")
print(f"{len(seen)} tensors compared against gguf-py, config checked")
if failures:
    print("FAIL: " + "; ".join(failures[:10]))
    sys.exit(1)
print("OK")
