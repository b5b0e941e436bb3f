#!/usr/bin/env bash
# Every stage of benchmarks/robustkd_compare.py for one dataset, each stage its own process (issue 4).
#
# One ResNet-20/ResNet-8 training leaves a large GPU mostly idle (launch-bound), so the three
# poisoned-teacher chains run at once and, as soon as a teacher is ready, its seven students
# (ce_only, kd, ofd, nad, fine_pruning, robustkd, robustkd_adv) run at once too. Every stage is
# cached in its own run directory, so a killed run resumes where it stopped when started again.
# The results are those of robustkd_compare.py; the wall times it records are per stage and
# measured while the other stages share the device (say so when quoting them).
#
# usage: benchmarks/robustkd_parallel.sh DATASET OUT DATA_ROOT [--device cuda] [--scale S] ...
#   e.g. benchmarks/robustkd_parallel.sh cifar10 runs/rkd ../shared/data --device cuda
# Logs: OUT/logs/DATASET/*.log. PYTHON picks the interpreter (default: python).
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DATASET OUT DATA_ROOT [options passed to every stage]" >&2
  exit 2
fi
dataset=$1 out=$2 root=$3
shift 3
extra=("$@")
py=${PYTHON:-python}
script="$(dirname "$0")/robustkd_compare.py"
logs="$out/logs/$dataset"
mkdir -p "$logs"
methods=(ce_only kd ofd nad fine_pruning robustkd robustkd_adv)
attacks=(${ATTACKS:-robustkd_blend badnets blend})  # ATTACKS picks a subset; the longest chain (clean teacher → trigger → teacher) first
# many processes on few cores: one intra-op thread each (see kdguard.runtime.configure_threads)
export KDGUARD_NUM_THREADS=${KDGUARD_NUM_THREADS:-1}

# decode the dataset into the cache once, before the parallel readers
"$py" -c "import sys; from kdguard.data import load_dataset
for split in ('train', 'test'): load_dataset(sys.argv[1], split, root=sys.argv[2])" "$dataset" "$root" || exit 1

# shellcheck source=parallel_stages.sh
source "$(dirname "$0")/parallel_stages.sh"

chain() {  # one poisoned teacher, then all of its students at once
  local attack=$1 stage_pids=() stage_names=() m
  if ! "$py" "$script" teachers --dataset "$dataset" --attacks "$attack" --out "$out" --data-root "$root" \
      "${extra[@]}" >"$logs/teacher_$attack.log" 2>&1; then
    report_failure "teacher_$attack"
    return 1
  fi
  echo "$(date +%T) teacher $attack ready: $(tail -n 1 "$logs/teacher_$attack.log")"
  for m in "${methods[@]}"; do
    start_stage "${attack}_$m" "$py" "$script" compare --teachers "$out/$dataset/teacher_$attack" --methods "$m" \
      --out "$out" --data-root "$root" "${extra[@]}"
  done
  wait_stages
}

echo "$(date +%T) start: $dataset, $(nproc) cores"
chain_pids=()
for a in "${attacks[@]}"; do
  chain "$a" &
  chain_pids+=($!)
done
status=0
for p in "${chain_pids[@]}"; do wait "$p" || status=1; done
if [ $status -ne 0 ]; then
  echo "some stages failed; fix them and run this again (finished stages are cached)"
  exit 1
fi
# every stage is cached now: this only gathers the table
"$py" "$script" compare --out "$out" --data-root "$root" "${extra[@]}" \
  --teachers "${attacks[@]/#/$out/$dataset/teacher_}"
echo "$(date +%T) end"
