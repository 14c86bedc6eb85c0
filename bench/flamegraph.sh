#!/bin/bash
# A flame graph of each daemon during one 10-second replicator-bench cell at
# RTT 0: where its CPU time goes, by call stack.
#
#   bench/flamegraph.sh CONFIG WORKLOAD OUT_DIR [REPLICATOR [REPLICATOR_BENCH]]
#   bench/flamegraph.sh async qd32 bench/profiles/after
#
# CONFIG is nbd, async or sync; WORKLOAD one of replicator-bench's (qd1,
# qd32, seq, ...). REPLICATOR and REPLICATOR_BENCH default to this tree's
# release builds; give another tree's pair to profile an earlier build with
# its own benchmark. OUT_DIR's name labels the graphs (name it after the
# build, e.g. its commit). Writes OUT_DIR/CONFIG-WORKLOAD-ROLE.svg (ROLE: primary
# and secondary, or unpaired for nbd) and OUT_DIR/CONFIG-WORKLOAD-ROLE.folded.gz
# (the folded stacks: one line per stack with the CPU time sampled in it,
# in nanoseconds; `bench/profile-shares.py` sums them by what they were
# doing).
#
# 4 s of `perf record` with DWARF call graphs at 499 Hz per daemon; the
# unwinding slows the daemons while it runs, so the graphs tell shares, not
# costs: `bench/perf-per-write.sh` measures those, with nothing else
# attached. Needs `perf` (Debian: linux-perf) and inferno (`cargo install
# inferno`).
set -euo pipefail
usage="usage: $0 CONFIG WORKLOAD OUT_DIR [REPLICATOR [REPLICATOR_BENCH]]"
cfg=${1:?$usage}
workload=${2:?$usage}
dest=${3:?$usage}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${4:-$root/target/release/replicator}
bench=${5:-$root/target/release/replicator-bench}
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }
for tool in inferno-collapse-perf inferno-flamegraph; do
  command -v $tool >/dev/null || { echo "$tool is not installed (cargo install inferno)" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }
mkdir -p "$dest"

. "$root/bench/cell.sh"
out=$(mktemp -d)
trap 'stop_cell "$out"; rm -rf "$out"' EXIT
# The daemons run a copy without debug information: perf names its
# functions from the symbol table (some versions of perf fail on a release
# build's line tables), and every build's graph shows functions alike, with
# no inlined frames (`--no-inline`: whether perf finds them depends on what
# its build-id cache holds).
objcopy --strip-debug "$bin" "$out/replicator"
start_cell "$cfg" "$workload" "$out/replicator" "$bench" "$out"
# cpu-clock: CPU time in nanoseconds whether or not the machine has a PMU
# (a guest often has none; with one, perf's default would count cycles).
pids=()
for site in "${sites[@]}"; do
  perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "${daemons[$site]}" -o "$out/$site.data" \
    -- sleep 4 >"$out/record-$site.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do
  wait "$p" || { cat "$out"/record-*.log >&2; echo "perf record failed" >&2; exit 1; }
done
finish_cell "$cfg" "$workload" "$out"
echo "$cell_row"

declare -A role=([site-a]=primary [site-b]=secondary)
[ "$cfg" = nbd ] && role[site-a]=unpaired
for site in "${sites[@]}"; do
  base="$dest/$cfg-$workload-${role[$site]}"
  perf script --no-inline -i "$out/$site.data" 2>/dev/null | inferno-collapse-perf >"$out/$site.folded"
  inferno-flamegraph --title "$cfg $workload at RTT 0, ${role[$site]}, $(basename "$dest"): $cell_iops IOPS while recorded" \
    --countname ns --minwidth 0.5 <"$out/$site.folded" >"$base.svg"
  gzip -9 -c "$out/$site.folded" >"$base.folded.gz"
  echo "$base.svg: $(awk '{ n += $NF } END { printf "%.2f", n / 1e9 }' "$out/$site.folded") s of CPU sampled"
done
