//! The bad day, with real processes and real faults: a target process killed with SIGKILL and
//! restarted, one stopped with SIGSTOP past `--timeout`, a session fenced while its request
//! waited in a dead connection, a target directory swapped for an older copy, and a target file
//! system that fills up. Every scenario ends with whole-tree equality, reached while still
//! mounted, and the daemon's exit code.

mod common;

use common::mnt::{converge, Mount, Opts};
use common::{serve, ChildGuard};
use mirrorfs::protocol::{Reply, Request};
use mirrorfs::rpc::{Rpc, RpcError};
use mirrorfs::transport::{self, Endpoint};
use mirrorfs::Change;
use mirrorfs::RelPath;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

/// What a workload saw of its syscalls.
#[derive(Debug, Default)]
struct Seen {
    ops: u64,
    slowest: Duration,
    slowest_op: String,
    errors: Vec<String>,
}

/// Writes, renames and removes files in `dir` through the mount until stopped, timing every
/// syscall. A syscall's wait counts from its start or from the last fault (`fault`), whichever
/// is later: the promise is about how long a syscall waits once the target stopped answering,
/// and a target slowed by a busy machine before the fault may have taken its time legitimately.
struct Workload {
    stop: Arc<AtomicBool>,
    fault: Arc<std::sync::Mutex<Option<Instant>>>,
    handle: Option<JoinHandle<Seen>>,
}

impl Workload {
    fn start(dir: PathBuf) -> Workload {
        fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let fault = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let (s, faulted) = (stop.clone(), fault.clone());
        let handle = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut i = 0u64;
            let timed = |seen: &mut Seen, what: String, f: &mut dyn FnMut() -> std::io::Result<()>| {
                let t = Instant::now();
                let r = f();
                let from = match *faulted.lock().unwrap() {
                    Some(at) => at.max(t),
                    None => t,
                };
                let waited = Instant::now().saturating_duration_since(from);
                if waited > seen.slowest {
                    seen.slowest = waited;
                    seen.slowest_op = what.clone();
                }
                seen.ops += 1;
                if let Err(e) = r {
                    seen.errors.push(format!("{what}: {e}"));
                }
            };
            while !s.load(Ordering::Relaxed) {
                let f = dir.join(format!("f{}", i % 40));
                timed(&mut seen, format!("write {}", f.display()), &mut || {
                    fs::write(&f, format!("round {i}\n").repeat(1 + (i % 7) as usize * 300))
                });
                if i % 5 == 0 {
                    let to = dir.join(format!("r{}", i % 11));
                    timed(&mut seen, format!("rename {}", f.display()), &mut || {
                        fs::rename(&f, &to)
                    });
                }
                if i % 13 == 0 {
                    let d = dir.join(format!("d{}", i % 3));
                    timed(
                        &mut seen,
                        format!("mkdir/rmdir {}", d.display()),
                        &mut || match fs::create_dir(&d) {
                            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fs::remove_dir_all(&d),
                            r => r,
                        },
                    );
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        });
        Workload {
            stop,
            fault,
            handle: Some(handle),
        }
    }

    /// The target stops answering now.
    fn fault(&self) {
        *self.fault.lock().unwrap() = Some(Instant::now());
    }

    fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn listen_of(m: &Mount) -> String {
    m.target_arg(false)
}

/// Waits until the daemon's log shows the link reaching `state` (a line "... -> STATE").
fn wait_state(m: &Mount, state: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !m.log_text().contains(&format!("-> {state}")) {
        assert!(
            Instant::now() < deadline,
            "the link never became {state}:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check_seen(seen: &Seen, timeout: Duration, m: &Mount) {
    check_seen_within(seen, timeout + Duration::from_secs(2), timeout, m)
}

fn check_seen_within(seen: &Seen, limit: Duration, timeout: Duration, m: &Mount) {
    assert!(seen.ops > 50, "the workload ran ({} ops)", seen.ops);
    assert!(
        seen.errors.is_empty(),
        "syscalls failed: {:?}\nlog:\n{}",
        seen.errors,
        m.log_text()
    );
    assert!(
        seen.slowest < limit,
        "a syscall waited {:?} ({}), past --timeout {timeout:?} and a margin:\n{}",
        seen.slowest,
        seen.slowest_op,
        m.log_text()
    );
}

#[test]
fn kill_9_of_serve_and_a_restart_are_caught_up_without_a_remount() {
    let name = "kill_9_of_serve_and_a_restart_are_caught_up_without_a_remount";
    let opts = Opts {
        extra: &["--timeout", "3"],
        ..Opts::default()
    };
    let Some(mut m) = Mount::with(name, opts) else { return };
    let w = Workload::start(m.p("work"));
    fs::create_dir_all(m.p("tree/sub")).unwrap();
    fs::write(m.p("tree/sub/x"), b"1").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let before = m.wait_status("connected", Duration::from_secs(5));
    assert!(before.link.forwarded_ops > 0, "{before:?}");
    w.fault();
    drop(m.server.take()); // SIGKILL, reaped
    let away = m.wait_status("disconnected", Duration::from_secs(10));
    assert!(
        away.link.last_error.as_deref().is_some_and(|e| e.contains("target")),
        "{away:?}"
    );
    // A directory renamed while the target is away: both subtrees are caught up.
    fs::rename(m.p("tree"), m.p("moved")).unwrap();
    fs::write(m.p("moved/sub/x"), b"changed while away").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let (_, st) = m.status();
    let st = st.expect("listed");
    assert!(st.link.behind_paths > 0, "changes made while away are kept: {st:?}");
    m.server = Some(serve(&m.dst, &listen_of(&m), &[]));
    let back = m.wait_status("connected", Duration::from_secs(20));
    assert!(back.link.reconnects >= 1, "{back:?}");
    std::thread::sleep(Duration::from_millis(500));
    let seen = w.stop();
    check_seen(&seen, Duration::from_secs(3), &m);
    converge(&m, "after the restart, still mounted");
    let log = m.log_text();
    assert!(
        log.contains("catching up on"),
        "the catch-up was partial and said so:\n{log}"
    );
    m.finish();
}

#[test]
fn sigstop_of_serve_past_the_timeout_then_sigcont() {
    let name = "sigstop_of_serve_past_the_timeout_then_sigcont";
    let opts = Opts {
        extra: &["--timeout", "2"],
        ..Opts::default()
    };
    let Some(m) = Mount::with(name, opts) else { return };
    let w = Workload::start(m.p("work"));
    std::thread::sleep(Duration::from_millis(500));
    let pid = m.server.as_ref().unwrap().0.id();
    w.fault();
    sh(&format!("kill -STOP {pid}"));
    wait_state(&m, "disconnected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    sh(&format!("kill -CONT {pid}"));
    wait_state(&m, "connected", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let seen = w.stop();
    check_seen(&seen, Duration::from_secs(2), &m);
    converge(&m, "after SIGCONT, still mounted");
    m.finish();
}

/// A connection whose target stopped answering is given up by the first request that waited out
/// the time limit: the requests queued behind it fail at once, so an operation of several
/// requests (a catch-up, a watcher's reconcile) never waits a limit per request.
#[test]
fn one_timeout_gives_the_connection_up_for_every_request_on_it() {
    let d = tempfile::tempdir().unwrap();
    let dst = d.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let sock = d.path().join("s.sock");
    let server = serve(&dst, &format!("unix:{}", sock.display()), &[]);
    let limit = Duration::from_secs(1);
    let c = transport::connect(&Endpoint::Unix(sock), None, Some(limit)).unwrap();
    let Reply::Claimed(_) = c.call(Request::Claim { known: None }).unwrap() else {
        panic!("no claim")
    };
    sh(&format!("kill -STOP {}", server.0.id()));
    // Dropped before the client, even on a failed assertion: a client that still trusts its
    // connection waits at drop for the target to close its side.
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            sh(&format!("kill -CONT {}", self.0));
        }
    }
    let _cont = Cont(server.0.id());
    let mkdir = |name: &str| {
        Request::Change(Change::Mkdir {
            path: RelPath::new(name).unwrap(),
            perm: 0o755,
        })
    };
    let (first, second) = (c.submit(mkdir("a")), c.submit(mkdir("b")));
    let t = Instant::now();
    let r = first.wait();
    let waited = t.elapsed();
    assert!(matches!(r, Err(RpcError::Timeout(_))), "{r:?}");
    assert!(
        waited >= limit && waited < limit * 3,
        "the first request waited {waited:?}"
    );
    let t = Instant::now();
    let r = second.wait();
    assert!(r.is_err(), "{r:?}");
    assert!(
        t.elapsed() < limit / 4,
        "the request behind it waited {:?} more",
        t.elapsed()
    );
    let t = Instant::now();
    assert!(c.call(mkdir("c")).is_err());
    assert!(t.elapsed() < limit / 4, "a new request waited {:?}", t.elapsed());
}

/// A request that waited in a dead connection (its server process stopped) while a newer
/// session claimed the target through another process is never applied.
#[test]
fn a_newer_session_fences_a_request_delayed_in_an_old_connection() {
    let d = tempfile::tempdir().unwrap();
    let dst = d.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let (sa, sb) = (d.path().join("a.sock"), d.path().join("b.sock"));
    let old = serve(&dst, &format!("unix:{}", sa.display()), &[]);
    let _new = serve(&dst, &format!("unix:{}", sb.display()), &[]);
    let limit = Some(Duration::from_secs(10));
    let a = transport::connect(&Endpoint::Unix(sa.clone()), None, limit).unwrap();
    let Reply::Claimed(first) = a.call(Request::Claim { known: None }).unwrap() else {
        panic!("no claim")
    };
    let f = RelPath::new("f").unwrap();
    a.call(Request::Change(Change::Create {
        path: f.clone(),
        perm: 0o644,
        exclusive: true,
    }))
    .unwrap();
    let write = |data: &[u8]| {
        Request::Change(Change::Write {
            path: f.clone(),
            offset: 0,
            data: data.to_vec(),
            mtime: None,
        })
    };
    sh(&format!("kill -STOP {}", old.0.id()));
    let late = a.submit(write(b"late, from the old session"));
    a.flush();
    let b = transport::connect(&Endpoint::Unix(sb), None, limit).unwrap();
    let Reply::Claimed(second) = b
        .call(Request::Claim {
            known: first.generation,
        })
        .unwrap()
    else {
        panic!("no claim")
    };
    assert_eq!(second.prev_epoch, first.epoch);
    b.call(write(b"new")).unwrap();
    sh(&format!("kill -CONT {}", old.0.id()));
    match late.wait() {
        Err(RpcError::Remote(e)) => assert!(mirrorfs::session::is_fenced(&e), "{e}"),
        other => panic!("the delayed request was not fenced: {other:?}"),
    }
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"new");
    // The old connection is closed: nothing more from it can land.
    assert!(a.call(write(b"later still")).is_err());
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"new");
    drop(old);
}

/// The target directory is swapped for an older copy of itself while the target is away: the
/// link sees another directory and reconciles the whole tree, not just what changed meanwhile.
#[test]
fn a_target_replaced_by_an_older_copy_is_reconciled_whole() {
    let name = "a_target_replaced_by_an_older_copy_is_reconciled_whole";
    let opts = Opts {
        extra: &["--timeout", "3"],
        ..Opts::default()
    };
    let Some(mut m) = Mount::with(name, opts) else { return };
    for i in 0..20 {
        fs::write(m.p(&format!("early{i}")), format!("early {i}")).unwrap();
    }
    let snap = m.tmp.path().join("snap");
    sh(&format!("cp -a {} {}", m.dst.display(), snap.display()));
    for i in 0..20 {
        fs::write(m.p(&format!("late{i}")), format!("late {i}")).unwrap();
    }
    fs::write(m.p("early3"), b"rewritten after the copy").unwrap();
    drop(m.server.take());
    wait_state(&m, "disconnected", Duration::from_secs(10));
    fs::rename(&m.dst, m.tmp.path().join("gone")).unwrap();
    fs::rename(&snap, &m.dst).unwrap();
    fs::write(m.p("while-away"), b"x").unwrap();
    m.server = Some(serve(&m.dst, &listen_of(&m), &[]));
    wait_state(&m, "connected", Duration::from_secs(20));
    converge(&m, "after the swap");
    assert!(m.log_text().contains("whole tree"), "log:\n{}", m.log_text());
    m.finish();
}

/// Unmounts a file system on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn write_big(p: &Path, mib: usize) -> std::io::Result<()> {
    let mut f = fs::File::create(p)?;
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&block)?;
    }
    f.sync_all()
}

