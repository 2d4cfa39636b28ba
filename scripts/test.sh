#!/usr/bin/env bash
# The project's test command (README, .ci/run): sets up the independent Python
# readers, fetches the real model and text into the cache, builds the binary once
# with optimisations, and runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPRESS_CACHE="${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress}"

scripts/setup-python.sh
cargo build --release -p compress
target/release/compress fetch
cargo test --release --workspace "$@"
