//! Helpers shared by the end-to-end tests: an independent tree comparison (std + the xattr
//! crate, not mirrorfs's own scanner), a builder for a tree holding every kind of entry, and
//! guards that kill the processes a test starts even when it fails.
#![allow(dead_code)]

pub mod mnt;
pub mod netns;
pub mod sshd;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uid and gid of the user `name`, if there is one.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Runs a shell command line and asserts it succeeded.
pub fn sh_ok(what: &str) {
    let ok = Command::new("sh").arg("-c").arg(what).status().unwrap().success();
    assert!(ok, "{what}");
}

/// The mirrorfs binary at a path every user can run: a copy in a 0755 directory, replaced
/// atomically by each test process (one file, however many runs). The build's own path may lie
/// under a directory only root can enter (a checkout in /root), and the tests that run serve as
/// another user need to reach it.
pub fn bin_for_all() -> &'static str {
    static COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join("mirrorfs-test-bin");
        let _ = fs::create_dir(&dir);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let to = dir.join("mirrorfs");
        let tmp = dir.join(format!(".mirrorfs.{}", std::process::id()));
        fs::copy(bin(), &tmp).expect("copy the mirrorfs binary");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&tmp, &to).unwrap();
        to.display().to_string()
    })
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirrorfs")
}

pub fn mirrorfs(args: &[&OsStr]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mirrorfs")
}

pub fn run_ok(args: &[&OsStr]) -> String {
    let out = mirrorfs(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "mirrorfs {args:?} failed ({:?}):\n{err}",
        out.status
    );
    err
}

pub fn sync(src: &Path, dst: &str, extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(dst),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run_ok(&args)
}

/// A number from the sync summary, e.g. `field(out, "files sent")`.
pub fn field(summary: &str, name: &str) -> u64 {
    let line = summary
        .lines()
        .find(|l| l.starts_with("synced in"))
        .unwrap_or_else(|| panic!("no summary in {summary}"));
    let i = line.find(name).unwrap_or_else(|| panic!("no {name} in {line}"));
    line[..i]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    link: Option<Vec<u8>>,
    content: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn kind(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "chardev"
    } else {
        "blockdev"
    }
}

