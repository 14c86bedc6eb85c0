#!/bin/bash
# CPU time, context switches and system calls per write of each daemon, with `perf stat`,
# during one 10-second replicator-bench cell at RTT 0.
#
#   bench/perf-per-write.sh CONFIG WORKLOAD [REPLICATOR [REPLICATOR_BENCH]]
#   bench/perf-per-write.sh async qd1
#
# CONFIG is nbd, async or sync; WORKLOAD one of replicator-bench's (qd1,
# qd32, ...). REPLICATOR and REPLICATOR_BENCH default to this tree's release
# builds (give another tree's pair to measure an earlier build with its own
# benchmark). Needs `perf` (Debian: linux-perf).
set -euo pipefail
usage="usage: $0 CONFIG WORKLOAD [REPLICATOR [REPLICATOR_BENCH]]"
cfg=${1:?$usage}
workload=${2:?$usage}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${3:-$root/target/release/replicator}
bench=${4:-$root/target/release/replicator-bench}
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }

. "$root/bench/cell.sh"
out=$(mktemp -d)
trap 'stop_cell "$out"; rm -rf "$out"' EXIT
start_cell "$cfg" "$workload" "$bin" "$bench" "$out"
# The system calls a write costs: the client's requests in and replies out,
# datagrams out and in, reactor waits,
# io_uring submissions, journal writes and syncs, wake-ups between threads.
calls=(sendto recvfrom sendmsg sendmmsg recvmsg recvmmsg epoll_wait io_uring_enter pwritev pwrite64 fdatasync futex)
syscalls=$(printf 'syscalls:sys_enter_%s,' "${calls[@]}")
syscalls=${syscalls%,}
perfs=()
for site in "${sites[@]}"; do
  perf stat -x, -e "task-clock,context-switches,$syscalls" -p "${daemons[$site]}" -- sleep 4 2>"$out/perf-$site.csv" &
  perfs+=($!)
done
for p in "${perfs[@]}"; do
  wait "$p" || { cat "$out"/perf-*.csv >&2; echo "perf stat failed" >&2; exit 1; }
done
finish_cell "$cfg" "$workload" "$out"
echo "$cell_row"
iops=$cell_iops
declare -A role=([site-a]=primary [site-b]=secondary)
[ "$cfg" = nbd ] && role[site-a]=unpaired
for site in "${sites[@]}"; do
  awk -F, -v site="${role[$site]}" -v iops="$iops" '
    /task-clock/ { ms = $1 } /context-switches/ { cs = $1 }
    /syscalls:sys_enter_/ { name = $3; sub(/.*sys_enter_/, "", name); n[name] = $1; order[++k] = name }
    END {
      writes = iops * 4
      printf "%s: %.0f us CPU and %.1f context switches per write (%.0f ms and %d switches in 4 s, ~%d writes)\n",
        site, ms * 1000 / writes, cs / writes, ms, cs, writes
      line = "  system calls per write:"
      for (i = 1; i <= k; i++) if (n[order[i]] + 0 > 0) line = line sprintf(" %s %.2f", order[i], n[order[i]] / writes)
      print line
    }' "$out/perf-$site.csv"
done