/// A target on a small tmpfs that fills up: the writer sees no error and no repair storm, the
/// link stays behind (never "connected") while paths are missing, and once space is freed the
/// catch-up completes without a remount.
#[test]
fn a_target_that_fills_up_catches_up_once_space_is_freed() {
    let name = "a_target_that_fills_up_catches_up_once_space_is_freed";
    let opts = Opts {
        local_target: true,
        extra: &["--timeout", "3"],
        before: Some(&|src: &Path| {
            let dst = src.parent().unwrap().join("dst");
            fs::create_dir_all(&dst).unwrap();
            sh(&format!("mount -t tmpfs -o size=20m mirrorfs-test {}", dst.display()));
        }),
        ..Opts::default()
    };
    let Some(m) = Mount::with(name, opts) else { return };
    let _tmpfs = Mounted(m.dst.clone());
    let t = Instant::now();
    write_big(&m.p("big1"), 12).expect("the writer sees no error");
    write_big(&m.p("big2"), 12).expect("the writer sees no error");
    for i in 0..30 {
        fs::write(m.p(&format!("small{i}")), format!("{i}")).expect("small writes succeed");
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the writes took {took:?}: a repair storm"
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = m.log_text();
    let repairs = log.matches("repairing the target").count();
    assert!(
        repairs <= 2,
        "one refusal starts the catch-up, not one repair per write ({repairs}):\n{log}"
    );
    // The recovery thread keeps retrying meanwhile: the target may change during the walk.
    assert!(
        !common::mnt::tree_diff_live(&m.src, &m.dst).is_empty(),
        "the target is behind"
    );
    let last = log.rfind("-> ").map(|i| &log[i..]).unwrap_or("");
    assert!(
        !last.starts_with("-> connected"),
        "never shown as connected while behind:\n{log}"
    );
    sh(&format!("mount -o remount,size=100m {}", m.dst.display()));
    converge(&m, "after space was freed");
    m.finish();
}

/// Unmounts lazily on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = mirrorfs::fuse::unmount(&self.0, true);
    }
}

