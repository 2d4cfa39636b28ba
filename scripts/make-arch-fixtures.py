#!/usr/bin/env python3
"""Writes tiny random-weight reference fixtures for seven architectures.

For each of llama3 (LlamaForCausalLM with Llama-3.1 rope scaling), qwen2
(Qwen2ForCausalLM, q/k/v biases), qwen3 (Qwen3ForCausalLM, q/k norms, head_dim
!= hidden/heads, tied output), and the four of issue 17: gemma3 (Gemma3ForCausalLM:
(1 + w) norms before and after attention and MLP, embeddings scaled by sqrt(hidden),
GELU-tanh, 5 sliding-window layers to 1 global with their own rope bases and linear
rope scaling on the global one, query_pre_attn_scalar != head_dim, per-head q/k norms,
tied output), olmo2 (Olmo2ForCausalLM: norms after attention and MLP only, q/k norms
over the whole projections, MHA), smollm3 (SmolLM3ForCausalLM: every 4th layer without
rope, GQA, tied output) and mistral (MistralForCausalLM with a sliding window shorter
than the sequence) it writes tests/fixtures/arch/<name>/:

  config.json             as transformers 5 save_pretrained writes it
  config.v4.json          (llama3 and the four of issue 17) the same config in the
                          transformers 4 layout
  model.safetensors       f32 weights (HF names and layouts)
  tokenizer.json          byte-level BPE (GPT-2 style), shared by all of them
  tokenizer_config.json
  reference.safetensors   tokens (I32 [T]) and logits (F32 [T, vocab]): HF
                          transformers' logits of the whole sequence from position 0
                          (float32, eval mode, eager attention); gemma3 and mistral
                          also logits_as_gguf: transformers' logits of the model as
                          llama.cpp reads model.gguf (see GGUF_READING)
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
import copy
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
    if name == "gemma3":
        # Six layers because llama.cpp's gemma3 has no key for the layer pattern: it
        # takes 5 sliding layers to 1 global (il % 6 < 5) unless the GGUF carries
        # gemma3.attention.sliding_window_pattern, which the converter never writes.
        # With HF's own default pattern (sliding_window_pattern 6) both read the same.
        return tf.Gemma3TextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
            bos_token_id=0, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True,
            attention_bias=False, query_pre_attn_scalar=GEMMA3_QUERY_PRE_ATTN_SCALAR,
            sliding_window=GEMMA3_WINDOW, layer_types=list(GEMMA3_LAYER_TYPES),
            final_logit_softcapping=None, attn_logit_softcapping=None,
            rope_parameters=copy.deepcopy(rope_override or GEMMA3_ROPE),
        )
    if name == "olmo2":
        return tf.Olmo2Config(
            **{**COMMON, "num_key_value_heads": 4}, tie_word_embeddings=False,
            attention_bias=False, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
    if name == "smollm3":
        return tf.SmolLM3Config(
            **{**COMMON, "num_hidden_layers": 4, "intermediate_size": 64},
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
            use_sliding_window=False, no_rope_layer_interval=SMOLLM3_NO_ROPE_INTERVAL,
            pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 2000000.0},
        )
    if name == "mistral":
        return tf.MistralConfig(
            **COMMON, head_dim=16, tie_word_embeddings=False, sliding_window=MISTRAL_WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    raise ValueError(name)


# The four of issue 17.
GEMMA3_WINDOW = 8  # < SEQ_LEN: a sliding layer's query sees itself and the 7 tokens before
GEMMA3_LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
GEMMA3_QUERY_PRE_ATTN_SCALAR = 24  # scores * 24^-0.5; head_dim 16, hidden/heads 12
GEMMA3_ROPE = {
    # Linear scaling on the global layers as Gemma 3 4B/12B/27B have it (factor 8).
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}
SMOLLM3_NO_ROPE_INTERVAL = 4  # layers 3, 7, ... without rope (llama.cpp hard-codes 4)
MISTRAL_WINDOW = 8

MODEL_CLASS = {"llama3": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
               "smollm3": "SmolLM3ForCausalLM", "mistral": "MistralForCausalLM"}
GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3": "gemma3", "olmo2": "olmo2", "smollm3": "smollm3", "mistral": "llama"}
# The order fixes the seeds (WEIGHT_SEED + index): append only.
ARCHES = ["llama3", "qwen2", "qwen3", "gemma3", "olmo2", "smollm3", "mistral"]
NEW_ARCHES = ("gemma3", "olmo2", "smollm3", "mistral")

# How llama.cpp reads each new GGUF, where that is not what transformers computes
# (the GGUF has no key for it): the config changes under which transformers computes
# what llama.cpp computes from model.gguf. Its logits are stored as logits_as_gguf.
GGUF_READING = {
    # llama.cpp's gemma3 scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) only
    # for the 62-layer 27B); query_pre_attn_scalar is not in the GGUF.
    "gemma3": {"query_pre_attn_scalar": 16},
    # The converter writes Mistral as `llama` without any window key, and llama.cpp's
    # llama has no sliding window: every layer attends to the whole context.
    "mistral": {"sliding_window": None},
}


def build_model(name: str, config):
    import torch
    import transformers as tf

    config._attn_implementation = "eager"
    model = getattr(tf, MODEL_CLASS[name])(config).to(torch.float32)
    model.eval()
    return model


def reinit(model, seed: int, norm_center: float = 1.0) -> None:
    """norm_center: 1 (x * w norms), 0 for Gemma's x * (1 + w) norms (HF inits w = 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied parameter once (qwen3: embed = lm_head).
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if pname.endswith("norm.weight"):  # input/post-attention/final/q/k norms
                p.copy_(norm_center + STD_NORM * noise)
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


