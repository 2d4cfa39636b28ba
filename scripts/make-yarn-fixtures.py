#!/usr/bin/env python3
"""Writes the YaRN rope-scaling fixtures (tests/fixtures/yarn/).

Two of the existing tiny fixtures with YaRN switched on, as long-context
checkpoints ship it:

  qwen3        tests/fixtures/arch/qwen3 with `rope_type: yarn`, factor 4 over an
               original context of 16 (Qwen 2.5 / Qwen3's recipe for 4x context;
               cos and sin scaled by 0.1·ln(4) + 1)
  deepseek_v3  tests/fixtures/moe/deepseek_v3 with DeepSeek-V3's YaRN (factor 4
               over 16, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1:
               cos and sin unscaled, the attention scores scaled by
               (0.1·ln(4) + 1)², transformers' `yarn_apply_mscale`)

Each folder gets the weights, tokenizer and a config.json (transformers 5 layout,
`rope_parameters`) that differs from the source only in its YaRN keys; the logits
transformers computes (f32, eager attention) on 64 tokens (four times the original
context, the extended `max_position_embeddings`) in reference.safetensors
(`tokens` I32 [64], `logits` F32 [64, vocab],
`logits_unscaled`: the source fixture's, to show the scaling matters), and
model.gguf: llama.cpp's own convert_hf_to_gguf.py --outtype f32 of the folder.

Run with the venv of scripts/setup-torch-venv.sh, from anywhere:

    .cache/venv-torch/bin/python scripts/make-yarn-fixtures.py [--llama-cpp DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQ = 64
SEED = 7

FIXTURES = {
    "qwen3": (
        ROOT / "tests/fixtures/arch/qwen3",
        {"factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "deepseek_v3": (
        ROOT / "tests/fixtures/moe/deepseek_v3",
        {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}


def _load_arch_module():
    """scripts/make-arch-fixtures.py, for its llama.cpp source and converter helpers."""
    path = Path(__file__).resolve().parent / "make-arch-fixtures.py"
    spec = importlib.util.spec_from_file_location("make_arch_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def logits_of(folder: Path, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/yarn"))
    ap.add_argument("--llama-cpp", default=None)
    args = ap.parse_args()
    import numpy as np
    from safetensors.numpy import save_file

    mk = _load_arch_module()
    llama_dir = mk.llama_cpp_source(args.llama_cpp)
    for name, (src, yarn) in FIXTURES.items():
        out = Path(args.out) / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(src / f, out / f)
        config = json.loads((src / "config.json").read_text())
        rope = dict(config["rope_parameters"])
        rope.update({"rope_type": "yarn", **yarn})
        config["rope_parameters"] = rope
        config["max_position_embeddings"] = int(
            yarn["factor"] * yarn["original_max_position_embeddings"])
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        rng = np.random.default_rng(SEED)
        tokens = rng.integers(0, config["vocab_size"], SEQ).tolist()
        scaled = logits_of(out, tokens)
        unscaled = logits_of(src, tokens)
        rel = float(np.abs(scaled - unscaled).max() / np.abs(unscaled).max())
        print(f"{name}: YaRN moves the logits by {rel:.3f} of the largest", file=sys.stderr)
        assert rel > 1e-2, f"{name}: YaRN barely changes the logits ({rel})"
        save_file({"tokens": np.array(tokens, dtype=np.int32),
                   "logits": scaled.astype(np.float32),
                   "logits_unscaled": unscaled.astype(np.float32)},
                  str(out / "reference.safetensors"))
        mk.convert(llama_dir, out, out / "model.gguf")


if __name__ == "__main__":
    main()