fn daemon_mount(src: &Path, target: &str, log: &Path) {
    let out = Command::new(common::bin())
        .arg("mount")
        .arg(src)
        .args(["--target", target, "--timeout", "2", "--log-file"])
        .arg(log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `mirrorfs umount` of a daemon whose target is away returns the daemon's 23 and its reason
/// within the time limit and a few seconds; once the target is back, the next mount finishes
/// the job and `umount` says the target is in sync.
#[test]
fn umount_reports_the_daemons_verdict() {
    if !common::mnt::fuse_ready("umount_reports_the_daemons_verdict") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, log) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("d.log"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    let sock = format!("unix:{}", tmp.path().join("t.sock").display());
    let server = serve(&dst, &sock, &[]);
    daemon_mount(&src, &sock, &log);
    let _g = Unmount(src.clone());
    fs::write(src.join("before"), b"1").unwrap();
    drop(server);
    fs::write(src.join("while-away"), b"2").unwrap();
    let t = Instant::now();
    let out = Command::new(common::bin()).arg("umount").arg(&src).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(23), "{said}");
    assert!(
        said.contains("is behind") && said.contains("next mount or sync"),
        "{said}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "umount took {:?}", t.elapsed());
    let _server: ChildGuard = serve(&dst, &sock, &[]);
    daemon_mount(&src, &sock, &log);
    let out = Command::new(common::bin()).arg("umount").arg(&src).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("in sync"), "{said}");
    common::assert_same_tree(&src, &dst);
}

/// A local target on a removable disk (a loop-mounted ext4 image) that is unmounted while
/// mirrored: the link notices, refuses to fill the empty mountpoint left behind and says why in
/// `status`, and once the disk is mounted again it catches up on what changed meanwhile.
#[test]
fn a_local_target_on_a_disk_unmounted_and_mounted_again() {
    let name = "a_local_target_on_a_disk_unmounted_and_mounted_again";
    if !common::mnt::fuse_ready(name) {
        return;
    }
    let img_dir = tempfile::tempdir().unwrap();
    let img = img_dir.path().join("disk.img");
    sh(&format!("truncate -s 64M {0} && mkfs.ext4 -q -F {0}", img.display()));
    let mount_disk = |at: &Path| sh(&format!("mount -o loop {} {}", img.display(), at.display()));
    let opts = Opts {
        local_target: true,
        extra: &["--timeout", "2"],
        before: Some(&|src: &Path| {
            let dst = src.parent().unwrap().join("dst");
            fs::create_dir_all(&dst).unwrap();
            mount_disk(&dst);
            fs::remove_dir(dst.join("lost+found")).unwrap();
        }),
        ..Opts::default()
    };
    let Some(m) = Mount::with(name, opts) else { return };
    let _disk = Mounted(m.dst.clone());
    for i in 0..10 {
        fs::write(m.p(&format!("a{i}")), format!("{i}")).unwrap();
    }
    converge(&m, "mirrored onto the disk");
    sh(&format!("umount -l {}", m.dst.display()));
    let away = m.wait_status("disconnected", Duration::from_secs(10));
    for i in 0..10 {
        fs::write(m.p(&format!("b{i}")), format!("while the disk is away {i}")).unwrap();
    }
    fs::remove_file(m.p("a3")).unwrap();
    // Reconnect attempts meet the empty mountpoint, and leave it alone.
    std::thread::sleep(Duration::from_secs(2));
    let (code, st) = m.status();
    let st = st.unwrap();
    assert_eq!(
        (code, st.link.state.as_str()),
        (1, "disconnected"),
        "{away:?} then {st:?}"
    );
    assert!(
        st.link
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("is its disk mounted")),
        "status says why: {st:?}"
    );
    assert_eq!(
        fs::read_dir(&m.dst).unwrap().count(),
        0,
        "nothing written beneath the mountpoint"
    );
    mount_disk(&m.dst);
    m.wait_status("connected", Duration::from_secs(20));
    converge(&m, "the disk is back");
    assert!(
        m.log_text().contains("catching up on"),
        "a partial catch-up:\n{}",
        m.log_text()
    );
    m.finish();
}

