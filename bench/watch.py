#!/usr/bin/env python3
"""Latency of watch mode: from a write returning in SRC to the change being visible in the
target, p50 and p99, for `mirrorfs watch` and for lsyncd, in one run; plus the CPU and memory of
an idle `mirrorfs watch` over a large tree. Run through bench/watch.sh."""
import os, shutil, signal, subprocess, sys, tempfile, time

M = sys.argv[1]
WORK = sys.argv[2]
BIG = sys.argv[3]            # a large tree (the Rust docs)
N = int(os.environ.get("WRITES", "200"))
N_LSYNCD = int(os.environ.get("WRITES_LSYNCD", "30"))

def wait_for(path, content, limit=30.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with open(path, "rb") as f:
                if f.read() == content:
                    return True
        except OSError:
            pass
        time.sleep(0.0005)
    return False

def latencies(src, dst, n, pause):
    out = []
    os.makedirs(os.path.join(src, "lat"), exist_ok=True)
    time.sleep(1.0)
    for i in range(n):
        data = f"write {i} {time.time()}".encode()
        p = os.path.join(src, "lat", f"f{i % 20}")
        with open(p, "wb") as f:
            f.write(data)
        t0 = time.monotonic()
        if not wait_for(os.path.join(dst, "lat", f"f{i % 20}"), data):
            out.append(float("inf"))
            continue
        out.append(time.monotonic() - t0)
        time.sleep(pause)
    out.sort()
    return out

def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))]

def fresh(name, tree=None):
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d + "/dst")
    if tree:
        shutil.copytree(tree, d + "/src", symlinks=True)
    else:
        os.makedirs(d + "/src")
    return d + "/src", d + "/dst"

def run_mirrorfs(src, dst):
    return subprocess.Popen([M, "watch", src, "--target", dst, "-q"], stderr=subprocess.DEVNULL)

def run_lsyncd(src, dst):
    cfg = os.path.join(WORK, "lsyncd.conf")
    with open(cfg, "w") as f:
        f.write('settings { nodaemon = true }\n'
                f'sync {{ default.direct, source = "{src}", target = "{dst}", delay = 0 }}\n')
    return subprocess.Popen(["lsyncd", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()

rows = []
for name, start, n in [("mirrorfs watch", run_mirrorfs, N), ("lsyncd (direct, delay 0)", run_lsyncd, N_LSYNCD)]:
    for tree_name, tree in [("empty tree", None), ("docs tree", BIG)]:
        if shutil.which("lsyncd") is None and name.startswith("lsyncd"):
            continue
        src, dst = fresh("w", tree)
        p = start(src, dst)
        # The initial sync, then the live loop: wait for two markers in turn.
        ok = True
        for m in (b"1", b"2"):
            with open(os.path.join(src, "marker"), "wb") as f:
                f.write(m)
            ok = ok and wait_for(os.path.join(dst, "marker"), m, 600)
        lat = latencies(src, dst, n, 0.02) if ok else [float("inf")]
        stop(p)
        rows.append((name, tree_name, len(lat), pct(lat, 0.5), pct(lat, 0.99)))

# Idle cost of mirrorfs watch over the large tree.
src, dst = fresh("idle", BIG)
files = sum(len(f) for _, _, f in os.walk(src))
p = run_mirrorfs(src, dst)
# Two markers: the second can only arrive through the live watch loop, after the initial walk.
for m in (b"1", b"2"):
    with open(os.path.join(src, "marker"), "wb") as f:
        f.write(m)
    wait_for(os.path.join(dst, "marker"), m, 600)
time.sleep(5)
def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmRSS:"):
                return int(l.split()[1]) / 1024
c0 = cpu(p.pid); time.sleep(10); c1 = cpu(p.pid)
mem = rss(p.pid)
stop(p)

print(f"{'tool':<28} {'tree':<12} {'writes':>6} {'p50 ms':>9} {'p99 ms':>9}")
for name, tree, n, p50, p99 in rows:
    print(f"{name:<28} {tree:<12} {n:>6} {p50*1000:>9.1f} {p99*1000:>9.1f}")
print(f"idle mirrorfs watch over {files} files: {100*(c1-c0)/10:.2f}% of one core over 10 s, RSS {mem:.0f} MiB")
