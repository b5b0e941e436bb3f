#!/usr/bin/env bash
# Every cell of a benchmarks/datafree_transfer.py table, each cell its own process (issues 5 and 7).
#
# A data-free run of a ResNet-8 student leaves a large GPU mostly idle, so the teachers of all
# attacks train at once and, as soon as one is ready, all of its cells (ZSKT, ZSKT + ABD, CMI,
# clean KD, ...) start at once too. Every cell is cached in its own run directory, so a killed run
# resumes where it stopped when started again, and `datafree_transfer.py --report` prints the
# table from whatever has finished. The wall times the table reports are per cell and measured
# while the other cells share the device (say so when quoting them).
# The SR cells of the ABD table (zskt+sr, zskt+abd) continue a copy of their base cell's run
# (zskt, zskt+sv) stopped at the SR phase start: whichever process comes first runs that prefix
# and the others wait for it on a file lock (datafree_transfer.py, shared_prefix).
#
# usage: benchmarks/datafree_parallel.sh TABLE OUT DATA_ROOT [options passed to every call]
#   e.g. benchmarks/datafree_parallel.sh abd runs/bench_datafree_transfer ../shared/data
#        CELLS="badnets:zskt badnets:zskt+abd" benchmarks/datafree_parallel.sh abd runs/x ../shared/data
# CELLS (optional) restricts the run to those ATTACK:METHOD cells; PYTHON picks the interpreter.
# Logs: OUT/logs_TABLE/*.log.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TABLE OUT DATA_ROOT [options passed to every call]" >&2
  exit 2
fi
table=$1 out=$2 root=$3
shift 3
py=${PYTHON:-python}
script="$(dirname "$0")/datafree_transfer.py"
# many processes on few cores: one intra-op thread each
common=(--table "$table" --out "$out" --data-root "$root" --threads 1 "$@")
logs="$out/logs_$table"
mkdir -p "$logs"

if [ -n "${CELLS:-}" ]; then
  read -r -a cells <<<"$CELLS"
else
  mapfile -t cells < <("$py" "$script" --table "$table" --list) || exit 1
fi
attacks=()
for c in "${cells[@]}"; do
  a=${c%%:*}
  [[ " ${attacks[*]} " == *" $a "* ]] || attacks+=("$a")
done

log_name() { echo "${1//[:+]/_}"; }  # badnets:zskt+abd → badnets_zskt_abd

# shellcheck source=parallel_stages.sh
source "$(dirname "$0")/parallel_stages.sh"

attack_chain() {  # one teacher, then every wanted cell of that attack at once
  local attack=$1 stage_pids=() stage_names=() c
  if ! "$py" "$script" "${common[@]}" --only "$attack:teacher" >"$logs/${attack}_teacher.log" 2>&1; then
    report_failure "${attack}_teacher"
    return 1
  fi
  echo "$(date +%T) teacher $attack ready"
  for c in "${cells[@]}"; do
    [ "${c%%:*}" = "$attack" ] || continue
    start_stage "$(log_name "$c")" "$py" "$script" "${common[@]}" --only "$c"
  done
  wait_stages
}

echo "$(date +%T) start: table $table, ${#cells[@]} cells, ${#attacks[@]} teachers, $(nproc) cores"
chain_pids=()
for a in "${attacks[@]}"; do
  attack_chain "$a" &
  chain_pids+=($!)
done
status=0
for p in "${chain_pids[@]}"; do wait "$p" || status=1; done
"$py" "$script" "${common[@]}" --report
echo "$(date +%T) end"
exit $status