/// A target in its own network namespace, behind a veth link that the test cuts for 10 s.
/// Fields drop in order: the mount, the server, the namespace and its links, the served files.
struct CutSetup {
    m: Mount,
    _server: ChildGuard,
    ns: common::netns::NetNs,
    _tmp: tempfile::TempDir,
}

fn network_cut_setup(name: &str, policy: &str, more: &[&str]) -> Option<CutSetup> {
    if !common::mnt::fuse_ready(name) {
        return None;
    }
    let ns = match common::netns::NetNs::new() {
        Ok(ns) => ns,
        Err(why) => {
            common::mnt::skip(name, &why);
            return None;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let (dst, token) = (tmp.path().join("served"), tmp.path().join("token"));
    fs::create_dir(&dst).unwrap();
    fs::write(&token, b"a token of at least sixteen bytes\n").unwrap();
    let port = common::free_port();
    let addr = format!("{}:{port}", ns.ns_ip);
    let child = ns
        .command(common::bin())
        .arg("serve")
        .arg(&dst)
        .args(["--listen", &format!("tcp:{addr}"), "--token-file"])
        .arg(&token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "serve in the namespace did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = format!("tcp:{addr}");
    let token_s = token.display().to_string();
    let mut extra = vec!["--timeout", "2", "--token-file", &token_s, "--on-disconnect", policy];
    extra.extend_from_slice(more);
    let opts = Opts {
        target: Some(&target),
        extra: &extra,
        ..Opts::default()
    };
    let mut m = Mount::with(name, opts)?;
    // The comparison and the final equality read what the namespace's server wrote.
    let _ = std::fs::remove_dir(&m.dst);
    m.dst = dst;
    Some(CutSetup {
        m,
        _server: server,
        ns,
        _tmp: tmp,
    })
}

#[test]
fn a_network_cut_with_continue_loses_nothing() {
    let Some(c) = network_cut_setup("a_network_cut_with_continue_loses_nothing", "continue", &[]) else {
        return;
    };
    let w = Workload::start(c.m.p("work"));
    std::thread::sleep(Duration::from_millis(500));
    w.fault();
    c.ns.set_link(false);
    c.m.wait_status("disconnected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(8));
    c.ns.set_link(true);
    c.m.wait_status("connected", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let seen = w.stop();
    check_seen(&seen, Duration::from_secs(2), &c.m);
    converge(&c.m, "after the cut");
    c.m.finish();
}

#[test]
fn a_network_cut_with_block_waits_then_completes() {
    // Two FUSE threads and four blocked writers: a blocked mutation must not hold a thread.
    let name = "a_network_cut_with_block_waits_then_completes";
    let Some(c) = network_cut_setup(name, "block", &["--threads", "2"]) else {
        return;
    };
    fs::write(c.m.p("before"), b"1").unwrap();
    // Each writer in its own directory: a blocked create holds the kernel's lock on its parent,
    // so a listing of that one directory waits with it (as on any FUSE or NFS mount).
    for i in 0..4 {
        fs::create_dir(c.m.p(&format!("w{i}"))).unwrap();
    }
    c.ns.set_link(false);
    // The first writes meet the cut and wait one --timeout; later ones wait for the target.
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let p = c.m.p(&format!("w{i}/during"));
            std::thread::spawn(move || {
                let t = Instant::now();
                fs::write(&p, format!("written during the cut by {i}")).map(|_| t.elapsed())
            })
        })
        .collect();
    c.m.wait_status("disconnected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "every write waits for the target"
    );
    // Reads, listings, a new stat and status do not wait. They run on a thread of their own, so
    // that if they hang the test fails (and its guards free the writers) instead of hanging.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (before, mnt) = (c.m.p("before"), c.m.mnt.clone());
    std::thread::spawn(move || {
        let read = fs::read(&before).unwrap();
        let names = fs::read_dir(&mnt).unwrap().count();
        let missing = fs::metadata(mnt.join("no-such-name")).is_err();
        let _ = tx.send((read, names, missing));
    });
    let t = Instant::now();
    let (read, names, missing) = rx
        .recv_timeout(Duration::from_secs(2))
        .expect("reads answer within 2 s beside four blocked writers");
    assert_eq!(read, b"1");
    assert_eq!(names, 5, "the listing shows before and w0..w3");
    assert!(missing);
    let (code, _) = c.m.status();
    assert_eq!(code, 1);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "reads and status took {:?} beside four blocked writers",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(5));
    c.ns.set_link(true);
    for (i, w) in writers.into_iter().enumerate() {
        let took = w.join().unwrap().expect("the blocked write completes");
        assert!(
            took > Duration::from_secs(8),
            "write {i} returned only after the cut: {took:?}"
        );
        assert_eq!(
            fs::read(c.m.dst.join(format!("w{i}/during"))).unwrap(),
            format!("written during the cut by {i}").as_bytes(),
            "and is on the target"
        );
    }
    c.m.wait_status("connected", Duration::from_secs(10));
    converge(&c.m, "after the cut");
    c.m.finish();
}

#[test]
fn a_network_cut_with_fail_refuses_and_changes_nothing() {
    let Some(c) = network_cut_setup("a_network_cut_with_fail_refuses_and_changes_nothing", "fail", &[]) else {
        return;
    };
    fs::write(c.m.p("before"), b"1").unwrap();
    fs::write(c.m.p("mapped"), vec![0u8; 4096]).unwrap();
    c.ns.set_link(false);
    // The syscall caught at the moment of loss waits one --timeout, keeps its source result
    // and counts as changed.
    fs::create_dir(c.m.p("at-the-cut")).unwrap();
    c.m.wait_status("disconnected", Duration::from_secs(10));
    for (what, r) in [
        ("create", fs::write(c.m.p("refused"), b"x")),
        ("mkdir", fs::create_dir(c.m.p("refused-dir"))),
        ("rename", fs::rename(c.m.p("before"), c.m.p("renamed"))),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
    }
    for p in ["refused", "refused-dir", "renamed"] {
        assert!(
            !c.m.src.join(p).exists(),
            "{p}: the source shows none of the refused changes"
        );
    }
    assert_eq!(fs::read(c.m.p("before")).unwrap(), b"1", "reads keep working");
    // Writeback of a shared mmap cannot be refused (the writer already wrote): it goes through,
    // and counts as changed.
    let st = Command::new("python3")
        .arg("-c")
        .arg(
            "import mmap,sys\nf=open(sys.argv[1],'r+b')\nm=mmap.mmap(f.fileno(),4096)\nm[0:6]=b'mapped'\nm.flush()\nm.close()",
        )
        .arg(c.m.p("mapped"))
        .status()
        .unwrap();
    assert!(st.success(), "msync of a shared mapping is not refused");
    assert_eq!(&fs::read(c.m.src.join("mapped")).unwrap()[..6], b"mapped");
    std::thread::sleep(Duration::from_secs(8));
    c.ns.set_link(true);
    c.m.wait_status("connected", Duration::from_secs(20));
    fs::write(c.m.p("after"), b"3").unwrap();
    c.m.finish();
}

/// A listener that accepts connections and never answers (a hung server).
fn silent_listener() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp:{}", l.local_addr().unwrap());
    (l, addr)
}

/// At start, every command gives up on a target that makes no progress for --timeout: with a
/// message naming it, and (for mount) nothing left mounted.
#[test]
fn every_wait_at_start_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, mnt) = (tmp.path().join("src"), tmp.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let (_l, addr) = silent_listener();
    let can_mount = common::mnt::fuse_ready("every_wait_at_start_is_bounded");
    let mut commands: Vec<Vec<std::ffi::OsString>> = ["sync", "verify", "watch"]
        .iter()
        .map(|c| vec![c.into(), src.clone().into()])
        .collect();
    if can_mount {
        commands.push(vec![
            "mount".into(),
            src.clone().into(),
            mnt.clone().into(),
            "--foreground".into(),
        ]);
    }
    for mut args in commands {
        args.extend([
            "--target".into(),
            addr.clone().into(),
            "--timeout".into(),
            "2".into(),
            "-q".into(),
        ]);
        let t = Instant::now();
        let mut child = Command::new(common::bin())
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} still waits after 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&addr), "{args:?}: the message names the target: {err}");
        assert!(t.elapsed() < Duration::from_secs(8), "{args:?} took {:?}", t.elapsed());
        assert!(!common::mnt::mounted(&mnt), "nothing is left mounted");
    }
}

