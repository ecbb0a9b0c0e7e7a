#!/usr/bin/env bash
# Benchmark at scale: a tree of FILES small files (default 1,000,000) in DIRS directories
# (default 11,000), on a fresh ext4 of its own, and the figures that matter for it, side by side
# with rsync and the native filesystem in one run, each with its peak memory:
#   - `sync`, initial copy (each tool to a freshly made ext4), against `rsync -a`
#   - `sync`, nothing changed, warm cache and cold cache, against `rsync -a`
#   - `mount` over an equal target, cold cache, until it is live (the startup walk)
#   - `find -printf '%s %T@'` of the whole tree: native, through bindfs, through the mount; the
#     first and a second one at once after, and the mount daemon's memory after them
# Times are medians of ROUNDS (default 2), the tool going first alternating by round. Peak RSS is
# GNU time's maximum resident set of the command (rsync's largest process); for the mount, the
# daemon's VmHWM and VmRSS from /proc.
#
#   bench/scale.sh                          # 1,000,000 files
#   FILES=100000 DIRS=1100 bench/scale.sh   # a tenth, for a quick look
#   CASES="copy rerun" bench/scale.sh       # a subset (copy rerun cold mount find)
#   BASE=/path/to/older/mirrorfs bench/scale.sh   # the find case with that build too, in the
#                                                 # same run, on the same tree
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${FILES:-1000000}
DIRS=${DIRS:-11000}
ROUNDS=${ROUNDS:-2}
CASES=${CASES:-copy rerun cold mount find}
WORK=${WORK:-/var/tmp/mirrorfs-scale}
has() { [[ " $CASES " == *" $1 "* ]]; }
need=()
command -v rsync >/dev/null || need+=(rsync)
command -v bindfs >/dev/null || need+=(bindfs)
command -v python3 >/dev/null || need+=(python3)
[ -x /usr/bin/time ] || need+=(time)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
cargo build --release -q
M=${MIRRORFS:-$PWD/target/release/mirrorfs}  # MIRRORFS= another build

