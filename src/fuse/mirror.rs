//! `Mirror`: what each mount operation does. It applies the operation to the source through the
//! inode table's `O_PATH` fds (never by path), and, for a mutation, returns the requests that
//! repeat it on the target, each carrying the metadata it produced on the source: mode, owner
//! and mtime of the entry, and the mtime of the directories whose entries changed. The
//! `Replicator` runs every mutation under its order lock, so the target sees the source's order.
//!
//! The daemon runs as root with `default_permissions`: the kernel checks every permission
//! against the caller's credentials (supplementary groups included) before a request gets
//! here, and new entries are created as root and then given to the caller, as the kernel would
//! have (the group of a set-group-ID directory is inherited).

use super::cache::Cache;
use super::handles::{FileHandle, Handles, Served};
use super::inodes::{Inode, Inodes, ROOT};
use crate::change::Change;
use crate::fs::{Kind, SetTime, Time};
use crate::path::RelPath;
use crate::source::{Forward, Replicator};
use crate::sys::{self, RawDirEntry, TimeSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub type Rep = Replicator;

/// Who asked, as the kernel tells it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set, as `setattr` gives it.
#[derive(Debug, Clone, Copy)]
pub enum NewTime {
    At(Time),
    Now,
}

/// Which attributes `setattr` changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<NewTime>,
    pub mtime: Option<NewTime>,
    pub fh: Option<u64>,
    /// A truncation by a caller who may not keep set-ID bits (see `kill_set_id`).
    pub kill_set_id: bool,
}

/// What `Mirror::open` made: the handle, the backing file when the kernel serves it by
/// passthrough, and whether a close of it must reach the daemon before it returns. Only a
/// passthrough writer's does (`push`): every other write was forwarded when it was made, so
/// the kernel is told to skip the flush (`FOPEN_NOFLUSH`), one round trip less per close. With
/// the writeback cache (`--ack=fsync`) the kernel ignores that flag and writes the file back at
/// every close; `flush` then says what the daemon answers.
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<fuser::BackingId>>,
    pub flush: bool,
}

pub struct Mirror {
    pub inodes: Inodes,
    pub files: Handles<FileHandle>,
    rep: Arc<Rep>,
    /// Forward owners (only a root target can set them).
    owners: bool,
    /// Serve read-only opens with kernel passthrough (set when the kernel agreed at init).
    pub passthrough: AtomicBool,
    pub cache: Cache,
    /// The kernel left clearing set-ID bits to us (FUSE_HANDLE_KILLPRIV_V2 agreed at init).
    pub killpriv: AtomicBool,
    /// The kernel's writeback cache is on (`--ack=fsync` agreed at init): it may read a page
    /// through any open before it writes part of it, write-only ones included.
    pub writeback: AtomicBool,
}

/// Clears the set-user-ID bit of a regular file, and its set-group-ID bit where group execute
/// is set, as the kernel does on a write or truncation by someone who may not keep them;
/// returns the new permission bits if any changed. The kernel leaves this to the daemon once
/// `FUSE_HANDLE_KILLPRIV_V2` is agreed (and the daemon, being root, is never subject to it on
/// the source). Capabilities need nothing: the kernel drops `security.capability` on every
/// write and truncation, the daemon's too, on both sides.
fn kill_set_id(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let st = sys::fstat(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(None);
    }
    let mut perm = st.st_mode & 0o7777;
    perm &= !libc::S_ISUID;
    if perm & libc::S_IXGRP != 0 {
        perm &= !libc::S_ISGID;
    }
    if perm == st.st_mode & 0o7777 {
        return Ok(None);
    }
    sys::chmod_opath(fd, perm)?;
    Ok(Some(perm))
}

