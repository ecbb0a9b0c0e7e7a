#!/usr/bin/env bash
# Runs every test of mirrorfs, on a fresh machine too: installs what the tests need first.
# Tests run as root (they set owners, make device nodes, mount FUSE filesystems).
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the tests need root (owners, device nodes, FUSE mounts)" >&2
  exit 2
fi

# Debian tools the tests call: script(1) for the terminal test; mknod/mkfifo/touch/truncate;
# fallocate, setpriv and mount(8) from util-linux; python3 (mmap, unix sockets); git and tar for
# the real-workload test.
missing=()
command -v script >/dev/null || missing+=(bsdutils)
command -v mknod >/dev/null || missing+=(coreutils)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v fallocate >/dev/null || missing+=(util-linux)
command -v mount >/dev/null || missing+=(mount)
command -v python3 >/dev/null || missing+=(python3)
command -v git >/dev/null || missing+=(git)
command -v tar >/dev/null || missing+=(tar)
# The outage tests: network namespaces and veth links (iproute2), a loop-mounted ext4 image
# as a removable disk (e2fsprogs), cp -a for an older copy of a target.
command -v ip >/dev/null || missing+=(iproute2)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
[ -d /usr/include/linux ] || missing+=(linux-libc-dev)
# The ssh tests run a real sshd on a loopback port, and the ssh client.
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null || missing+=(openssh-client)
command -v ssh-keygen >/dev/null || missing+=(openssh-client)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# POSIX conformance tools, pinned (configuration in tests/conformance/).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v pjdfstest >/dev/null || cargo install --locked pjdfstest@0.2.2
command -v fsx >/dev/null || cargo install --locked fsx@0.3.2
# pjdfstest switches to these users.
id nobody >/dev/null 2>&1 || useradd -r -U nobody
getent group nogroup >/dev/null || groupadd -r nogroup
# pjdfstest needs the user `tests` and the group `tests`; a machine may have one without the other.
getent group tests >/dev/null || groupadd tests
id tests >/dev/null 2>&1 || useradd -g tests -d / -s /usr/sbin/nologin -c 'pjdfstest user' tests
# The ssh tests log in as an account without root on the "far side": it needs a shell, and a
# password field that is not locked (sshd refuses a locked account without PAM).
id mirrorfs-far >/dev/null 2>&1 || useradd -m -s /bin/sh -c 'mirrorfs far-side test user' mirrorfs-far
usermod -p '*' mirrorfs-far

cargo build --release --workspace --locked
# mount -t mirrorfs and /etc/fstab find the helper here.
ln -sf "$PWD/target/release/mount-mirrorfs" /sbin/mount.mirrorfs

log=$(mktemp)
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
set +e
# --no-fail-fast: every test binary runs even after a failure, so the closing line counts them all.
MIRRORFS_SKIP_LOG="$skips" cargo test --release --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ -s "$skips" ]; then
  echo "skipped (counted as passed by cargo, listed here):"
  sed 's/^/  /' "$skips"
fi
# One closing line over every test binary; a test that skipped itself is not counted as passed.
awk -v skipped="$(wc -l <"$skips")" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p - skipped, f, s + skipped }' "$log"
exit "$status"
