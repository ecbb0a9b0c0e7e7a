#!/usr/bin/env bash
# Benchmark: mirrorfs over ssh, side by side in one run with its peers, and the ratios.
#
#   1. `mirrorfs sync` against `rsync -a -e ssh` on the Rust docs tree, both through the same
#      sshd on loopback behind bench/delay.py (DELAY_MS each way, default 5): initial copy,
#      re-run with nothing changed, 1% of the files appended; time and bytes for each.
#   2. The mount over ssh against the same mount over a unix socket: `cp -a` of a part of the
#      docs tree into it, and a sequential write with fsync. Here ssh goes to sshd directly, not
#      through the relay, so the ratio is the cost of ssh itself.
# Bytes: mirrorfs counts what it sent during the apply (its requests); the target's scan listing
# flows the other way and is not in it. rsync's "Total bytes sent" includes its file list.
# Each timing is the median of ROUNDS runs (default 3), the two alternating, each going first in
# every other round.
#
#   bench/ssh.sh
#   ROUNDS=5 DELAY_MS=0 bench/ssh.sh
#   PARTS=mount bench/ssh.sh      # only the mount's part
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DELAY_MS=${DELAY_MS:-5}
WORK=${WORK:-/tmp/mirrorfs-bench-ssh}
need=()
command -v rsync >/dev/null || need+=(rsync)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
[ ${#need[@]} -eq 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; }
cargo build --release -q
M=$PWD/target/release/mirrorfs
BENCH=$PWD/bench
pids=()
cleanup() {
  for m in "$WORK"/mnt-*; do [ -d "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }; done
  kill "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK/aside" /run/sshd
chmod 755 "$WORK"

# A private sshd on loopback, reached through the delay relay, with keys made for this run.
K=$WORK/keys
mkdir -p "$K"
ssh-keygen -q -t ed25519 -N '' -f "$K/host"
ssh-keygen -q -t ed25519 -N '' -f "$K/id"
cp "$K/id.pub" "$K/authorized_keys"
cat > "$K/sshd_config" <<CONF
Port 17621
ListenAddress 127.0.0.1
HostKey $K/host
AuthorizedKeysFile $K/authorized_keys
PidFile none
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
LogLevel ERROR
CONF
echo "[127.0.0.1]:17622 $(cat "$K/host.pub")" > "$K/known_hosts"
echo "[127.0.0.1]:17621 $(cat "$K/host.pub")" >> "$K/known_hosts"
cat > "$K/ssh_config" <<CONF
Host bench-ssh-direct
  HostName 127.0.0.1
  Port 17621
  User root
  IdentityFile $K/id
  IdentitiesOnly yes
  UserKnownHostsFile $K/known_hosts
  StrictHostKeyChecking yes
  LogLevel ERROR
Host bench-ssh
  HostName 127.0.0.1
  Port 17622
  User root
  IdentityFile $K/id
  IdentitiesOnly yes
  UserKnownHostsFile $K/known_hosts
  StrictHostKeyChecking yes
  LogLevel ERROR
CONF
/usr/sbin/sshd -D -e -f "$K/sshd_config" 2>/dev/null & pids+=($!)
python3 "$BENCH/delay.py" 17622 17621 "$DELAY_MS" & pids+=($!)
sleep 1
SSH="ssh -F $K/ssh_config"
$SSH bench-ssh true || { echo "the benchmark's sshd does not answer" >&2; exit 1; }

DOCS=$(rustc --print sysroot)/share/doc
cp -a "$DOCS" "$WORK/docs"
S=$WORK/docs
echo "docs tree: $(find "$S" -type f | wc -l) files, $(du -sh "$S" | cut -f1); ${DELAY_MS} ms each way"
sync

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.6f", b - a }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
results=()
row() { results+=("$(printf '%-46s %12s %12s %8s' "$1" "$2" "$3" "$4")"); }

# time_pair NAME PREP A_CMD B_CMD: PREP runs untimed before each command as `PREP TOOL POSITION`.
time_pair() {
  local name=$1 prep=$2 acmd=$3 bcmd=$4 at=() bt=() t0 round=0 order
  for _ in $(seq "$ROUNDS"); do
    round=$((round + 1))
    if [ $((round % 2)) = 1 ]; then order="a b"; else order="b a"; fi
    local pos=0
    for tool in $order; do
      pos=$((pos + 1))
      eval "$prep $tool $pos"
      if [ "$tool" = a ]; then
        t0=$(now); eval "$acmd" >/dev/null 2>&1; at+=("$(elapsed "$t0")")
      else
        t0=$(now); eval "$bcmd" >/dev/null 2>&1; bt+=("$(elapsed "$t0")")
      fi
    done
  done
  echo "$name: ${at[*]} | ${bt[*]}" >&2
  local a b
  a=$(printf '%s\n' "${at[@]}" | median)
  b=$(printf '%s\n' "${bt[@]}" | median)
  row "$name (s)" "$(printf %.3f "$a")" "$(printf %.3f "$b")" "$(ratio "$a" "$b")"
}
noop() { :; }
empty() {
  local d=$WORK/s-mirror; [ "$1" = b ] && d=$WORK/s-rsync
  local a; a=$(mktemp -d "$WORK/aside/XXXXXX")
  mkdir -p "$d"; find "$d" -mindepth 1 -maxdepth 1 -exec mv -t "$a" {} +; sync
}

# 1. sync over ssh against rsync over ssh (PARTS=mount skips it).
PARTS=${PARTS:-sync mount}
if [[ " $PARTS " == *" sync "* ]]; then
mkdir -p "$WORK/s-mirror" "$WORK/s-rsync"
MS="$M sync $S --target bench-ssh:$WORK/s-mirror --ssh '$SSH' --remote-mirrorfs $M -q"
RS="rsync -a -e '$SSH' $S/ bench-ssh:$WORK/s-rsync/"
results+=("$(printf '%-46s %12s %12s %8s' "sync over ssh" "mirrorfs" "rsync -e ssh" "ratio")")
time_pair "initial copy" empty "$MS" "$RS"
mb=$(eval "${MS% -q}" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
time_pair "re-run, nothing changed" noop "$MS" "$RS"
mapfile -t files < <(find "$S" -type f | awk 'NR % 100 == 0')
append() { if [ "$2" = 1 ]; then for f in "${files[@]}"; do echo "appended $RANDOM" >> "$f"; done; fi; }
time_pair "1% of the files appended" append "$MS" "$RS"
# Bytes: a fresh initial copy, a re-run and an append, each tool counting its own.
empty a; empty b
ib=$(eval "${MS% -q}" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
ir=$(eval "$RS --stats" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
row "initial copy (bytes sent)" "$ib" "$ir" "$(ratio "$ib" "$ir")"
nb=$(eval "${MS% -q}" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
nr=$(eval "$RS --stats" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
row "re-run (bytes sent; see the note above)" "$nb" "$nr" "$(ratio "$nb" "$nr")"
for f in "${files[@]}"; do echo "appended again" >> "$f"; done
ab=$(eval "${MS% -q}" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
ar=$(eval "$RS --stats" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
row "1% appended (bytes sent)" "$ab" "$ar" "$(ratio "$ab" "$ar")"
$M verify "$S" --target "$WORK/s-mirror" -q && echo "verify: the ssh target equals the source"
: "$mb"
fi

# 2. The mount over ssh against the mount over a unix socket.
# A part of the docs tree: its first 3,000 files, with their directories.
PART=$WORK/part
mkdir -p "$PART"
(cd "$S" && find . -type f | awk 'NR <= 3000' | xargs -d '\n' cp --parents -a -t "$PART")
for c in ssh unix; do mkdir -p "$WORK/mnt-$c" "$WORK/far-$c"; done
$M serve "$WORK/far-unix" --listen "unix:$WORK/far.sock" 2>/dev/null & pids+=($!)
sleep 0.5
$M mount "$WORK/mnt-ssh" --target "bench-ssh-direct:$WORK/far-ssh" --ssh "$SSH" --remote-mirrorfs "$M" -q --log-file "$WORK/ssh.log" >/dev/null
$M mount "$WORK/mnt-unix" --target "unix:$WORK/far.sock" -q --log-file "$WORK/unix.log" >/dev/null
clear_mnt() {
  local d=$WORK/mnt-ssh; [ "$1" = b ] && d=$WORK/mnt-unix
  rm -rf "$d"/* ; sync
}
results+=("$(printf '%-46s %12s %12s %8s' "the mount (ssh without the relay)" "over ssh" "over unix" "ratio")")
time_pair "cp -a of $(find "$PART" -type f | wc -l) docs files" clear_mnt \
  "cp -a $PART $WORK/mnt-ssh/" "cp -a $PART $WORK/mnt-unix/"
time_pair "seq write 256 MiB, 1 MiB blocks, fsync" clear_mnt \
  "dd if=/dev/zero of=$WORK/mnt-ssh/big bs=1M count=256 conv=fsync status=none" \
  "dd if=/dev/zero of=$WORK/mnt-unix/big bs=1M count=256 conv=fsync status=none"
$M umount "$WORK/mnt-ssh" >/dev/null 2>&1 || true
$M umount "$WORK/mnt-unix" >/dev/null 2>&1 || true
rm -rf "$WORK"

echo
printf '%s\n' "${results[@]}"
