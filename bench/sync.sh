#!/usr/bin/env bash
# Benchmark: `mirrorfs sync` against `rsync -a` on the same trees, side by side in one run, and
# the ratios between them. Absolute times on a shared machine say little; the ratios are the
# result. Each timing is the median of ROUNDS runs (default 4), mirrorfs and rsync alternating,
# each going first in every other round.
#
#   bench/sync.sh                 # Rust docs tree + large-file tree + 1 GiB delta case
#   ROUNDS=5 WORK=/var/tmp/b bench/sync.sh
#   TREES=large CASES=copy bench/sync.sh   # a subset while iterating (TREES: docs large;
#                                          # CASES: copy rerun append remote big)
#   DELAY_MS=25 bench/sync.sh      # one-way delay of the link in the remote cases (default 5)
#
# The remote cases run the docs tree over TCP through bench/delay.py, a relay that delays each
# direction by DELAY_MS: `mirrorfs serve` against an rsync daemon, each behind its own relay.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
TREES=${TREES:-docs large}
CASES=${CASES:-copy rerun append remote big}
DELAY_MS=${DELAY_MS:-5}
has() { [[ " $CASES " == *" $1 "* ]]; }
WORK=${WORK:-/tmp/mirrorfs-bench}
command -v rsync >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }
cargo build --release -q
M=$PWD/target/release/mirrorfs
BENCH=$PWD/bench
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

rm -rf "$WORK"
mkdir -p "$WORK"
DOCS=$(rustc --print sysroot)/share/doc
echo "# trees"
cp -a "$DOCS" "$WORK/docs"
echo "many files: $(find "$WORK/docs" -type f | wc -l) files, $(du -sh "$WORK/docs" | cut -f1) (Rust docs)"
mkdir -p "$WORK/large"
for i in 1 2 3 4 5 6 7 8; do head -c $((64 << 20)) /dev/urandom > "$WORK/large/f$i"; done
echo "large files: 8 x 64 MiB random"
sync

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.6f", b - a }'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
results=()
row() { results+=("$(printf '%-44s %10s %10s %8s' "$1" "$2" "$3" "$4")"); }

# time_pair NAME PREP MIRRORFS_CMD RSYNC_CMD: PREP runs before each timed command (untimed), as
# `PREP TOOL POSITION`; a PREP that changes the source does so for POSITION 1, so both tools see
# the same change. The tool that goes first alternates from round to round: the first run after
# a change to the disk (files freed, cache filled) can pay for it, and it must not always be the
# same tool.
time_pair() {
  local name=$1 prep=$2 mcmd=$3 rcmd=$4 mt=() rt=() t0 round=0 order
  for _ in $(seq "$ROUNDS"); do
    round=$((round + 1))
    if [ $((round % 2)) = 1 ]; then order="mirror rsync"; else order="rsync mirror"; fi
    local pos=0
    for tool in $order; do
      pos=$((pos + 1))
      eval "$prep $tool $pos"
      if [ "$tool" = mirror ]; then
        t0=$(now); eval "$mcmd" >/dev/null 2>&1; mt+=("$(elapsed "$t0")")
      else
        t0=$(now); eval "$rcmd" >/dev/null 2>&1; rt+=("$(elapsed "$t0")")
      fi
    done
  done
  local m r
  echo "$name: mirrorfs ${mt[*]}; rsync ${rt[*]}" >&2
  m=$(printf '%s\n' "${mt[@]}" | median)
  r=$(printf '%s\n' "${rt[@]}" | median)
  row "$name (time, s)" "$(printf %.3f "$m")" "$(printf %.3f "$r")" "$(ratio "$m" "$r")"
}

