#!/usr/bin/env bash
# Benchmark of watch mode: latency from a write returning in the source to the change being
# visible in the target (p50, p99), for `mirrorfs watch` and lsyncd side by side in one run, on an
# empty tree and on the Rust docs tree (about 50,000 files); and the CPU and memory of an idle
# `mirrorfs watch` over the docs tree. WRITES (default 200) and WRITES_LSYNCD (default 30: lsyncd
# waits about a second per change) set how many writes are timed.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/mirrorfs-wbench}
command -v lsyncd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lsyncd; }
cargo build --release -q
rm -rf "$WORK"; mkdir -p "$WORK"
python3 bench/watch.py "$PWD/target/release/mirrorfs" "$WORK" "$(rustc --print sysroot)/share/doc"
rm -rf "$WORK"
