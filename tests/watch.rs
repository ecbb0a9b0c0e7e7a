//! End-to-end tests of `mirrorfs watch` against a real `serve` target process: every kind of
//! change made directly in the source reaches the target (checked by polling the whole-tree
//! comparison until it is empty, with a deadline), bursts converge, and an overflowing event
//! queue is answered by a full rescan.

mod common;

use common::{bin, serve, tree_diff, ChildGuard};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

struct Watch {
    tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    _server: ChildGuard,
    watcher: Option<ChildGuard>,
}

/// Tests that change inotify sysctls take this for writing, all others for reading: a
/// shrunken watch limit would break the watches of tests running beside them.
static SYSCTLS: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    SYSCTLS.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    SYSCTLS.write().unwrap_or_else(|e| e.into_inner())
}

impl Watch {
    fn start() -> Watch {
        Watch::start_with(|_| {}, &[])
    }

    /// `before` fills the source before the watcher starts; `extra` are more flags.
    fn start_with(before: impl FnOnce(&Path), extra: &[&str]) -> Watch {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        before(&src);
        let sock = tmp.path().join("t.sock");
        let server = serve(&dst, &format!("unix:{}", sock.display()), &[]);
        let log = fs::File::create(tmp.path().join("watch.log")).unwrap();
        let child = Command::new(bin())
            .arg("watch")
            .arg(&src)
            .arg("--target")
            .arg(format!("unix:{}", sock.display()))
            .arg("-q")
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Watch {
            tmp,
            src,
            dst,
            _server: server,
            watcher: Some(ChildGuard(child)),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("watch.log")).unwrap_or_default()
    }

    /// Polls until the target equals the source, or fails with the differences left.
    fn converge(&self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            // The target changes under the walk while a reconcile runs (temporary files come and
            // go): a walk that trips on that counts as "not yet".
            let d = std::panic::catch_unwind(|| tree_diff(&self.src, &self.dst))
                .unwrap_or_else(|_| vec!["the tree changed during the comparison".into()]);
            if d.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: no convergence within {limit:?}:\n{}\nlog:\n{}",
                    d.join("\n"),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }

    /// SIGTERM; the watcher must exit 0.
    fn stop(mut self) {
        let mut g = self.watcher.take().unwrap();
        let pid = g.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = g.0.try_wait().unwrap() {
                assert!(st.success(), "watch exited {st}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "watch did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn sh(cmd: &str) {
    assert!(
        Command::new("sh").arg("-c").arg(cmd).status().unwrap().success(),
        "{cmd}"
    );
}

#[test]
fn every_kind_of_change_reaches_the_target() {
    let _g = shared();
    let w = Watch::start();
    let t = Duration::from_secs(20);
    fs::create_dir_all(w.p("d/e")).unwrap();
    fs::write(w.p("d/e/f"), b"created").unwrap();
    w.converge("create", t);
    fs::write(w.p("d/e/f"), b"rewritten").unwrap();
    sh(&format!("echo appended >> '{}'", w.p("d/e/f").display()));
    w.converge("write and append", t);
    sh(&format!("truncate -s 3 '{}'", w.p("d/e/f").display()));
    w.converge("truncate", t);
    fs::set_permissions(w.p("d/e/f"), fs::Permissions::from_mode(0o600)).unwrap();
    w.converge("chmod", t);
    sh(&format!(
        "touch -d '2001-01-01 00:00:00.5' '{}'",
        w.p("d/e/f").display()
    ));
    w.converge("touch", t);
    xattr::set(w.p("d/e/f"), "user.k", b"v").unwrap();
    w.converge("xattr", t);
    fs::rename(w.p("d/e/f"), w.p("d/g")).unwrap();
    w.converge("rename a file", t);
    fs::rename(w.p("d"), w.p("moved")).unwrap();
    w.converge("rename a tree", t);
    fs::create_dir_all(w.p("tree/a/b")).unwrap();
    fs::write(w.p("tree/a/b/c"), b"x").unwrap();
    w.converge("make a tree", t);
    fs::remove_dir_all(w.p("tree")).unwrap();
    w.converge("delete a tree", t);
    fs::write(w.p("becomes-dir"), b"f").unwrap();
    fs::create_dir(w.p("becomes-file")).unwrap();
    w.converge("before replacing", t);
    fs::remove_file(w.p("becomes-dir")).unwrap();
    fs::create_dir(w.p("becomes-dir")).unwrap();
    fs::write(w.p("becomes-dir/inner"), b"i").unwrap();
    fs::remove_dir(w.p("becomes-file")).unwrap();
    fs::write(w.p("becomes-file"), b"now a file").unwrap();
    w.converge("file to directory and back", t);
    symlink("moved/g", w.p("link")).unwrap();
    fs::hard_link(w.p("moved/g"), w.p("hard")).unwrap();
    w.converge("symlink and hard link", t);
    w.stop();
}

#[test]
fn a_burst_of_ten_thousand_files_converges() {
    let _g = shared();
    let w = Watch::start();
    for d in 0..100 {
        let dir = w.p(&format!("burst/{}/{}", d / 10, d));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    for d in 0..100 {
        for f in (0..100).step_by(2) {
            fs::remove_file(w.p(&format!("burst/{}/{}/f{f}", d / 10, d))).unwrap();
        }
    }
    w.converge("10,000 files created, half deleted", Duration::from_secs(120));
    w.stop();
}

/// Sets a sysctl for the length of a test, and puts the old value back even if it fails.
struct Sysctl(&'static str, String);

impl Sysctl {
    fn set(path: &'static str, v: &str) -> Option<Sysctl> {
        let old = fs::read_to_string(path).ok()?;
        fs::write(path, v).ok()?;
        Some(Sysctl(path, old))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.0, self.1.trim());
    }
}

#[test]
fn an_overflowing_event_queue_means_a_full_rescan() {
    let _x = exclusive();
    // The queue size is taken when the watcher starts: shrink it first.
    let Some(_g) = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", "32") else {
        common::mnt::skip(
            "an_overflowing_event_queue_means_a_full_rescan",
            "cannot write fs.inotify.max_queued_events",
        );
        return;
    };
    let w = Watch::start();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..2000 {
        fs::write(w.p(&format!("flood{i}")), b"x").unwrap();
    }
    w.converge("after an overflow", Duration::from_secs(60));
    assert!(w.log().contains("overflowed"), "the overflow was seen:\n{}", w.log());
    w.stop();
}

#[test]
fn watch_refuses_a_missing_source() {
    let out = Command::new(bin())
        .args(["watch", "/nonexistent/src", "--target", "/tmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/src"));
    let _ = Path::new("/");
}

/// Renames seen at both ends travel as renames: the target's file keeps its inode (it was
/// moved, not sent again), for a file and for a directory tree.
#[test]
fn renames_are_forwarded_as_renames() {
    use std::os::unix::fs::MetadataExt;
    let _g = shared();
    let w = Watch::start_with(
        |src| {
            fs::create_dir_all(src.join("tree/sub")).unwrap();
            fs::write(src.join("tree/sub/big"), vec![7u8; 1 << 20]).unwrap();
            fs::write(src.join("f"), b"file").unwrap();
        },
        &[],
    );
    let t = Duration::from_secs(20);
    w.converge("start", t);
    // Open on the target across the renames: a file moved keeps its links, one sent again
    // leaves this one unlinked (inode numbers alone could be reused).
    let held_big = fs::File::open(w.dst.join("tree/sub/big")).unwrap();
    let held_f = fs::File::open(w.dst.join("f")).unwrap();
    fs::rename(w.p("f"), w.p("g")).unwrap();
    fs::rename(w.p("tree"), w.p("moved")).unwrap();
    w.converge("renames", t);
    let same = |held: &fs::File, p: &str| {
        let m = held.metadata().unwrap();
        m.nlink() > 0 && m.ino() == fs::symlink_metadata(w.dst.join(p)).unwrap().ino()
    };
    assert!(same(&held_f, "g"), "the renamed file was sent again instead of renamed");
    assert!(
        same(&held_big, "moved/sub/big"),
        "the renamed tree was sent again instead of renamed"
    );
    // A rename whose old name is taken again before the watcher looks is not repeated (that
    // would move the new file): the reconcile sends what is there.
    fs::rename(w.p("g"), w.p("h")).unwrap();
    fs::write(w.p("g"), b"new g").unwrap();
    w.converge("rename then reuse of the name", t);
    w.stop();
}

/// The classic race: directories made and filled faster than watches can be added, and a
/// tree moved in with its contents, then filled further at once. Nothing made in the gap
/// before a directory's watch exists may be missed.
#[test]
fn directories_filled_before_their_watch_exists_are_scanned() {
    let _g = shared();
    let w = Watch::start();
    let outside = w.tmp.path().join("outside");
    fs::create_dir_all(outside.join("t/a/b")).unwrap();
    for i in 0..50 {
        fs::write(outside.join(format!("t/a/b/pre{i}")), format!("{i}")).unwrap();
    }
    let src = w.src.display().to_string();
    let out = outside.display().to_string();
    sh(&format!(
        "cd '{src}' && for i in $(seq 20); do mkdir -p r$i/1/2/3 && echo $i > r$i/1/2/3/f && echo $i > r$i/1/g; done; \
         mv '{out}/t' '{src}/t' && mkdir t/a/b/c && for i in $(seq 50); do echo $i > t/a/b/c/post$i; done"
    ));
    w.converge("filled before watched", Duration::from_secs(30));
    // The watches exist now: changes deep inside the new trees still arrive.
    fs::write(w.p("t/a/b/c/post1"), b"later").unwrap();
    fs::write(w.p("r20/1/2/3/f"), b"later").unwrap();
    w.converge("inside the new trees", Duration::from_secs(30));
    w.stop();
}

/// Roots' inotify watches in use now, from every inotify fd's fdinfo.
fn watches_in_use() -> usize {
    let mut n = 0;
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(s) = fs::read_to_string(fd.path()) {
                n += s.lines().filter(|l| l.starts_with("inotify wd:")).count();
            }
        }
    }
    n
}

/// At the watch limit: a clear message naming the sysctl, periodic rescans that still carry
/// every change, and full coverage again once the limit is raised.
#[test]
fn the_watch_limit_falls_back_to_periodic_rescans() {
    let _x = exclusive();
    let w0 = |src: &Path| {
        for i in 0..20 {
            fs::create_dir_all(src.join(format!("d{i}/e"))).unwrap();
            fs::write(src.join(format!("d{i}/e/f")), b"x").unwrap();
        }
    };
    let limit = (watches_in_use() + 5).to_string();
    let Some(guard) = Sysctl::set("/proc/sys/fs/inotify/max_user_watches", &limit) else {
        common::mnt::skip(
            "the_watch_limit_falls_back_to_periodic_rescans",
            "cannot write fs.inotify.max_user_watches",
        );
        return;
    };
    let w = Watch::start_with(w0, &["--rescan-secs", "0.3"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.log().contains("fs.inotify.max_user_watches") {
        assert!(Instant::now() < deadline, "no watch-limit message:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    w.converge("start", Duration::from_secs(20));
    // Deep in the tree, where no watch can be.
    fs::write(w.p("d19/e/f"), b"changed while unwatched").unwrap();
    fs::create_dir(w.p("d19/e/new")).unwrap();
    fs::remove_file(w.p("d18/e/f")).unwrap();
    w.converge("changes under the limit", Duration::from_secs(20));
    drop(guard);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.log().contains("watched again") {
        assert!(Instant::now() < deadline, "coverage did not come back:\n{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(w.p("d19/e/new/after"), b"watched").unwrap();
    w.converge("after the limit was raised", Duration::from_secs(20));
    w.stop();
}

/// A symlink to a directory is an entry, not a second way into the directory: changes in the
/// real directory arrive under its real name, also after the link is removed.
#[test]
fn symlinks_to_directories_are_not_followed() {
    let _g = shared();
    let w = Watch::start_with(
        |src| {
            fs::create_dir_all(src.join("releases/v2")).unwrap();
            symlink("releases/v2", src.join("current")).unwrap();
            symlink("/", src.join("outside")).unwrap();
        },
        &[],
    );
    let t = Duration::from_secs(20);
    w.converge("start", t);
    fs::write(w.p("releases/v2/x"), b"through the real name").unwrap();
    w.converge("write in the linked directory", t);
    fs::remove_file(w.p("current")).unwrap();
    w.converge("link removed", t);
    fs::write(w.p("releases/v2/y"), b"still watched").unwrap();
    w.converge("write after the link went", t);
    assert!(
        !w.log().contains("max_user_watches"),
        "a link outside the tree was followed:\n{}",
        w.log()
    );
    w.stop();
}

/// Under a mount, an overflow loses the events that would have dropped the kernel's cached
/// names: the rescan that follows checks every directory the kernel knows, so names looked up
/// through the mount as missing (negative entries) and then made behind it show through it
/// once the target has them.
#[test]
fn after_an_overflow_the_mount_drops_what_it_cannot_vouch_for() {
    use std::os::unix::fs::MetadataExt;
    let _x = exclusive();
    let name = "after_an_overflow_the_mount_drops_what_it_cannot_vouch_for";
    let Some(_g) = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", "32") else {
        common::mnt::skip(name, "cannot write fs.inotify.max_queued_events");
        return;
    };
    let before = |src: &Path| {
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/f"), b"before").unwrap();
    };
    // inotify's queue is the one made small here (the mount's fanotify queue is unbounded).
    let opts = common::mnt::Opts {
        separate: true,
        before: Some(&before),
        env: &[("MIRRORFS_NO_FANOTIFY", "1")],
        ..Default::default()
    };
    let Some(m) = common::mnt::Mount::with(name, opts) else {
        return;
    };
    for i in 0..50 {
        assert!(fs::symlink_metadata(m.mnt.join(format!("d/n{i}"))).is_err());
    }
    let old = fs::symlink_metadata(m.mnt.join("d/f")).unwrap();
    // The daemon is stopped while the changes are made: its event queue overflows before it
    // reads any of them. Through the mount nothing is touched meanwhile.
    let pid = m.daemon.as_ref().unwrap().id().to_string();
    sh(&format!("kill -STOP {pid}"));
    let cont = common::mnt::Resume(pid.clone());
    for i in 0..50 {
        fs::write(m.src.join(format!("d/n{i}")), b"made behind the mount").unwrap();
    }
    fs::remove_file(m.src.join("d/f")).unwrap();
    fs::write(m.src.join("d/f"), b"another file").unwrap();
    for i in 0..100 {
        fs::write(m.src.join(format!("flood{i}")), b"x").unwrap();
    }
    drop(cont);
    common::mnt::converge(&m, "after an overflow");
    assert!(
        m.log_text().contains("overflowed"),
        "the overflow was seen:\n{}",
        m.log_text()
    );
    let deadline = Instant::now() + Duration::from_millis(400);
    loop {
        let missing: Vec<String> = (0..50)
            .map(|i| format!("d/n{i}"))
            .filter(|n| fs::symlink_metadata(m.mnt.join(n)).is_err())
            .collect();
        let f = fs::symlink_metadata(m.mnt.join("d/f")).unwrap();
        if missing.is_empty() && f.ino() != old.ino() && common::mnt::tree_diff_live(&m.src, &m.mnt).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount still misses {missing:?} (d/f inode {} before, {} now) after the target has them",
            old.ino(),
            f.ino()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.finish();
}