/// Every entry of a tree (root included as ""), and its hard-link groups as sets of paths.
fn walk(root: &Path) -> (BTreeMap<Vec<u8>, Node>, BTreeSet<BTreeSet<Vec<u8>>>) {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let m = fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("stat {}: {e}", full.display()));
        let k = kind(m.file_type());
        let key = rel.as_os_str().as_bytes().to_vec();
        if k == "dir" {
            for e in fs::read_dir(&full).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        if k == "file" && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().insert(key.clone());
        }
        // `user.mirrorfs.*` is the mirror's own bookkeeping (the session record on a target
        // root), never part of the tree being mirrored.
        let xattrs = xattr::list(&full)
            .map(|names| {
                names
                    .filter(|n| !n.as_bytes().starts_with(b"user.mirrorfs."))
                    .map(|n| {
                        (
                            n.as_bytes().to_vec(),
                            xattr::get(&full, &n).unwrap().unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        nodes.insert(
            key,
            Node {
                kind: k,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if k == "dir" { 0 } else { m.size() },
                mtime: (m.mtime(), m.mtime_nsec()),
                rdev: m.rdev(),
                link: (k == "symlink").then(|| fs::read_link(&full).unwrap().as_os_str().as_bytes().to_vec()),
                content: (k == "file").then(|| fs::read(&full).unwrap()),
                xattrs,
            },
        );
    }
    (nodes, inodes.into_values().collect())
}

/// Every difference between two trees: content, kind, mode, owner, mtime (ns), symlink
/// targets, device numbers, xattrs and hard-link groups.
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    diff_trees(a, b, None)
}

/// `tree_diff` for a target served without root by the user `owner` (uid, gid): every entry
/// of the target belongs to that user, and the source's device nodes are absent; everything
/// else is compared as ever.
pub fn tree_diff_unprivileged(a: &Path, b: &Path, owner: (u32, u32)) -> Vec<String> {
    diff_trees(a, b, Some(owner))
}

fn diff_trees(a: &Path, b: &Path, unprivileged: Option<(u32, u32)>) -> Vec<String> {
    let (mut na, ga) = walk(a);
    let (nb, gb) = walk(b);
    let mut out = Vec::new();
    if let Some((uid, gid)) = unprivileged {
        let devices: Vec<Vec<u8>> = na
            .iter()
            .filter(|(_, n)| n.kind == "chardev" || n.kind == "blockdev")
            .map(|(p, _)| p.clone())
            .collect();
        for p in devices {
            na.remove(&p);
            if nb.contains_key(&p) {
                out.push(format!(
                    "a device node made by a target without root: {:?}",
                    String::from_utf8_lossy(&p)
                ));
            }
        }
        for n in na.values_mut() {
            (n.uid, n.gid) = (uid, gid);
        }
    }
    for (p, x) in &na {
        let name = String::from_utf8_lossy(p);
        match nb.get(p) {
            None => out.push(format!("missing in target: {name:?}")),
            Some(y) if x != y => {
                let mut what = Vec::new();
                if x.kind != y.kind {
                    what.push(format!("kind {} vs {}", x.kind, y.kind));
                }
                if x.mode != y.mode {
                    what.push(format!("mode {:o} vs {:o}", x.mode, y.mode));
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    what.push(format!("owner {}:{} vs {}:{}", x.uid, x.gid, y.uid, y.gid));
                }
                if x.mtime != y.mtime {
                    what.push(format!("mtime {:?} vs {:?}", x.mtime, y.mtime));
                }
                if x.size != y.size || x.content != y.content {
                    what.push(format!("content (size {} vs {})", x.size, y.size));
                }
                if x.link != y.link {
                    what.push("symlink target".into());
                }
                if x.rdev != y.rdev {
                    what.push("rdev".into());
                }
                if x.xattrs != y.xattrs {
                    what.push(format!(
                        "xattrs {:?} vs {:?}",
                        x.xattrs.keys().collect::<Vec<_>>(),
                        y.xattrs.keys().collect::<Vec<_>>()
                    ));
                }
                out.push(format!("{name:?}: {}", what.join(", ")));
            }
            _ => {}
        }
    }
    for p in nb.keys().filter(|p| !na.contains_key(*p)) {
        if !out
            .iter()
            .any(|o| o.contains("device node made") && o.contains(&*String::from_utf8_lossy(p)))
        {
            out.push(format!("extra in target: {:?}", String::from_utf8_lossy(p)));
        }
    }
    if ga != gb {
        out.push(format!("hard-link groups differ: {ga:?} vs {gb:?}"));
    }
    out
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let d = tree_diff(a, b);
    assert!(d.is_empty(), "trees differ:\n{}", d.join("\n"));
}

pub fn set_mtime(p: &Path, sec: i64, nsec: u32) {
    let t = std::time::UNIX_EPOCH + Duration::new(sec as u64, nsec);
    let ft = fs::symlink_metadata(p).unwrap().file_type();
    if !ft.is_file() && !ft.is_dir() {
        // std sets times through an open file: symlinks, fifos and devices go through touch -h.
        let ts = format!("@{sec}.{nsec:09}");
        let st = Command::new("touch")
            .arg("-h")
            .arg("-d")
            .arg(ts)
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
        return;
    }
    let f = fs::File::options()
        .read(true)
        .open(p)
        .or_else(|_| fs::File::open(p))
        .unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

/// A tree with every kind of entry and attribute the mirror must keep.
/// Every path beneath `root` (not `root` itself), without following symlinks, in no set order.
pub fn all_paths(root: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths
}

pub fn rich_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("plain.txt"), b"hello world\n").unwrap();
    fs::write(root.join("dir/sub/file"), vec![7u8; 100_000]).unwrap();
    fs::write(root.join("with space"), b"s").unwrap();
    fs::write(root.join("new\nline"), b"n").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"bad\xff\xfeutf8")), b"b").unwrap();
    fs::write(root.join("-leading-dash"), b"d").unwrap();
    fs::write(root.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(root.join("setgid"), b"g").unwrap();
    fs::set_permissions(root.join("setgid"), fs::Permissions::from_mode(0o2750)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(root.join("private"), b"p").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(root.join("owned"), b"o").unwrap();
    std::os::unix::fs::lchown(root.join("owned"), Some(1234), Some(5678)).unwrap();
    symlink("plain.txt", root.join("link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    std::os::unix::fs::lchown(root.join("dangling"), Some(42), Some(43)).unwrap();
    fs::hard_link(root.join("plain.txt"), root.join("dir/hardlink")).unwrap();
    fs::hard_link(root.join("plain.txt"), root.join("dir/sub/hardlink2")).unwrap();
    sh(&format!("mkfifo '{}'", root.join("fifo").display()));
    sh(&format!("mknod '{}' c 1 3", root.join("chardev").display()));
    sh(&format!("mknod '{}' b 7 200", root.join("blockdev").display()));
    xattr::set(root.join("plain.txt"), "user.color", b"blue").unwrap();
    xattr::set(root.join("dir"), "user.dir", b"yes").unwrap();
    xattr::set(root.join("with space"), "user.bin", &[0u8, 1, 2, 255]).unwrap();
    // Sparse: 32 MiB with data only at 1 MiB and at the end.
    let f = fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"middle", 1 << 20).unwrap();
    f.write_all_at(b"end", (32 << 20) - 3).unwrap();
    drop(f);
    let mut t = 1_600_000_000i64;
    let mut paths = all_paths(root);
    // Deepest first, so setting a child's time cannot move its parent's afterwards.
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    paths.push(root.to_path_buf());
    for p in paths {
        t += 1;
        set_mtime(&p, t, 123_456_789);
    }
}

/// Allocated bytes of a file.
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Kills and reaps a child process when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mirrorfs serve DIR --listen ADDR [extra]` and waits until it accepts.
pub fn serve(dir: &Path, listen: &str, extra: &[&str]) -> ChildGuard {
    let child = Command::new(bin())
        .arg("serve")
        .arg(dir)
        .arg("--listen")
        .arg(listen)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start serve");
    let g = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = if let Some(p) = listen.strip_prefix("unix:") {
            std::os::unix::net::UnixStream::connect(p).is_ok()
        } else {
            std::net::TcpStream::connect(listen.trim_start_matches("tcp:")).is_ok()
        };
        if up {
            return g;
        }
        assert!(Instant::now() < deadline, "server on {listen} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
