#!/usr/bin/env bash
# The fuzzing harness's full run (tests/fuzz.rs): FUZZ_CASES (default 10^6)
# mutated GGUF models, imatrix GGUFs, safetensors files and config.json files
# through our readers, in-process; 0 panics, 0 aborts and no allocation over
# the bound is the pass. Prints the summary, writes bench/results/fuzz.json,
# and the peak RSS of the whole run (/usr/bin/time).
#
# Usage: bench/fuzz.sh [CASES] [SEED]
# An abort names its case on stderr ("fuzz: seed S case N …"); save and rerun
# it with FUZZ_SEED=S FUZZ_CASE=N cargo test --release -p e2e --test fuzz -- --ignored fuzz_one
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export FUZZ_CASES="${1:-1000000}" FUZZ_SEED="${2:-1}"
cargo test --release -p e2e --test fuzz --no-run >/dev/null 2>&1
bin=$(ls -t target/release/deps/fuzz-* | grep -v '\.d$' | head -1)
/usr/bin/time -v "$bin" --ignored --exact fuzz_full --nocapture 2>"$root/target/fuzz-time.log" || {
    cat "$root/target/fuzz-time.log" >&2
    exit 1
}
grep -E "Maximum resident|Elapsed" "$root/target/fuzz-time.log"
python3 - <<'PY'
import json
r = json.load(open("bench/results/fuzz.json"))
print("| cases | seed | seconds | accepted | refused | failures | worst allocation / input |")
print("|---|---|---|---|---|---|---|")
print(f"| {r['cases']} | {r['seed']} | {r['seconds']:.1f} | {r['accepted']} | {r['refused']} | {len(r['failures'])} | {r['worst_alloc_ratio']:.0f}× |")
PY
