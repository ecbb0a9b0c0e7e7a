//! The kernel's caches of names and attributes: how long the kernel may keep them, and which to
//! drop when the watcher beneath the mount sees a change that did not come through it.
//!
//! Every change reaches the daemon, through the mount or through the watcher, so while the
//! watcher covers the whole tree the kernel may keep entries, attributes and negative entries
//! (names that do not exist) for a day, as libfuse's passthrough_hp does with `cache=always`.
//! Without a watcher, or while part of the tree is not watched (the inotify limit), they are
//! kept one second, which bounds how long a change behind the mount stays unseen.
//!
//! For each path the watcher reports, the kernel's view (the inode table: which inode the
//! kernel was told sits at that name) is held against the source's: where they differ (the
//! name went, came, or names another inode now) the entry is invalidated, and the attributes
//! of the entry and its directory are invalidated either way (cheap: no page is touched). The
//! mount's own changes agree with the table already, so they cost the kernel no lookup. After
//! the watcher lost events (a queue overflow), every known directory is checked this way,
//! which also finds any negative entry gone stale: such a name is in the listing now.
//!
//! Invalidating an entry takes the directory's lock in the kernel, which a request in flight
//! in that directory holds until it is answered: callers hold no lock a request waits for.

use super::inodes::{Inodes, KnownDir, ROOT};
use crate::path::RelPath;
use crate::sys;
use fuser::{INodeNo, Notifier};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// How long the kernel keeps what it was told while the watcher covers the tree.
const WATCHED: Duration = Duration::from_secs(24 * 3600);
/// ... and otherwise.
const UNWATCHED: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Cache {
    /// The watcher covers the whole tree.
    watched: AtomicBool,
    notifier: OnceLock<Notifier>,
    /// The session ended: there is nothing left to invalidate.
    ended: AtomicBool,
}

impl Cache {
    pub fn new(watched: bool) -> Cache {
        Cache {
            watched: AtomicBool::new(watched),
            notifier: OnceLock::new(),
            ended: AtomicBool::new(false),
        }
    }

    pub fn end(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    fn live(&self) -> bool {
        self.notifier.get().is_some() && !self.ended.load(Ordering::Relaxed)
    }

    /// How long a reply's entry and attributes may be kept.
    pub fn ttl(&self) -> Duration {
        if self.watched.load(Ordering::Relaxed) {
            WATCHED
        } else {
            UNWATCHED
        }
    }

    /// Set once the session exists.
    pub fn set_notifier(&self, n: Notifier) {
        let _ = self.notifier.set(n);
    }

    /// The watcher's coverage changed. Losing it drops everything the kernel holds for long
    /// (replies from now on are kept one second).
    pub fn set_watched(&self, inodes: &Inodes, on: bool) {
        let was = self.watched.swap(on, Ordering::Relaxed);
        if was && !on {
            self.lost_track(inodes);
        }
    }

    fn inval_entry(&self, parent: u64, name: &[u8]) {
        if let Some(n) = self.notifier.get() {
            // ENOENT (the kernel forgot the directory) needs nothing; other errors mean the
            // session is ending.
            let _ = n.inval_entry(INodeNo(parent), OsStr::from_bytes(name));
        }
    }

    fn inval_attrs(&self, id: u64) {
        if let Some(n) = self.notifier.get() {
            // A negative offset drops the attributes only: no page is locked.
            let _ = n.inval_inode(INodeNo(id), -1, 0);
        }
    }

    /// The watcher saw `paths` change beneath the mount.
    pub fn changed(&self, inodes: &Inodes, paths: &[RelPath]) {
        if !self.live() {
            return;
        }
        let Some(root) = inodes.get(ROOT) else { return };
        let Ok(rootfd) = root.fd() else { return };
        let mut dirs = HashSet::new();
        for p in paths {
            let Some(parent) = p.parent() else {
                self.inval_attrs(ROOT);
                continue;
            };
            let Some(dir) = inodes.resolve(&parent) else {
                // The kernel knows nothing below a directory it has not looked up.
                continue;
            };
            let now = sys::cstr(p.as_bytes())
                .and_then(|c| sys::fstatat(rootfd.as_fd(), &c, false))
                .ok()
                .map(|st| (st.st_dev, st.st_ino));
            self.check(inodes, dir, p.file_name(), now);
            dirs.insert(dir);
        }
        for d in dirs {
            self.inval_attrs(d);
        }
    }

    /// Holds the kernel's view of `name` in `dir` against the source's (`now`: its (dev, ino),
    /// or `None` when absent).
    fn check(&self, inodes: &Inodes, dir: u64, name: &[u8], now: Option<(u64, u64)>) {
        match (inodes.at(dir, name), now) {
            (Some((id, key)), Some(k)) if key == k => self.inval_attrs(id),
            (None, None) => {}
            (Some((id, _)), _) => {
                self.inval_entry(dir, name);
                self.inval_attrs(id);
            }
            // A name the kernel may hold as negative.
            (None, Some(_)) => self.inval_entry(dir, name),
        }
    }

    /// The watcher lost events: every directory the kernel knows is checked, names it was
    /// told and names the source lists now, and every inode's attributes are dropped.
    pub fn lost_track(&self, inodes: &Inodes) {
        if !self.live() {
            return;
        }
        let (ids, dirs) = inodes.known();
        for KnownDir {
            id: dir,
            inode,
            names: told,
        } in dirs
        {
            let Ok(fd) = inode.fd() else { continue };
            let listed = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .and_then(sys::read_dir_names)
                .unwrap_or_default();
            let names: HashSet<Vec<u8>> = told.into_iter().chain(listed).collect();
            for name in names {
                let now = sys::cstr(&name)
                    .and_then(|c| sys::fstatat(fd.as_fd(), &c, false))
                    .ok()
                    .map(|st| (st.st_dev, st.st_ino));
                self.check(inodes, dir, &name, now);
            }
        }
        for id in ids {
            self.inval_attrs(id);
        }
    }
}
