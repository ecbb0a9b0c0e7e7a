//! A mounted mirror for the end-to-end tests: a real `mirrorfs serve` target process and a real
//! `mirrorfs mount --foreground` daemon over the source. Dropping it unmounts (lazily if need
//! be) and kills both processes, even when the test failed.

use super::{assert_same_tree, bin, serve, tree_diff, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// True when FUSE mounts can run here. When they cannot, the test says why and is counted as
/// skipped, unless MIRRORFS_REQUIRE_FUSE=1, where it fails.
pub fn fuse_ready(test: &str) -> bool {
    let why = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing")
    } else if mirrorfs::sys::geteuid() != 0 {
        Some("not running as root")
    } else {
        None
    };
    let Some(why) = why else { return true };
    skip(test, why);
    false
}

/// Says plainly why `test` cannot run here and records it for test.sh's count; where
/// MIRRORFS_REQUIRE_FUSE=1 (CI) it fails instead.
pub fn skip(test: &str, why: &str) {
    if std::env::var("MIRRORFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{test}: required here (MIRRORFS_REQUIRE_FUSE=1) but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    if let Some(log) = std::env::var_os("MIRRORFS_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Is `p` a mountpoint of type fuse.mirrorfs right now?
pub fn mounted(p: &Path) -> bool {
    mirrorfs::fuse::is_mirrorfs_mount(p)
}

pub struct Mount {
    pub tmp: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    /// Where the mount is (the source itself unless a separate mountpoint was asked for).
    pub mnt: PathBuf,
    pub server: Option<ChildGuard>,
    pub daemon: Option<Child>,
    pub log: PathBuf,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A target given by the test (no `serve` of our own).
    pub target: Option<String>,
}

#[derive(Default)]
pub struct Opts<'a> {
    /// Mount at a separate directory instead of over the source.
    pub separate: bool,
    /// Serve the target in-process (a plain DIR target) instead of from a `serve` process.
    pub local_target: bool,
    pub extra: &'a [&'a str],
    /// Environment of the daemon.
    pub env: &'a [(&'a str, &'a str)],
    /// Fills the source before mounting.
    pub before: Option<&'a dyn Fn(&Path)>,
    /// The target, served by the test itself (`dst` is then what it serves).
    pub target: Option<&'a str>,
}

impl Mount {
    pub fn new(test: &str) -> Option<Mount> {
        Mount::with(test, Opts::default())
    }

    pub fn with(test: &str, o: Opts<'_>) -> Option<Mount> {
        if !fuse_ready(test) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        if let Some(f) = o.before {
            f(&src);
        }
        let mnt = if o.separate {
            let m = tmp.path().join("mnt");
            std::fs::create_dir(&m).unwrap();
            m
        } else {
            src.clone()
        };
        let mut m = Mount {
            log: tmp.path().join("daemon.log"),
            tmp,
            src,
            dst,
            mnt,
            server: None,
            daemon: None,
            extra: o.extra.iter().map(|s| s.to_string()).collect(),
            env: o.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            target: o.target.map(str::to_string),
        };
        if !o.local_target && o.target.is_none() {
            let sock = m.tmp.path().join("target.sock");
            m.server = Some(serve(&m.dst, &format!("unix:{}", sock.display()), &[]));
        }
        m.start(o.local_target);
        Some(m)
    }

    pub fn target_arg(&self, local: bool) -> String {
        if let Some(t) = &self.target {
            t.clone()
        } else if local {
            self.dst.display().to_string()
        } else {
            format!("unix:{}", self.tmp.path().join("target.sock").display())
        }
    }

