#!/bin/bash
# Compares two builds of the replicator on the same cells, in alternating
# rounds (A, B, A, B, ...), and prints each round's IOPS and the medians of
# IOPS, p50 and each daemon's CPU per operation: on a shared machine a single
# run of each build says little, the machine's own swing between minutes is
# larger than most changes.
#
#   bench/ab.sh ROUNDS CONFIGS WORKLOADS BIN_A BIN_B [replicator-bench options]
#   bench/ab.sh 3 nbd,async,sync qd1,qd32 /tmp/replicator-before target/release/replicator --pin --site-b-dir /mnt/site-b
#
# Each round is one `replicator-bench --no-figures --no-fio-check` run of
# CONFIGS x WORKLOADS with that build (RTT 0 and 3-s cells unless --rtt or
# --duration is given); its results.json is kept under $AB_OUT (default: a new temporary
# directory). Needs python3 for the summary.
set -euo pipefail
usage="usage: $0 ROUNDS CONFIGS WORKLOADS BIN_A BIN_B [replicator-bench options]"
rounds=${1:?$usage}
configs=${2:?$usage}
workloads=${3:?$usage}
bins=("${4:?$usage}" "${5:?$usage}")
shift 5
root=$(cd "$(dirname "$0")/.." && pwd)
bench=$root/target/release/replicator-bench
[ -x "$bench" ] || { echo "build it first: cargo build --release -p replicator-bench -p replicator --bins" >&2; exit 2; }
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }; done
command -v python3 >/dev/null || { echo "python3 is needed for the summary" >&2; exit 2; }
out=${AB_OUT:-$(mktemp -d)}
mkdir -p "$out"
# Defaults, unless given among the options.
duration=(--duration 3)
rtt=(--rtt 0)
for a in "$@"; do
  case $a in
    --duration | --duration=*) duration=() ;;
    --rtt | --rtt=*) rtt=() ;;
  esac
done

for r in $(seq 1 "$rounds"); do
  for i in 0 1; do
    label=$([ $i = 0 ] && echo A || echo B)
    dir=$out/$label-$r
    echo "round $r, build $label (${bins[$i]})" >&2
    "$bench" --no-figures --no-fio-check "${rtt[@]}" "${duration[@]}" --configs "$configs" --workloads "$workloads" \
      --replicator "${bins[$i]}" --out "$dir" "$@" >"$dir.log" 2>&1 \
      || { echo "round $r, build $label failed: see $dir.log" >&2; exit 1; }
  done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}  # (config, rtt, workload) -> {label: [(iops, p50, a_us, b_us)]}
for label in "AB":
    for r in range(1, rounds + 1):
        for c in json.load(open(f"{out}/{label}-{r}/results.json"))["cells"]:
            s = c["summary"]
            if not s:
                continue
            cpu = {d["role"]: d["us_per_op"] for d in s.get("daemons", [])}
            a = cpu.get("primary", cpu.get("export"))
            rows.setdefault((c["config"], c["rtt_ms"], c["workload"]), {}).setdefault(label, []).append(
                (s["iops"], s["p50_us"], a, cpu.get("secondary")))

def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None

def fmt(x, spec):
    return format("—", ">" + spec.split(".")[0]) if x is None else format(x, spec)

# CPU per operation: the export or primary, and the secondary.
print(f"{'config':<12} {'workload':<15} {'build':<5} {'IOPS per round':<32} {'median IOPS':>11} {'p50 µs':>7} "
      f"{'primary µs':>10} {'secondary µs':>12}")
for (config, rtt, workload), by in rows.items():
    if rtt:
        config = f"{config}@{rtt:g}ms"
    meds = {}
    for label in "AB":
        v = by.get(label, [])
        m = [med([x[k] for x in v]) for k in range(4)]
        meds[label] = m
        rounds_iops = " ".join(f"{x[0]:.0f}" for x in v)
        print(f"{config:<12} {workload:<15} {label:<5} {rounds_iops:<32} {fmt(m[0], '11.0f')} {fmt(m[1], '7.0f')} "
              f"{fmt(m[2], '10.1f')} {fmt(m[3], '12.1f')}")
    if meds["A"][0] and meds["B"][0]:
        print(f"{'':<12} {'':<15} B/A   median IOPS {meds['B'][0] / meds['A'][0]:.2f}×, "
              f"p50 {meds['B'][1] / meds['A'][1]:.2f}×")
print(f"(rounds under {out})")
EOF
