#!/usr/bin/env bash
# Creates the project-local Python virtual environment used by the tests that
# cross-check our codecs against gguf-py (the `gguf` package on PyPI), our
# safetensors against the `safetensors` package, and our config.json files
# against HF transformers' config validation (no PyTorch: configs only).
#
# Location: ${COMPRESS_VENV:-.cache/venv}, relative to the repository root.
# Idempotent: an existing venv with the pinned versions is left as it is, and then
# no network is needed. Needs PyPI (or a configured index) otherwise.
set -euo pipefail

GGUF_VERSION=0.19.0
NUMPY_VERSION=2.4.6
SAFETENSORS_VERSION=0.8.0
TRANSFORMERS_VERSION=5.23.0

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${COMPRESS_VENV:-.cache/venv}"
py="$venv/bin/python"

check_pins() {
    "$py" - "$GGUF_VERSION" "$NUMPY_VERSION" "$SAFETENSORS_VERSION" "$TRANSFORMERS_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want = dict(zip(["gguf", "numpy", "safetensors", "transformers"], sys.argv[1:]))
sys.exit(0 if all(version(p) == v for p, v in want.items()) else 1)
PYEOF
}

if [ -x "$py" ] && check_pins; then
    echo "setup-python: venv ready at $venv (gguf $GGUF_VERSION, numpy $NUMPY_VERSION, safetensors $SAFETENSORS_VERSION)"
    exit 0
fi

if [ ! -x "$py" ]; then
    python3 -m venv "$venv" || {
        echo "setup-python: error: 'python3 -m venv $venv' failed (is python3-venv installed?)" >&2
        exit 1
    }
fi

# Probe the package index before installing so an offline machine gets one clear line.
if ! "$py" -m pip index versions gguf >/dev/null 2>&1; then
    echo "setup-python: error: the Python package index (PyPI) is unreachable; cannot install gguf $GGUF_VERSION" >&2
    exit 2
fi

if ! "$py" -m pip install --quiet \
    "gguf==$GGUF_VERSION" "numpy==$NUMPY_VERSION" "safetensors==$SAFETENSORS_VERSION" \
    "transformers==$TRANSFORMERS_VERSION"; then
    echo "setup-python: error: pip install of the pinned packages failed (see above)" >&2
    exit 1
fi

if ! check_pins; then
    echo "setup-python: error: installed versions do not match the pins" >&2
    exit 1
fi
echo "setup-python: venv ready at $venv (gguf $GGUF_VERSION, numpy $NUMPY_VERSION, safetensors $SAFETENSORS_VERSION, transformers $TRANSFORMERS_VERSION)"
