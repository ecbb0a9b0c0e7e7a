//! The kernel's caches of names and attributes: how long the kernel may keep them, and which to
//! drop when the watcher beneath the mount sees a change that did not come through it.
//!
//! Every change reaches the daemon, through the mount or through the watcher, so while the
//! watcher covers the whole tree the kernel may keep entries, attributes and negative entries
//! (names that do not exist) for a day, as libfuse's passthrough_hp does with `cache=always`.
//! Without a watcher, or while part of the tree is not watched (the inotify limit), they are
//! kept one second, which bounds how long a change behind the mount stays unseen. Listings
//! are always kept (the mount opens no directory, see `Ops::opendir`): the kernel drops a
//! listing itself when a change through the mount touches its directory, and checks it against
//! the directory's mtime whenever it reads it from the start, so without a watcher a listing,
//! like an entry, is at most a second behind.
//!
//! For each path the watcher reports, the kernel's view (the inode table: which inode the
//! kernel was told sits at that name, and the change time in the attributes it was last given)
//! is held against the source's: where the name went, came, or names another inode now, the
//! entry is invalidated; where the change time moved, the attributes of the entry. A directory
//! with such a name, or whose own change time moved, loses its attributes and its listing, once
//! per batch (no page of a file is touched). The mount's own changes were told to the kernel in
//! their replies, so most of them cost nothing. After the watcher lost events (a queue
//! overflow), every known directory is checked this way, which also finds any negative entry
//! gone stale: such a name is in the listing now.
//!
//! Invalidating an entry takes the directory's lock in the kernel, which a request in flight
//! in that directory holds until it is answered: callers hold no lock a request waits for.

use super::inodes::{stamp, Inode, Inodes, KnownDir, ROOT};
use crate::path::RelPath;
use crate::sys;
use fuser::{INodeNo, Notifier};
use std::collections::{HashMap, HashSet};
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

    /// Drops the kernel's attributes and kept listing of the directory `id`. A listing's pages
    /// are locked only while the kernel copies into or out of them, never across a request.
    fn inval_listing(&self, id: u64) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(INodeNo(id), 0, 0);
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

    /// Drops the kernel's attributes of `id`; safe from a request handler (no lock is taken
    /// that a request holds).
    pub fn inval_attrs(&self, id: u64) {
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
        let stat = |p: &[u8]| sys::cstr(p).and_then(|c| sys::fstatat(rootfd.as_fd(), &c, false)).ok();
        // Each directory once: its path, and whether a name in it changed.
        let mut dirs: HashMap<u64, (RelPath, bool)> = HashMap::new();
        for p in paths {
            let Some(parent) = p.parent() else {
                self.attrs(&root, stat(b"").as_ref());
                continue;
            };
            let Some(dir) = inodes.resolve(&parent) else {
                // The kernel knows nothing below a directory it has not looked up.
                continue;
            };
            let moved = self.check(inodes, dir, p.file_name(), stat(p.as_bytes()).as_ref());
            dirs.entry(dir).or_insert((parent, false)).1 |= moved;
        }
        for (dir, (path, moved)) in dirs {
            let Some(d) = inodes.get(dir) else { continue };
            // The root's path is empty: fstatat then stats the root fd itself.
            if moved || stat(path.as_bytes()).is_none_or(|st| stamp(&st) != d.told_stamp()) {
                self.inval_listing(dir);
            }
        }
    }

    /// Drops the kernel's attributes of `inode` unless they are what the source has now (`st`):
    /// the mount's own changes were told to the kernel in their replies.
    fn attrs(&self, inode: &Inode, st: Option<&libc::stat>) {
        if st.is_none_or(|st| stamp(st) != inode.told_stamp()) {
            self.inval_attrs(inode.id);
        }
    }

    /// Holds the kernel's view of `name` in `dir` against the source's (`now`, or `None` when
    /// absent); true when the name was dropped, which may change the directory's listing.
    fn check(&self, inodes: &Inodes, dir: u64, name: &[u8], now: Option<&libc::stat>) -> bool {
        let key = now.map(|st| (st.st_dev, st.st_ino));
        match (inodes.at(dir, name), key) {
            (Some((inode, told)), Some(k)) if told == k => {
                self.attrs(&inode, now);
                false
            }
            (None, None) => false,
            (Some((inode, _)), _) => {
                self.inval_entry(dir, name);
                self.inval_attrs(inode.id);
                true
            }
            // A name the kernel may hold as negative, or knows only from a listing.
            (None, Some(_)) => {
                self.inval_entry(dir, name);
                true
            }
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
                let now = sys::cstr(&name).and_then(|c| sys::fstatat(fd.as_fd(), &c, false)).ok();
                self.check(inodes, dir, &name, now.as_ref());
            }
            self.inval_listing(dir);
        }
        for id in ids {
            self.inval_attrs(id);
        }
    }
}