/// `serve --listen unix:PATH` replaces only a socket nobody answers on.
#[test]
fn serve_replaces_only_a_dead_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    fs::create_dir(&dir).unwrap();
    let serve_out = |path: &Path| {
        let mut c = Command::new(common::bin())
            .arg("serve")
            .arg(&dir)
            .arg("--listen")
            .arg(format!("unix:{}", path.display()))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        match c.try_wait().unwrap() {
            Some(st) => {
                let mut e = String::new();
                std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut e).unwrap();
                (Some(st), e)
            }
            None => {
                let _ = c.kill();
                let _ = c.wait();
                (None, String::new())
            }
        }
    };
    let file = tmp.path().join("a-file");
    fs::write(&file, b"precious").unwrap();
    let (st, err) = serve_out(&file);
    assert_eq!(st.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"precious", "the file is left alone");
    let sock = tmp.path().join("s.sock");
    let live = serve(&dir, &format!("unix:{}", sock.display()), &[]);
    let (st, err) = serve_out(&sock);
    assert_eq!(st.and_then(|s| s.code()), Some(2), "{err}");
    assert!(err.contains("another running mirrorfs serve"), "{err}");
    // Killed: its socket file stays, and nothing answers on it; a new serve takes its place.
    drop(live);
    assert!(sock.exists());
    let (st, _) = serve_out(&sock);
    assert!(st.is_none(), "a serve on the dead socket's path runs");
}

