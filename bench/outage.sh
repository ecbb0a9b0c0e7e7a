#!/usr/bin/env bash
# Benchmark of the catch-up after an outage: a mount of the Rust docs tree (about 50,000 files)
# replicates to `mirrorfs serve`, which is killed (SIGKILL); while it is away 1% of the files
# are appended to through the mount. Then three ways to bring a copy of the tree up to date run
# side by side, each on its own copy of the pre-change target, alternating first place by round:
#   catch-up   restart serve; time until `mirrorfs status` shows the mount connected again
#              (this includes the wait for the next reconnect attempt of the backoff), and the
#              catch-up itself as the daemon logs it;
#   sync       `mirrorfs sync` of the changed tree, a full walk, to a second `serve` over a
#              unix socket (the same transport as the catch-up's);
#   rsync      `rsync -a --delete` of the changed tree.
# Every copy is checked equal to the source at the end of each round.
#
#   bench/outage.sh
#   ROUNDS=5 WORK=/var/tmp/ob bench/outage.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/mirrorfs-obench}
command -v rsync >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync; }
cargo build --release -q
M=$PWD/target/release/mirrorfs
SERVE_PID=
SYNC_PID=
cleanup() {
  [ -n "$SYNC_PID" ] && kill -9 "$SYNC_PID" 2>/dev/null || true
  "$M" umount "$WORK/mnt" >/dev/null 2>&1 || umount -l "$WORK/mnt" 2>/dev/null || true
  [ -n "$SERVE_PID" ] && kill -9 "$SERVE_PID" 2>/dev/null || true
}
trap cleanup EXIT
rm -rf "$WORK"
mkdir -p "$WORK/mnt"
cp -a "$(rustc --print sysroot)/share/doc" "$WORK/src"
FILES=$(find "$WORK/src" -type f | wc -l)
echo "# tree: $FILES files, $(du -sh "$WORK/src" | cut -f1) (Rust docs); 1% changed during the outage"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
serve() {
  "$M" serve "$WORK/dm" --listen "unix:$WORK/t.sock" 2>>"$WORK/serve.log" &
  SERVE_PID=$!
  for _ in $(seq 200); do [ -S "$WORK/t.sock" ] && python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$WORK/t.sock" 2>/dev/null && return; sleep 0.02; done
  echo "serve did not come up" >&2; exit 1
}
state() { "$M" status "$WORK/mnt" --json | python3 -c 'import json,sys; m=json.load(sys.stdin)["mounts"]; print(m[0]["state"] if m else "none")'; }

declare -a TC TK TS TR
for round in $(seq "$ROUNDS"); do
  rm -rf "$WORK"/dm "$WORK"/ds "$WORK"/dr "$WORK/t.sock"
  "$M" sync "$WORK/src" --target "$WORK/dm" -q
  cp -a "$WORK/dm" "$WORK/ds"
  cp -a "$WORK/dm" "$WORK/dr"
  serve
  : >"$WORK/daemon.log"
  "$M" mount "$WORK/src" "$WORK/mnt" --target "unix:$WORK/t.sock" --timeout 5 -q --log-file "$WORK/daemon.log" >/dev/null
  kill -9 "$SERVE_PID"; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=
  until [ "$(state)" = disconnected ]; do sleep 0.05; done
  # 1% of the files, appended to through the mount while the target is away.
  (cd "$WORK/mnt" && find . -type f | awk "NR % 100 == $round" | while read -r f; do echo "outage round $round" >>"$f"; done)
  sync
  if [ $((round % 2)) = 1 ]; then order="catchup sync rsync"; else order="rsync sync catchup"; fi
  for tool in $order; do
    case $tool in
      catchup)
        t0=$(now); serve
        until [ "$(state)" = connected ]; do sleep 0.02; done
        TC+=("$(elapsed "$t0")")
        TK+=("$(grep -o 'caught up in [0-9.]*' "$WORK/daemon.log" | tail -1 | awk '{print $4}')")
        ;;
      sync)
        "$M" serve "$WORK/ds" --listen "unix:$WORK/s.sock" 2>>"$WORK/serve.log" &
        SYNC_PID=$!
        until python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])" "$WORK/s.sock" 2>/dev/null; do sleep 0.02; done
        t0=$(now); "$M" sync "$WORK/src" --target "unix:$WORK/s.sock" -q; TS+=("$(elapsed "$t0")")
        kill -9 "$SYNC_PID"; wait "$SYNC_PID" 2>/dev/null || true; SYNC_PID=
        ;;
      rsync) t0=$(now); rsync -a --delete "$WORK/src/" "$WORK/dr/"; TR+=("$(elapsed "$t0")") ;;
    esac
  done
  "$M" umount "$WORK/mnt" >/dev/null
  kill -9 "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=
  for d in dm ds dr; do
    "$M" verify "$WORK/src" --target "$WORK/$d" -q >/dev/null || { echo "round $round: $d differs from the source" >&2; exit 1; }
  done
  echo "round $round: catch-up ${TC[-1]} s to connected (catch-up itself ${TK[-1]} s), sync ${TS[-1]} s, rsync ${TR[-1]} s" >&2
done
c=$(printf '%s\n' "${TC[@]}" | median); k=$(printf '%s\n' "${TK[@]}" | median)
s=$(printf '%s\n' "${TS[@]}" | median); r=$(printf '%s\n' "${TR[@]}" | median)
echo "# median of $ROUNDS rounds, $(nproc) cores; every copy verified equal to the source"
printf '%-52s %8s %10s %10s\n' "" "s" "vs sync" "vs rsync"
printf '%-52s %8.3f %9.2fx %9.2fx\n' "restart to connected (backoff wait included)" "$c" "$(awk -v a="$c" -v b="$s" 'BEGIN{print a/b}')" "$(awk -v a="$c" -v b="$r" 'BEGIN{print a/b}')"
printf '%-52s %8.3f %9.2fx %9.2fx\n' "the catch-up itself (daemon log)" "$k" "$(awk -v a="$k" -v b="$s" 'BEGIN{print a/b}')" "$(awk -v a="$k" -v b="$r" 'BEGIN{print a/b}')"
printf '%-52s %8.3f\n' "mirrorfs sync, full walk, to serve over unix" "$s"
printf '%-52s %8.3f\n' "rsync -a --delete" "$r"
