#!/usr/bin/env python3
"""Writes tiny random-weight mixture-of-experts reference fixtures (issue 18).

For each of qwen3_moe (Qwen3MoeForCausalLM), mixtral (MixtralForCausalLM), olmoe
(OlmoeForCausalLM), deepseek_v3 (DeepseekV3ForCausalLM, GGUF `deepseek2`) and llama4
(Llama4ForCausalLM with a Llama4TextConfig) it writes tests/fixtures/moe/<name>/:

  config.json             as transformers 5 save_pretrained writes it
  config.v4.json          the same config in the transformers 4 layout
  model.safetensors       f32 weights in the layout of the real checkpoints on the HF
                          hub (per-expert tensors; Llama 4: its fused 3-D tensors), which
                          is what transformers 5.23 save_pretrained writes by default
  tokenizer.json          the byte-level BPE of tests/fixtures/arch (vocabulary 384)
  tokenizer_config.json
  reference.safetensors   tokens / tokens_starved (I32) and transformers' logits /
                          logits_starved (F32 [T, 384]); per MoE layer the router logits,
                          the experts chosen and their weights, and the per-expert token
                          counts, as transformers computes them
  reference.json          the counts, the GGUF keys and MoE tensor names, the checks'
                          numbers, seeds and versions
  model.gguf              the same model converted by llama.cpp's own
                          convert_hf_to_gguf.py --outtype f32

`tokens` routes at least one token to every expert of every MoE layer; on
`tokens_starved` at least one expert of some MoE layer gets no token. Every routing
decision on both inputs has a margin (k-th minus (k+1)-th selection score) of at
least MIN_MARGIN, so float noise in another implementation cannot flip it.

Checks done here: transformers reloads model.safetensors with no missing/unexpected
keys, and the transformers-5 fused layout (save_original_format=False) gives the same
logits; the per-expert counts recomputed from the captured router logits (numpy,
float64, the routing rule written out below) equal the experts transformers' own
router chose; every GGUF tensor equals the HF tensor it comes from (stacked,
permuted, split or transposed as the converter does); and a float64 numpy forward
pass read only from model.gguf, as llama.cpp computes each architecture
(src/models/*.cpp, build_moe_ffn), gives transformers' logits and routing.

Run with the venv of scripts/setup-torch-venv.sh, from anywhere:

    .cache/venv-torch/bin/python scripts/make-moe-fixtures.py

Options: --out DIR (default tests/fixtures/moe), --only NAME (repeatable),
--llama-cpp DIR (llama.cpp source, as make-arch-fixtures.py), --llama-bin DIR
(optional: a built llama.cpp bin/ with llama-perplexity; compares its log-probs
on a text with transformers' and prints the result, writes nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_arch_module():
    """scripts/make-arch-fixtures.py, for its tokenizer (the same 384-token BPE as the
    dense fixtures), its llama.cpp source/converter helpers and its GGUF reader."""
    path = Path(__file__).resolve().parent / "make-arch-fixtures.py"
    spec = importlib.util.spec_from_file_location("make_arch_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mk = _load_arch_module()
VOCAB_SIZE = mk.VOCAB_SIZE

SEQ_LEN = 48          # `tokens`: every expert of every MoE layer gets >= 1 token
STARVED_LENS = (16, 12, 8)  # `tokens_starved`: the first length with a starved expert
MIN_MARGIN = 1e-3     # router logits (sigmoid scores for deepseek_v3: MIN_MARGIN / 4)

# Seeds: weights of architecture i use WEIGHT_SEED + i; the token search starts at
# TOKEN_SEED + 1000 * i (tokens) and STARVED_SEED + 1000 * i (tokens_starved).
WEIGHT_SEED = 20250601
TOKEN_SEED = 4242
STARVED_SEED = 9090

STD_MATRIX = 0.2      # every matrix, the 3-D expert tensors included
STD_NORM = 0.1        # norm weights: 1 + STD_NORM * N(0, 1)
STD_ROUTER = 0.3      # router (gate) weights: logits std ~ 0.3 * sqrt(64) = 2.4
STD_SCORE_BIAS = 0.2  # deepseek_v3 e_score_correction_bias (sigmoid scores are in (0, 1))

ARCHES = ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "llama4"]  # append only (seeds)
MODEL_CLASS = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama4": "Llama4ForCausalLM",
}
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe",
             "deepseek_v3": "deepseek2", "llama4": "llama4"}


def log(msg: str) -> None:
    print(msg, flush=True)


def dump_json(obj) -> str:
    """json.dumps(indent=2) with lists of numbers (and lists of such lists) kept on
    one line."""
    def scalar_list(v):
        return isinstance(v, list) and all(
            x is None or isinstance(x, (int, float, str)) or scalar_list(x) for x in v)

    def fmt(v, ind):
        pad = "  " * ind
        if isinstance(v, dict):
            if not v:
                return "{}"
            items = [f"{pad}  {json.dumps(k)}: {fmt(x, ind + 1)}" for k, x in v.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(v, list) and not scalar_list(v):
            items = [f"{pad}  {fmt(x, ind + 1)}" for x in v]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(v)

    return fmt(obj, 0) + "\n"


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------

COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, max_position_embeddings=128,
              hidden_act="silu", bos_token_id=0, eos_token_id=0, pad_token_id=None,
              tie_word_embeddings=False)


def make_config(name: str):
    import transformers as tf

    if name == "qwen3_moe":
        # head_dim 24 != hidden/heads = 16 (q_proj 64 -> 96), like Qwen3-30B-A3B's 128 vs 64.
        # mlp_only_layers stays [] : llama.cpp's qwen3moe has no dense layers (it
        # requires ffn_gate_inp in every block), so a GGUF with one would not load.
        return tf.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, intermediate_size=64, moe_intermediate_size=32, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], rms_norm_eps=1e-6, attention_bias=False,
            use_sliding_window=False, sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "mixtral":
        return tf.MixtralConfig(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
            rms_norm_eps=1e-5, sliding_window=None, router_jitter_noise=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if name == "olmoe":
        # MHA (4/4): llama.cpp's olmoe wants attn_k_norm of length n_embd, i.e. no GQA.
        # rms_norm_eps 1e-5: llama.cpp's converter writes 1e-5 for OLMoE whatever the
        # config says (OlmoeModel.set_gguf_parameters).
        return tf.OlmoeConfig(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
            rms_norm_eps=1e-5, clip_qkv=None, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "deepseek_v3":
        # MLA sizes all different, so that no two GGUF lengths coincide: key_length
        # (kv_lora + rope) 32, value_length (kv_lora) 24, key_length_mla (nope + rope)
        # 20, value_length_mla 16, q_lora_rank 32, rope 8.
        # scoring_func / topk_method are not fields of transformers' DeepseekV3Config
        # (it always routes by sigmoid + bias, group-limited), but the hub's config.json
        # has them and llama.cpp's converter needs scoring_func (see DEEPSEEK_NOTE).
        return tf.DeepseekV3Config(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12,
            v_head_dim=16, rms_norm_eps=1e-6, rope_interleave=True, attention_bias=False,
            num_nextn_predict_layers=0, scoring_func="sigmoid", topk_method="noaux_tc",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "llama4":
        # Llama 4 Scout's text defaults: MoE every other block, chunked attention
        # (chunk 8192) on 3 of 4 layers and NoPE + temperature tuning on every 4th,
        # L2 q/k norm on the rope layers. llama.cpp hard-codes all of these.
        return tf.Llama4TextConfig(
            **COMMON, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=32, intermediate_size_mlp=48,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            rms_norm_eps=1e-5, use_qk_norm=True, attn_temperature_tuning=True,
            floor_scale=8192, attn_scale=0.1, attention_chunk_size=8192,
            no_rope_layer_interval=4, router_jitter_noise=0.0, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    raise ValueError(name)


def build_model(name: str, config):
    import torch
    import transformers as tf

    config._attn_implementation = "eager"
    if name != "llama4":
        config._experts_implementation = "eager"
    model = getattr(tf, MODEL_CLASS[name])(config).to(torch.float32)
    model.eval()
    return model


def load_hf(name: str, folder, **kw):
    """from_pretrained in float32 with eager attention and (where transformers has
    the choice) the eager per-expert loop."""
    import torch
    import transformers as tf

    extra = {} if name == "llama4" else {"experts_implementation": "eager"}
    out = getattr(tf, MODEL_CLASS[name]).from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager", **extra, **kw)
    (out[0] if isinstance(out, tuple) else out).eval()
    return out


def is_router(pname: str) -> bool:
    return pname.endswith(("mlp.gate.weight", "feed_forward.router.weight"))


def reinit(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + STD_NORM * noise)
            elif is_router(pname):
                p.copy_(STD_ROUTER * noise)
            elif p.dim() in (2, 3):
                p.copy_(STD_MATRIX * noise)
            else:
                raise ValueError(f"unexpected parameter {pname} {tuple(p.shape)}")
        for bname, b in sorted(model.named_buffers()):
            if bname.endswith("e_score_correction_bias"):
                b.copy_(STD_SCORE_BIAS * torch.randn(b.shape, generator=g, dtype=torch.float32))


# ---------------------------------------------------------------------------
# Routing, as transformers computes it (re-derived here from the router logits)
# ---------------------------------------------------------------------------

def moe_layers(name: str, config) -> list[int]:
    n = config.num_hidden_layers
    if name == "qwen3_moe":
        return [i for i in range(n) if i not in config.mlp_only_layers
                and (i + 1) % config.decoder_sparse_step == 0]
    if name == "deepseek_v3":
        return [i for i in range(n) if i >= config.first_k_dense_replace]
    if name == "llama4":
        return list(config.moe_layers)
    return list(range(n))


def n_experts(name: str, config) -> int:
    return config.n_routed_experts if name == "deepseek_v3" else config.num_local_experts


def router_module(name: str, model, layer: int):
    blk = model.model.layers[layer]
    return blk.feed_forward.router if name == "llama4" else blk.mlp.gate


def route(name: str, config, logits, bias=None):
    """Experts and weights from router logits [T, E] (float64), the rule of
    transformers 5.23's router of each architecture; also the selection margin.

    qwen3_moe, olmoe: p = softmax(logits); top-k of p; w = p[top-k], divided by
      their sum if norm_topk_prob (qwen3_moe true, olmoe false).
    mixtral: the same with the division always (= softmax over the top-k logits).
    deepseek_v3: s = sigmoid(logits); c = s + e_score_correction_bias; group score =
      sum of the 2 largest c of each of n_group groups (consecutive experts); keep the
      topk_group best groups; top-k of c in them; w = s[top-k] / (sum + 1e-20) if
      norm_topk_prob; w *= routed_scaling_factor.
    llama4: top-k of the logits; w = sigmoid(logit) (it scales the expert's input).
    Returns ids [T, k] (by decreasing score), weights [T, k], margin (min over tokens
    of the k-th minus the (k+1)-th selection score, and for deepseek_v3 also of the
    topk_group-th minus the next group score).
    """
    import numpy as np

    k = config.num_experts_per_tok
    T, E = logits.shape
    if name == "deepseek_v3":
        s = 1.0 / (1.0 + np.exp(-logits))
        c = s + bias[None, :]
        G, kg = config.n_group, config.topk_group
        grp = np.sort(c.reshape(T, G, E // G), axis=-1)[..., -2:].sum(-1)  # [T, G]
        gorder = np.argsort(-grp, axis=-1, kind="stable")
        gsorted = np.take_along_axis(grp, gorder, -1)
        gmargin = float((gsorted[:, kg - 1] - gsorted[:, kg]).min()) if kg < G else math.inf
        allowed = np.zeros((T, G), dtype=bool)
        np.put_along_axis(allowed, gorder[:, :kg], True, -1)
        masked = np.where(np.repeat(allowed, E // G, axis=1), c, -np.inf)
        order = np.argsort(-masked, axis=-1, kind="stable")
        ids = order[:, :k]
        srt = np.take_along_axis(masked, order, -1)
        margin = float((srt[:, k - 1] - srt[:, k]).min())
        w = np.take_along_axis(s, ids, -1)
        if config.norm_topk_prob:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * config.routed_scaling_factor
        return ids, w, min(margin, gmargin)
    order = np.argsort(-logits, axis=-1, kind="stable")
    ids = order[:, :k]
    srt = np.take_along_axis(logits, order, -1)
    margin = float((srt[:, k - 1] - srt[:, k]).min())
    if name == "llama4":
        w = 1.0 / (1.0 + np.exp(-np.take_along_axis(logits, ids, -1)))
        return ids, w, margin
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    w = np.take_along_axis(p, ids, -1)
    if name == "mixtral" or config.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return ids, w, margin


ROUTING_RULE = {
    "qwen3_moe": "p = softmax(router logits) over all experts; the top-k of p; "
                 "w = p[top-k] / sum(p[top-k]) (norm_topk_prob true); out = sum w * expert(x)",
    "mixtral": "p = softmax(router logits); the top-k of p; w = p[top-k] / sum(p[top-k]) "
               "(= softmax over the top-k logits); out = sum w * expert(x)",
    "olmoe": "p = softmax(router logits); the top-k of p; w = p[top-k], not renormalised "
             "(norm_topk_prob false); out = sum w * expert(x)",
    "deepseek_v3": "s = sigmoid(router logits); c = s + e_score_correction_bias; groups of "
                   "n_experts / n_group consecutive experts scored by the sum of their 2 largest c; "
                   "the topk_group best groups kept; the top-k of c among their experts; "
                   "w = s[top-k] / (sum(s[top-k]) + 1e-20) (norm_topk_prob true) * routed_scaling_factor; "
                   "out = sum w * expert(x) + shared_expert(x)",
    "llama4": "the top-k of the router logits; w = sigmoid(logit); "
              "out = sum expert(w * x) + shared_expert(x) (the weight scales the expert's input)",
}


def min_margin(name: str) -> float:
    return MIN_MARGIN / 4 if name == "deepseek_v3" else MIN_MARGIN


def run_hf(name: str, model, config, tokens):
    """transformers' logits [T, V] and, per MoE layer, the router's own outputs:
    logits [T, E] and the experts it chose [T, k] with their weights."""
    import numpy as np
    import torch

    captured = {}
    hooks = []
    for layer in moe_layers(name, config):
        def hook(mod, inp, out, layer=layer):
            captured[layer] = out
        hooks.append(router_module(name, model, layer).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    routers = {}
    k = config.num_experts_per_tok
    for layer, o in captured.items():
        if name == "llama4":
            scores, rlogits = o  # scores: sigmoid of the top-k logits, 0 elsewhere
            scores = scores.float().numpy()
            ids = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
            w = np.take_along_axis(scores, ids, -1)
            assert (np.count_nonzero(scores, axis=-1) == k).all()
        else:
            rlogits, w, ids = o
            w, ids = w.float().numpy(), ids.numpy()
        routers[layer] = {"logits": rlogits.float().numpy(), "ids": ids, "weights": w}
        if name == "deepseek_v3":
            routers[layer]["bias"] = router_module(name, model, layer).e_score_correction_bias.double().numpy()
    return out.logits[0].float().numpy(), routers


def analyse_routing(name: str, config, routers: dict):
    """Recomputes the routing from the captured router logits and checks it against
    the experts transformers chose. Returns {layer: (ids, weights, counts)}, margin."""
    import numpy as np

    E = n_experts(name, config)
    res, margin = {}, math.inf
    for layer, r in sorted(routers.items()):
        ids, w, m = route(name, config, r["logits"].astype(np.float64), r.get("bias"))
        margin = min(margin, m)
        if not (np.sort(ids, -1) == np.sort(r["ids"], -1)).all():
            bad = np.nonzero((np.sort(ids, -1) != np.sort(r["ids"], -1)).any(-1))[0]
            sys.exit(f"{name}: layer {layer}: recomputed experts differ from transformers' "
                     f"at tokens {bad.tolist()}")
        # transformers' weights, in our order (by decreasing selection score)
        pos = np.argsort(r["ids"], -1)
        hf_w = np.take_along_axis(np.take_along_axis(r["weights"], pos, -1),
                                  np.argsort(np.argsort(ids, -1), -1), -1)
        if not np.allclose(hf_w, w, rtol=1e-5, atol=1e-6):
            sys.exit(f"{name}: layer {layer}: recomputed weights differ from transformers': "
                     f"{np.abs(hf_w - w).max()}")
        counts = np.bincount(ids.ravel(), minlength=E)
        res[layer] = (ids.astype(np.int32), hf_w.astype(np.float32), counts)
    return res, margin


# ---------------------------------------------------------------------------
# Safetensors layouts
# ---------------------------------------------------------------------------

def hub_names(name: str, config) -> list[str]:
    """The tensor names of the checkpoint as the real models on the hub store them
    (Llama 4 with the `language_model.` prefix of Llama4ForConditionalGeneration
    removed: a text-only Llama4ForCausalLM)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    moe = set(moe_layers(name, config))
    E = n_experts(name, config)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if name == "deepseek_v3":
            names += [p + "self_attn." + t + ".weight" for t in (
                "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
                "kv_a_layernorm", "kv_b_proj", "o_proj")]
        else:
            names += [p + f"self_attn.{t}_proj.weight" for t in "qkvo"]
            if name in ("qwen3_moe", "olmoe"):
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if name == "mixtral":
            names += [p + "block_sparse_moe.gate.weight"]
            names += [p + f"block_sparse_moe.experts.{e}.w{j}.weight" for e in range(E) for j in (1, 2, 3)]
        elif name == "llama4":
            f = p + "feed_forward."
            if i in moe:
                names += [f + "router.weight", f + "experts.gate_up_proj", f + "experts.down_proj"]
                names += [f + f"shared_expert.{t}_proj.weight" for t in ("gate", "up", "down")]
            else:
                names += [f + f"{t}_proj.weight" for t in ("gate", "up", "down")]
        elif i in moe:
            names += [p + "mlp.gate.weight"]
            names += [p + f"mlp.experts.{e}.{t}_proj.weight" for e in range(E) for t in ("gate", "up", "down")]
            if name == "deepseek_v3":
                names += [p + "mlp.gate.e_score_correction_bias"]
                names += [p + f"mlp.shared_experts.{t}_proj.weight" for t in ("gate", "up", "down")]
        else:
            names += [p + f"mlp.{t}_proj.weight" for t in ("gate", "up", "down")]
    return sorted(names)


def layout_of(path: Path, layer: int) -> dict:
    """The MoE tensors of one layer: name (expert index written E) -> shape."""
    import re
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "np") as f:
        for k in sorted(f.keys()):
            if k.startswith(f"model.layers.{layer}.") and ("mlp" in k or "moe" in k or "feed_forward" in k):
                out[re.sub(r"\.experts\.\d+\.", ".experts.E.", k)] = list(f.get_slice(k).get_shape())
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# GGUF: tensors against HF, and a numpy forward pass as llama.cpp computes it
# ---------------------------------------------------------------------------

