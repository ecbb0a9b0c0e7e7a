#!/usr/bin/env bash
# Benchmark of the mount: the same workloads on the native filesystem, on bindfs (Debian's FUSE
# passthrough, no replication) and on a mirrorfs mount replicating to a local target on the same
# disk, side by side in one run. Each figure is the median of ROUNDS runs, the three alternating.
# Throughput workloads print speed relative to native (1.00 = native speed, higher is better);
# tree copy and compile print time relative to native (lower is better).
#
#   bench/mount.sh
#   ROUNDS=5 WORK=/var/tmp/mb bench/mount.sh
#   BASE=/path/to/older/mirrorfs bench/mount.sh   # adds that build as a fourth config, to
#                                                 # compare two versions in one run
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/mirrorfs-mbench}
need=()
command -v bindfs >/dev/null || need+=(bindfs)
command -v fio >/dev/null || need+=(fio)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
cargo build --release -q
M=$PWD/target/release/mirrorfs

cleanup() {
  umount "$WORK/bmnt" 2>/dev/null || true
  "$M" umount "$WORK/msrc" 2>/dev/null || umount -l "$WORK/msrc" 2>/dev/null || true
  umount "$WORK/basesrc" 2>/dev/null || umount -l "$WORK/basesrc" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
rm -rf "$WORK"
mkdir -p "$WORK"/{native,bsrc,bmnt,msrc,mdst}
bindfs "$WORK/bsrc" "$WORK/bmnt"
"$M" mount "$WORK/msrc" --target "$WORK/mdst" -q --log-file "$WORK/mirrorfs.log" >/dev/null 2>&1
declare -A DIR=([native]=$WORK/native [bindfs]=$WORK/bmnt [mirrorfs]=$WORK/msrc)
CONFIGS=(native bindfs mirrorfs)
if [ -n "${BASE:-}" ]; then
  mkdir -p "$WORK"/{basesrc,basedst}
  "$BASE" mount "$WORK/basesrc" --target "$WORK/basedst" -q --log-file "$WORK/base.log" >/dev/null 2>&1
  DIR[base]=$WORK/basesrc
  CONFIGS+=(base)
fi

# A tree of 20,000 small files (1-8 KiB) in 200 directories, for cp -a.
python3 - "$WORK/smalltree" <<'PY'
import os, random, sys
root = sys.argv[1]; random.seed(1)
for d in range(200):
    p = os.path.join(root, f"d{d:03}"); os.makedirs(p)
    for f in range(100):
        with open(os.path.join(p, f"f{f:03}"), "wb") as fh:
            fh.write(os.urandom(random.randint(1024, 8192)))
PY
# A real crate with no dependencies to build: regex-syntax from the cargo registry, with a
# lockfile made once (online) so the timed builds run offline.
CRATE=""
REG=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/regex-syntax-0.8.* 2>/dev/null | head -1 || true)
if [ -n "$REG" ]; then
  cp -a "$REG" "$WORK/crate-src"
  (cd "$WORK/crate-src" && cargo generate-lockfile -q) && CRATE=$WORK/crate-src
fi

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench NAME PREP CMD: PREP and CMD are run with D set to the config's directory; only CMD is timed.
declare -A T
bench() {
  local name=$1 prep=$2 cmd=$3 c t0 t1
  declare -A runs=()
  for _ in $(seq "$ROUNDS"); do
    for c in "${CONFIGS[@]}"; do
      D=${DIR[$c]}
      eval "$prep" >/dev/null 2>&1
      t0=$(now); eval "$cmd" >/dev/null 2>&1; t1=$(now)
      runs[$c]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }') "
    done
  done
  for c in "${CONFIGS[@]}"; do T[$name,$c]=$(printf '%s\n' ${runs[$c]} | median); done
}

bench seqwrite 'rm -f $D/seq; sync' 'dd if=/dev/zero of=$D/seq bs=1M count=1024 conv=fsync status=none'
bench seqread 'sync; echo 3 > /proc/sys/vm/drop_caches' 'dd if=$D/seq of=/dev/null bs=1M status=none'
bench randwrite 'rm -f $D/rand; fio --name=l --filename=$D/rand --size=64m --rw=write --bs=1m --end_fsync=1 >/dev/null; sync' \
  'fio --name=r --filename=$D/rand --size=64m --rw=randwrite --bs=4k --ioengine=psync --end_fsync=1 --randrepeat=1'
bench cpa 'rm -rf $D/tree; sync' 'cp -a $WORK/smalltree $D/tree'
if [ -n "$CRATE" ]; then
  bench compile 'rm -rf $D/crate; cp -a '"$CRATE"' $D/crate; sync' \
    'cargo build --offline -q --manifest-path $D/crate/Cargo.toml --target-dir $D/crate/target'
fi

cleanup
trap - EXIT
echo "# mirrorfs mount vs bindfs vs native: median of $ROUNDS, $(nproc) cores"
printf '%-40s %9s %9s %9s %10s %10s' workload native_s bindfs_s mirror_s bindfs mirrorfs
[ -n "${BASE:-}" ] && printf ' %10s %12s' base mirror/base
echo
line() { # NAME KEY MODE: MODE speed = native/x (higher better), time = x/native (lower better)
  local n=${T[$2,native]} b=${T[$2,bindfs]} m=${T[$2,mirrorfs]} op
  if [ "$3" = speed ]; then op='a/b'; else op='b/a'; fi
  r() { awk -v a="$n" -v b="$1" "BEGIN{print $op}"; }
  printf '%-40s %9.3f %9.3f %9.3f %9.2fx %9.2fx' "$1" "$n" "$b" "$m" "$(r "$b")" "$(r "$m")"
  if [ -n "${BASE:-}" ]; then
    local x=${T[$2,base]}
    printf ' %9.2fx %11.3f' "$(r "$x")" "$(awk -v a="$m" -v b="$x" 'BEGIN{print a/b}')"
  fi
  echo
}
echo "-- speed relative to native (higher is better)"
line "seq write 1 GiB, 1 MiB blocks, fsync" seqwrite speed
line "seq read 1 GiB, cold cache" seqread speed
line "4 KiB random writes, 64 MiB, fsync" randwrite speed
echo "-- time relative to native (lower is better)"
line "cp -a 20,000 small files" cpa time
[ -n "$CRATE" ] && line "cargo build $(basename "$REG") (debug)" compile time
diff -rq "$WORK/msrc" "$WORK/mdst" >/dev/null && echo "mirrorfs target equals its source after the run" || echo "WARNING: mirrorfs target differs from its source"
