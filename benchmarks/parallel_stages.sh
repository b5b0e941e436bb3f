# Helpers shared by the *_parallel.sh runners (sourced, not run). The caller sets $logs.
# Stages started by start_stage run in the background with their output in $logs/NAME.log;
# wait_stages waits for all of them, prints which finished and the end of each failed log (on
# stdout, where a remote caller sees it) and returns 1 if any failed.

report_failure() {
  echo "FAILED: $1 (log $logs/$1.log)"
  tail -n 15 "$logs/$1.log"
}

start_stage() {  # NAME COMMAND...
  local name=$1
  shift
  "$@" >"$logs/$name.log" 2>&1 &
  stage_pids+=($!)
  stage_names+=("$name")
}

wait_stages() {
  local i failed=0
  for i in "${!stage_pids[@]}"; do
    if wait "${stage_pids[$i]}"; then
      echo "$(date +%T) ${stage_names[$i]} done"
    else
      report_failure "${stage_names[$i]}"
      failed=1
    fi
  done
  stage_pids=()
  stage_names=()
  return $failed
}
