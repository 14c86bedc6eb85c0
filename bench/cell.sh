# Sourced by perf-per-write.sh and flamegraph.sh: runs one 10-second
# replicator-bench cell at RTT 0 in the background and waits until it is
# being measured.
#
#   start_cell CONFIG WORKLOAD REPLICATOR REPLICATOR_BENCH WORK_DIR
#
# Sets `bench_pid`, `sites` (site-a, and site-b for a pair) and `daemons`
# (site -> pid); the bench writes WORK_DIR/bench.log and WORK_DIR/bench/.
# Returns once the cell's warm-up is over. `finish_cell` waits for the bench
# and sets `cell_row` (the cell's row of the results table) and `cell_iops`.
# `stop_cell WORK_DIR` (for the caller's EXIT trap) ends a bench and its
# daemons that are still running, as when the caller fails half-way.

start_cell() {
  local cfg=$1 workload=$2 bin=$3 bench=$4 work=$5 site p started=
  [ -x "$bench" ] || { echo "build it first: cargo build --release -p replicator-bench -p replicator --bins" >&2; return 2; }
  mkdir -p "$work/dir"
  "$bench" --rtt 0 --duration 10 --configs "$cfg" --workloads "$workload" --no-figures --no-fio-check \
    --dir "$work/dir" --replicator "$bin" --out "$work/bench" >"$work/bench.log" 2>&1 &
  bench_pid=$!
  # The daemons of this run (their configuration files live under --dir):
  # site-a and site-b of a pair, or site-a alone for the unpaired export.
  declare -gA daemons=()
  sites=(site-a site-b)
  [ "$cfg" = nbd ] && sites=(site-a)
  for _ in $(seq 150); do
    for site in "${sites[@]}"; do
      p=$(pgrep -f "$work/dir/.*/$site/replicator.toml run" | head -1 || true)
      [ -n "$p" ] && daemons[$site]=$p
    done
    [ ${#daemons[@]} -eq ${#sites[@]} ] && break
    sleep 0.2
  done
  [ ${#daemons[@]} -eq ${#sites[@]} ] || { cat "$work/bench.log" >&2; echo "the daemons of this run were not found" >&2; return 1; }
  # Past the setup (the bench logs the cell as it starts) and the warm-up,
  # into the measured cell.
  for _ in $(seq 600); do
    grep -qE "^\[ *[0-9.]+s\]   [0-9a-z+/-]+ \(1/1\)" "$work/bench.log" && { started=1; break; }
    sleep 0.2
  done
  [ -n "$started" ] || { cat "$work/bench.log" >&2; echo "the cell did not start" >&2; return 1; }
  sleep 1
}

finish_cell() {
  local cfg=$1 workload=$2 work=$3
  wait "$bench_pid" || { cat "$work/bench.log" >&2; return 1; }
  bench_pid=
  # The run measured one workload: the configuration's last row (the CPU
  # table's) is its cell, whatever name the workload was given by.
  cell_row=$(awk -F'|' -v cfg=" $cfg " '$2 == cfg && $5 ~ /^ *[0-9]+ *$/ { row = $0 } END { print row }' "$work/bench/RESULTS.md")
  [ -n "$cell_row" ] || { echo "no $cfg row for $workload in the bench's results" >&2; return 1; }
  cell_iops=$(echo "$cell_row" | awk -F'|' '{gsub(/ /, "", $5); print $5}')
}

stop_cell() {
  local work=$1
  [ -n "${bench_pid:-}" ] && kill "$bench_pid" 2>/dev/null
  pkill -f "$work/dir/.*/replicator.toml run" 2>/dev/null
  return 0
}
