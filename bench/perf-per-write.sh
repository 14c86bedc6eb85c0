#!/bin/bash
# CPU time, context switches and system calls per write of each daemon, with `perf stat`,
# during one 10-second replicator-bench cell at RTT 0.
#
#   bench/perf-per-write.sh CONFIG WORKLOAD [REPLICATOR]
#   bench/perf-per-write.sh async qd1
#
# CONFIG is nbd, async or sync; WORKLOAD one of replicator-bench's (qd1,
# qd32, ...). REPLICATOR defaults to target/release/replicator. Needs `perf`
# (Debian: linux-perf) and a release build of replicator-bench.
set -euo pipefail
usage="usage: $0 CONFIG WORKLOAD [REPLICATOR]"
cfg=${1:?$usage}
workload=${2:?$usage}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${3:-$root/target/release/replicator}
bench=$root/target/release/replicator-bench
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 2; }
[ -x "$bench" ] || { echo "build it first: cargo build --release -p replicator-bench -p replicator --bins" >&2; exit 2; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
mkdir "$out/dir"
"$bench" --rtt 0 --duration 10 --configs "$cfg" --workloads "$workload" --no-figures --no-fio-check \
  --dir "$out/dir" --replicator "$bin" --out "$out/bench" >"$out/bench.log" 2>&1 &
bench_pid=$!

# The daemons of this run (their configuration files live under --dir):
# site-a and site-b of a pair, or site-a alone for the unpaired export.
declare -A daemons=()
sites=(site-a site-b)
[ "$cfg" = nbd ] && sites=(site-a)
for _ in $(seq 150); do
  for site in "${sites[@]}"; do
    p=$(pgrep -f "$out/dir/.*/$site/replicator.toml run" | head -1 || true)
    [ -n "$p" ] && daemons[$site]=$p
  done
  [ ${#daemons[@]} -eq ${#sites[@]} ] && break
  sleep 0.2
done
[ ${#daemons[@]} -eq ${#sites[@]} ] || { cat "$out/bench.log" >&2; echo "the daemons of this run were not found" >&2; exit 1; }
# Past the setup (the bench logs the cell as it starts) and the warm-up,
# into the measured cell.
for _ in $(seq 600); do
  grep -qE "^\[ *[0-9.]+s\]   [0-9a-z+/-]+ \(1/1\)" "$out/bench.log" && break
  sleep 0.2
done
sleep 1
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
wait "${perfs[@]}"
wait "$bench_pid" || { cat "$out/bench.log" >&2; exit 1; }

row=$(grep -E "^\| $cfg \| [^|]* \| [^|]*$workload" "$out/bench/RESULTS.md" | tail -1)
echo "$row"
iops=$(echo "$row" | awk -F'|' '{gsub(/ /, "", $5); print $5}')
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
