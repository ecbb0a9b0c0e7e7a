#!/usr/bin/env bash
# Runs every test of mirrorfs, on a fresh machine too: installs what the tests need first.
# Tests run as root (they set owners, make device nodes and xattrs).
set -euo pipefail
cd "$(dirname "$0")"

# Debian tools the tests call: script(1) for the terminal test, coreutils' mknod/mkfifo/touch.
missing=()
command -v script >/dev/null || missing+=(bsdutils)
command -v mknod >/dev/null || missing+=(coreutils)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the tests need root (owners, device nodes)" >&2
  exit 2
fi

cargo build --release --workspace --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
