#!/usr/bin/env python3
"""Writes tiny random-weight reference fixtures for three architectures.

For each of llama3 (LlamaForCausalLM with Llama-3.1 rope scaling), qwen2
(Qwen2ForCausalLM, q/k/v biases) and qwen3 (Qwen3ForCausalLM, q/k norms, head_dim
!= hidden/heads, tied output) it writes tests/fixtures/arch/<name>/:

  config.json             as transformers 5 save_pretrained writes it
  config.v4.json          (llama3 only) the same config in the transformers 4 layout
  model.safetensors       f32 weights (HF names and layouts)
  tokenizer.json          byte-level BPE (GPT-2 style), shared by all three
  tokenizer_config.json
  reference.safetensors   tokens (I32 [T]) and logits (F32 [T, vocab]): HF
                          transformers' logits of the whole sequence from position 0
                          (float32, eval mode, eager attention)
  reference.json          a few numbers and the versions used
  model.gguf              the same model converted by llama.cpp's own
                          convert_hf_to_gguf.py --outtype f32

HF transformers is the independent reference implementation; llama.cpp's converter
is the reference for the GGUF layout. Deterministic: fixed seeds, a fixed training
text for the tokenizer (embedded below), single-threaded torch.

Run with the venv of scripts/setup-torch-venv.sh, from anywhere:

    bash scripts/setup-torch-venv.sh
    .cache/venv-torch/bin/python scripts/make-arch-fixtures.py

Options: --out DIR (default tests/fixtures/arch), --only NAME (repeatable),
--llama-cpp DIR (a llama.cpp source tree; default: the llama-cpp-python 0.3.36
sdist's vendor/llama.cpp under ${LLAMA_CPP_DIR:-.cache/llama.cpp}/src, downloaded
from PyPI with pip as scripts/build-llama-cpp.sh does if it is not there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

SEQ_LEN = 40
VOCAB_SIZE = 384  # 256 byte symbols + 1 special token + 127 merges
SPECIAL = "<|endoftext|>"

# Seeds: weights of architecture i use WEIGHT_SEED + i, the tokens TOKEN_SEED + i.
WEIGHT_SEED = 20240601
TOKEN_SEED = 777

# Re-initialisation (transformers' std 0.02 init gives logits ~0 that hide errors).
STD_MATRIX = 0.2
STD_NORM = 0.1  # norm weights: 1 + STD_NORM * N(0, 1)
STD_BIAS = 0.1

# The tokenizer's fixed training text (kept in this file so that edits elsewhere in
# the repository do not change the fixtures).
TRAINING_TEXT = """\
A language model turns a sequence of tokens into a distribution over the next token.
The compression pipeline takes such a model, quantizes its weights to fewer bits,
prunes the weights that matter least, and distills what was lost back into a smaller
student. Each step is checked against an independent reference: the logits of the
original model on the same tokens, the perplexity on held-out text, and the
divergence between the two distributions at every position.

The weights of a transformer are mostly matrices. The attention block projects the
hidden state into queries, keys and values, rotates the queries and keys by the
position of each token, compares every query with the keys before it, and mixes the
values by the resulting weights. The feed-forward block expands the hidden state,
gates it, and projects it back. Normalisation layers keep the scale of the hidden
state under control between the blocks.

Rotary position embeddings rotate pairs of dimensions by an angle that grows with the
position. Each pair has its own frequency: the first pairs turn quickly, the last
ones slowly. Scaling the rotation for long contexts divides the slow frequencies by a
factor and leaves the fast ones as they are, with a smooth ramp between the two.

A quantized weight is stored in small blocks. Each block has a scale, sometimes a
minimum, and a few bits for every weight in it. Dequantizing multiplies the integers
by the scale and adds the minimum. Better quantizers choose the scale by measuring the
error on real activations instead of the weights alone, and give more bits to the
matrices whose errors matter most.

