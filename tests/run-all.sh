#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the system
# packages the end-to-end tests drive (real NBD clients, filesystem tools;
# man, groff, zsh, fish and systemd-analyze for the packaging tests),
# checks formatting and clippy lints, builds in release mode and runs unit,
# simulation and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in qemu-io:qemu-utils fio:fio nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit \
            nbdfuse:libnbd-bin fusermount3:fuse3 mkfs.ext4:e2fsprogs e2fsck:e2fsprogs losetup:mount ip:iproute2 \
            promtool:prometheus man:man-db groff:groff-base zsh:zsh fish:fish systemd-analyze:systemd; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "installing test dependencies: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Lint gates: formatting (rustfmt.toml) and clippy with warnings as errors.
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# Every test binary runs even after one fails (the summary then counts all).
cargo test --release --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# The power-loss suite again on the other I/O backend (the thread pool the
# daemon falls back to where io_uring is unavailable or distrusted): its
# FUA and flush paths differ.
REPLICATOR_IO_BACKEND=threads cargo test --release -p replicator-tests --test power_loss -- --test-threads=2 2>&1 \
    | tee -a "$log" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "workspace: %d passed, %d failed\n", p, f }' "$log"
exit $status
