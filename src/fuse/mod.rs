//! The FUSE mount: a passthrough filesystem over the source whose every mutation is replicated
//! to the target before the syscall returns. `inodes` holds the kernel's inodes as `O_PATH` fds,
//! `handles` the open files, `mirror` the operations and what they forward, `ops` the adapter to
//! `fuser`, `cache` what the kernel may keep and what it must drop. This module runs a mount from start to end: it checks the mountpoint (a stale mount
//! of a crashed daemon is detached), opens the source before mounting over it, mounts, serves
//! until unmounted or signalled, and drains the replicator.

pub mod cache;
pub mod handles;
pub mod inodes;
pub mod mirror;
pub mod ops;

use crate::source::Replicator;
use crate::sys;
use mirror::Mirror;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0} is already a mirrorfs mount; unmount it first (mirrorfs umount {0})")]
    AlreadyMounted(String),
    #[error("mountpoint {0}: {1}")]
    Mountpoint(String, io::Error),
    #[error("cannot mount at {0}: {1}")]
    Mount(String, io::Error),
    #[error("source root: {0}")]
    Root(io::Error),
    #[error("/dev/fuse: {0} (is the fuse module loaded, and are we root?)")]
    NoFuse(io::Error),
}

/// When the mount answers a write (`--ack`). Namespace and metadata operations (create, rename,
/// unlink, chmod, xattrs, …) return once the target has them in either mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// Every syscall returns once the target has its change: a `write` once the target holds
    /// its bytes (DRBD's protocol C).
    #[default]
    Syscall,
    /// The kernel's writeback cache is on: a `write` returns once it is in the page cache, and
    /// the kernel hands the pages to the daemon at writeback, which forwards them like any
    /// write. `fsync` and every `close` of a file return only once the target has that file's
    /// data and mtime (the kernel writes a file's pages and its times back before both).
    Fsync,
}

impl Ack {
    pub fn name(self) -> &'static str {
        match self {
            Ack::Syscall => "syscall",
            Ack::Fsync => "fsync",
        }
    }
}

impl std::str::FromStr for Ack {
    type Err = String;
    fn from_str(s: &str) -> Result<Ack, String> {
        match s {
            "syscall" => Ok(Ack::Syscall),
            "fsync" => Ok(Ack::Fsync),
            _ => Err(format!("{s:?} is not one of syscall, fsync")),
        }
    }
}

/// What a mounted session needs.
pub struct MountConfig {
    pub mountpoint: PathBuf,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
    pub threads: usize,
    pub passthrough: bool,
    /// A watcher beneath the mount reports changes made behind it (see `cache`).
    pub watched: bool,
    pub ack: Ack,
}

/// One line of /proc/self/mountinfo: where, and which filesystem type.
fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some((PathBuf::from(unescape(f.get(4)?)), f.get(dash + 1)?.to_string()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(out).to_string_lossy().into_owned()
}

/// True when a mirrorfs FUSE mount sits at `path`.
pub fn is_mirrorfs_mount(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mounts().iter().any(|(p, t)| p == &path && t == "fuse.mirrorfs")
}

/// The error a mount of a dead daemon answers with: ENOTCONN once the kernel has aborted its
/// connection, ECONNABORTED just after, while it is torn down.
fn dead(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED))
}

fn detach_stale(path: &Path) -> Result<(), MountError> {
    log::warn!("{}: stale mount of a dead daemon; detaching it", path.display());
    eprintln!(
        "mirrorfs: {} held a stale mount of a dead daemon; detached it",
        path.display()
    );
    sys::umount(path, true).map_err(|e| MountError::Mountpoint(path.display().to_string(), e))
}

/// Makes sure `path` can be mounted on: a stale mount of a dead daemon ("Transport endpoint is
/// not connected") is detached with a log line; a live mirrorfs mount is an error.
pub fn prepare_mountpoint(path: &Path) -> Result<(), MountError> {
    match std::fs::metadata(path) {
        Err(e) if dead(&e) => detach_stale(path),
        Err(e) => Err(MountError::Mountpoint(path.display().to_string(), e)),
        Ok(m) if !m.is_dir() => Err(MountError::Mountpoint(
            path.display().to_string(),
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        )),
        Ok(_) if is_mirrorfs_mount(path) => {
            // The stat may have come from the kernel's attribute cache; statfs always asks the
            // daemon, so a dead one answers ENOTCONN here.
            match sys::statvfs(path) {
                Err(e) if dead(&e) => detach_stale(path),
                _ => Err(MountError::AlreadyMounted(path.display().to_string())),
            }
        }
        Ok(_) => Ok(()),
    }
}

