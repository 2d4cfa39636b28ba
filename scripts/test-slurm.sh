#!/usr/bin/env bash
# The Slurm path, end to end, on a real one-node Slurm started on this machine.
#
# Installs Slurm and munge from Debian's packages when they are missing (needs
# root), starts munged, slurmctld and slurmd with a private configuration under
# .cache/slurm-test/, and submits examples/slurm/compress-array.sh unchanged
# (only resource flags on the sbatch command line) on a four-job recipe of the
# tiny llama3 fixture whose jobs share an imatrix, a 2:4 SparseGPT pruning and
# a distillation. While the array runs it cancels the task that is computing
# the shared distillation, mid-stage, and resubmits that task exactly as the
# script's header says. Then it checks:
#   - `compress status` reports every job finished, exit 0;
#   - every artifact is byte-identical to a single-machine `compress run`;
#   - every stage shared by several jobs was computed once (one manifest
#     records computing it, the others reused it), and the logs name who
#     computed and who waited;
#   - the resubmitted task ran (Slurm says COMPLETED).
# Takes about two minutes; not part of the default test run:
#   bash scripts/test-slurm.sh            # prints PASS or the first failure
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$repo/.cache/slurm-test"
conf_dir="$work/etc"
say() { echo "test-slurm: $*" >&2; }
fail() { say "FAIL: $*"; exit 1; }

if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [[ $(id -u) == 0 ]] || fail "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    say "installing slurm-wlm and munge from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

say "building compress"
(cd "$repo" && cargo build --release -q -p compress)
export PATH="$repo/target/release:$PATH"
# The tasks share the cache compress uses here (sbatch passes the environment on).
export COMPRESS_CACHE="${COMPRESS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compress}"

# --- a one-node cluster ----------------------------------------------------
stop_cluster() {
    for pidfile in "$work/slurmd.pid" "$work/slurmctld.pid" "$work/munged.pid"; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}
stop_cluster
rm -rf "$work"
mkdir -p "$conf_dir" "$work/state" "$work/spool" "$work/munge" "$work/run"
trap stop_cluster EXIT

node="$(hostname -s)"
chown munge: "$work/munge"
chmod 700 "$work/munge"
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge: /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
socket="$work/munge/munge.socket"
runuser -u munge -- munged --socket="$socket" --pid-file="$work/munge/munged.pid" \
    --log-file="$work/munge/munged.log" --seed-file="$work/munge/seed" --force
cp "$work/munge/munged.pid" "$work/munged.pid"

# Four CPUs on a two-core machine (config_overrides): the four tasks of the
# array run at once, so shards really contend for the shared stages.
cat >"$conf_dir/slurm.conf" <<EOF
ClusterName=compress-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
MinJobAge=3600
NodeName=$node CPUs=4 RealMemory=8000 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
: >"$conf_dir/cgroup.conf"
export SLURM_CONF="$conf_dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
    sleep 1
done
sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' ||
    fail "the node did not come up: $(sinfo 2>&1 | tail -2); see $work/slurmctld.log and $work/slurmd.log"
say "one-node Slurm up: $(sinfo -h -o '%P %D %c %T')"

# --- the recipe ---------------------------------------------------------------
run_dir="$work/submit"
mkdir -p "$run_dir/logs"
model="$repo/tests/fixtures/arch/llama3/model.gguf"
cat >"$run_dir/tiny.toml" <<EOF
# Four jobs of the tiny llama3 fixture: two share an imatrix, two share a
# 2:4 SparseGPT pruning and its distillation.
name = "slurm-tiny"
output = "out/tiny"
[[model]]
name = "llama3"
path = "$model"
[calib]
text = "asset:calib"
samples = 8
seq = 64
[eval]
text = "asset:eval"
ctx = 64
chunks = 8
[[variant]]
name = "q4_0"
stages = [{ kind = "quantize", type = "Q4_0", imatrix = true }]
[[variant]]
name = "q5_1"
stages = [{ kind = "quantize", type = "Q5_1", imatrix = true }]
[[variant]]
name = "sparse24-distilled-q8_0"
stages = [
  { kind = "prune", method = "sparsegpt", nm = "2:4", write = "gguf" },
  { kind = "distill", tokens = 160000, seq = 64, lr = 2e-4, write = "gguf" },
  { kind = "quantize", type = "Q8_0" },
]
[[variant]]
name = "sparse24-distilled-q4_0"
stages = [
  { kind = "prune", method = "sparsegpt", nm = "2:4", write = "gguf" },
  { kind = "distill", tokens = 160000, seq = 64, lr = 2e-4, write = "gguf" },
  { kind = "quantize", type = "Q4_0" },
]
EOF
cd "$run_dir"
compress validate tiny.toml >/dev/null
compress run tiny.toml --plan
shards=$(compress run tiny.toml --plan --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["shards"])')
[[ $shards == 4 ]] || fail "the plan has $shards shards, expected 4"

# --- the array, as the example's header says -----------------------------------
script="$repo/examples/slurm/compress-array.sh"
resources=(--cpus-per-task=1 --mem=1G --time=00:20:00)
job=$(sbatch --parsable "${resources[@]}" --array=0-$((shards - 1)) "$script" tiny.toml)
say "submitted array $job (tasks 0-$((shards - 1)))"