# Each file takes a block and an inode: size the images for that, with room to spare.
GIB=$(( (FILES * 6 / 1024 / 1024) + 2 ))
INODES=$(( FILES + FILES / 4 + DIRS + 10000 ))
S=$WORK/src/tree
unmount_all() {
  for m in "$WORK/bmnt" "$S"; do
    mountpoint -q "$m" 2>/dev/null && { "$M" umount "$m" >/dev/null 2>&1 || umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  for d in m r src; do
    mountpoint -q "$WORK/$d" 2>/dev/null && { umount "$WORK/$d" 2>/dev/null || umount -l "$WORK/$d"; }
  done
  return 0
}
teardown() { unmount_all; rm -rf "$WORK"; }
trap teardown EXIT
teardown
mkdir -p "$WORK"/{src,m,r,bmnt}

# image NAME: a fresh ext4 mounted at $WORK/NAME.
image() {
  mountpoint -q "$WORK/$1" && umount "$WORK/$1"
  rm -f "$WORK/$1.img"
  truncate -s "${GIB}G" "$WORK/$1.img"
  mkfs.ext4 -q -F -N "$INODES" -E lazy_itable_init=1,lazy_journal_init=1 "$WORK/$1.img"
  mount -o loop "$WORK/$1.img" "$WORK/$1"
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
results=()
row() { results+=("$(printf '%-46s %10s %10s %8s %10s %10s' "$@")"); }
mounted=()
mrow() { mounted+=("$(printf '%-46s %10s %10s %8s %10s' "$@")"); }

echo "# building $FILES files in $DIRS directories on a fresh ext4 (${GIB} GiB, $INODES inodes)"
image src
python3 - "$S" "$FILES" "$DIRS" <<'PY'
import os, sys, random
root, files, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)
top = max(1, int(dirs ** 0.5))
blob = bytes(random.getrandbits(8) for _ in range(4096))
made = 0
for d in range(dirs):
    p = os.path.join(root, f"d{d % top:03d}", f"s{d:05d}")
    os.makedirs(p, exist_ok=True)
    n = files // dirs + (1 if d < files % dirs else 0)
    for i in range(n):
        size = random.randrange(0, 2000)
        with open(os.path.join(p, f"f{i:04d}.txt"), "wb") as f:
            f.write(blob[made % 2048:made % 2048 + size])
        made += 1
print(f"{made} files")
PY
sync

# timed CMD...: runs CMD under GNU time; prints "seconds peak_kib".
timed() {
  /usr/bin/time -f '%e %M' -o "$WORK/time.out" "$@" >/dev/null 2>"$WORK/cmd.err" || {
    echo "failed: $*" >&2; cat "$WORK/cmd.err" >&2; return 1; }
  cat "$WORK/time.out"
}

# pair NAME PREP: mirrorfs sync and rsync -a, alternating, ROUNDS rounds; PREP TOOL before each.
pair() {
  local name=$1 prep=$2 mt=() mm=() rt=() rm_=() round order out
  for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="mirror rsync"; else order="rsync mirror"; fi
    for tool in $order; do
      $prep "$tool"
      if [ "$tool" = mirror ]; then
        out=$(timed "$M" sync "$S" --target "$WORK/m/t" -q); mt+=("${out% *}"); mm+=("${out#* }")
      else
        out=$(timed rsync -a "$S/" "$WORK/r/t/"); rt+=("${out% *}"); rm_+=("${out#* }")
      fi
    done
  done
  echo "$name: mirrorfs ${mt[*]} s, ${mm[*]} KiB; rsync ${rt[*]} s, ${rm_[*]} KiB" >&2
  local m r
  m=$(printf '%s\n' "${mt[@]}" | median); r=$(printf '%s\n' "${rt[@]}" | median)
  LAST=$m
  row "$name" "$m" "$r" "$(ratio "$m" "$r")" \
    "$(mib "$(printf '%s\n' "${mm[@]}" | sort -g | tail -1)")" \
    "$(mib "$(printf '%s\n' "${rm_[@]}" | sort -g | tail -1)")"
}
empty_target() { if [ "$1" = mirror ]; then image m; else image r; fi; sync; }
noop() { :; }
cold() { drop; }

if has copy; then
  pair "sync, initial copy (s)" empty_target
else
  image m; "$M" sync "$S" --target "$WORK/m/t" -q
  if has rerun || has cold; then image r; rsync -a "$S/" "$WORK/r/t/"; fi
fi
has rerun && pair "sync, nothing changed, warm cache (s)" noop
COLD=
has cold && pair "sync, nothing changed, cold cache (s)" cold && COLD=$LAST

# The mount daemon's memory: VmHWM (peak) and VmRSS, in MiB.
daemon_mem() { awk '/^VmHWM|^VmRSS/ { printf "%s %.0f ", $1, $2 / 1024 }' "/proc/$1/status"; }
mount_src() { "$M" mount "$S" --target "$WORK/m/t" -q --log-file "$WORK/mount.log" 2>&1 | sed -n 's/.*daemon pid \([0-9]*\).*/\1/p'; }
if has mount; then
  mt=()
  for _ in $(seq "$ROUNDS"); do
    drop
    t0=$(now); pid=$(mount_src); t1=$(now)
    mt+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')")
    echo "mount live after ${mt[-1]} s; daemon $(daemon_mem "$pid")" >&2
    "$M" umount "$S" >/dev/null 2>&1
  done
  sm=$(printf '%s\n' "${mt[@]}" | median)
  mrow "mount over an equal target, cold, until live (s)" "$sm" "-" "-" "-"
  [ -n "$COLD" ] && mrow "  (against sync, nothing changed, cold)" "$sm" "$COLD" "$(ratio "$sm" "$COLD")" "-"
fi

if has find; then
  FIND=(find "$S" -printf '%s %T@\n')
  ft() { local t0; t0=$(now); "${FIND[@]}" >/dev/null; awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
  drop; n1=$(ft); n2=$(ft)
  drop; bindfs "$S" "$WORK/bmnt"; FIND[1]=$WORK/bmnt; b1=$(ft); b2=$(ft); umount "$WORK/bmnt"
  drop; pid=$(mount_src); FIND[1]=$S; m1=$(ft); m2=$(ft); mem=$(daemon_mem "$pid")
  "$M" umount "$S" >/dev/null 2>&1
  echo "find: native $n1 $n2; bindfs $b1 $b2; mirrorfs $m1 $m2; daemon after: $mem" >&2
  mrow "find -printf '%s %T@', first (s)" "$m1" "$n1" "$(ratio "$m1" "$n1")" "$b1"
  mrow "the same find again at once (s)" "$m2" "$n2" "$(ratio "$m2" "$n2")" "$b2"
  if [ -n "${BASE:-}" ]; then
    drop; pid=$(M=$BASE mount_src); x1=$(ft); x2=$(ft); bmem=$(daemon_mem "$pid")
    "$BASE" umount "$S" >/dev/null 2>&1
    echo "find: base $x1 $x2; base daemon after: $bmem" >&2
    mrow "  base build: first find (s)" "$x1" "$n1" "$(ratio "$x1" "$n1")" "$b1"
    mrow "  base build: the same find again (s)" "$x2" "$n2" "$(ratio "$x2" "$n2")" "$b2"
    echo "base daemon after the finds (MiB): $bmem" > "$WORK/base.mem"
  fi
  mem_after="$mem"
fi

echo
echo "# $FILES files in $DIRS directories, median of $ROUNDS, 2 cores; peak RSS in MiB"
printf '%-46s %10s %10s %8s %10s %10s\n' case mirrorfs rsync ratio "mfs MiB" "rsync MiB"
printf '%s\n' "${results[@]}"
if [ ${#mounted[@]} -gt 0 ]; then
  echo
  printf '%-46s %10s %10s %8s %10s\n' case mirrorfs native ratio bindfs
  printf '%s\n' "${mounted[@]}"
  [ -n "${mem_after:-}" ] && echo "mount daemon after the finds (MiB): $mem_after"
  [ -f "$WORK/base.mem" ] && cat "$WORK/base.mem"
fi