/// `mirrorfs watch` rides out a target restart the way the mount does.
#[test]
fn watch_reconnects_and_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    fs::create_dir_all(src.join("tree/sub")).unwrap();
    fs::write(src.join("tree/sub/x"), b"1").unwrap();
    let sock = format!("unix:{}", tmp.path().join("t.sock").display());
    let server = serve(&dst, &sock, &[]);
    let log = tmp.path().join("watch.log");
    let child = Command::new(common::bin())
        .arg("watch")
        .arg(&src)
        .args(["--target", &sock, "--timeout", "2", "-q"])
        .env("RUST_LOG", "info")
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut watch = ChildGuard(child);
    let converge = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !common::mnt::tree_diff_live(&src, &dst).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}\n{}",
                common::mnt::tree_diff_live(&src, &dst),
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    converge("the first walk");
    drop(server);
    fs::write(src.join("while-away"), b"2").unwrap();
    // A directory renamed while the target is away: both subtrees are caught up.
    fs::rename(src.join("tree"), src.join("moved")).unwrap();
    fs::write(src.join("moved/sub/x"), b"changed").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _server = serve(&dst, &sock, &[]);
    converge("after the restart");
    sh(&format!("kill -TERM {}", watch.0.id()));
    let st = watch.0.wait().unwrap();
    assert!(
        st.success(),
        "watch exits 0 once caught up: {st}\n{}",
        fs::read_to_string(&log).unwrap()
    );
}