The tokenizer splits text into words, spaces and punctuation, maps every byte to a
printable character, and merges the most frequent pairs of symbols again and again
until the vocabulary is full. Numbers like 1, 22, 333 and 4444, names like Llama and
Qwen, and words like model, weight, token and tensor all end up as a few pieces each.
"""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# llama.cpp source
# ---------------------------------------------------------------------------

def llama_cpp_source(explicit: str | None) -> Path:
    if explicit:
        src = Path(explicit).resolve()
    else:
        base = Path(os.environ.get("LLAMA_CPP_DIR", ROOT / ".cache" / "llama.cpp"))
        if not base.is_absolute():
            base = ROOT / base
        src_parent = base / "src"
        src = src_parent / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        if not (src / "convert_hf_to_gguf.py").is_file():
            tarball = src_parent / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
            src_parent.mkdir(parents=True, exist_ok=True)
            if not tarball.is_file():
                log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI")
                # --no-binary for this package only, as in scripts/build-llama-cpp.sh.
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                     "--no-binary", "llama-cpp-python",
                     f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(src_parent)],
                    check=True,
                )
            got = hashlib.sha256(tarball.read_bytes()).hexdigest()
            if got != SDIST_SHA256:
                sys.exit(f"sha256 mismatch for {tarball}: {got}")
            with tarfile.open(tarball) as tf:
                tf.extractall(src_parent, filter="data")
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py" / "gguf").is_dir():
        sys.exit(f"no llama.cpp source with convert_hf_to_gguf.py and gguf-py at {src}")
    return src


def convert_main(llama_dir: str, model_dir: str, outfile: str) -> None:
    """Runs llama.cpp's convert_hf_to_gguf.py (in a child process, see convert()).

    One workaround, no edit of llama.cpp: the converter names the BPE pre-tokenizer by
    a hash of how the tokenizer splits a test string and refuses unknown hashes. Our
    tokenizer is GPT-2's byte-level scheme (GPT-2 regex, no prefix space) with its own
    small vocabulary, so its hash is unknown; get_vocab_base_pre is patched to answer
    "gpt-2", the name llama.cpp's loader gives that scheme (it refuses "gpt2").
    """
    sys.path.insert(0, str(Path(llama_dir) / "gguf-py"))
    sys.path.insert(1, llama_dir)
    import gguf  # the vendored gguf-py, matching the converter

    assert Path(gguf.__file__).resolve().is_relative_to(Path(llama_dir).resolve()), gguf.__file__
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", "f32"]
    convert_hf_to_gguf.main()


def convert(llama_dir: Path, model_dir: Path, outfile: Path) -> None:
    # A child process: the converter configures logging, parses sys.argv and imports
    # its own gguf-py, none of which should leak into this process.
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--convert-only",
         str(llama_dir), str(model_dir), str(outfile)],
        check=True, env=env, cwd=str(model_dir),
    )


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.split("\n\n"), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        sys.exit(f"tokenizer has {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}")
    if tok.token_to_id(SPECIAL) != 0:
        sys.exit(f"{SPECIAL} is not token 0")
    return tok


def save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)
    fast.save_pretrained(str(out))


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the scaling changes the logits of a 40-token sequence, and such
    # that the 8 rotary frequencies of head_dim 16 at theta 500000 (wavelengths 6.3,
    # 32, 167, 861, ... positions) fall in all three branches of the llama3 rule:
    # wavelength < 64/4 = 16: unscaled; 16..64: smooth ramp; > 64: divided by 8.
    "original_max_position_embeddings": 64,
}

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=0,
    eos_token_id=0,
)


def make_config(name: str, rope_override: dict | None = None):
    import transformers as tf

    if name == "llama3":
        return tf.LlamaConfig(
            **COMMON, head_dim=16, tie_word_embeddings=False, attention_bias=False,
            mlp_bias=False, rope_parameters=dict(rope_override or LLAMA3_ROPE),
        )
    if name == "qwen2":
        return tf.Qwen2Config(
            **COMMON, tie_word_embeddings=False, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if name == "qwen3":
        return tf.Qwen3Config(
            **COMMON, head_dim=32, tie_word_embeddings=True, attention_bias=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    raise ValueError(name)


MODEL_CLASS = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCHES = ["llama3", "qwen2", "qwen3"]


def build_model(name: str, config):
    import torch
    import transformers as tf

    config._attn_implementation = "eager"
    model = getattr(tf, MODEL_CLASS[name])(config).to(torch.float32)
    model.eval()
    return model


def reinit(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied parameter once (qwen3: embed = lm_head).
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if pname.endswith("norm.weight"):  # input/post-attention/final/q/k norms
                p.copy_(1.0 + STD_NORM * noise)
            elif pname.endswith(".bias"):
                p.copy_(STD_BIAS * noise)
            elif p.dim() == 2:
                p.copy_(STD_MATRIX * noise)
            else:
                raise ValueError(f"unexpected parameter {pname} {tuple(p.shape)}")


def logits_of(model, tokens):
    import torch

    with torch.no_grad():
        ids = torch.tensor(tokens, dtype=torch.long)[None, :]
        out = model(input_ids=ids, use_cache=False)
    return out.logits[0].to(torch.float32).numpy()


def v4_config(cfg: dict) -> dict:
    """The transformers 4 layout: top-level rope_theta + rope_scaling, torch_dtype."""
    out = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            rp = dict(v)
            out["rope_scaling"] = None
            out["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") != "default":
                out["rope_scaling"] = rp
        elif k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# GGUF checks
# ---------------------------------------------------------------------------

def llama3_rope_factors(rope: dict, head_dim: int):
    """The rope_freqs values, recomputed here as llama.cpp's converter defines them."""
    import numpy as np

    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute_llama(w, n_head: int):
    """llama.cpp's LlamaModel.permute (HF half-split rope rows -> interleaved pairs)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def field_value(field):
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        if types[-1] == GGUFValueType.STRING:
            return f"[{n} strings]"
        return f"[{n} x {types[-1].name}]"
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    v = field.parts[field.data[0]]
    return v.tolist()[0] if hasattr(v, "tolist") else v


def check_gguf(name: str, folder: Path, config, state: dict) -> dict:
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(str(folder / "model.gguf"))
    keys = {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    arch = keys.get("general.architecture")
    if arch != GGUF_ARCH[name]:
        sys.exit(f"{name}: general.architecture = {arch!r}, want {GGUF_ARCH[name]!r}")
    if keys.get("tokenizer.ggml.pre") != "gpt-2" or keys.get("tokenizer.ggml.model") != "gpt2":
        sys.exit(f"{name}: tokenizer.ggml.model/pre = {keys.get('tokenizer.ggml.model')!r}/"
                 f"{keys.get('tokenizer.ggml.pre')!r}, want 'gpt2'/'gpt-2'")
    tensors = {t.name: t for t in r.tensors}
    for t in r.tensors:
        if t.tensor_type.name != "F32":
            sys.exit(f"{name}: {t.name} is {t.tensor_type.name}, want F32")

    def arr(tname):
        t = tensors[tname]
        return np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])

    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    permuted = name == "llama3"
    # Q/K rows: permuted for llama (LlamaModel.undo_permute = True), as-is for qwen2/3.
    for layer in range(config.num_hidden_layers):
        for proj, gname, heads in (("q_proj", "attn_q", n_head), ("k_proj", "attn_k", n_kv)):
            hf = state[f"model.layers.{layer}.self_attn.{proj}.weight"]
            want = permute_llama(hf, heads) if permuted else hf
            if not np.array_equal(arr(f"blk.{layer}.{gname}.weight"), want):
                sys.exit(f"{name}: blk.{layer}.{gname}.weight is not the "
                         f"{'permuted' if permuted else 'unchanged'} HF {proj}")
            if f"model.layers.{layer}.self_attn.{proj}.bias" in state:
                hb = state[f"model.layers.{layer}.self_attn.{proj}.bias"]
                if not np.array_equal(arr(f"blk.{layer}.{gname}.bias"), hb):
                    sys.exit(f"{name}: blk.{layer}.{gname}.bias differs from HF")
    if not np.array_equal(arr("token_embd.weight"), state["model.embed_tokens.weight"]):
        sys.exit(f"{name}: token_embd.weight differs from HF")
    if config.tie_word_embeddings:
        if "output.weight" in tensors:
            sys.exit(f"{name}: tied model has output.weight")
    elif not np.array_equal(arr("output.weight"), state["lm_head.weight"]):
        sys.exit(f"{name}: output.weight differs from HF lm_head")

    extra = {}
    if name == "llama3":
        if "rope_freqs.weight" not in tensors:
            sys.exit("llama3: no rope_freqs.weight")
        got = arr("rope_freqs.weight")
        want = llama3_rope_factors(config.rope_parameters, config.head_dim)
        if not np.allclose(got, want, rtol=1e-6, atol=0):
            sys.exit(f"llama3: rope_freqs {got} != {want}")
        extra["rope_freqs"] = [float(x) for x in got]
        rope_keys = [k for k in keys if k.startswith("llama.rope.")]
        if not rope_keys:
            sys.exit("llama3: no llama.rope.* keys")
    return {
        "keys": keys,
        "tensors": {t.name: [int(x) for x in t.shape] for t in r.tensors},
        **extra,
    }


def gguf_forward(path: Path, tokens):
    """A float64 numpy forward pass read only from the GGUF, as llama.cpp computes it.

    A check of the fixtures (and of what the GGUF means), not of llama.cpp: llama uses
    rope type NORM (rotates adjacent pairs of the converter-permuted Q/K rows), qwen2
    and qwen3 rope type NEOX (rotates dimension i with i + head_dim/2, rows as in HF);
    pair i turns by pos * freq_base^(-2i/n_rot) / rope_freqs[i] (ggml_rope_cache_init:
    theta/ff); qwen3 RMS-normalises each head of Q and K before the rope.
    """
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv = {k: field_value(f) for k, f in r.fields.items()}
    arch = kv["general.architecture"]
    T = {t.name: np.asarray(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
         for t in r.tensors}

    def hp(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    n_layer, n_embd = hp("block_count"), hp("embedding_length")
    n_head, n_kv = hp("attention.head_count"), hp("attention.head_count_kv")
    head_dim = hp("attention.key_length", n_embd // n_head)
    n_rot = hp("rope.dimension_count", head_dim)
    base, eps = hp("rope.freq_base"), hp("attention.layer_norm_rms_epsilon")
    neox = arch in ("qwen2", "qwen3")
    ff = T.get("rope_freqs.weight", np.ones(n_rot // 2))

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def lin(x, name):
        y = x @ T[name + ".weight"].T
        return y + T[name + ".bias"] if name + ".bias" in T else y

    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)[:, None]
    theta = pos * base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot) / ff  # [n, n_rot/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # [n, heads, head_dim]
        x = x.copy()
        if neox:
            a, b = x[..., : n_rot // 2].copy(), x[..., n_rot // 2 : n_rot].copy()
            x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
            x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
        return x

    x = T["token_embd.weight"][np.asarray(tokens)]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, T[p + "attn_norm.weight"])
        q = lin(h, p + "attn_q").reshape(n, n_head, head_dim)
        k = lin(h, p + "attn_k").reshape(n, n_kv, head_dim)
        v = lin(h, p + "attn_v").reshape(n, n_kv, head_dim)
        if p + "attn_q_norm.weight" in T:
            q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        g = n_head // n_kv
        out = np.empty((n, n_head, head_dim))
        for hh in range(n_head):
            s = q[:, hh] @ k[:, hh // g].T / math.sqrt(head_dim) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, hh // g]
        x = x + lin(out.reshape(n, n_head * head_dim), p + "attn_output")
        h = rms(x, T[p + "ffn_norm.weight"])
        gate = lin(h, p + "ffn_gate")
        x = x + lin(gate / (1 + np.exp(-gate)) * lin(h, p + "ffn_up"), p + "ffn_down")
    x = rms(x, T["output_norm.weight"])
    return x @ T.get("output.weight", T["token_embd.weight"]).T


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def make_one(idx: int, name: str, out_root: Path, tok, llama_dir: Path, versions: dict) -> dict:
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import load_file as load_torch

    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    config = make_config(name)
    model = build_model(name, config)
    reinit(model, WEIGHT_SEED + idx)
    model.save_pretrained(str(folder))
    (folder / "generation_config.json").unlink(missing_ok=True)
    save_tokenizer(tok, folder)

    # The reference runs on the model as saved and reloaded (what the Rust side reads).
    import transformers as tf

    model = getattr(tf, MODEL_CLASS[name]).from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    state = {k: v.numpy() for k, v in load_torch(str(folder / "model.safetensors")).items()}
    for k, v in state.items():
        if v.dtype != np.float32:
            sys.exit(f"{name}: {k} is {v.dtype}, want float32")

    rng = np.random.default_rng(TOKEN_SEED + idx)
    tokens = rng.integers(1, VOCAB_SIZE, size=SEQ_LEN).astype(np.int32)  # no special token
    logits = logits_of(model, tokens.tolist())
    assert logits.shape == (SEQ_LEN, VOCAB_SIZE) and logits.dtype == np.float32
    save_file({"tokens": tokens, "logits": np.ascontiguousarray(logits)},
              str(folder / "reference.safetensors"))
    max_abs = float(np.abs(logits).max())
    info = {
        "architecture": MODEL_CLASS[name],
        "gguf_architecture": GGUF_ARCH[name],
        "seq_len": SEQ_LEN,
        "vocab_size": VOCAB_SIZE,
        "weight_seed": WEIGHT_SEED + idx,
        "token_seed": TOKEN_SEED + idx,
        "max_abs_logit": max_abs,
        "logit_std": float(logits.std()),
        **versions,
    }
    log(f"{name}: logits {logits.shape}, max |logit| {max_abs:.4f}, std {logits.std():.4f}")

    if name == "llama3":
        # The same weights with the rope scaling removed: must differ clearly, or the
        # fixture would not test the scaling at all.
        plain_cfg = make_config(name, {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]})
        plain = build_model(name, plain_cfg)
        plain.load_state_dict(model.state_dict())
        plain_logits = logits_of(plain, tokens.tolist())
        diff = float(np.abs(plain_logits - logits).max())
        rel = diff / max_abs
        log(f"llama3: max |logit difference| without rope scaling {diff:.4f} ({rel:.3%} of max |logit|)")
        if rel <= 1e-2:
            sys.exit("llama3: rope scaling barely changes the logits; fixture would not test it")
        info["rope_scaling_ignored_max_abs_diff"] = diff
        info["rope_scaling_ignored_rel_diff"] = rel

        # transformers' scaled inverse frequencies = unscaled ones / llama.cpp's factors.
        factors = llama3_rope_factors(config.rope_parameters, config.head_dim)
        if not (np.any(factors == 1.0) and np.any(factors == LLAMA3_ROPE["factor"])
                and np.any((factors > 1.0) & (factors < LLAMA3_ROPE["factor"]))):
            sys.exit(f"llama3: rope factors {factors} do not cover all three branches")
        d = config.head_dim
        plain_inv = 1.0 / (LLAMA3_ROPE["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
        hf_inv = model.model.rotary_emb.inv_freq.to(torch.float32).numpy()
        if not np.allclose(plain_inv / factors, hf_inv, rtol=1e-5, atol=0):
            sys.exit(f"llama3: HF inv_freq {hf_inv} != unscaled / factors {plain_inv / factors}")
        log(f"llama3: rope factors {factors.tolist()} match transformers' inv_freq")

        cfg = json.loads((folder / "config.json").read_text())
        v4 = v4_config(cfg)
        (folder / "config.v4.json").write_text(json.dumps(v4, indent=2) + "\n")
        # transformers 5 reads the v4 layout back to the same rope parameters.
        back = tf.LlamaConfig.from_json_file(str(folder / "config.v4.json"))
        if dict(back.rope_parameters) != dict(config.rope_parameters):
            sys.exit(f"config.v4.json reads back as {back.rope_parameters}")

    convert(llama_dir, folder, folder / "model.gguf")
    g = check_gguf(name, folder, config, state)
    ours = gguf_forward(folder / "model.gguf", tokens.tolist())
    gdiff = float(np.abs(ours - logits).max())
    log(f"{name}: numpy forward from model.gguf vs transformers: max |diff| {gdiff:.2e}")
    if gdiff > 1e-3:
        sys.exit(f"{name}: the GGUF's logits differ from transformers' by {gdiff}")
    info["gguf_numpy_forward_max_abs_diff"] = gdiff
    if "rope_freqs" in g:
        info["rope_freqs"] = g["rope_freqs"]
    (folder / "reference.json").write_text(json.dumps(info, indent=2) + "\n")
    return g


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--convert-only":
        convert_main(sys.argv[2], sys.argv[3], sys.argv[4])
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "arch"))
    ap.add_argument("--only", action="append", choices=ARCHES)
    ap.add_argument("--llama-cpp", default=None)
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

    llama_dir = llama_cpp_source(args.llama_cpp)
    versions = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_source": f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist, vendor/llama.cpp",
    }
    out_root = Path(args.out).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    report = {}
    for idx, name in enumerate(ARCHES):
        if args.only and name not in args.only:
            continue
        report[name] = make_one(idx, name, out_root, tok, llama_dir, versions)

    for name, g in report.items():
        log(f"\n== {name}: model.gguf")
        for k, v in g["keys"].items():
            log(f"  {k} = {v}")
        for t, shape in g["tensors"].items():
            log(f"  tensor {t} {shape}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    total = 0
    log("")
    for p in sorted(out_root.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"{p.stat().st_size:>9}  {p.relative_to(out_root)}")
    log(f"{total:>9}  total")


if __name__ == "__main__":
    main()
