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
use std::time::{Duration, Instant};

struct Watch {
    tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    _server: ChildGuard,
    watcher: Option<ChildGuard>,
}

impl Watch {
    fn start() -> Watch {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        let sock = tmp.path().join("t.sock");
        let server = serve(&dst, &format!("unix:{}", sock.display()), &[]);
        let log = fs::File::create(tmp.path().join("watch.log")).unwrap();
        let child = Command::new(bin())
            .arg("watch")
            .arg(&src)
            .arg("--target")
            .arg(format!("unix:{}", sock.display()))
            .arg("-q")
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