def v4_config_gemma3(cfg: dict) -> dict:
    """Gemma 3 in the transformers 4 layout: rope_theta (global layers),
    rope_local_base_freq (sliding layers), rope_scaling (global layers only),
    sliding_window_pattern instead of layer_types, torch_dtype."""
    out = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            full, local = dict(v["full_attention"]), dict(v["sliding_attention"])
            out["rope_theta"] = full.pop("rope_theta")
            out["rope_local_base_freq"] = local.pop("rope_theta")
            if local.get("rope_type", "default") != "default":
                sys.exit(f"gemma3: the v4 layout has no rope scaling for sliding layers: {local}")
            out["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        elif k == "layer_types":
            n = len(GEMMA3_LAYER_TYPES)
            if v != GEMMA3_LAYER_TYPES or cfg["num_hidden_layers"] != n:
                sys.exit(f"gemma3: layer_types {v} is not one period of sliding_window_pattern {n}")
            out["sliding_window_pattern"] = n
        elif k == "dtype":
            out["torch_dtype"] = v
        elif k == "_sliding_window_pattern":
            pass  # transformers 5 serialises its private copy of the pattern; 4 did not
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


def read_fixture_gguf(name: str, folder: Path):
    """The converted GGUF of fixture `name`: its metadata (architecture and
    tokenizer checked), its tensors by name (all F32, checked), and a reader of one
    tensor as a numpy array in HF shape order."""
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

    return keys, tensors, arr


def check_gguf(name: str, folder: Path, config, state: dict) -> dict:
    import numpy as np

    keys, tensors, arr = read_fixture_gguf(name, folder)

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
        "tensors": {t.name: [int(x) for x in t.shape] for t in tensors.values()},
        **extra,
    }