/// The mount daemon itself killed mid-workload: what was acknowledged with fsync is on the
/// source, and the next mount detaches the dead mount and brings the target to equality.
#[test]
fn kill_9_of_the_mount_daemon_loses_nothing_acknowledged() {
    let Some(mut m) = Mount::new("kill_9_of_the_mount_daemon_loses_nothing_acknowledged") else {
        return;
    };
    let dir = m.p("work");
    fs::create_dir(&dir).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (s, d) = (stop.clone(), dir.clone());
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0.. {
            if s.load(Ordering::Relaxed) {
                break;
            }
            let p = d.join(format!("f{i}"));
            let r = fs::File::create(&p).and_then(|mut f| {
                f.write_all(format!("acknowledged {i}").as_bytes())?;
                f.sync_all()
            });
            match r {
                Ok(()) => acked.push(i),
                Err(_) => break,
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(700));
    let mut daemon = m.daemon.take().unwrap();
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(acked.len() > 10, "the workload ran");
    // The dead mount answers ENOTCONN until the next mount detaches it.
    m.start(false);
    for i in &acked {
        assert_eq!(
            fs::read(m.p(&format!("work/f{i}"))).unwrap(),
            format!("acknowledged {i}").as_bytes(),
            "f{i} was acknowledged"
        );
    }
    m.finish();
}

/// A target that dies while nothing is being forwarded is noticed all the same: status does not
/// go on saying "connected".
#[test]
fn a_target_that_dies_while_idle_is_noticed() {
    let Some(mut m) = Mount::new("a_target_that_dies_while_idle_is_noticed") else {
        return;
    };
    fs::write(m.p("f"), b"1").unwrap();
    m.wait_status("connected", Duration::from_secs(5));
    drop(m.server.take());
    let st = m.wait_status("disconnected", Duration::from_secs(3));
    assert!(st.link.last_error.is_some(), "{st:?}");
    m.server = Some(serve(&m.dst, &listen_of(&m), &[]));
    m.wait_status("connected", Duration::from_secs(15));
    m.finish();
}

/// Sends SIGCONT when dropped, so a test that fails while a process is stopped never leaves
/// another one waiting on it in the kernel.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        sh(&format!("kill -CONT {} 2>/dev/null || true", self.0));
    }
}

#[test]
fn a_request_slower_than_the_timeout_is_kept_alive_not_lost() {
    // The target's own disk stalls: the outer target serves a directory that is itself a
    // mirrorfs mount whose target is stopped (with on-disconnect=block, its writes wait). A
    // write through the outer mount then takes several --timeout periods on the target, and the
    // outer link must see keepalives, not a lost target.
    let name = "a_request_slower_than_the_timeout_is_kept_alive_not_lost";
    let inner_opts = Opts {
        separate: true,
        extra: &["--timeout", "1", "--on-disconnect", "block"],
        ..Opts::default()
    };
    let Some(inner) = Mount::with(name, inner_opts) else {
        return;
    };
    let sock = inner.tmp.path().join("outer.sock");
    let listen = format!("unix:{}", sock.display());
    let _outer_target = serve(&inner.mnt, &listen, &[]);
    let opts = Opts {
        target: Some(&listen),
        extra: &["--timeout", "1"],
        ..Opts::default()
    };
    let Some(mut outer) = Mount::with(name, opts) else {
        return;
    };
    let _ = fs::remove_dir(&outer.dst);
    outer.dst = inner.mnt.clone();
    fs::write(outer.p("before"), b"1").unwrap();
    converge(&outer, "before the stall");

    let pid = inner.server.as_ref().expect("the inner target").0.id();
    sh(&format!("kill -STOP {pid}"));
    let resume = Resume(pid);
    let p = outer.p("slow");
    let writer = std::thread::spawn(move || {
        let t = Instant::now();
        fs::write(&p, b"written while the target's disk stalled").map(|_| t.elapsed())
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(!writer.is_finished(), "the write waits for the stalled target");
    let (_, st) = outer.status();
    let st = st.expect("listed");
    assert_eq!(st.link.state, "connected", "a busy target is not a lost one: {st:?}");
    drop(resume);
    let took = writer.join().unwrap().expect("the slow write completes");
    assert!(
        took > Duration::from_secs(3),
        "it waited past three --timeout periods: {took:?}"
    );
    let st = outer.wait_status("connected", Duration::from_secs(10));
    assert_eq!(st.link.reconnects, 0, "the outer link was never lost: {st:?}");
    let log = outer.log_text();
    assert!(!log.contains(" lost "), "the outer link was never lost:\n{log}");
    converge(&outer, "after the stall");
    converge(&inner, "the inner mirror after the stall");
    outer.finish();
    inner.finish();
}