def expected_gguf(name: str, config, state: dict) -> dict:
    """GGUF tensor name -> (numpy array in HF order, how), from the hub-layout state."""
    import numpy as np

    exp = {"token_embd.weight": (state["model.embed_tokens.weight"], "as in HF"),
           "output_norm.weight": (state["model.norm.weight"], "as in HF"),
           "output.weight": (state["lm_head.weight"], "as in HF")}
    moe = set(moe_layers(name, config))
    E = n_experts(name, config)
    H = config.num_attention_heads
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        exp[b + "attn_norm.weight"] = (state[p + "input_layernorm.weight"], "as in HF")
        exp[b + "ffn_norm.weight"] = (state[p + "post_attention_layernorm.weight"], "as in HF")
        a = p + "self_attn."
        if name == "deepseek_v3":
            for hf, g in (("q_a_proj", "attn_q_a"), ("q_a_layernorm", "attn_q_a_norm"),
                          ("q_b_proj", "attn_q_b"), ("kv_a_proj_with_mqa", "attn_kv_a_mqa"),
                          ("kv_a_layernorm", "attn_kv_a_norm"), ("o_proj", "attn_output")):
                exp[b + g + ".weight"] = (state[a + hf + ".weight"], "as in HF")
            nope, vd = config.qk_nope_head_dim, config.v_head_dim
            kv_b = state[a + "kv_b_proj.weight"].reshape(H, nope + vd, -1)
            exp[b + "attn_k_b.weight"] = (np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)),
                                          "kv_b_proj rows of k_nope per head, transposed [H, kv_lora, nope]")
            exp[b + "attn_v_b.weight"] = (np.ascontiguousarray(kv_b[:, nope:]),
                                          "kv_b_proj rows of v per head [H, v_head_dim, kv_lora]")
        else:
            for t in "qkvo":
                w = state[a + f"{t}_proj.weight"]
                how = "as in HF"
                if name == "mixtral" and t in "qk":
                    heads = H if t == "q" else config.num_key_value_heads
                    w, how = mk.permute_llama(w, heads), "rows permuted (LlamaModel.permute)"
                exp[b + {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}[t] + ".weight"] = (w, how)
            if name in ("qwen3_moe", "olmoe"):
                exp[b + "attn_q_norm.weight"] = (state[a + "q_norm.weight"], "as in HF")
                exp[b + "attn_k_norm.weight"] = (state[a + "k_norm.weight"], "as in HF")
        if name == "mixtral":
            m = p + "block_sparse_moe."
            exp[b + "ffn_gate_inp.weight"] = (state[m + "gate.weight"], "as in HF")
            for j, g in ((1, "gate"), (3, "up"), (2, "down")):
                exp[b + f"ffn_{g}_exps.weight"] = (
                    np.stack([state[m + f"experts.{e}.w{j}.weight"] for e in range(E)]),
                    f"experts.E.w{j} stacked [E, out, in]")
        elif name == "llama4":
            f = p + "feed_forward."
            if i in moe:
                I = config.intermediate_size
                gu = state[f + "experts.gate_up_proj"]  # [E, hidden, 2I]
                exp[b + "ffn_gate_inp.weight"] = (state[f + "router.weight"], "as in HF")
                exp[b + "ffn_gate_exps.weight"] = (np.ascontiguousarray(gu[:, :, :I].transpose(0, 2, 1)),
                                                   "gate_up_proj[:, :, :I] transposed [E, I, hidden]")
                exp[b + "ffn_up_exps.weight"] = (np.ascontiguousarray(gu[:, :, I:].transpose(0, 2, 1)),
                                                 "gate_up_proj[:, :, I:] transposed [E, I, hidden]")
                exp[b + "ffn_down_exps.weight"] = (np.ascontiguousarray(
                    state[f + "experts.down_proj"].transpose(0, 2, 1)), "down_proj transposed [E, hidden, I]")
                for t in ("gate", "up", "down"):
                    exp[b + f"ffn_{t}_shexp.weight"] = (state[f + f"shared_expert.{t}_proj.weight"], "as in HF")
            else:
                for t in ("gate", "up", "down"):
                    exp[b + f"ffn_{t}.weight"] = (state[f + f"{t}_proj.weight"], "as in HF")
        elif i in moe:
            m = p + "mlp."
            exp[b + "ffn_gate_inp.weight"] = (state[m + "gate.weight"], "as in HF")
            for t in ("gate", "up", "down"):
                exp[b + f"ffn_{t}_exps.weight"] = (
                    np.stack([state[m + f"experts.{e}.{t}_proj.weight"] for e in range(E)]),
                    f"experts.E.{t}_proj stacked [E, out, in]")
            if name == "deepseek_v3":
                exp[b + "exp_probs_b.bias"] = (state[m + "gate.e_score_correction_bias"], "as in HF")
                for t in ("gate", "up", "down"):
                    exp[b + f"ffn_{t}_shexp.weight"] = (state[m + f"shared_experts.{t}_proj.weight"], "as in HF")
        else:
            for t in ("gate", "up", "down"):
                exp[b + f"ffn_{t}.weight"] = (state[p + f"mlp.{t}_proj.weight"], "as in HF")
    return exp