def load_gguf_f64(path: Path):
    """A GGUF for the numpy forward passes: the reader, its metadata, the
    architecture, every tensor in float64 (HF shape order), and `hp(key,
    default)` for the architecture's `{arch}.*` keys."""
    import numpy as np
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv = {k: field_value(f) for k, f in r.fields.items()}
    arch = kv["general.architecture"]
    T = {t.name: np.asarray(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
         for t in r.tensors}

    def hp(key, default=None):
        return kv.get(f"{arch}.{key}", default)

    return r, kv, arch, T, hp


def gguf_forward(path: Path, tokens):
    """A float64 numpy forward pass read only from the GGUF, as llama.cpp computes it.

    A check of the fixtures (and of what the GGUF means), not of llama.cpp: llama uses
    rope type NORM (rotates adjacent pairs of the converter-permuted Q/K rows), qwen2
    and qwen3 rope type NEOX (rotates dimension i with i + head_dim/2, rows as in HF);
    pair i turns by pos * freq_base^(-2i/n_rot) / rope_freqs[i] (ggml_rope_cache_init:
    theta/ff); qwen3 RMS-normalises each head of Q and K before the rope.
    """
    import numpy as np

    r, kv, arch, T, hp = load_gguf_f64(path)

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


# GGUF tensor names of the HF per-layer tensors (llama.cpp's tensor map, as the
# converter applies it to these architectures). post_attention_layernorm is the
# pre-MLP norm (ffn_norm) in llama-style blocks but the norm after attention
# (post_attention_norm) in Gemma 3 and OLMo 2.
HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(name: str, hf: str) -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias"), hf
    bid, mod = parts[2], ".".join(parts[3:-1])
    if mod == "post_attention_layernorm":
        g = "post_attention_norm" if name in ("gemma3", "olmo2") else "ffn_norm"
    else:
        g = HF_TO_GGUF_LAYER[mod]
    return f"blk.{bid}.{g}.{parts[-1]}"


def check_gguf_new(name: str, folder: Path, config, state: dict) -> dict:
    """Every HF tensor is in the GGUF under its llama.cpp name, and nothing else is:
    bit-equal to HF, except Q/K rows permuted (llama, smollm3: LlamaModel.permute) and
    Gemma's norm weights stored as w + 1 (in float32)."""
    import numpy as np

    keys, tensors, arr = read_fixture_gguf(name, folder)
    arch = keys["general.architecture"]

    permuted = arch in ("llama", "smollm3")
    seen, transforms = set(), {}
    for hf, w in sorted(state.items()):
        g = gguf_name(name, hf)
        if g not in tensors:
            sys.exit(f"{name}: {hf} has no {g} in model.gguf")
        want, how = w, "as in HF"
        if permuted and (".attn_q." in g or ".attn_k." in g):
            heads = config.num_attention_heads if ".attn_q." in g else config.num_key_value_heads
            want, how = permute_llama(w, heads), "rows permuted (LlamaModel.permute)"
        if name == "gemma3" and hf.endswith("norm.weight"):
            want, how = (w + np.float32(1.0)).astype(np.float32), "w + 1"
        if not np.array_equal(arr(g), want):
            sys.exit(f"{name}: {g} is not {hf} {how}")
        seen.add(g)
        transforms.setdefault(how, []).append(g)
    extra = sorted(set(tensors) - seen)
    if extra:
        sys.exit(f"{name}: model.gguf has tensors not in HF: {extra}")
    return {
        "keys": keys,
        "tensors": {t.name: [int(x) for x in t.shape] for t in tensors.values()},
        "transforms": {k: len(v) for k, v in transforms.items()},
    }


def gguf_array(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def gguf_forward_new(path: Path, tokens, **opts):
    """A float64 numpy forward pass read only from the GGUF, as llama.cpp computes
    gemma3, olmo2, smollm3 and llama (the converted Mistral), for the four of issue 17.

    What llama.cpp takes from the GGUF and what it hard-codes (src/models/<arch>.cpp):
    gemma3: x = embd * sqrtf(n_embd); per layer: rms(x)*attn_norm -> q,k,v -> per-head
    rms*attn_q_norm / attn_k_norm -> rope NEOX -> q * 1/sqrt(head_dim) -> attention
    (sliding layers: key position > query position - sliding_window) -> o ->
    rms*post_attention_norm -> + x; rms*ffn_norm -> down(gelu_tanh(gate) * up) ->
    rms*post_ffw_norm -> + x. Sliding layers: il % P < P - 1 with P the
    attention.sliding_window_pattern key or 6; their rope base rope.freq_base_swa
    (default 10000) with freq scale 1; global layers rope.freq_base with freq scale
    1/rope.scaling.factor. All norm weights are already w + 1 in the GGUF.
    olmo2: no pre-norms; q,k -> rms over the whole projection * attn_q_norm /
    attn_k_norm -> rope NEOX -> attention -> o -> rms*post_attention_norm -> + x;
    down(silu(gate) * up) of x -> rms*post_ffw_norm -> + x.
    smollm3: llama block; no rope on layers with (il + 1) % 4 == 0 (hard-coded).
    llama: llama block, rope NORM on the converter-permuted Q/K rows, no window.

    opts change that reading (for the checks: the HF semantics, and typical mistakes):
    window, swa_layers, attn_scale, embed_scale, norm_offset (added to every norm
    weight), skip_post_norms, qk_norm_per_head, post_as_pre_norm, nope_layers,
    swa_base, full_base, full_freq_scale, gelu_erf, gelu_f16.
    """
    import numpy as np

    r, kv, arch, T, hp = load_gguf_f64(path)

    n_layer, n_embd = hp("block_count"), hp("embedding_length")
    n_head, n_kv = hp("attention.head_count"), hp("attention.head_count_kv", hp("attention.head_count"))
    head_dim = hp("attention.key_length", n_embd // n_head)
    n_rot = hp("rope.dimension_count", head_dim)
    eps = hp("attention.layer_norm_rms_epsilon")
    base = hp("rope.freq_base", 10000.0)
    factor = hp("rope.scaling.factor", 0.0) or 0.0
    freq_scale = 1.0 / factor if factor else 1.0
    n_swa = hp("attention.sliding_window", 0) or 0
    neox = arch in ("gemma3", "olmo2")

    swa = [False] * n_layer
    if arch in ("gemma3", "olmo2") and n_swa > 0:
        pat = gguf_array(r, f"{arch}.attention.sliding_window_pattern")
        if isinstance(pat, list):
            swa = [bool(x) for x in pat]
        else:
            P = int(pat) if pat is not None else (6 if arch == "gemma3" else 4)
            swa = [P == 0 or il % P < P - 1 for il in range(n_layer)]
    base_swa = hp("rope.freq_base_swa", 10000.0 if arch == "gemma3" else base)
    window = n_swa
    if "window" in opts:
        window = opts["window"]
        if arch == "llama":
            swa = [window is not None] * n_layer
    swa = opts.get("swa_layers", swa)
    nope = [arch == "smollm3" and (il + 1) % 4 == 0 for il in range(n_layer)]
    nope = opts.get("nope_layers", nope)

    if arch == "gemma3":
        attn_scale = 1.0 / math.sqrt(n_embd / n_head if n_layer == 62 else head_dim)
        embed_scale = float(np.float32(math.sqrt(n_embd)))  # sqrtf(n_embd)
    else:
        attn_scale, embed_scale = 1.0 / math.sqrt(head_dim), 1.0
    attn_scale = opts.get("attn_scale", attn_scale)
    embed_scale = opts.get("embed_scale", embed_scale)
    off = opts.get("norm_offset", 0.0)
    softcap = hp("final_logit_softcapping")

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (w + off)

    def lin(x, name):
        y = x @ T[name + ".weight"].T
        return y + T[name + ".bias"] if name + ".bias" in T else y

    def act(g):
        if arch != "gemma3":
            return g / (1 + np.exp(-g))
        if opts.get("gelu_erf"):
            from math import erf
            return 0.5 * g * (1 + np.vectorize(erf)(g / math.sqrt(2)))
        if opts.get("gelu_f16"):
            # ggml's CPU GELU (GGML_GELU_FP16): input rounded to f16, result looked up
            # in a table of f16 values; |x| >= 10 passes through (0 or x).
            x16 = g.astype(np.float16).astype(np.float64)
            y = (0.5 * x16 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x16 + 0.044715 * x16 ** 3))))
            y = y.astype(np.float16).astype(np.float64)
            return np.where(g <= -10, 0.0, np.where(g >= 10, g, y))
        return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))

    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)[:, None]

    def rope(x, b, fs):  # [n, heads, head_dim]
        theta = pos * fs * b ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        x = x.copy()
        if neox:
            a, c = x[..., : n_rot // 2].copy(), x[..., n_rot // 2 : n_rot].copy()
            x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot] = a * cos - c * sin, a * sin + c * cos
        else:
            a, c = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
            x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * cos - c * sin, a * sin + c * cos
        return x

    qi, ki = np.arange(n)[:, None], np.arange(n)[None, :]
    x = T["token_embd.weight"][np.asarray(tokens)] * embed_scale
    for il in range(n_layer):
        p = f"blk.{il}."
        has = lambda t: p + t + ".weight" in T  # noqa: E731
        if has("attn_norm"):
            h = rms(x, T[p + "attn_norm.weight"])
        elif opts.get("post_as_pre_norm"):
            h = rms(x, T[p + "post_attention_norm.weight"])
        else:
            h = x
        q, k, v = lin(h, p + "attn_q"), lin(h, p + "attn_k"), lin(h, p + "attn_v")
        whole = has("attn_q_norm") and T[p + "attn_q_norm.weight"].shape[0] == q.shape[1]
        if whole and not opts.get("qk_norm_per_head"):
            q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
        q, k, v = (q.reshape(n, n_head, head_dim), k.reshape(n, n_kv, head_dim),
                   v.reshape(n, n_kv, head_dim))
        if has("attn_q_norm") and not whole:
            q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
        elif whole and opts.get("qk_norm_per_head"):  # the mistake: per-head slices of the weights
            q = rms(q, T[p + "attn_q_norm.weight"].reshape(n_head, head_dim))
            k = rms(k, T[p + "attn_k_norm.weight"].reshape(n_kv, head_dim))
        if not nope[il]:
            if swa[il]:
                b, fs = opts.get("swa_base", base_swa), 1.0
            else:
                b, fs = opts.get("full_base", base), opts.get("full_freq_scale", freq_scale)
            q, k = rope(q, b, fs), rope(k, b, fs)
        allowed = ki <= qi
        if swa[il]:
            allowed = allowed & (ki > qi - window)
        mask = np.where(allowed, 0.0, -np.inf)
        g = n_head // n_kv
        out = np.empty((n, n_head, head_dim))
        for hh in range(n_head):
            sc = (q[:, hh] * attn_scale) @ k[:, hh // g].T + mask
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            out[:, hh] = (sc / sc.sum(-1, keepdims=True)) @ v[:, hh // g]
        o = lin(out.reshape(n, n_head * head_dim), p + "attn_output")
        if has("post_attention_norm") and not opts.get("skip_post_norms") and not opts.get("post_as_pre_norm"):
            o = rms(o, T[p + "post_attention_norm.weight"])
        x = x + o
        if has("ffn_norm"):
            h = rms(x, T[p + "ffn_norm.weight"])
        elif opts.get("post_as_pre_norm"):
            h = rms(x, T[p + "post_ffw_norm.weight"])
        else:
            h = x
        f = lin(act(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
        if has("post_ffw_norm") and not opts.get("skip_post_norms") and not opts.get("post_as_pre_norm"):
            f = rms(f, T[p + "post_ffw_norm.weight"])
        x = x + f
    x = rms(x, T["output_norm.weight"])
    logits = x @ T.get("output.weight", T["token_embd.weight"]).T
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    return logits


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
    reinit(model, WEIGHT_SEED + idx, 0.0 if name == "gemma3" else 1.0)
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
    if name in NEW_ARCHES:
        return finish_new(name, folder, model, config, state, tokens, logits, info, llama_dir)

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


# The numpy reading of model.gguf with what transformers does instead of llama.cpp
# (see GGUF_READING): must give the reference logits.
GGUF_AS_HF = {
    "gemma3": {"attn_scale": GEMMA3_QUERY_PRE_ATTN_SCALAR ** -0.5},
    "mistral": {"window": MISTRAL_WINDOW},
}

# Typical mistakes, as changes of that reading: each must move the logits clearly
# (recorded as max |diff| / max |logit| in reference.json).
MISTAKES = {
    "gemma3": {
        "norm weights w instead of 1 + w": {"norm_offset": -1.0},
        "norm weights 2 + w (+1 applied twice)": {"norm_offset": 1.0},
        "no embedding scale": {"embed_scale": 1.0},
        "attention scale 1/sqrt(head_dim)": {"attn_scale": 16 ** -0.5},
        "attention scale 1/sqrt(hidden/heads)": {"attn_scale": 12 ** -0.5},
        "window 7 (one too few)": {"window": GEMMA3_WINDOW - 1},
        "window 9 (one too many)": {"window": GEMMA3_WINDOW + 1},
        "no window": {"window": 10 ** 6},
        "all layers sliding (as a 3-layer [S, S, F] GGUF would read)": {"swa_layers": [True] * 6},
        "global rope base on sliding layers": {"swa_base": 1000000.0},
        "local rope base on the global layer": {"full_base": 10000.0},
        "no rope scaling on the global layer": {"full_freq_scale": 1.0},
        "post-norms skipped": {"skip_post_norms": True},
        "GELU erf instead of tanh": {"gelu_erf": True},
        "GELU through ggml's f16 table (llama.cpp on CPU)": {"gelu_f16": True},
    },
    "olmo2": {
        "q/k norm per head instead of whole projection": {"qk_norm_per_head": True},
        "post-norms used as pre-norms": {"post_as_pre_norm": True},
        "post-norms skipped": {"skip_post_norms": True},
    },
    "smollm3": {
        "rope on every layer (NoPE ignored)": {"nope_layers": [False] * 4},
        "NoPE on layer 0 instead of 3": {"nope_layers": [True, False, False, False]},
    },
    "mistral": {
        "no window (llama.cpp's reading)": {"window": None},
        "window 7 (one too few)": {"window": MISTRAL_WINDOW - 1},
        "window 9 (one too many)": {"window": MISTRAL_WINDOW + 1},
    },
}


def finish_new(name: str, folder: Path, model, config, state: dict, tokens, logits, info: dict,
               llama_dir: Path) -> dict:
    """The rest of make_one for gemma3, olmo2, smollm3 and mistral."""
    import numpy as np
    import transformers as tf
    from safetensors.numpy import save_file

    toks = tokens.tolist()
    max_abs = info["max_abs_logit"]

    def hf_variant(**changes):
        cfg = copy.deepcopy(model.config)
        for k, v in changes.items():
            setattr(cfg, k, v)
        m = build_model(name, cfg)
        m.load_state_dict(model.state_dict())
        return logits_of(m, toks)

    def rel(a, b=logits):
        return float(np.abs(np.asarray(a, dtype=np.float64) - b).max()) / max_abs

    def must_differ(what: str, r: float) -> None:
        log(f"{name}: {what}: max |logit difference| {r:.3%} of max |logit|")
        if r <= 1e-2:
            sys.exit(f"{name}: {what} barely changes the logits; the fixture would not test it")

    # What transformers computes with one feature switched off: each must matter.
    hf_checks = {}
    if name in ("gemma3", "mistral"):
        # The window is really used by eager attention (or this fixture tests nothing).
        hf_checks["sliding_window_ignored"] = rel(hf_variant(
            sliding_window=None if name == "mistral" else 4096))
        info["sliding_window"] = config.sliding_window
        info["sliding_window_rule"] = (
            "query position i sees key positions j with i - sliding_window < j <= i "
            "(sliding_window tokens, itself included)")
    if name == "gemma3":
        info["layer_types"] = list(config.layer_types)
        plain = copy.deepcopy(GEMMA3_ROPE)
        plain["full_attention"] = {"rope_type": "default", "rope_theta": plain["full_attention"]["rope_theta"]}
        hf_checks["rope_scaling_ignored"] = rel(hf_variant(rope_parameters=plain))
        hf_checks["query_pre_attn_scalar_as_head_dim"] = rel(hf_variant(query_pre_attn_scalar=config.head_dim))
    if name == "smollm3":
        info["no_rope_layers"] = list(config.no_rope_layers)
        hf_checks["nope_ignored"] = rel(hf_variant(no_rope_layers=[1] * config.num_hidden_layers))
    for what, r in hf_checks.items():
        must_differ(f"transformers with {what}", r)
    info["transformers_variant_rel_diff"] = hf_checks

    tensors = {"tokens": tokens, "logits": np.ascontiguousarray(logits)}
    as_gguf = logits
    if name in GGUF_READING:
        as_gguf = hf_variant(**GGUF_READING[name])
        tensors["logits_as_gguf"] = np.ascontiguousarray(as_gguf)
        info["gguf_reading"] = GGUF_READING[name]
        info["logits_as_gguf_max_abs_logit"] = float(np.abs(as_gguf).max())
        info["logits_as_gguf_rel_diff"] = rel(as_gguf)
    save_file(tensors, str(folder / "reference.safetensors"))

    # The transformers 4 layout, read back by transformers 5 to the same config.
    cfg = json.loads((folder / "config.json").read_text())
    v4 = v4_config_gemma3(cfg) if name == "gemma3" else v4_config(cfg)
    (folder / "config.v4.json").write_text(json.dumps(v4, indent=2) + "\n")
    back = type(config).from_json_file(str(folder / "config.v4.json"))
    for attr in ("rope_parameters", "layer_types", "sliding_window", "no_rope_layers",
                 "query_pre_attn_scalar", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        if hasattr(config, attr) and getattr(back, attr, None) != getattr(config, attr):
            sys.exit(f"{name}: config.v4.json reads back {attr} = {getattr(back, attr, None)!r}, "
                     f"want {getattr(config, attr)!r}")

    convert(llama_dir, folder, folder / "model.gguf")
    g = check_gguf_new(name, folder, config, state)
    gguf_path = folder / "model.gguf"
    d = float(np.abs(gguf_forward_new(gguf_path, toks) - as_gguf).max())
    log(f"{name}: numpy forward from model.gguf (llama.cpp's reading) vs transformers"
        f"{' logits_as_gguf' if name in GGUF_READING else ''}: max |diff| {d:.2e}")
    if d > 1e-3:
        sys.exit(f"{name}: the GGUF's logits differ from transformers' by {d}")
    info["gguf_numpy_forward_max_abs_diff"] = d
    as_hf = GGUF_AS_HF.get(name, {})
    if as_hf:
        d = float(np.abs(gguf_forward_new(gguf_path, toks, **as_hf) - logits).max())
        log(f"{name}: numpy forward from model.gguf with {as_hf} vs transformers: max |diff| {d:.2e}")
        if d > 1e-3:
            sys.exit(f"{name}: the GGUF read as transformers does differs by {d}")
        info["gguf_numpy_forward_as_hf"] = as_hf
        info["gguf_numpy_forward_as_hf_max_abs_diff"] = d
    mistakes = {}
    for what, opts in MISTAKES[name].items():
        mistakes[what] = rel(gguf_forward_new(gguf_path, toks, **{**as_hf, **opts}))
        log(f"{name}: mistake {what!r}: max |logit difference| {mistakes[what]:.3%} of max |logit|")
    info["mistakes_rel_diff"] = mistakes
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
