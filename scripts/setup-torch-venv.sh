#!/usr/bin/env bash
# Creates the project-local Python venv with PyTorch (CPU use) + HF transformers that
# scripts/make-arch-fixtures.py runs in: it builds tiny random-weight reference models,
# their logits, and their GGUF conversion by llama.cpp's own convert_hf_to_gguf.py;
# scripts/check-engines.sh loads our compressed-tensors folders in it.
# The fixtures it writes are committed (tests/fixtures/arch/); neither CI nor the
# tests need this venv. Not part of CI.
#
# Location: ${COMPRESS_TORCH_VENV:-.cache/venv-torch}, relative to the repository root
# (.cache/ is git-ignored). Idempotent: a venv with the pinned versions is left as it
# is, and then no network is needed. Needs PyPI otherwise.
#
# Size and time: PyPI's Linux torch wheel is a CUDA build, and it does not import
# without its nvidia/CUDA libraries (`torch --no-deps` fails at `import torch` with
# "libcublasLt.so.*[0-9] not found"), and download.pytorch.org's CPU wheels are not
# reachable here. So torch is installed plainly, with its CUDA dependencies: about
# 3.5 GB downloaded, 5.3 GB on disk, ~80 s for torch at PyPI's speed here plus ~60 s
# for the rest. Only the CPU is used.
#
# The llama.cpp source that the fixture script converts with is not installed here:
# make-arch-fixtures.py takes it from the llama-cpp-python sdist, the same one
# scripts/build-llama-cpp.sh downloads (and it downloads it itself the same way if
# it is missing; building llama.cpp is not needed).
set -euo pipefail

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.23.0
TOKENIZERS_VERSION=0.23.3
SAFETENSORS_VERSION=0.8.0
NUMPY_VERSION=2.4.6
GGUF_VERSION=0.19.0
# convert_hf_to_gguf.py imports sentencepiece before it finds there is no tokenizer.model.
SENTENCEPIECE_VERSION=0.2.3
# transformers' loader of compressed-tensors folders (scripts/check-engines.sh).
COMPRESSED_TENSORS_VERSION=0.20.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${COMPRESS_TORCH_VENV:-.cache/venv-torch}"
py="$venv/bin/python"

check_pins() {
    "$py" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" "$TOKENIZERS_VERSION" \
        "$SAFETENSORS_VERSION" "$NUMPY_VERSION" "$GGUF_VERSION" "$SENTENCEPIECE_VERSION" \
        "$COMPRESSED_TENSORS_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
names = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "gguf", "sentencepiece",
         "compressed-tensors"]
want = dict(zip(names, sys.argv[1:]))
if not all(version(p) == v for p, v in want.items()):
    sys.exit(1)
import torch
float(torch.randn(2) @ torch.randn(2))
PYEOF
}

pins="torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION, tokenizers $TOKENIZERS_VERSION, safetensors $SAFETENSORS_VERSION, numpy $NUMPY_VERSION, gguf $GGUF_VERSION, sentencepiece $SENTENCEPIECE_VERSION, compressed-tensors $COMPRESSED_TENSORS_VERSION"

if [ -x "$py" ] && check_pins; then
    echo "setup-torch-venv: venv ready at $venv ($pins)"
    exit 0
fi

if [ ! -x "$py" ]; then
    python3 -m venv "$venv" || {
        echo "setup-torch-venv: error: 'python3 -m venv $venv' failed (is python3-venv installed?)" >&2
        exit 1
    }
fi

if ! "$py" -m pip index versions torch >/dev/null 2>&1; then
    echo "setup-torch-venv: error: the Python package index (PyPI) is unreachable; cannot install torch $TORCH_VERSION" >&2
    exit 2
fi

if ! "$py" -m pip install --quiet \
    "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
    "tokenizers==$TOKENIZERS_VERSION" "safetensors==$SAFETENSORS_VERSION" \
    "numpy==$NUMPY_VERSION" "gguf==$GGUF_VERSION" "sentencepiece==$SENTENCEPIECE_VERSION" \
    "compressed-tensors==$COMPRESSED_TENSORS_VERSION"; then
    echo "setup-torch-venv: error: pip install of the pinned packages failed (see above)" >&2
    exit 1
fi

if ! check_pins; then
    echo "setup-torch-venv: error: installed versions do not match the pins, or torch does not run" >&2
    exit 1
fi
echo "setup-torch-venv: venv ready at $venv ($pins)"
