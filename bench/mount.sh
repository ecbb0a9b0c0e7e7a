#!/usr/bin/env bash
# Benchmark of the mount: the same workloads on the native filesystem, on bindfs (Debian's FUSE
# passthrough, no replication) and on a mirrorfs mount replicating to a local target on the same
# disk, side by side in one run. Each figure is the median of ROUNDS runs, the configs
# alternating. Every config of every round runs on a freshly made ext4 (a loop file): on a
# filesystem where a big tree was just deleted, ext4 skips the freed inodes one by one and charges
# whoever runs next. Throughput workloads print speed relative to native (1.00 = native speed,
# higher is better); tree and compile workloads print time relative to native (lower is better).
#
#   bench/mount.sh
#   ROUNDS=5 WORK=/var/tmp/mb bench/mount.sh
#   WORKLOADS="cpa tarx rmrf" bench/mount.sh      # a subset (seqwrite seqread randwrite cpa
#                                                 # tarx rmrf findcold findwarm readall compile)
#   BASE=/path/to/older/mirrorfs bench/mount.sh   # adds that build as a fourth config, to
#                                                 # compare two versions in one run
#   CONFIGS="native mirrorfs base" BASE=... bench/mount.sh   # a subset of the configs
#   CONFIGS="native bindfs mirrorfs ackfsync" bench/mount.sh  # adds mirrorfs --ack=fsync
#   MOUNT_ARGS="--ack fsync" BASE=... bench/mount.sh  # options for the mirrorfs and base mounts
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/var/tmp/mirrorfs-mbench}
WORKLOADS=${WORKLOADS:-seqwrite seqread randwrite cpa tarx rmrf findcold findwarm readall compile}
IMG_GIB=${IMG_GIB:-6}
MOUNT_ARGS=${MOUNT_ARGS:-}
need=()
command -v bindfs >/dev/null || need+=(bindfs)
command -v fio >/dev/null || need+=(fio)
command -v python3 >/dev/null || need+=(python3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
cargo build --release -q
M=$PWD/target/release/mirrorfs
has() { [[ " $WORKLOADS " == *" $1 "* ]]; }

FS=$WORK/fs
teardown() {
  umount "$FS/bmnt" 2>/dev/null || umount -l "$FS/bmnt" 2>/dev/null || true
  for m in "$FS/msrc" "$FS/basesrc"; do
    [ -d "$m" ] && { "$M" umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; }
  done
  umount "$FS" 2>/dev/null || umount -l "$FS" 2>/dev/null || true
  rm -f "$WORK/fs.img"
}
trap teardown EXIT
teardown
rm -rf "$WORK"
mkdir -p "$WORK/fs"

# fresh CONFIG: a new ext4 at $FS, and the config's directory D inside it.
fresh() {
  teardown
  truncate -s "${IMG_GIB}G" "$WORK/fs.img"
  mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$WORK/fs.img"
  mount -o loop "$WORK/fs.img" "$FS"
  case $1 in
    native) mkdir "$FS/native"; D=$FS/native ;;
    bindfs) mkdir "$FS/bsrc" "$FS/bmnt"; bindfs "$FS/bsrc" "$FS/bmnt"; D=$FS/bmnt ;;
    mirrorfs)
      mkdir "$FS/msrc" "$FS/mdst"
      "$M" mount "$FS/msrc" --target "$FS/mdst" $MOUNT_ARGS -q --log-file "$WORK/mirrorfs.log" >/dev/null 2>&1
      D=$FS/msrc ;;
    ackfsync)
      mkdir "$FS/msrc" "$FS/mdst"
      "$M" mount "$FS/msrc" --target "$FS/mdst" --ack fsync -q --log-file "$WORK/ackfsync.log" >/dev/null 2>&1
      D=$FS/msrc ;;
    base)
      mkdir "$FS/basesrc" "$FS/basedst"
      "$BASE" mount "$FS/basesrc" --target "$FS/basedst" $MOUNT_ARGS -q --log-file "$WORK/base.log" >/dev/null 2>&1
      D=$FS/basesrc ;;
  esac
}

if [ -n "${CONFIGS:-}" ]; then read -r -a CONFIGS <<<"$CONFIGS"
else CONFIGS=(native bindfs mirrorfs); [ -n "${BASE:-}" ] && CONFIGS+=(base); fi

# The tree: the Rust docs from the toolchain (about 50,000 files of generated docs), kept
# outside the filesystems under test, and a tar of it for tar -x.
DOCS=$(rustc --print sysroot)/share/doc
cp -a "$DOCS" "$WORK/tree"
tar -C "$WORK" -cf "$WORK/tree.tar" tree
echo "tree: $(find "$WORK/tree" -type f | wc -l) files, $(du -sh "$WORK/tree" | cut -f1)"
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

