#!/bin/sh
# Builds target/debian/replicator_*.deb (needs `cargo install cargo-deb`):
# the release binary, then the man pages and shell completions the binary
# generates from its own command line (`replicator generate`, hidden), then
# cargo-deb packages them with the unit, the sysusers and tmpfiles snippets
# and the example config ([package.metadata.deb] in replicator/Cargo.toml).
# Extra arguments go to `cargo deb` (e.g. --fast).
# Output: target/debian/replicator_VERSION_ARCH.deb and replicator-dbgsym_*.ddeb.
set -eu
cd "$(dirname "$0")/../.."
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cargo build --release -p replicator
out="$target/release/packaging"
rm -rf "$out"
"$target/release/replicator" generate man "$out/man" >/dev/null
gzip -9n "$out"/man/*.1
"$target/release/replicator" generate completions "$out/completions" >/dev/null
# Debug info (the release profile keeps line tables) goes to a separate
# replicator-dbgsym package; the binary in the .deb is stripped.
cargo deb -p replicator --no-build --dbgsym "$@"