def check_gguf(name: str, folder: Path, config, state: dict) -> dict:
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(str(folder / "model.gguf"))
    keys = {k: mk.field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if keys.get("general.architecture") != GGUF_ARCH[name]:
        sys.exit(f"{name}: general.architecture = {keys.get('general.architecture')!r}")
    if keys.get("tokenizer.ggml.pre") != "gpt-2" or keys.get("tokenizer.ggml.model") != "gpt2":
        sys.exit(f"{name}: unexpected tokenizer keys")
    tensors = {t.name: t for t in r.tensors}
    for t in r.tensors:
        if t.tensor_type.name != "F32":
            sys.exit(f"{name}: {t.name} is {t.tensor_type.name}, want F32")
    exp = expected_gguf(name, config, state)
    hows = {}
    for g, (want, how) in sorted(exp.items()):
        if g not in tensors:
            sys.exit(f"{name}: model.gguf has no {g}")
        t = tensors[g]
        got = np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if got.shape != want.shape or not np.array_equal(got, want):
            sys.exit(f"{name}: {g} {got.shape} is not HF {how} {want.shape}")
        hows.setdefault(how, []).append(g)
    extra = sorted(set(tensors) - set(exp))
    if extra:
        sys.exit(f"{name}: model.gguf has tensors not accounted for: {extra}")
    log(f"{name}: all {len(exp)} GGUF tensors equal the HF ones ({', '.join(sorted(hows))})")
    return {"keys": keys, "tensors": {t.name: [int(x) for x in t.shape] for t in r.tensors}}


# What llama.cpp hard-codes per architecture in build_moe_ffn's arguments
# (src/models/<arch>.cpp @0c1e57098); deepseek2 reads them from the GGUF instead.
LLAMA_CPP_MOE = {
    "llama": {"gating": "softmax", "norm_w": True},
    "qwen3moe": {"gating": "softmax", "norm_w": True},
    "olmoe": {"gating": "softmax", "norm_w": False},
    "llama4": {"gating": "sigmoid", "norm_w": False},
}


def gguf_forward(path: Path, tokens, **opts):
    """A float64 numpy forward pass read only from model.gguf, as llama.cpp computes
    these five architectures. Returns (logits [T, V], {layer: expert ids [T, k]}).

    Attention: llama (Mixtral): rope NORM (adjacent pairs) on the converter-permuted
    Q/K rows; qwen3moe: RMS norm of each head of Q and K (attn_q_norm/attn_k_norm,
    length head_dim), then rope NEOX; olmoe: RMS norm over the whole Q and K
    projections (length n_embd), then rope NEOX; llama4: rope NORM (the rows as in HF,
    whose complex rope pairs adjacent dimensions) and then a weightless RMS ("L2")
    norm of each head on layers with (il + 1) % 4 != 0; the others have no rope and
    their Q scaled by 1 + 0.1 * log(floor((pos + 1) / 8192) + 1) (= 1 below 8191
    tokens); chunked attention with chunks of 8192 (no effect here); deepseek2: MLA,
    below.

    MoE (build_moe_ffn): logits = ffn_gate_inp @ x; probs = softmax(logits) or
    sigmoid(logits) (deepseek2: {arch}.expert_gating_func, 2 = sigmoid, absent =
    softmax); selection scores = probs + exp_probs_b (deepseek2) or the raw logits
    (llama4); if {arch}.expert_group_count > 1: keep the expert_group_used_count groups
    with the largest sum of their 2 best selection scores; top expert_used_count
    experts; w = probs of them; normalised to sum 1 if norm_w (llama, qwen3moe: always;
    olmoe, llama4: never; deepseek2: {arch}.expert_weights_norm); times
    {arch}.expert_weights_scale if present and not 0 or 1; out = sum_e w_e *
    down_e(silu(gate_e x) * up_e x), except llama4: sum_e down_e(silu(gate_e (w_e x)) *
    up_e (w_e x)); plus the shared expert (ffn_*_shexp) on x, unweighted.
    Dense blocks: deepseek2 blocks below leading_dense_block_count, llama4 blocks with
    (il + 1) % interleave_moe_layer_step != 0.

    opts (typical mistakes, for the mistakes table): norm_w, gating ("softmax" /
    "sigmoid"), no_probs_b, no_groups, group_max, bias_in_weights, w_scale,
    weight_after_ffn (llama4), all_rope (llama4), no_kq_norm (llama4).
    """
    import numpy as np

    r, kv, arch, T, hp = mk.load_gguf_f64(path)
    n_layer, n_embd = hp("block_count"), hp("embedding_length")
    n_head, n_kv = hp("attention.head_count"), hp("attention.head_count_kv")
    eps = hp("attention.layer_norm_rms_epsilon")
    base = hp("rope.freq_base", 10000.0)
    n_expert, k_used = hp("expert_count"), hp("expert_used_count")

    if arch == "deepseek2":
        moe_cfg = {"gating": {2: "sigmoid"}.get(hp("expert_gating_func"), "softmax"),
                   "norm_w": bool(hp("expert_weights_norm", False))}
        w_scale = hp("expert_weights_scale", 0.0) or 0.0
        groups, groups_used = hp("expert_group_count", 0) or 0, hp("expert_group_used_count", 0) or 0
    else:
        moe_cfg = dict(LLAMA_CPP_MOE[arch])
        w_scale, groups, groups_used = 0.0, hp("expert_group_count", 0) or 0, hp("expert_group_used_count", 0) or 0
    if "norm_w" in opts:
        moe_cfg["norm_w"] = opts["norm_w"]
    if "gating" in opts:
        moe_cfg["gating"] = opts["gating"]
    if "w_scale" in opts:
        w_scale = opts["w_scale"]
    if opts.get("no_groups"):
        groups = 0

    def rms(x, w=None):
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return y if w is None else y * w

    def lin(x, name):
        return x @ T[name + ".weight"].T

    def silu(g):
        return g / (1 + np.exp(-g))

    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)[:, None]

    def rope(x, n_rot, neox):  # x [n, heads, d]; rotates the first n_rot dims
        theta = pos * base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        x = x.copy()
        if neox:
            a, c = x[..., : n_rot // 2].copy(), x[..., n_rot // 2 : n_rot].copy()
            x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot] = a * cos - c * sin, a * sin + c * cos
        else:
            a, c = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
            x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * cos - c * sin, a * sin + c * cos
        return x

    causal = np.where(np.arange(n)[None, :] <= np.arange(n)[:, None], 0.0, -np.inf)

    def attend(q, k, v, scale):  # q [n, H, d], k [n, Hk, d], v [n, Hk, dv]
        H, Hk = q.shape[1], k.shape[1]
        out = np.empty((n, H, v.shape[2]))
        for h in range(H):
            s = (q[:, h] @ k[:, h // (H // Hk)].T) * scale + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, h] = (s / s.sum(-1, keepdims=True)) @ v[:, h // (H // Hk)]
        return out.reshape(n, -1)

    def moe(x, p):
        logits = x @ T[p + "ffn_gate_inp.weight"].T  # [n, E]
        if moe_cfg["gating"] == "sigmoid":
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
        sel = probs
        if p + "exp_probs_b.bias" in T and not opts.get("no_probs_b"):
            sel = probs + T[p + "exp_probs_b.bias"][None, :]
        if arch == "llama4":
            sel = logits
        if groups > 1:
            per = n_expert // groups
            sg = sel.reshape(n, groups, per)
            gs = sg.max(-1) if opts.get("group_max") else np.sort(sg, -1)[..., -2:].sum(-1)
            top_g = np.argsort(-gs, -1, kind="stable")[:, :groups_used]
            keep = np.zeros((n, groups), dtype=bool)
            np.put_along_axis(keep, top_g, True, -1)
            sel = np.where(np.repeat(keep, per, axis=1), sel, -np.inf)
        ids = np.argsort(-sel, -1, kind="stable")[:, :k_used]
        w = np.take_along_axis(probs, ids, -1)
        if opts.get("bias_in_weights"):
            w = w + T[p + "exp_probs_b.bias"][ids]
        if moe_cfg["norm_w"]:
            w = w / np.maximum(w.sum(-1, keepdims=True), 6.103515625e-5)
        if w_scale not in (0.0, 1.0):
            w = w * w_scale
        G, U, D = T[p + "ffn_gate_exps.weight"], T[p + "ffn_up_exps.weight"], T[p + "ffn_down_exps.weight"]
        out = np.zeros_like(x)
        for t in range(n):
            for j in range(k_used):
                e = ids[t, j]
                if arch == "llama4" and not opts.get("weight_after_ffn"):
                    xi = x[t] * w[t, j]
                    out[t] += D[e] @ (silu(G[e] @ xi) * (U[e] @ xi))
                else:
                    out[t] += w[t, j] * (D[e] @ (silu(G[e] @ x[t]) * (U[e] @ x[t])))
        if p + "ffn_gate_shexp.weight" in T:
            out += lin(silu(lin(x, p + "ffn_gate_shexp")) * lin(x, p + "ffn_up_shexp"), p + "ffn_down_shexp")
        return out, ids

    routing = {}
    x = T["token_embd.weight"][np.asarray(tokens)]
    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms(x, T[p + "attn_norm.weight"])
        if arch == "deepseek2":
            n_rot = hp("rope.dimension_count")
            k_mla = hp("attention.key_length_mla")
            nope = k_mla - n_rot
            kv_lora = hp("attention.kv_lora_rank")
            q = lin(rms(lin(h, p + "attn_q_a"), T[p + "attn_q_a_norm.weight"]), p + "attn_q_b")
            q = q.reshape(n, n_head, k_mla)
            q_nope, q_pe = q[..., :nope], rope(q[..., nope:], n_rot, neox=False)
            kv = lin(h, p + "attn_kv_a_mqa")  # [n, kv_lora + n_rot]
            c = rms(kv[:, :kv_lora], T[p + "attn_kv_a_norm.weight"])
            k_pe = rope(kv[:, None, kv_lora:], n_rot, neox=False)  # [n, 1, n_rot]
            k_b, v_b = T[p + "attn_k_b.weight"], T[p + "attn_v_b.weight"]  # [H, lora, nope], [H, v, lora]
            k_nope = np.einsum("tl,hln->thn", c, k_b)
            v = np.einsum("tl,hvl->thv", c, v_b)
            k = np.concatenate([k_nope, np.repeat(k_pe, n_head, axis=1)], -1)
            qq = np.concatenate([q_nope, q_pe], -1)
            a = attend(qq, k, v, 1.0 / math.sqrt(k_mla))
        else:
            head_dim = hp("attention.key_length", n_embd // n_head)
            q, k, v = lin(h, p + "attn_q"), lin(h, p + "attn_k"), lin(h, p + "attn_v")
            if arch == "olmoe":
                q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
            q, k, v = q.reshape(n, n_head, head_dim), k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim)
            if arch == "qwen3moe":
                q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
            n_rot = hp("rope.dimension_count", head_dim)
            if arch == "llama4":
                use_rope = (il + 1) % 4 != 0 or opts.get("all_rope")
                if use_rope:
                    q, k = rope(q, n_rot, neox=False), rope(k, n_rot, neox=False)
                    if not opts.get("no_kq_norm"):
                        q, k = rms(q), rms(k)
                else:
                    q = q * (np.log(np.floor((pos[:, :, None] + 1.0) / 8192) + 1.0) * 0.1 + 1.0)
            else:
                q, k = rope(q, n_rot, neox=arch in ("qwen3moe", "olmoe")), rope(k, n_rot, neox=arch in ("qwen3moe", "olmoe"))
            a = attend(q, k, v, 1.0 / math.sqrt(head_dim))
        x = x + lin(a, p + "attn_output")
        h = rms(x, T[p + "ffn_norm.weight"])
        if p + "ffn_gate_inp.weight" in T:
            f, routing[il] = moe(h, p)
        else:
            f = lin(silu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
        x = x + f
    x = rms(x, T["output_norm.weight"])
    return x @ T["output.weight"].T, routing


# Typical mistakes of a reader (options of gguf_forward): each moves the logits by
# the fraction of max |logit| recorded in reference.json (mistakes_rel_diff).
MISTAKES = {
    "qwen3_moe": {"top-k weights not renormalised (norm_topk_prob ignored)": {"norm_w": False},
                  "sigmoid instead of softmax gating": {"gating": "sigmoid"}},
    "mixtral": {"top-k weights not renormalised (softmax over all experts)": {"norm_w": False}},
    "olmoe": {"top-k weights renormalised (norm_topk_prob false ignored)": {"norm_w": True}},
    "deepseek_v3": {
        "softmax gating (llama.cpp's default without expert_gating_func)": {"gating": "softmax"},
        "e_score_correction_bias ignored in the selection": {"no_probs_b": True},
        "no group-limited selection (n_group ignored)": {"no_groups": True},
        "groups scored by their best expert (DeepSeek-V2's group_limited_greedy)": {"group_max": True},
        "weights taken from the biased scores s + bias": {"bias_in_weights": True},
        "routed_scaling_factor ignored": {"w_scale": 1.0},
        "top-k weights not renormalised": {"norm_w": False},
    },
    "llama4": {
        "router weight applied to the expert output instead of its input": {"weight_after_ffn": True},
        "rope on every layer (NoPE layer 3 ignored)": {"all_rope": True},
        "no L2 q/k norm": {"no_kq_norm": True},
        "softmax instead of sigmoid gating": {"gating": "softmax"},
    },
}

# The GGUF keys and tensors worth recording (all of the MoE ones).
def moe_keys(keys: dict, arch: str) -> dict:
    want = ("expert_", "leading_dense", "interleave_moe", "attention.", "rope.", "block_count",
            "embedding_length", "feed_forward_length", "vocab_size", "context_length")
    return {k: v for k, v in sorted(keys.items())
            if k.startswith(arch + ".") and any(k[len(arch) + 1:].startswith(w) for w in want)}


# ---------------------------------------------------------------------------
# transformers 4 layout
# ---------------------------------------------------------------------------

def v4_config(name: str, cfg: dict) -> dict:
    """rope_theta + rope_scaling top-level instead of rope_parameters, torch_dtype
    instead of dtype; Qwen3-MoE's num_experts (transformers 5 writes num_local_experts);
    DeepSeek-V3 without transformers 5's derived head_dim / qk_head_dim."""
    out = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            rp = dict(v)
            out["rope_theta"] = rp.pop("rope_theta")
            out["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        elif k == "dtype":
            out["torch_dtype"] = v
        elif k == "num_local_experts" and name == "qwen3_moe":
            out["num_experts"] = v
        elif name == "deepseek_v3" and k in ("head_dim", "qk_head_dim"):
            pass
        else:
            out[k] = v
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def search_tokens(name, model, config, seed0, lengths, want_starved: bool):
    """The first random token sequence (ids 1..383, seeds seed0, seed0 + 1, ...) whose
    routing covers every expert of every MoE layer (want_starved false) or leaves some
    expert of some layer without a token (true), with every margin >= min_margin."""
    import numpy as np

    for length in lengths:
        for s in range(seed0, seed0 + 400):
            rng = np.random.default_rng(s)
            tokens = rng.integers(1, VOCAB_SIZE, size=length).astype(np.int32)
            logits, routers = run_hf(name, model, config, tokens.tolist())
            routing, margin = analyse_routing(name, config, routers)
            if margin < min_margin(name):
                continue
            zero = any((c == 0).any() for _, _, c in routing.values())
            if zero == want_starved:
                return s, tokens, logits, routers, routing, margin
    sys.exit(f"{name}: no {'starved' if want_starved else 'covering'} token sequence found")


def make_one(idx: int, name: str, out_root: Path, tok, llama_dir: Path, versions: dict) -> dict:
    import numpy as np
    from safetensors.numpy import save_file
    from safetensors.torch import load_file as load_torch

    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    config = make_config(name)
    model = build_model(name, config)
    reinit(model, WEIGHT_SEED + idx)
    model0 = model
    model.save_pretrained(str(folder))  # save_original_format=True: the hub layout
    (folder / "generation_config.json").unlink(missing_ok=True)
    mk.save_tokenizer(tok, folder)

    # The hub layout, exactly.
    state = {k: v.numpy() for k, v in load_torch(str(folder / "model.safetensors")).items()}
    want = hub_names(name, config)
    if sorted(state) != want:
        sys.exit(f"{name}: model.safetensors names differ from the hub layout:\n"
                 f"  missing {sorted(set(want) - set(state))}\n  extra {sorted(set(state) - set(want))}")
    for k, v in state.items():
        if v.dtype != np.float32:
            sys.exit(f"{name}: {k} is {v.dtype}")

    # The reference runs on the model as saved and reloaded.
    model, info_load = load_hf(name, folder, output_loading_info=True)
    bad = {k: v for k, v in info_load.items() if v}
    if bad:
        sys.exit(f"{name}: from_pretrained reports {bad}")
    config = model.config
    E = n_experts(name, config)
    mlayers = moe_layers(name, config)

    s_cov, tokens, logits, routers, routing, margin = search_tokens(
        name, model, config, TOKEN_SEED + 1000 * idx, (SEQ_LEN,), want_starved=False)
    s_st, tokens_st, logits_st, routers_st, routing_st, margin_st = search_tokens(
        name, model, config, STARVED_SEED + 1000 * idx, STARVED_LENS, want_starved=True)
    l0, _ = run_hf(name, model0, model0.config, tokens.tolist())
    if not np.array_equal(l0, logits):
        sys.exit(f"{name}: the reloaded model's logits differ from the saved one's: {np.abs(l0 - logits).max()}")
    del model0
    counts = {l: c for l, (_, _, c) in routing.items()}
    counts_st = {l: c for l, (_, _, c) in routing_st.items()}
    starved = [[l, int(e)] for l in mlayers for e in np.nonzero(counts_st[l] == 0)[0]]
    log(f"{name}: tokens seed {s_cov} ({len(tokens)} tokens), counts "
        f"{ {l: c.tolist() for l, c in counts.items()} }, margin {margin:.4f}")
    log(f"{name}: tokens_starved seed {s_st} ({len(tokens_st)} tokens), counts "
        f"{ {l: c.tolist() for l, c in counts_st.items()} }, starved [layer, expert] {starved}, "
        f"margin {margin_st:.4f}")

    # The transformers 5 fused layout gives the same model.
    with tempfile.TemporaryDirectory() as td:
        model.save_pretrained(td, save_original_format=False)
        fused_layout = layout_of(Path(td) / "model.safetensors", mlayers[0])
        m2 = load_hf(name, td)
        l2, _ = run_hf(name, m2, m2.config, tokens.tolist())
        if not np.array_equal(l2, logits):
            sys.exit(f"{name}: the transformers-5 layout gives other logits: {np.abs(l2 - logits).max()}")
        del m2
    hub_layout = layout_of(folder / "model.safetensors", mlayers[0])

    def stack(routing_, what):
        return np.ascontiguousarray(np.stack([routing_[l][what] for l in mlayers]))

    tensors = {
        "tokens": tokens, "logits": np.ascontiguousarray(logits),
        "tokens_starved": tokens_st, "logits_starved": np.ascontiguousarray(logits_st),
        "moe_layers": np.asarray(mlayers, dtype=np.int32),
    }
    for suffix, rt, ro in (("", routing, routers), ("_starved", routing_st, routers_st)):
        tensors["router_logits" + suffix] = np.ascontiguousarray(
            np.stack([ro[l]["logits"] for l in mlayers]).astype(np.float32))
        tensors["expert_ids" + suffix] = np.ascontiguousarray(np.stack([rt[l][0] for l in mlayers]))
        tensors["expert_weights" + suffix] = np.ascontiguousarray(np.stack([rt[l][1] for l in mlayers]))
        tensors["expert_token_counts" + suffix] = np.ascontiguousarray(
            np.stack([rt[l][2] for l in mlayers]).astype(np.int32))
    save_file(tensors, str(folder / "reference.safetensors"))

    max_abs = float(np.abs(logits).max())
    info = {
        "architecture": MODEL_CLASS[name],
        "gguf_architecture": GGUF_ARCH[name],
        "vocab_size": VOCAB_SIZE,
        "num_hidden_layers": config.num_hidden_layers,
        "moe_layers": mlayers,
        "num_experts": E,
        "num_experts_per_tok": config.num_experts_per_tok,
        "seq_len": len(tokens),
        "seq_len_starved": len(tokens_st),
        "weight_seed": WEIGHT_SEED + idx,
        "token_seed": s_cov,
        "token_seed_starved": s_st,
        "max_abs_logit": max_abs,
        "logit_std": float(logits.std()),
        "max_abs_logit_starved": float(np.abs(logits_st).max()),
        "expert_token_counts": [counts[l].tolist() if l in counts else None
                                for l in range(config.num_hidden_layers)],
        "expert_token_counts_starved": [counts_st[l].tolist() if l in counts_st else None
                                        for l in range(config.num_hidden_layers)],
        "starved_experts": starved,
        "min_routing_margin": margin,
        "min_routing_margin_starved": margin_st,
        "routing_rule": ROUTING_RULE[name],
        "safetensors_layout_hub": hub_layout,
        "safetensors_layout_transformers5": fused_layout,
        **versions,
    }

    # transformers 4 layout, read back by transformers 5 to the same config.
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.v4.json").write_text(json.dumps(v4_config(name, cfg), indent=2) + "\n")
    back = type(config).from_json_file(str(folder / "config.v4.json"))
    for attr in ("rope_parameters", "num_experts_per_tok", "num_hidden_layers", "head_dim",
                 "num_key_value_heads", "norm_topk_prob", "moe_layers", "no_rope_layers",
                 "layer_types", "n_group", "topk_group", "routed_scaling_factor",
                 "first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step"):
        if hasattr(config, attr) and getattr(back, attr, None) != getattr(config, attr):
            sys.exit(f"{name}: config.v4.json reads back {attr} = {getattr(back, attr, None)!r}, "
                     f"want {getattr(config, attr)!r}")
    if n_experts(name, back) != E:
        sys.exit(f"{name}: config.v4.json reads back {n_experts(name, back)} experts")
    if name == "llama4":
        info["layer_types"] = list(config.layer_types)
        info["no_rope_layers"] = list(config.no_rope_layers)
        info["attention_chunk_size"] = config.attention_chunk_size

    # GGUF
    mk.convert(llama_dir, folder, folder / "model.gguf")
    g = check_gguf(name, folder, config, state)
    arch = GGUF_ARCH[name]
    info["gguf_keys"] = moe_keys(g["keys"], arch)
    blk = mlayers[0]
    info["gguf_tensors_moe_block"] = {t: s for t, s in g["tensors"].items() if t.startswith(f"blk.{blk}.")}
    dense = [i for i in range(config.num_hidden_layers) if i not in mlayers]
    if dense:
        info["gguf_tensors_dense_block"] = {t: s for t, s in g["tensors"].items()
                                            if t.startswith(f"blk.{dense[0]}.")}

    agree = {}
    for suffix, toks, ref, rt in (("", tokens, logits, routing), ("_starved", tokens_st, logits_st, routing_st)):
        ours, ours_rt = gguf_forward(folder / "model.gguf", toks.tolist())
        d = float(np.abs(ours - ref).max())
        rel = d / float(np.abs(ref).max())
        for l in mlayers:
            if not (np.sort(ours_rt[l], -1) == np.sort(rt[l][0], -1)).all():
                sys.exit(f"{name}: the GGUF reading routes layer {l} differently from transformers")
        log(f"{name}: numpy forward from model.gguf vs transformers{suffix}: max |diff| {d:.2e} "
            f"({rel:.2e} of max |logit|), same experts chosen")
        if rel > 1e-4:
            sys.exit(f"{name}: the GGUF's logits differ from transformers' by {rel:.2e} of max |logit|")
        agree["gguf_numpy_forward_max_abs_diff" + suffix] = d
        agree["gguf_numpy_forward_rel_diff" + suffix] = rel
    info.update(agree)

    mistakes = {}
    for what, o in MISTAKES[name].items():
        ours, _ = gguf_forward(folder / "model.gguf", tokens.tolist(), **o)
        mistakes[what] = float(np.abs(ours - logits).max()) / max_abs
        log(f"{name}: mistake {what!r}: max |logit difference| {mistakes[what]:.3%} of max |logit|")
        if mistakes[what] <= 1e-2:
            sys.exit(f"{name}: {what} barely changes the logits; the fixture would not test it")
    info["mistakes_rel_diff"] = mistakes

    if name == "deepseek_v3":
        info.update(deepseek_without_scoring_func(folder, llama_dir, tokens, logits, max_abs))

    (folder / "reference.json").write_text(dump_json(info))
    for f in folder.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    return g


DEEPSEEK_NOTE = (
    "transformers' DeepseekV3Config has no scoring_func field (its router is always "
    "sigmoid + e_score_correction_bias, group-limited), so a config.json written by "
    "transformers' own DeepseekV3Config lacks the key; llama.cpp's converter then writes "
    "no deepseek2.expert_gating_func and llama.cpp falls back to softmax (DeepSeek-V2's "
    "gating). The hub's DeepSeek-V3 config.json has scoring_func: sigmoid, as this "
    "fixture's does.")


def convert_without_scoring_func(folder: Path, llama_dir: Path, out: Path) -> Path:
    """The fixture converted again from its config.json without scoring_func /
    topk_method (what transformers writes for a DeepseekV3Config made without those
    keys); returns the GGUF's path under out."""
    for f in folder.iterdir():
        if f.name not in ("model.gguf", "config.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("scoring_func"), cfg.pop("topk_method")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    mk.convert(llama_dir, out, out / "model.gguf")
    return out / "model.gguf"


def deepseek_without_scoring_func(folder: Path, llama_dir: Path, tokens, logits, max_abs) -> dict:
    """That GGUF read as llama.cpp does, against transformers."""
    import numpy as np

    with tempfile.TemporaryDirectory() as td:
        path = convert_without_scoring_func(folder, llama_dir, Path(td))
        r, kv, arch, T, hp = mk.load_gguf_f64(path)
        gating = hp("expert_gating_func")
        ours, _ = gguf_forward(path, tokens.tolist())
    rel = float(np.abs(ours - logits).max()) / max_abs
    log(f"deepseek_v3: GGUF converted without scoring_func: expert_gating_func = {gating}; "
        f"llama.cpp's logits differ from transformers' by {rel:.1%} of max |logit|")
    if rel <= 1e-2:
        sys.exit("deepseek_v3: softmax gating should change the logits")
    return {"gguf_without_scoring_func": {
        "note": DEEPSEEK_NOTE,
        "deepseek2.expert_gating_func": gating,
        "llama_cpp_vs_transformers_rel_diff": rel,
    }}


# ---------------------------------------------------------------------------
# Optional: llama.cpp's own log-probs (llama-perplexity --kl-divergence-base)
# ---------------------------------------------------------------------------

def llama_cpp_check(name: str, folder: Path, bin_dir: Path, gguf_path: Path | None = None,
                    n_ctx: int = 64, chunks: int = 3) -> dict:
    """Runs llama-perplexity on mk.TRAINING_TEXT with the fixture's GGUF (or gguf_path;
    f32 KV cache, no flash attention), reads its --kl-divergence-base dump (log-probs of
    the second half of each chunk, quantised to uint16 per row) and compares them with
    transformers' log-probs of the same tokens and with those of gguf_forward (the
    numpy reading of the same GGUF). Returns the max |differences|."""
    gguf_path = gguf_path or folder / "model.gguf"
    import numpy as np
    import torch
    from gguf import GGUFReader

    with tempfile.TemporaryDirectory() as td:
        txt, dump = Path(td) / "text.txt", Path(td) / "base.kld"
        txt.write_text(mk.TRAINING_TEXT * 2)
        cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf_path), "-f", str(txt),
               "-c", str(n_ctx), "-b", str(n_ctx), "--chunks", str(chunks), "-ctk", "f32", "-ctv", "f32",
               "-fa", "off", "-t", "1", "--kl-divergence-base", str(dump)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": p.stderr[-2000:]}
        raw = dump.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx_f, n_vocab, n_chunk = np.frombuffer(raw[8:20], dtype=np.int32)
    off = 20
    toks = np.frombuffer(raw[off:off + 4 * n_chunk * n_ctx_f], dtype=np.int32).reshape(n_chunk, n_ctx_f)
    off += 4 * n_chunk * n_ctx_f
    nv = 2 * ((n_vocab + 1) // 2) + 4
    first = n_ctx_f // 2
    rows = n_ctx_f - 1 - first
    add_bos = any(f.name == "tokenizer.ggml.add_bos_token" and bool(f.parts[f.data[0]][0])
                  for f in GGUFReader(str(gguf_path)).fields.values())
    model = load_hf(name, folder)
    worst, worst_np, counts = 0.0, 0.0, {}
    for c in range(n_chunk):
        block = np.frombuffer(raw[off:off + 2 * rows * nv], dtype=np.uint16).reshape(rows, nv)
        off += 2 * rows * nv
        scale = block[:, 0:2].copy().view(np.float32)[:, 0]
        minlp = block[:, 2:4].copy().view(np.float32)[:, 0]
        q = block[:, 4:4 + n_vocab].astype(np.float64)
        lp_cpp = minlp[:, None] + scale[:, None] * q
        ids = toks[c].copy()
        if add_bos:
            ids[0] = 0
        lg, routers = run_hf(name, model, model.config, ids.tolist())
        lp_hf = torch.log_softmax(torch.from_numpy(lg).double(), -1).numpy()[first:first + rows]
        routing, _ = analyse_routing(name, model.config, routers)
        for l, (_, _, cnt) in routing.items():
            counts[l] = counts.get(l, 0) + cnt
        lg_np, _ = gguf_forward(gguf_path, ids.tolist())
        lp_np = lg_np - lg_np.max(-1, keepdims=True)
        lp_np = (lp_np - np.log(np.exp(lp_np).sum(-1, keepdims=True)))[first:first + rows]
        valid = q > 0  # entries at the floor (max - 16) are clipped
        worst = max(worst, float(np.abs(lp_cpp - lp_hf)[valid].max()))
        worst_np = max(worst_np, float(np.abs(lp_cpp - lp_np)[valid].max()))
    return {"max_abs_logprob_diff_vs_transformers": worst, "max_abs_logprob_diff_vs_numpy_gguf": worst_np,
            "chunks": int(n_chunk), "n_ctx": int(n_ctx_f),
            "quant_step_max": float(scale.max()),
            "expert_token_counts_hf": {l: c.tolist() for l, c in sorted(counts.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "moe"))
    ap.add_argument("--only", action="append", choices=ARCHES)
    ap.add_argument("--llama-cpp", default=None)
    ap.add_argument("--llama-bin", default=None, help="built llama.cpp bin/ for the optional llama-perplexity check")
    ap.add_argument("--report", default=None, help="write the GGUF keys/tensors per architecture as JSON here")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import numpy as np
    import safetensors
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    llama_dir = mk.llama_cpp_source(args.llama_cpp)
    versions = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "llama_cpp_commit": mk.LLAMA_CPP_COMMIT,
        "llama_cpp_source": f"llama-cpp-python=={mk.LLAMA_CPP_PYTHON_VERSION} sdist, vendor/llama.cpp",
    }
    out_root = Path(args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    tok = mk.build_tokenizer()
    report = {}
    for idx, name in enumerate(ARCHES):
        if args.only and name not in args.only:
            continue
        report[name] = make_one(idx, name, out_root, tok, llama_dir, versions)

    for name, g in report.items():
        log(f"\n== {name}: model.gguf")
        for k, v in g["keys"].items():
            if not k.startswith("tokenizer."):
                log(f"  {k} = {v}")
        for t, shape in g["tensors"].items():
            if t.startswith(("blk.0.", "blk.1.", "token", "output")):
                log(f"  tensor {t} {shape}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if args.llama_bin:
        for name in report:
            res = llama_cpp_check(name, out_root / name, Path(args.llama_bin))
            log(f"{name}: llama-perplexity log-probs: {res}")
            if name == "deepseek_v3":
                with tempfile.TemporaryDirectory() as td:
                    path = convert_without_scoring_func(out_root / name, llama_dir, Path(td))
                    res = llama_cpp_check(name, out_root / name, Path(args.llama_bin), path)
                log(f"{name} converted without scoring_func: llama-perplexity log-probs: {res}")
    total = 0
    log("")
    for p in sorted(out_root.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"{p.stat().st_size:>9}  {p.relative_to(out_root)}")
    log(f"{total:>9}  total")


if __name__ == "__main__":
    main()