# bench NAME PREP CMD: for every round and config, a fresh filesystem, then PREP (untimed) and
# CMD (timed), both with D set to the config's directory. The config that goes first rotates,
# and every other round runs in the opposite order.
declare -A T
bench() {
  local name=$1 prep=$2 cmd=$3 c t0 t1 round=0 i n=${#CONFIGS[@]}
  declare -A runs=()
  for _ in $(seq "$ROUNDS"); do
    for i in $(seq 0 $((n - 1))); do
      # Every other round runs backwards: with a fixed direction each config would always
      # follow the same neighbour, and a run is affected by what the one before it left behind
      # (seen with the seq write: in pairs of runs of one build, the second was the faster).
      ((round % 2)) && i=$((n - 1 - i))
      c=${CONFIGS[$(((i + round) % n))]}
      fresh "$c"
      eval "$prep" >/dev/null 2>&1
      sync
      t0=$(now); eval "$cmd" >/dev/null 2>&1; t1=$(now)
      runs[$c]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }') "
      if [[ $c == mirrorfs || $c == ackfsync ]] && ! diff -rq "$FS/msrc" "$FS/mdst" >/dev/null 2>&1; then
        echo "WARNING: $name: the mirrorfs target differs from its source" >&2
      fi
    done
    round=$((round + 1))
  done
  for c in "${CONFIGS[@]}"; do
    T[$name,$c]=$(printf '%s\n' ${runs[$c]} | median)
    echo "$name $c: ${runs[$c]}" >&2
  done
}

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
has seqwrite && bench seqwrite ':' 'dd if=/dev/zero of=$D/seq bs=1M count=1024 conv=fsync status=none'
has seqread && bench seqread 'dd if=/dev/zero of=$D/seq bs=1M count=1024 conv=fsync status=none; drop' \
  'dd if=$D/seq of=/dev/null bs=1M status=none'
has randwrite && bench randwrite 'fio --name=l --filename=$D/rand --size=64m --rw=write --bs=1m --end_fsync=1' \
  'fio --name=r --filename=$D/rand --size=64m --rw=randwrite --bs=4k --ioengine=psync --end_fsync=1 --randrepeat=1'
has cpa && bench cpa ':' 'cp -a $WORK/tree $D/tree'
has tarx && bench tarx ':' 'tar -C $D -xf $WORK/tree.tar'
has rmrf && bench rmrf 'cp -a $WORK/tree $D/tree' 'rm -rf $D/tree'
# Metadata reads: every entry's size and mtime, with cold caches, and again at once after.
FIND='find $D/tree -printf "%s %T@\n"'
has findcold && bench findcold 'cp -a $WORK/tree $D/tree; drop' "$FIND"
has findwarm && bench findwarm 'cp -a $WORK/tree $D/tree; drop; '"$FIND" "$FIND"
# Every file opened, read and closed once, its pages already cached: the cost of open and close.
has readall && bench readall 'cp -a $WORK/tree $D/tree' 'find $D/tree -type f -print0 | xargs -0 cat >/dev/null'
if has compile && [ -n "$CRATE" ]; then
  bench compile 'cp -a '"$CRATE"' $D/crate' \
    'cargo build --offline -q --manifest-path $D/crate/Cargo.toml --target-dir $D/crate/target'
fi

teardown
trap - EXIT
echo "# mirrorfs mount vs bindfs vs native: median of $ROUNDS, a fresh ext4 per run, $(nproc) cores"
printf '%-40s %9s %9s %9s %10s %10s' workload native_s bindfs_s mirror_s bindfs mirrorfs
[ -n "${BASE:-}" ] && printf ' %10s %12s' base mirror/base
ACK=""; [[ " ${CONFIGS[*]} " == *" ackfsync "* ]] && ACK=1
[ -n "$ACK" ] && printf ' %10s %10s %13s' ackfsync_s ackfsync ackfsync/mirr
echo
line() { # NAME KEY MODE: MODE speed = native/x (higher better), time = x/native (lower better)
  [ -n "${T[$2,native]:-}" ] || return 0
  local n=${T[$2,native]} b=${T[$2,bindfs]:-nan} m=${T[$2,mirrorfs]:-nan} op
  if [ "$3" = speed ]; then op='a/b'; else op='b/a'; fi
  r() { awk -v a="$n" -v b="$1" "BEGIN{print $op}"; }
  printf '%-40s %9.3f %9.3f %9.3f %9.2fx %9.2fx' "$1" "$n" "$b" "$m" "$(r "$b")" "$(r "$m")"
  if [ -n "${BASE:-}" ]; then
    local x=${T[$2,base]}
    printf ' %9.2fx %11.3f' "$(r "$x")" "$(awk -v a="$m" -v b="$x" 'BEGIN{print a/b}')"
  fi
  if [ -n "$ACK" ]; then
    local k=${T[$2,ackfsync]}
    printf ' %10.3f %9.2fx %13.3f' "$k" "$(r "$k")" "$(awk -v a="$k" -v b="$m" 'BEGIN{print a/b}')"
  fi
  echo
}
echo "-- speed relative to native (higher is better)"
line "seq write 1 GiB, 1 MiB blocks, fsync" seqwrite speed
line "seq read 1 GiB, cold cache" seqread speed
line "4 KiB random writes, 64 MiB, fsync" randwrite speed
echo "-- time relative to native (lower is better)"
line "cp -a of the tree" cpa time
line "tar -x of the tree" tarx time
line "rm -rf of the tree" rmrf time
line "find -printf '%s %T@', cold cache" findcold time
line "the same find again at once" findwarm time
line "cat of every file, pages cached" readall time
[ -n "$CRATE" ] && line "cargo build $(basename "$REG") (debug)" compile time
rm -rf "$WORK"