    /// Starts the daemon and waits until the mount is live.
    pub fn start(&mut self, local: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg(&self.src);
        if self.mnt != self.src {
            cmd.arg(&self.mnt);
        }
        cmd.args(["--target", &self.target_arg(local), "--foreground", "-q"])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // This daemon's own "mounted at" line: a stale mount of a killed daemon is listed too,
        // and may still answer a stat from the kernel's cache.
        let lines_before = self.log_text().matches(" mounted at ").count();
        let mut child = cmd.spawn().expect("start mirrorfs mount");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(mounted(&self.mnt)
            && std::fs::metadata(&self.mnt).is_ok()
            && self.log_text().matches(" mounted at ").count() > lines_before)
        {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("mount daemon exited ({st}) before mounting:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "mount did not come up:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemon = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The path of `rel` inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Waits for the daemon to exit (after an unmount or a signal) and returns its status.
    pub fn wait_daemon(&mut self) -> ExitStatus {
        let mut child = self.daemon.take().expect("daemon running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit after unmount:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts with umount(8) and returns the daemon's exit status.
    pub fn unmount(&mut self) -> ExitStatus {
        let st = Command::new("umount").arg(&self.mnt).status().unwrap();
        assert!(st.success(), "umount {} failed", self.mnt.display());
        self.wait_daemon()
    }

    /// Unmounts, checks the daemon exited 0, and that the target equals the source.
    pub fn finish(mut self) {
        self.finish_ref();
    }

    /// `finish` for a mount the test still holds (its temp dir stays until the drop).
    pub fn finish_ref(&mut self) {
        let st = self.unmount();
        assert!(st.success(), "daemon exited {st}:\n{}", self.log_text());
        assert!(!mounted(&self.mnt), "still mounted after the daemon exited");
        assert_same_tree(&self.src, &self.dst);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.mnt) || std::fs::metadata(&self.mnt).is_err() {
            let _ = mirrorfs::fuse::unmount(&self.mnt, true);
        }
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `f` in a fresh mount over a real target process, then unmounts and proves the target
/// equals the source.
pub fn scenario(test: &str, f: impl FnOnce(&Mount)) {
    let Some(m) = Mount::new(test) else { return };
    f(&m);
    m.finish();
}

/// `tree_diff` of trees that a daemon may still be writing: a comparison during which an entry
/// vanished is tried again (a few times), rather than failing on the vanished entry.
pub fn tree_diff_live(a: &Path, b: &Path) -> Vec<String> {
    for _ in 0..20 {
        if let Ok(d) = std::panic::catch_unwind(|| tree_diff(a, b)) {
            return d;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    vec!["the tree kept changing during the comparison".into()]
}

/// Polls until the target equals `src`, or fails with what still differs.
pub fn converge(m: &Mount, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = tree_diff_live(&m.src, &m.dst);
        if d.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the target did not converge:\n{}\nlog:\n{}",
            d.join("\n"),
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Mount {
    /// `mirrorfs status MOUNTPOINT --json`: its exit code and this mount's entry, if listed.
    pub fn status(&self) -> (i32, Option<mirrorfs::control::MirrorStatus>) {
        let out = Command::new(bin())
            .arg("status")
            .arg(&self.mnt)
            .arg("--json")
            .output()
            .expect("run mirrorfs status");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {:?}", out));
        let mounts = v["mounts"].as_array().expect("a mounts array").clone();
        let mine = mounts
            .into_iter()
            .map(|m| serde_json::from_value::<mirrorfs::control::MirrorStatus>(m).expect("every key"))
            .next();
        (out.status.code().unwrap_or(-1), mine)
    }

    /// Polls `status` until this mount's state is `state` (exit code 0 exactly when connected).
    pub fn wait_status(&self, state: &str, limit: Duration) -> mirrorfs::control::MirrorStatus {
        let deadline = Instant::now() + limit;
        loop {
            let (code, st) = self.status();
            if let Some(st) = st {
                if st.link.state == state {
                    assert_eq!(
                        code,
                        if state == "connected" { 0 } else { 1 },
                        "status exit code in {st:?}"
                    );
                    return st;
                }
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {state} (last: exit {code}, {:?}):\n{}",
                self.status().1,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends SIGCONT to a process stopped by the test when dropped, even if the test fails first.
/// The signal is sent without forking: a forked child closes every file the test holds open
/// when it execs, and a close through a mount may wait for the stopped process.
pub struct Resume(pub String);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Ok(pid) = self.0.parse() {
            let _ = mirrorfs::sys::send_signal(pid, libc::SIGCONT);
        }
    }
}