/// Opens the directory the mount will serve, before anything is mounted over it.
pub fn open_root(src: &Path) -> io::Result<(OwnedFd, libc::stat)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(src)?;
    let fd = OwnedFd::from(f);
    let st = sys::fstat(std::os::fd::AsFd::as_fd(&fd))?;
    Ok((fd, st))
}

/// A live mount. `run` serves until the filesystem is unmounted.
pub struct Mounted {
    session: fuser::Session<ops::Ops>,
    mirror: Arc<Mirror>,
}

/// What the watcher beneath a mount tells it: the kernel's caches follow (`cache`).
pub struct KernelCaches(Arc<Mirror>);

impl crate::watch::Observer for KernelCaches {
    fn changed(&self, paths: &[crate::path::RelPath]) {
        self.0.cache.changed(&self.0.inodes, paths)
    }

    fn lost_track(&self) {
        self.0.cache.lost_track(&self.0.inodes)
    }

    fn covered(&self, all: bool) {
        self.0.cache.set_watched(&self.0.inodes, all)
    }
}

/// Mounts `root` (opened with `open_root` before) at the mountpoint, replicating through `rep`.
/// The mount is live when this returns.
pub fn mount(
    root: OwnedFd,
    root_st: &libc::stat,
    rep: Arc<Replicator>,
    cfg: &MountConfig,
) -> Result<Mounted, MountError> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        return Err(MountError::NoFuse(e));
    }
    sys::set_umask(0);
    let files = sys::raise_nofile_limit() as usize;
    // Three quarters of the open-file limit may anchor inodes; open files and sockets get the rest.
    let mut budget = (files / 4 * 3).saturating_sub(64).max(64);
    // Tests shrink the budget to run the file-handle path on small trees.
    if let Some(b) = std::env::var("MIRRORFS_INODE_FDS").ok().and_then(|v| v.parse().ok()) {
        budget = b;
    }
    log::debug!("open-file limit {files}; up to {budget} inodes hold an fd, the rest a file handle");
    let inodes = inodes::Inodes::new(root, root_st, budget).map_err(MountError::Root)?;
    let mirror = Arc::new(Mirror::new(inodes, rep, cache::Cache::new(cfg.watched)));
    let ops = ops::Ops {
        m: mirror.clone(),
        want_passthrough: cfg.passthrough,
        want_writeback: cfg.ack == Ack::Fsync,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(cfg.fsname.clone()),
        // The kernel takes the subtype from the mount data: /proc/mounts then says fuse.mirrorfs.
        fuser::MountOption::CUSTOM("subtype=mirrorfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Dev,
        fuser::MountOption::Suid,
        fuser::MountOption::RW,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(ops, &cfg.mountpoint, &config)
        .map_err(|e| MountError::Mount(cfg.mountpoint.display().to_string(), e))?;
    mirror.cache.set_notifier(session.notifier());
    Ok(Mounted { session, mirror })
}

impl Mounted {
    /// When writes return, as the kernel agreed at init (until then, `Ack::Syscall`).
    pub fn ack(&self) -> impl Fn() -> Ack + Send + Sync + 'static {
        let m = self.mirror.clone();
        move || {
            if m.writeback.load(std::sync::atomic::Ordering::Relaxed) {
                Ack::Fsync
            } else {
                Ack::Syscall
            }
        }
    }

    /// For the watcher beneath the mount.
    pub fn caches(&self) -> KernelCaches {
        KernelCaches(self.mirror.clone())
    }

    /// Serves requests until the filesystem is unmounted; then every acknowledged operation is
    /// on the target.
    pub fn run(self) -> io::Result<()> {
        let r = self.session.run();
        self.mirror.cache.end();
        r
    }
}

/// Unmounts `path`; with `lazy`, detaches it even while it is busy.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    sys::umount(path, lazy)
}
