#!/usr/bin/env bash
# A Slurm job array that runs a recipe's jobs across machines: task I of N runs
# `compress run --shard I/N`, and every task writes into the same shared output
# folder (stage outputs are content-addressed and appear atomically, so shards
# that share a prefix never see half of one). When the array is done:
#   compress status out/batch --recipe examples/batch.toml
#
# Submit from the repository (or any folder holding the recipe) with:
#   sbatch --array=0-6 examples/slurm/compress-array.sh examples/batch.toml
# A failed or preempted task resumes from its last finished stage when resubmitted:
#   sbatch --array=3 examples/slurm/compress-array.sh examples/batch.toml
#SBATCH --job-name=compress
#SBATCH --cpus-per-task=16
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/compress-%A_%a.log
#SBATCH --requeue
set -euo pipefail

recipe="${1:?usage: sbatch --array=0-(N-1) compress-array.sh RECIPE [OUT]}"
out="${2:-}"
# Slurm counts tasks from 0; --shard counts from 1.
shard="$((SLURM_ARRAY_TASK_ID + 1))/${SLURM_ARRAY_TASK_COUNT}"
# One cache of model and text downloads for every task, on the shared filesystem.
export COMPRESS_CACHE="${COMPRESS_CACHE:-$PWD/.cache/compress}"
export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

args=(run "$recipe" --shard "$shard")
if [[ -n "$out" ]]; then
    args+=(--out "$out")
fi
# Plain line-by-line progress in the log; exit code 1 = a gate failed, 2 = a job failed.
srun compress "${args[@]}"
