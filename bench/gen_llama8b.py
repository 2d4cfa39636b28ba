#!/usr/bin/env python3
"""Writes a synthetic checkpoint with Llama-3-8B's shapes: sharded bf16
safetensors (about 16 GB), model.safetensors.index.json and config.json, and
the tokenizer files of TOKENIZER_DIR (a real tokenizer; its vocabulary is
smaller than the config's, as with padded vocabularies).

Weights are seeded Gaussian with the scale of a trained model's (std 0.02 for
the linears and the embedding, norm gains around 1), so activations stay in a
realistic range through 32 blocks. For the larger-than-memory benchmark
(bench/larger_than_memory.sh); nothing here is read by the tests.

usage: gen_llama8b.py OUT_DIR TOKENIZER_DIR [--seed 0] [--layers 32]
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 5 * 1024**3


def tensors(layers):
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_proj.weight", (FFN, HIDDEN)
        yield p + "mlp.up_proj.weight", (FFN, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, FFN)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def bf16_bytes(x):
    """float32 array to bf16 bytes, rounded to nearest even."""
    u = x.view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_shard(path, items, rng):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text.encode())
        for name, shape in items:
            n = int(np.prod(shape))
            if len(shape) == 1:
                values = (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
                f.write(bf16_bytes(values))
                continue
            done = 0
            while done < n:
                k = min(n - done, 1 << 24)
                f.write(bf16_bytes(0.02 * rng.standard_normal(k, dtype=np.float32)))
                done += k
            print(f"  {name} {shape}", file=sys.stderr, flush=True)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    shards, current, size = [], [], 0
    for name, shape in tensors(a.layers):
        n = int(np.prod(shape)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"{fname}: {len(items)} tensors", file=sys.stderr, flush=True)
        write_shard(os.path.join(a.out, fname), items, rng)
        for name, shape in items:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": a.layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(a.tokenizer_dir, name), os.path.join(a.out, name))
    print(f"wrote {a.out}: {total / 1e9:.2f} GB in {len(shards)} shards", file=sys.stderr)


if __name__ == "__main__":
    main()