# An initial copy starts from an empty target. The last copy is moved aside, not deleted: ext4
# skips inodes freed in the last minute when it allocates (recently_deleted), and deleting 50,000
# files just before a timed copy made that search dominate both tools' time, unevenly (up to 30 s
# of system time for a 4 s copy). The copies moved aside are deleted after the timed cases.
aside() { mkdir -p "$WORK/aside"; mv "$1" "$(mktemp -d "$WORK/aside/XXXXXX")/"; }
fresh() { [ -e "$WORK/t-$1" ] && aside "$WORK/t-$1"; mkdir "$WORK/t-$1"; sync; }
noop() { :; }
for tree in $TREES; do
  S=$WORK/$tree
  if has copy; then
    time_pair "$tree: initial copy to empty target" fresh \
      "$M sync $S --target $WORK/t-mirror -q" "rsync -a $S/ $WORK/t-rsync/"
  else
    fresh mirror; fresh rsync
    $M sync "$S" --target "$WORK/t-mirror" -q; rsync -a "$S/" "$WORK/t-rsync/"; sync
  fi
  has rerun && time_pair "$tree: re-run, nothing changed" noop \
    "$M sync $S --target $WORK/t-mirror -q" "rsync -a $S/ $WORK/t-rsync/"
  if [ "$tree" = docs ] && has append; then
    # Append to 1% of the files, then both catch up; bytes from each tool's own count.
    mapfile -t files < <(find "$S" -type f | awk 'NR % 100 == 0')
    append() { if [ "$2" = 1 ]; then for f in "${files[@]}"; do echo "appended $RANDOM" >> "$f"; done; fi; }
    time_pair "docs: after appending to 1% of files" append \
      "$M sync $S --target $WORK/t-mirror -q" "rsync -a $S/ $WORK/t-rsync/"
    for f in "${files[@]}"; do echo "appended again" >> "$f"; done
    mb=$($M sync "$S" --target "$WORK/t-mirror" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
    rb=$(rsync -a --stats "$S/" "$WORK/t-rsync/" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
    row "docs: 1% appended (bytes sent)" "$mb" "$rb" "$(ratio "$mb" "$rb")"
    for f in "${files[@]}"; do echo "appended a third time" >> "$f"; done
    rbd=$(rsync -a --no-whole-file --stats "$S/" "$WORK/t-rsync/" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
    $M sync "$S" --target "$WORK/t-mirror" -q
    row "  (rsync --no-whole-file bytes, reference)" "-" "$rbd" "-"
  fi
  if [ "$tree" = docs ] && has remote; then
    # The same tree to a server on the other end of a link with latency.
    mkdir -p "$WORK/r-mirror" "$WORK/r-rsync" "$WORK/aside"
    cat > "$WORK/rsyncd.conf" <<CONF
pid file = $WORK/rsyncd.pid
use chroot = false
[t]
  path = $WORK/r-rsync
  read only = false
  uid = root
  gid = root
CONF
    $M serve "$WORK/r-mirror" --listen tcp:127.0.0.1:17611 2>/dev/null & pids+=($!)
    rsync --daemon --no-detach --address 127.0.0.1 --port 17613 --config "$WORK/rsyncd.conf" & pids+=($!)
    python3 "$BENCH/delay.py" 17612 17611 "$DELAY_MS" & pids+=($!)
    python3 "$BENCH/delay.py" 17614 17613 "$DELAY_MS" & pids+=($!)
    sleep 1
    RM="$M sync $S --target tcp:127.0.0.1:17612 -q"
    RR="rsync -a $S/ rsync://127.0.0.1:17614/t/"
    empty() {
      local a; a=$(mktemp -d "$WORK/aside/XXXXXX")
      find "$WORK/r-$1" -mindepth 1 -maxdepth 1 -exec mv -t "$a" {} +; sync
    }
    l="docs over TCP, ${DELAY_MS} ms each way"
    time_pair "$l: initial copy" empty "$RM" "$RR"
    time_pair "$l: re-run" noop "$RM" "$RR"
    mapfile -t files < <(find "$S" -type f | awk 'NR % 100 == 0')
    append() { if [ "$2" = 1 ]; then for f in "${files[@]}"; do echo "appended $RANDOM" >> "$f"; done; fi; }
    time_pair "$l: 1% appended" append "$RM" "$RR"
    for f in "${files[@]}"; do echo "appended again" >> "$f"; done
    mb=$($M sync "$S" --target tcp:127.0.0.1:17612 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
    rb=$($RR --stats | sed -n 's/^Total bytes sent: //p' | tr -d ,)
    row "$l: 1% appended (bytes sent)" "$mb" "$rb" "$(ratio "$mb" "$rb")"
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    pids=()
    rm -rf "$WORK/r-mirror" "$WORK/r-rsync"
  fi
  rm -rf "$WORK/t-mirror" "$WORK/t-rsync" "$WORK/aside"
done
rm -rf "$WORK/docs" "$WORK/large"
has big || { echo; printf '%-44s %10s %10s %8s\n' "case" "mirrorfs" "rsync" "ratio"; printf '%s\n' "${results[@]}"; rm -rf "$WORK"; exit 0; }

# One 1 GiB file, 1 MiB changed in its middle, against rsync's delta mode (--no-whole-file; by
# default rsync sends whole files between local directories).
mkdir -p "$WORK/one" "$WORK/t-mirror" "$WORK/t-rsync"
head -c $((1 << 30)) /dev/urandom > "$WORK/one/big"
$M sync "$WORK/one" --target "$WORK/t-mirror" -q
rsync -a "$WORK/one/" "$WORK/t-rsync/"
sync
change() { if [ "$2" = 1 ]; then head -c $((1 << 20)) /dev/urandom | dd of="$WORK/one/big" bs=1M seek=512 conv=notrunc status=none; fi; }
time_pair "1 GiB file, 1 MiB changed" change \
  "$M sync $WORK/one --target $WORK/t-mirror -q" "rsync -a --no-whole-file $WORK/one/ $WORK/t-rsync/"
change mirror 1
wb=$($M sync "$WORK/one" --target "$WORK/t-mirror" 2>&1 | sed -n 's/.* \([0-9]*\) bytes on the wire.*/\1/p')
rb=$(rsync -a --no-whole-file --stats "$WORK/one/" "$WORK/t-rsync/" | sed -n 's/^Total bytes sent: //p' | tr -d ,)
row "1 GiB file, 1 MiB changed (bytes sent)" "$wb" "$rb" "$(ratio "$wb" "$rb")"
row "  (mirrorfs bytes / file size)" "$wb" "$((1 << 30))" "$(awk -v a="$wb" 'BEGIN { printf "%.4f", a / 1073741824 }')"
$M verify "$WORK/one" --target "$WORK/t-mirror" -q && echo "  verify: the 1 GiB target equals its source"
rm -rf "$WORK"

echo
printf '%-44s %10s %10s %8s\n' "case" "mirrorfs" "rsync" "ratio"
printf '%s\n' "${results[@]}"
