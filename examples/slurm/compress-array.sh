#!/usr/bin/env bash
# A Slurm job array that runs a recipe's jobs across machines: task I (0-based)
# runs `compress run RECIPE --shard I+1`, and every task writes into the same
# shared output folder. The number of shards comes from the recipe (its
# `shards` key, or one job per shard), never from the array, so any subset of
# tasks can be submitted or resubmitted. `compress run RECIPE --plan` prints it
# (and which shard computes each stage that several jobs share; the others wait
# for it through a lease in OUT/.stages and reuse it).
#
# Submit from the folder holding the recipe (logs/ must exist: Slurm does not
# create it):
#   mkdir -p logs
#   compress run examples/batch.toml --plan      # 7 jobs in 7 shards
#   sbatch --array=0-6 examples/slurm/compress-array.sh examples/batch.toml
# A failed, cancelled or preempted task resumes from its last finished stage when
# resubmitted (here task 3, i.e. shard 4 of 7):
#   sbatch --array=3 examples/slurm/compress-array.sh examples/batch.toml
# `--requeue` below lets Slurm requeue a preempted task itself (scontrol requeue).
# When the array is done:
#   compress status out/batch --recipe examples/batch.toml
#SBATCH --job-name=compress
#SBATCH --cpus-per-task=16
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/compress-%A_%a.log
#SBATCH --requeue
set -euo pipefail

recipe="${1:?usage: sbatch --array=0-(N-1) compress-array.sh RECIPE [OUT]}"
out="${2:-}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=...}"
# One cache of model and text downloads for every task, on the shared filesystem.
export COMPRESS_CACHE="${COMPRESS_CACHE:-$PWD/.cache/compress}"
export RAYON_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# Slurm counts tasks from 0; --shard counts from 1 and takes N from the recipe.
args=(run "$recipe" --shard "$((SLURM_ARRAY_TASK_ID + 1))")
if [[ -n "$out" ]]; then
    args+=(--out "$out")
fi
# Plain line-by-line progress in the log; exit code 1 = a gate failed, 2 = a job failed.
srun compress "${args[@]}"
