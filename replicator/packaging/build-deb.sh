#!/bin/sh
# Builds target/debian/replicator_*.deb (needs `cargo install cargo-deb`):
# the release binary, then the man pages and shell completions the binary
# generates from its own command line (`replicator generate`, hidden), then
# cargo-deb packages them with the unit, the sysusers and tmpfiles snippets
# and the example config ([package.metadata.deb] in replicator/Cargo.toml).
# Extra arguments go to `cargo deb` (e.g. --fast).
set -eu
cd "$(dirname "$0")/../.."
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cargo build --release -p replicator
out="$target/release/packaging"
rm -rf "$out"
"$target/release/replicator" generate man "$out/man" >/dev/null
"$target/release/replicator" generate completions "$out/completions" >/dev/null
cargo deb -p replicator --no-build "$@"