# The task computing the shared distillation (mid-stage), and the one waiting
# for it: the waiter is preempted (scontrol requeue; the script's --requeue lets
# Slurm restart it), then the computing task is cancelled.
victim="" waiter=""
task_of() { local t="${1##*_}"; echo "${t%.log}"; }
for _ in $(seq 240); do
    for log in logs/compress-"${job}"_*.log; do
        [[ -f $log ]] || continue
        if grep -q 'stage 2 distill: running' "$log" && grep -qE 'stage 2 distill: distill [0-9]+/' "$log"; then
            victim=$(task_of "$log")
        elif grep -q 'stage 2 distill: being computed by' "$log"; then
            waiter=$(task_of "$log")
        fi
    done
    [[ -n $victim && -n $waiter ]] && break
    victim="" waiter=""
    sleep 0.5
done
[[ -n $victim && -n $waiter ]] || fail "no task started the shared distillation with another waiting; logs: $(tail -n 3 logs/* 2>&1)"
scontrol requeue "${job}_${waiter}"
say "requeued task $waiter while it waited for the distillation"
sleep 2
scancel "${job}_${victim}"
say "cancelled task $victim mid-distillation"

wait_for() {
    for _ in $(seq 600); do
        [[ -z $(squeue -h -j "$1" 2>/dev/null) ]] && return 0
        sleep 1
    done
    fail "job $1 still queued or running after 10 minutes"
}
wait_for "$job"
state=$(scontrol show job "${job}_${victim}" | grep -o 'JobState=[A-Z]*')
[[ $state == JobState=CANCELLED ]] || fail "task $victim ended as $state, not CANCELLED"
requeued=$(scontrol show job "${job}_${waiter}" | grep -oE 'JobState=[A-Z]+|Restarts=[0-9]+' | tr '\n' ' ')
[[ $requeued == "JobState=COMPLETED Restarts=1 " ]] || fail "the requeued task $waiter: $requeued"
say "the requeued task $waiter ran again and completed ($requeued)"

# Resubmit only the cancelled task, by the command in the example's header.
again=$(sbatch --parsable "${resources[@]}" --array="$victim" "$script" tiny.toml)
say "resubmitted task $victim as $again"
wait_for "$again"
state=$(scontrol show job "${again}_${victim}" | grep -o 'JobState=[A-Z]*' || scontrol show job "$again" | grep -o 'JobState=[A-Z]*')
[[ $state == JobState=COMPLETED ]] || fail "the resubmitted task ended as $state: $(tail -n 5 logs/compress-"${again}"_*.log)"

# --- checks -------------------------------------------------------------------
compress status out/tiny --recipe tiny.toml || fail "compress status: not every job finished"
say "a single-machine run of the same recipe, for the bytes"
compress run tiny.toml --out single --quiet || fail "the single-machine run failed"
compress status out/tiny --json >status-slurm.json
compress status single --json >status-single.json
compress run tiny.toml --plan --json >plan.json
python3 - "$job" "$victim" <<'EOF'
import glob, json, sys
job, victim = sys.argv[1], sys.argv[2]
def artifacts(path):
    return {m["job"]["name"]: sorted((f["path"].rsplit("/", 1)[-1], f["sha256"]) for f in m["artifacts"])
            for m in json.load(open(path))["jobs"]}
slurm, single = artifacts("status-slurm.json"), artifacts("status-single.json")
assert len(slurm) == 4 and slurm == single, f"artifacts differ:\n{slurm}\n{single}"
print(f"test-slurm: {len(slurm)} jobs' artifacts byte-identical to a single-machine run", file=sys.stderr)

plan = json.load(open("plan.json"))
manifests = json.load(open("status-slurm.json"))["jobs"]
shared = [s for s in plan["stages"] if len(s["jobs"]) > 1]
assert len(shared) == 3, f"expected 3 shared stages (imatrix, prune, distill): {shared}"
logs = {p: open(p).read() for p in glob.glob("logs/*.log")}
text = "\n".join(logs.values())
for s in shared:
    # Finished computations in every task's log, the cancelled one's included
    # (a resubmitted task rewrites its manifest, so logs are the full record).
    finished = sum(1 for line in text.splitlines()
                   if ": finished in " in line and line.endswith(f"({s['key']})"))
    records = [r for m in manifests for r in m["stages"] if r["key"] == s["key"]]
    holders = {json.dumps(r["computed_by"], sort_keys=True) for r in records}
    assert finished == 1 and len(records) == len(s["jobs"]) and len(holders) == 1, \
        f"shared {s['kind']} {s['key']}: finished {finished} times; holders {holders}"
    by = records[0]["computed_by"]
    print(f"test-slurm: shared {s['kind']} (jobs {s['jobs']}) computed once, by shard {by['shard']} "
          f"(slurm task {by['slurm']}); the other job reused it", file=sys.stderr)

assert "being computed by shard" in text, "no log says a shard waited for another"
assert "reused after waiting" in text, "no log says a waiting shard reused the stage"
resubmitted = [t for p, t in logs.items() if p.endswith(f"_{victim}.log") and not p.startswith(f"logs/compress-{job}_")]
assert resubmitted, "no log of the resubmitted task"
assert f"shard {int(victim) + 1}/4" in resubmitted[0], resubmitted[0][:400]
print("test-slurm: the resubmitted task ran its own shard "
      f"{int(victim) + 1}/4 and resumed from the finished stages", file=sys.stderr)
EOF
say "PASS (logs, manifests and Slurm's own logs in $work)"