/// Gives the target the permission bits a cleared set-ID bit left.
fn perm_change(path: &RelPath, perm: u32) -> Change {
    Change::SetAttr {
        path: path.clone(),
        perm: Some(perm),
        uid: None,
        gid: None,
        atime: SetTime::Omit,
        mtime: SetTime::Omit,
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

fn name_c(name: &[u8]) -> io::Result<CString> {
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(einval());
    }
    sys::cstr(name)
}

fn mtime_of(st: &libc::stat) -> Time {
    Time::new(st.st_mtime, st.st_mtime_nsec as u32)
}

fn atime_of(st: &libc::stat) -> Time {
    Time::new(st.st_atime, st.st_atime_nsec as u32)
}

/// A request that stamps `path` with the mtime it has on the source.
fn stamp(path: RelPath, st: &libc::stat) -> Change {
    Change::SetAttr {
        path,
        perm: None,
        uid: None,
        gid: None,
        atime: SetTime::Omit,
        mtime: SetTime::At(mtime_of(st)),
    }
}

impl Mirror {
    pub fn new(inodes: Inodes, rep: Arc<Rep>, cache: Cache) -> Mirror {
        let owners = rep.link().info().keeps_owners();
        Mirror {
            inodes,
            files: Handles::default(),
            rep,
            owners,
            passthrough: AtomicBool::new(false),
            cache,
            killpriv: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
        }
    }

    /// `kill_set_id` on an open file when `kill` says so; the kernel's attributes of it are
    /// dropped at once if bits were cleared (no reply of a write carries attributes).
    fn kill(&self, h: &FileHandle, kill: bool) -> io::Result<Option<u32>> {
        if !kill {
            return Ok(None);
        }
        let killed = kill_set_id(h.fd.as_fd())?;
        if killed.is_some() {
            self.cache.inval_attrs(h.inode.id);
        }
        Ok(killed)
    }

    /// The flags a source fd is opened with: the caller's, less those the mount handles itself.
    /// `O_APPEND` goes because the kernel already gives appends their offset (and writeback of
    /// cached pages must land where the page is); `O_TRUNC` arrives as its own setattr;
    /// `O_DIRECT` would need aligned buffers. With the writeback cache a write-only open is
    /// opened for reading too, as libfuse's passthrough_hp does, since the kernel reads the rest
    /// of a page it writes in part.
    fn open_flags(&self, flags: i32) -> i32 {
        let mut f = (flags
            & !(libc::O_APPEND | libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL | libc::O_DIRECT | libc::O_NOCTTY))
            | libc::O_NOFOLLOW;
        if self.writeback.load(Ordering::Relaxed) && f & libc::O_ACCMODE == libc::O_WRONLY {
            f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
        }
        f
    }

    pub fn replicator(&self) -> &Rep {
        &self.rep
    }

    fn inode(&self, id: u64) -> io::Result<Arc<Inode>> {
        self.inodes
            .get(id)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    fn file(&self, fh: u64) -> io::Result<Arc<FileHandle>> {
        self.files.get(fh).ok_or_else(ebadf)
    }

    /// Looks `name` up in `parent` and records it; returns its id and stat.
    fn enter(&self, parent: u64, dir: BorrowedFd<'_>, name: &CString) -> io::Result<(u64, libc::stat)> {
        let fd = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let id = self.inodes.found(parent, name.as_bytes(), fd, &st);
        Ok((id, st))
    }

    // ---- Queries ----

    /// Lookups run outside the order lock; one that raced with a rename or unlink retries, so
    /// no inode is recorded under a name it no longer has.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> io::Result<(u64, libc::stat)> {
        let p = self.inode(parent)?;
        let cname = name_c(name)?;
        let pfd = p.fd()?;
        loop {
            let epoch = self.inodes.epoch();
            let fd = sys::openat(pfd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
            let st = sys::fstat(fd.as_fd())?;
            if let Some(id) = self.inodes.found_at(epoch, parent, name, fd, &st) {
                return Ok((id, st));
            }
        }
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.inodes.forget(id, n);
    }

    pub fn getattr(&self, id: u64) -> io::Result<libc::stat> {
        let inode = self.inode(id)?;
        let st = sys::fstat(inode.fd()?.as_fd())?;
        inode.told(&st);
        Ok(st)
    }

    pub fn readlink(&self, id: u64) -> io::Result<Vec<u8>> {
        sys::readlinkat(self.inode(id)?.fd()?.as_fd(), c"")
    }

    pub fn statfs(&self) -> io::Result<libc::statvfs> {
        sys::fstatvfs(self.inode(ROOT)?.fd()?.as_fd())
    }

    pub fn getxattr(&self, id: u64, name: &[u8], buf: &mut [u8]) -> io::Result<usize> {
        sys::fd_getxattr(self.inode(id)?.fd()?.as_fd(), name, buf)
    }

    pub fn listxattr(&self, id: u64, buf: &mut [u8]) -> io::Result<usize> {
        sys::fd_listxattr(self.inode(id)?.fd()?.as_fd(), buf)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let h = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            let n = sys::pread(h.fd.as_fd(), &mut buf[got..], offset + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        sys::lseek(self.file(fh)?.fd.as_fd(), offset, whence)
    }

    // ---- Directories ----

    /// Up to `max` entries of the directory `id` from position `offset`, each with the
    /// position after it (`sys::read_dir_at`). The kernel opens no directory (see
    /// `Ops::opendir`), so each read opens it afresh; the kernel keeps what it read.
    pub fn read_dir(&self, id: u64, offset: u64, max: usize) -> io::Result<Vec<(RawDirEntry, u64)>> {
        let fd = sys::reopen(self.inode(id)?.fd()?.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::read_dir_at(fd, offset, max)
    }

    // ---- Opening files ----

    /// Opens inode `id` with the caller's `flags`. `backing` registers an fd for kernel
    /// passthrough; it is asked only for read-only opens of inodes with no cached open. The
    /// backing id comes back when the kernel is to serve the open by passthrough, and
    /// `Opened::flush` says whether its close has anything to do (`push`).
    pub fn open(
        &self,
        id: u64,
        flags: i32,
        backing: impl FnOnce(&OwnedFd) -> io::Result<fuser::BackingId>,
    ) -> io::Result<Opened> {
        let inode = self.inode(id)?;
        let fd = sys::reopen(inode.fd()?.as_fd(), self.open_flags(flags))?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mut io = inode.io.lock();
        // The kernel refuses any open but a passthrough one while the inode has passthrough
        // opens; a writer then shares their backing file and is caught up at close.
        let push_at_close = writable && io.passthrough > 0 && io.backing.strong_count() > 0;
        let mut served = if push_at_close || (!writable && io.cached == 0 && self.passthrough.load(Ordering::Relaxed)) {
            Served::Passthrough
        } else {
            Served::Cached
        };
        let mut held = None;
        if served == Served::Passthrough {
            held = match io.backing.upgrade() {
                Some(b) => Some(b),
                None => match backing(&fd) {
                    Ok(b) => {
                        let b = Arc::new(b);
                        io.backing = Arc::downgrade(&b);
                        Some(b)
                    }
                    Err(e) => {
                        if self.passthrough.swap(false, Ordering::Relaxed) {
                            log::warn!("kernel passthrough refused ({e}); reads go through the daemon from now on");
                        }
                        served = Served::Cached;
                        None
                    }
                },
            };
        }
        match served {
            Served::Passthrough => io.passthrough += 1,
            Served::Cached => io.cached += 1,
        }
        drop(io);
        if push_at_close {
            log::info!(
                "inode {id} is open for passthrough reads: a writable open of it replicates at fsync and close, not at each write"
            );
            // The watcher leaves the file to the push at close.
            let st = sys::fstat(fd.as_fd())?;
            self.rep.defer(st.st_dev, st.st_ino);
        }
        let fh = self.files.insert(FileHandle {
            inode,
            fd,
            writable,
            served,
            push_at_close,
            backing: held.clone(),
            pushed: parking_lot::Mutex::new(None),
        });
        Ok(Opened {
            fh,
            backing: held,
            flush: push_at_close,
        })
    }

    /// A close. With the writeback cache the kernel has written the file's pages and times back
    /// (and so to the target) before it asks, whatever `FOPEN_NOFLUSH` said, and no handle is
    /// a passthrough writer's: the answer is `ENOSYS`, after which the kernel still writes back
    /// at every close but sends no FLUSH, one round trip less per close.
    pub fn flush(&self, fh: u64) -> io::Result<()> {
        if self.writeback.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
        self.push(fh)
    }

    /// Sends the whole file behind a passthrough writer to the target (see `push_at_close`),
    /// unless this version of it was sent already (a close is a flush and then a release), in
    /// pieces of `PUSH_PIECE` each queued on its own, so memory stays bounded whatever the size.
    pub fn push(&self, fh: u64) -> io::Result<()> {
        const PUSH_PIECE: u64 = 8 << 20;
        let Some(h) = self.files.get(fh).filter(|h| h.push_at_close) else {
            return Ok(());
        };
        // The writer's own fd may be write-only: read through one of our own.
        let rfd = sys::reopen(h.inode.fd()?.as_fd(), libc::O_RDONLY)?;
        let mut pushed = h.pushed.lock();
        let first = sys::fstat(rfd.as_fd())?;
        if *pushed == Some(super::handles::version(&first)) {
            return Ok(());
        }
        let size = first.st_size as u64;
        let mut off = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let last = self.rep.apply_unrefused(|| {
                let Some(path) = self.inodes.path(h.inode.id) else {
                    return Ok((true, Forward::none()));
                };
                let mut reqs = Vec::new();
                if off == 0 {
                    reqs.push(Change::Truncate {
                        path: path.clone(),
                        size,
                    });
                }
                let end = (off + PUSH_PIECE).min(size);
                while off < end {
                    let want = ((end - off) as usize).min(buf.len());
                    let n = sys::pread(rfd.as_fd(), &mut buf[..want], off)?;
                    if n == 0 {
                        off = size;
                        break;
                    }
                    reqs.push(Change::Write {
                        path: path.clone(),
                        offset: off,
                        data: buf[..n].to_vec(),
                        mtime: None,
                    });
                    off += n as u64;
                }
                let last = off >= size;
                if last {
                    let st = sys::fstat(rfd.as_fd())?;
                    // Changed while it was read: not this version, so the next push sends again.
                    let v = super::handles::version(&st);
                    *pushed = (v == super::handles::version(&first)).then_some(v);
                    reqs.push(stamp(path, &st));
                }
                Ok::<_, io::Error>((last, Forward::of(reqs)))
            })?;
            if last {
                return Ok(());
            }
        }
    }

    pub fn release(&self, fh: u64) {
        if let Some(h) = self.files.remove(fh) {
            if h.push_at_close {
                if let Ok(st) = sys::fstat(h.fd.as_fd()) {
                    self.rep.undefer(st.st_dev, st.st_ino);
                }
            }
            let mut io = h.inode.io.lock();
            match h.served {
                Served::Passthrough => io.passthrough = io.passthrough.saturating_sub(1),
                Served::Cached => io.cached = io.cached.saturating_sub(1),
            }
        }
    }

    // ---- Creating entries ----

    /// Gives a new entry (`fd`, its `O_PATH` fd, and `st`, its stat) to the caller, as the
    /// kernel would have created it, in the directory whose stat is `dst`, and returns its final
    /// stat; set-ID bits that the chown cleared are put back.
    fn give(&self, fd: BorrowedFd<'_>, st: libc::stat, dst: &libc::stat, who: Caller) -> io::Result<libc::stat> {
        let gid = if dst.st_mode & libc::S_ISGID != 0 {
            dst.st_gid
        } else {
            who.gid
        };
        if st.st_uid == who.uid && st.st_gid == gid {
            return Ok(st);
        }
        sys::fchown_fd(fd, who.uid, gid)?;
        let after = sys::fstat(fd)?;
        if after.st_mode != st.st_mode && st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            sys::chmod_opath(fd, st.st_mode & 0o7777)?;
            return sys::fstat(fd);
        }
        Ok(after)
    }

    /// The requests that give a newly made entry its metadata and restamp its directory.
    fn created(&self, path: &RelPath, st: &libc::stat, dir: RelPath, dst: &libc::stat) -> Vec<Change> {
        let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        vec![
            Change::SetAttr {
                path: path.clone(),
                perm: (!symlink).then_some(st.st_mode & 0o7777),
                uid: self.owners.then_some(st.st_uid),
                gid: self.owners.then_some(st.st_gid),
                atime: SetTime::Omit,
                mtime: SetTime::At(mtime_of(st)),
            },
            stamp(dir, dst),
        ]
    }

    /// Shared by create, mknod, mkdir and symlink: `make` creates `name` in the parent's fd and
    /// returns what the caller keeps (an open fd for create); `first` is the change that creates
    /// it on the target, `Some(None)` when the target cannot hold it (a device node on a target
    /// without root: only the directory's stamp goes), or `None` when the entry must come over
    /// by a repair instead.
    fn make<T>(
        &self,
        parent: u64,
        name: &[u8],
        who: Caller,
        make: impl FnOnce(BorrowedFd<'_>, &CString) -> io::Result<T>,
        first: impl FnOnce(RelPath, &libc::stat) -> Option<Option<Change>>,
    ) -> io::Result<(u64, libc::stat, T)> {
        let p = self.inode(parent)?;
        let cname = name_c(name)?;
        let pfd = p.fd()?;
        let d = pfd.as_fd();
        self.rep
            .apply(|| {
                let made = make(d, &cname)?;
                // The entry exists now: a failure from here on leaves the target behind, so it
                // is resynced from the source, and the caller gets the error.
                let after = || -> io::Result<((u64, libc::stat), Forward)> {
                    // The directory's stat serves both the set-group-ID rule and the stamp: the
                    // chown of the new entry does not change it.
                    let dst = sys::fstat(d)?;
                    let fd = sys::openat(d, &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                    let st = self.give(fd.as_fd(), sys::fstat(fd.as_fd())?, &dst, who)?;
                    let id = self.inodes.found(parent, cname.as_bytes(), fd, &st);
                    let fwd = match (self.inodes.path(id), self.inodes.path(parent)) {
                        (Some(path), Some(dir)) => match first(path.clone(), &st) {
                            Some(Some(req)) => {
                                let mut reqs = vec![req];
                                reqs.extend(self.created(&path, &st, dir, &dst));
                                Forward::of(reqs)
                            }
                            Some(None) => Forward::of(vec![stamp(dir, &dst)]),
                            None => Forward::resync(),
                        },
                        _ => Forward::none(),
                    };
                    Ok(((id, st), fwd))
                };
                Ok::<_, io::Error>(match after() {
                    Ok(((id, st), fwd)) => (Ok((id, st, made)), fwd),
                    Err(e) => (Err(e), Forward::resync()),
                })
            })
            .and_then(|r| r)
    }

    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u64, who: Caller) -> io::Result<(u64, libc::stat)> {
        let kind = Kind::from_mode(mode);
        self.make(
            parent,
            name,
            who,
            |d, n| sys::mknodat(d, n, mode, rdev),
            |path, st| {
                Some(match kind {
                    Kind::File => Some(Change::Create {
                        path,
                        perm: st.st_mode & 0o7777,
                        exclusive: true,
                    }),
                    // Only a target with root can make one; the planner counts it instead.
                    k if k.is_device() && !self.owners => None,
                    _ => Some(Change::Mknod {
                        path,
                        kind,
                        perm: st.st_mode & 0o7777,
                        rdev: st.st_rdev,
                    }),
                })
            },
        )
        .map(|(id, st, ())| (id, st))
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, who: Caller) -> io::Result<(u64, libc::stat)> {
        self.make(
            parent,
            name,
            who,
            |d, n| sys::mkdirat(d, n, mode & 0o7777),
            |path, st| {
                Some(Some(Change::Mkdir {
                    path,
                    perm: st.st_mode & 0o7777,
                }))
            },
        )
        .map(|(id, st, ())| (id, st))
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], who: Caller) -> io::Result<(u64, libc::stat)> {
        let t = sys::cstr(target)?;
        self.make(
            parent,
            name,
            who,
            |d, n| sys::symlinkat(&t, d, n),
            |path, _| {
                Some(Some(Change::Symlink {
                    path,
                    target: target.to_vec(),
                }))
            },
        )
        .map(|(id, st, ())| (id, st))
    }

    /// Creates and opens a regular file (`open` with `O_CREAT`).
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        who: Caller,
    ) -> io::Result<(u64, libc::stat, u64)> {
        let open = self.open_flags(flags) | libc::O_CREAT | (flags & (libc::O_TRUNC | libc::O_EXCL));
        let (id, st, fd) = self.make(
            parent,
            name,
            who,
            |d, n| sys::openat(d, n, open, mode & 0o7777),
            // O_CREAT without O_EXCL opened a file made behind the mount's back: a repair brings
            // it over whole.
            |path, st| {
                (st.st_size == 0).then_some(Some(Change::Create {
                    path,
                    perm: st.st_mode & 0o7777,
                    exclusive: false,
                }))
            },
        )?;
        let inode = self.inode(id)?;
        inode.io.lock().cached += 1;
        let fh = self.files.insert(FileHandle {
            inode,
            fd,
            writable: flags & libc::O_ACCMODE != libc::O_RDONLY,
            served: Served::Cached,
            push_at_close: false,
            pushed: parking_lot::Mutex::new(None),
            backing: None,
        });
        Ok((id, st, fh))
    }

    pub fn link(&self, id: u64, newparent: u64, newname: &[u8]) -> io::Result<(u64, libc::stat)> {
        let inode = self.inode(id)?;
        let p = self.inode(newparent)?;
        let cname = name_c(newname)?;
        self.rep.apply(|| {
            sys::link_fd(inode.fd()?.as_fd(), p.fd()?.as_fd(), &cname)?;
            let dst = sys::fstat(p.fd()?.as_fd())?;
            let existing = self.inodes.path(id);
            let (nid, st) = self.enter(newparent, p.fd()?.as_fd(), &cname)?;
            let fwd = match (existing, self.inodes.path(newparent)) {
                (Some(existing), Some(dir)) => {
                    let path = dir.join(newname).map_err(|_| einval())?;
                    Forward::of(vec![Change::Link { existing, path }, stamp(dir, &dst)])
                }
                _ => Forward::resync(),
            };
            Ok::<_, io::Error>(((nid, st), fwd))
        })
    }

    // ---- Removing and moving ----

    /// Adds to `fwd` a stamp of `path` with the mtime of what `st` describes; when that
    /// cannot be read (the change itself already happened), `fwd` asks for a resync instead.
    fn stamp_or_resync(&self, fwd: &mut Forward, path: RelPath, st: io::Result<libc::stat>) {
        match st {
            Ok(st) => fwd.changes.push(stamp(path, &st)),
            Err(e) => {
                log::warn!("stat after a change of {path}: {e}; resyncing instead");
                fwd.resync = true;
            }
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8], dir: bool) -> io::Result<()> {
        let p = self.inode(parent)?;
        let cname = name_c(name)?;
        let pfd = p.fd()?;
        self.rep.apply(|| {
            let path = self.inodes.child_path(parent, name);
            self.inodes.bump_epoch();
            sys::unlinkat(pfd.as_fd(), &cname, dir)?;
            self.inodes.removed(parent, name);
            let fwd = match (path, self.inodes.path(parent)) {
                (Some(path), Some(d)) => {
                    let mut fwd = Forward::of(vec![if dir {
                        Change::Rmdir { path }
                    } else {
                        Change::Unlink { path }
                    }]);
                    self.stamp_or_resync(&mut fwd, d, sys::fstat(pfd.as_fd()));
                    fwd
                }
                _ => Forward::none(),
            };
            Ok::<_, io::Error>(((), fwd))
        })
    }

    pub fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], flags: u32) -> io::Result<()> {
        let p = self.inode(parent)?;
        let np = self.inode(newparent)?;
        let (cname, cnew) = (name_c(name)?, name_c(newname)?);
        let (pfd, npfd) = (p.fd()?, np.fd()?);
        let (d, nd) = (pfd.as_fd(), npfd.as_fd());
        self.rep.apply(|| {
            let from = self.inodes.child_path(parent, name);
            let to = self.inodes.child_path(newparent, newname);
            self.inodes.bump_epoch();
            sys::renameat2(d, &cname, nd, &cnew, flags)?;
            self.inodes
                .renamed(parent, name, newparent, newname, flags & libc::RENAME_EXCHANGE != 0);
            let (Some(from), Some(to)) = (from, to) else {
                return Ok(((), Forward::none()));
            };
            let mut fwd = Forward::of(vec![Change::Rename {
                from: from.clone(),
                to: to.clone(),
                flags,
            }]);
            // The moved entries' own mtimes (a directory's ".." changed), then their directories'.
            self.stamp_or_resync(&mut fwd, to.clone(), sys::fstatat(nd, &cnew, false));
            if flags & libc::RENAME_EXCHANGE != 0 {
                self.stamp_or_resync(&mut fwd, from.clone(), sys::fstatat(d, &cname, false));
            }
            if let Some(dir) = from.parent() {
                self.stamp_or_resync(&mut fwd, dir, sys::fstat(d));
            }
            if parent != newparent {
                if let Some(dir) = to.parent() {
                    self.stamp_or_resync(&mut fwd, dir, sys::fstat(nd));
                }
            }
            Ok::<_, io::Error>(((), fwd))
        })
    }

    // ---- Changing content ----

    /// A write; `from_cache` is the kernel's writeback of cached pages (a shared mmap), which
    /// already happened as far as the writer knows, so it is never refused. With `kill` (the
    /// kernel's word that the writer may not keep them) set-ID bits are cleared first, and the
    /// cleared mode goes to the target with the data.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], from_cache: bool, kill: bool) -> io::Result<usize> {
        let h = self.file(fh)?;
        let op = || {
            let killed = self.kill(&h, kill)?;
            let mut done = 0;
            while done < data.len() {
                match sys::pwrite(h.fd.as_fd(), &data[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    // What was written stays written, is forwarded and is reported (a short write).
                    Err(_) if done > 0 => break,
                    Err(e) => return Err(e),
                }
            }
            let st = sys::fstat(h.fd.as_fd())?;
            let fwd = match self.inodes.path(h.inode.id) {
                Some(path) => {
                    let mut reqs = Vec::with_capacity(2);
                    reqs.extend(killed.map(|perm| perm_change(&path, perm)));
                    reqs.push(Change::Write {
                        path,
                        offset,
                        data: data[..done].to_vec(),
                        mtime: Some(mtime_of(&st)),
                    });
                    Forward::of(reqs)
                }
                // Unlinked: nothing on the target may change. A hard link whose other name
                // the mount has not seen yet is found by a resync.
                None if st.st_nlink > 0 => Forward::resync(),
                None => Forward::none(),
            };
            Ok::<_, io::Error>((done, fwd))
        };
        if from_cache {
            self.rep.apply_unrefused(op)
        } else {
            self.rep.apply(op)
        }
    }

    /// With `kill`, as `write`.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32, kill: bool) -> io::Result<()> {
        let h = self.file(fh)?;
        self.rep.apply(|| {
            let killed = self.kill(&h, kill)?;
            sys::fallocate(h.fd.as_fd(), mode, offset, len)?;
            let st = sys::fstat(h.fd.as_fd())?;
            let fwd = match self.inodes.path(h.inode.id) {
                Some(path) => {
                    let mut reqs: Vec<Change> = killed.map(|perm| perm_change(&path, perm)).into_iter().collect();
                    reqs.push(Change::Fallocate {
                        path: path.clone(),
                        mode,
                        offset,
                        len,
                    });
                    reqs.push(stamp(path, &st));
                    Forward::of(reqs)
                }
                None => Forward::none(),
            };
            Ok::<_, io::Error>(((), fwd))
        })
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u32,
        kill: bool,
    ) -> io::Result<usize> {
        let (hi, ho) = (self.file(fh_in)?, self.file(fh_out)?);
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30);
        self.rep.apply(|| {
            let killed = self.kill(&ho, kill)?;
            let n = sys::copy_file_range_flags(hi.fd.as_fd(), off_in, ho.fd.as_fd(), off_out, len, flags)?;
            let st = sys::fstat(ho.fd.as_fd())?;
            let fwd = match (self.inodes.path(hi.inode.id), self.inodes.path(ho.inode.id)) {
                (_, None) => Forward::none(),
                (Some(src), Some(dst)) => Forward::of(
                    killed
                        .map(|perm| perm_change(&dst, perm))
                        .into_iter()
                        .chain([
                            Change::CopyRange {
                                src,
                                src_offset: off_in,
                                dst: dst.clone(),
                                dst_offset: off_out,
                                len: n as u64,
                            },
                            stamp(dst, &st),
                        ])
                        .collect(),
                ),
                (None, Some(dst)) => {
                    // The input has no name on the target: send the bytes themselves.
                    let mut data = vec![0u8; n];
                    let got = sys::pread(ho.fd.as_fd(), &mut data, off_out)?;
                    data.truncate(got);
                    Forward::of(
                        killed
                            .map(|perm| perm_change(&dst, perm))
                            .into_iter()
                            .chain([Change::Write {
                                path: dst,
                                offset: off_out,
                                data,
                                mtime: Some(mtime_of(&st)),
                            }])
                            .collect(),
                    )
                }
            };
            Ok::<_, io::Error>((n, fwd))
        })
    }

    // ---- Changing metadata ----

    pub fn setattr(&self, id: u64, a: SetAttrs) -> io::Result<libc::stat> {
        let inode = self.inode(id)?;
        let handle = match a.fh {
            Some(fh) => self.files.get(fh),
            None => None,
        };
        self.rep
            .apply(|| {
                // Steps after the first that succeeded leave the source changed if they fail:
                // the target is then resynced from it, and the caller gets the error.
                let mut changed = false;
                Ok::<_, io::Error>(
                    match self.setattr_steps(id, &inode, handle.as_deref(), &a, &mut changed) {
                        Ok((st, fwd)) => {
                            inode.told(&st);
                            (Ok(st), fwd)
                        }
                        Err(e) if changed => (Err(e), Forward::resync()),
                        Err(e) => return Err(e),
                    },
                )
            })
            .and_then(|r| r)
    }

    /// The steps of a setattr on the source, and what repeats them on the target; `changed`
    /// says whether any step took effect.
    fn setattr_steps(
        &self,
        id: u64,
        inode: &Inode,
        handle: Option<&FileHandle>,
        a: &SetAttrs,
        changed: &mut bool,
    ) -> io::Result<(libc::stat, Forward)> {
        {
            let ifd = inode.fd()?;
            let fd = ifd.as_fd();
            let mut step = |r: io::Result<()>| -> io::Result<()> { r.map(|()| *changed = true) };
            let mut killed = false;
            if let Some(size) = a.size {
                if a.kill_set_id && a.mode.is_none() {
                    killed = kill_set_id(fd)?.is_some();
                    if killed {
                        step(Ok(()))?;
                    }
                }
                step(match handle {
                    Some(h) if h.writable => sys::ftruncate(h.fd.as_fd(), size),
                    _ => sys::reopen(fd, libc::O_WRONLY).and_then(|w| sys::ftruncate(w.as_fd(), size)),
                })?;
            }
            if a.uid.is_some() || a.gid.is_some() {
                step(sys::fchown_fd(fd, a.uid.unwrap_or(u32::MAX), a.gid.unwrap_or(u32::MAX)))?;
            }
            if let Some(mode) = a.mode {
                step(sys::chmod_opath(fd, mode & 0o7777))?;
            }
            let ts = |t: Option<NewTime>| match t {
                None => TimeSet::Omit,
                Some(NewTime::Now) => TimeSet::Now,
                Some(NewTime::At(t)) => TimeSet::At(t.sec, t.nsec),
            };
            if a.atime.is_some() || a.mtime.is_some() {
                step(sys::utimens_fd(fd, ts(a.atime), ts(a.mtime)))?;
            }
            let st = sys::fstat(fd)?;
            let Some(path) = self.inodes.path(id) else {
                return Ok((st, Forward::none()));
            };
            let mut reqs = Vec::new();
            if let Some(size) = a.size {
                reqs.push(Change::Truncate {
                    path: path.clone(),
                    size,
                });
            }
            let symlink = inode.kind == Kind::Symlink;
            let owner = a.uid.is_some() || a.gid.is_some();
            reqs.push(Change::SetAttr {
                path,
                // A chown may have cleared set-ID bits: the resulting mode always goes along.
                perm: (!symlink && (a.mode.is_some() || owner || killed)).then_some(st.st_mode & 0o7777),
                uid: (self.owners && owner).then_some(st.st_uid),
                gid: (self.owners && owner).then_some(st.st_gid),
                atime: if a.atime.is_some() {
                    SetTime::At(atime_of(&st))
                } else {
                    SetTime::Omit
                },
                // A chmod or chown leaves the mtime alone, on both sides: only a change of times
                // or size (whose truncation on the target moved its mtime) sends it.
                mtime: if a.atime.is_some() || a.mtime.is_some() || a.size.is_some() {
                    SetTime::At(mtime_of(&st))
                } else {
                    SetTime::Omit
                },
            });
            Ok((st, Forward::of(reqs)))
        }
    }

    pub fn setxattr(&self, id: u64, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let inode = self.inode(id)?;
        self.rep.apply(|| {
            sys::fd_setxattr(inode.fd()?.as_fd(), name, value, flags)?;
            let fwd = match self.inodes.path(id) {
                // mirrorfs's own records (this tree may be another mirror's target) stay here.
                _ if crate::session::is_reserved_xattr(name) => Forward::none(),
                Some(path) => Forward::of(vec![Change::SetXattr {
                    path,
                    name: name.to_vec(),
                    value: value.to_vec(),
                }]),
                None => Forward::none(),
            };
            Ok::<_, io::Error>(((), fwd))
        })
    }

    pub fn removexattr(&self, id: u64, name: &[u8]) -> io::Result<()> {
        let inode = self.inode(id)?;
        self.rep.apply(|| {
            sys::fd_removexattr(inode.fd()?.as_fd(), name)?;
            let fwd = match self.inodes.path(id) {
                _ if crate::session::is_reserved_xattr(name) => Forward::none(),
                Some(path) => Forward::of(vec![Change::RemoveXattr {
                    path,
                    name: name.to_vec(),
                }]),
                None => Forward::none(),
            };
            Ok::<_, io::Error>(((), fwd))
        })
    }

    // ---- Durability ----

    /// fsync: the source's flush runs on a helper thread while the target's is queued (after
    /// everything queued before it), so both disks flush at once; the call returns when both
    /// are durable, with the source's result.
    pub fn fsync(&self, id: u64, fh: Option<u64>, datasync: bool) -> io::Result<()> {
        if let Some(fh) = fh {
            self.push(fh)?;
        }
        let inode = self.inode(id)?;
        let fd = match fh.and_then(|f| self.files.get(f)) {
            Some(h) => h.fd.try_clone()?,
            None => sys::reopen(inode.fd()?.as_fd(), libc::O_RDONLY)?,
        };
        std::thread::scope(|s| {
            let source = s.spawn(|| sys::fsync(fd.as_fd(), datasync));
            let ticket = self.rep.start(|| match self.inodes.path(id) {
                Some(path) => Forward::of(vec![Change::Fsync { path, datasync }]),
                None => Forward::none(),
            });
            self.rep.finish(ticket);
            source
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("fsync thread panicked")))
        })
    }
}
