//! `LocalFs`: the `FileSystem` interface over a real directory, confined beneath its root.
//! The root is opened once as an `O_PATH` fd; every path is resolved from it with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (see `sys::open_beneath`), so no `..` and no
//! symlink is ever followed while resolving, and every call acts on the last component without
//! following it. Content is read and written through fds opened `O_NONBLOCK`, so a fifo at a path
//! never blocks the caller. Parent directories resolved that way, and the files written, are kept
//! open a moment for the next requests (`fs::fds`).

use super::fake::{self, Record};
use super::fds::FdCache;
use super::{Attrs, DirEntry, FileBytes, FileData, FileSystem, FsError, FsResult, Kind, Meta, SetTime, Time, Xattr};
use crate::path::RelPath;
use crate::sys;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub struct LocalFs {
    root: OwnedFd,
    root_path: PathBuf,
    /// Large aligned writes bypass the page cache (see `write_at`).
    direct: bool,
    /// The root opened for reading, for the session lock (`flock` needs more than `O_PATH`).
    lock: std::sync::OnceLock<OwnedFd>,
    /// `--fake-super`: owners, full modes and special files are kept in records (see `fake`).
    fake: bool,
    /// Directories resolved beneath the root (`O_PATH`).
    dirs: FdCache,
    /// Regular files opened for writing (`write_fd`), never with `O_DIRECT`.
    files: FdCache,
}

/// The directory holding an entry: the root itself, or a resolved subdirectory.
enum Dir<'a> {
    Root(BorrowedFd<'a>),
    Sub(std::sync::Arc<OwnedFd>),
}

impl Dir<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(f) => *f,
            Dir::Sub(f) => f.as_fd(),
        }
    }
}

/// Directories and files the caches keep (`fs::fds`): well inside the open files the mount
/// leaves outside its inode table (a quarter of the limit, and 64).
const DIRS_KEPT: usize = 128;
const FILES_KEPT: usize = 32;

const RD: i32 = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
const WR: i32 = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY;

impl LocalFs {
    /// Opens `root`, which must be an existing directory.
    pub fn new(root: &Path) -> io::Result<LocalFs> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(root)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTDIR) {
                    io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{} is not a directory", root.display()),
                    )
                } else {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", root.display()))
                }
            })?;
        let fd = OwnedFd::from(file);
        Ok(LocalFs {
            root: fd,
            root_path: root.to_path_buf(),
            direct: false,
            lock: std::sync::OnceLock::new(),
            fake: false,
            dirs: FdCache::reaped(DIRS_KEPT),
            files: FdCache::reaped(FILES_KEPT),
        })
    }

    /// rsync's `--fake-super`: what needs root (owners, set-ID bits, device nodes, and the
    /// symlinks and special files that cannot hold a user xattr) is written into records and
    /// read back from them (`fake`).
    pub fn with_fake_super(mut self, on: bool) -> LocalFs {
        self.fake = on;
        self
    }

    /// The record of `name` in `dir`, if it has one.
    fn record(dir: BorrowedFd<'_>, name: &[u8]) -> Option<Record> {
        sys::lgetxattr(dir, name, fake::XATTR)
            .ok()
            .and_then(|v| Record::parse(&v))
    }

    fn write_record(dir: BorrowedFd<'_>, name: &[u8], r: &Record) -> io::Result<()> {
        sys::lsetxattr(dir, name, fake::XATTR, &r.encode(), 0)
    }

    /// Changes an entry's record (made from what the entry shows, when it has none yet) and
    /// gives the real entry the permissions the record allows.
    fn update_record(&self, p: &RelPath, op: &str, f: impl FnOnce(&mut Record)) -> FsResult<()> {
        let (dir, name) = self.at(p, op)?;
        let real = sys::fstatat(dir.fd(), &name, false).map_err(|e| FsError::io(e, op, p))?;
        let real = Meta::from_stat(&real);
        if !matches!(real.kind, Kind::File | Kind::Dir) {
            return Err(FsError::msg(
                libc::EPERM,
                op,
                p,
                "no record can be kept on a real special file",
            ));
        }
        let mut r = Self::record(dir.fd(), name.as_bytes()).unwrap_or_else(|| Record::of(&real));
        f(&mut r);
        Self::write_record(dir.fd(), name.as_bytes(), &r).map_err(|e| FsError::io(e, op, p))?;
        let want = r.real_perm();
        if real.perm != want {
            // As `set_perm`: through O_PATH, so a symlink swapped in meanwhile is refused.
            let fd = self.open(p, libc::O_PATH, op)?;
            sys::chmod_opath(fd.as_fd(), want).map_err(|e| FsError::io(e, op, p))?;
        }
        Ok(())
    }

    /// Makes a regular file standing for a symlink or special file, with its record.
    fn make_stand_in(&self, p: &RelPath, op: &str, content: &[u8], r: Record) -> FsResult<()> {
        let (dir, name) = self.at(p, op)?;
        self.forget_name(p);
        let fd = sys::openat(
            dir.fd(),
            &name,
            WR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| FsError::io(e, op, p))?;
        let st = Meta::from_stat(&sys::fstat(fd.as_fd()).map_err(|e| FsError::io(e, op, p))?);
        let r = Record {
            uid: st.uid,
            gid: st.gid,
            ..r
        };
        let done =
            sys::pwrite_all(fd.as_fd(), content, 0).and_then(|_| Self::write_record(dir.fd(), name.as_bytes(), &r));
        if let Err(e) = done {
            let _ = sys::unlinkat(dir.fd(), &name, false);
            return Err(FsError::io(e, op, p));
        }
        Ok(())
    }

    /// Large aligned writes bypass the page cache (`O_DIRECT`). It pays where the CPU is the
    /// limit and the writer waits anyway: the mount, whose daemon copies every byte through
    /// FUSE and the source's cache already (seq write to a local target went from 0.12x to
    /// 0.24x of native with it). Measured again against the page cache with an fsync barrier
    /// (dd through the mount, conv=fsync, 6 alternating pairs): buffered took 0.94x the time
    /// at 512 MiB but 1.39x at 1 GiB, once dirty pages are throttled, so the mount keeps it.
    /// A bulk reconcile is better off buffered: its writer runs beside the reader, and waiting
    /// for the device cost it about half of its speed here.
    pub fn with_direct_writes(mut self, on: bool) -> LocalFs {
        self.direct = on;
        self
    }

    fn lock_fd(&self) -> FsResult<BorrowedFd<'_>> {
        if let Some(fd) = self.lock.get() {
            return Ok(fd.as_fd());
        }
        let fd = sys::reopen(self.root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| FsError::io(e, "open", &RelPath::root()))?;
        Ok(self.lock.get_or_init(|| fd).as_fd())
    }

    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Resolves the parent of `p` and returns it with the last name. The root is (root, ".").
    fn at(&self, p: &RelPath, op: &str) -> FsResult<(Dir<'_>, CString)> {
        let Some((parent, name)) = p.split() else {
            return Ok((Dir::Root(self.root.as_fd()), CString::from(c".")));
        };
        let dir = if parent.is_empty() {
            Dir::Root(self.root.as_fd())
        } else {
            let resolve = || sys::open_beneath(self.root.as_fd(), parent, libc::O_PATH | libc::O_DIRECTORY);
            Dir::Sub(
                self.dirs
                    .get(parent, std::time::Instant::now(), resolve)
                    .map_err(|e| FsError::io(e, op, p))?,
            )
        };
        Ok((dir, sys::cstr(name).map_err(|e| FsError::io(e, op, p))?))
    }

    /// Drops what the caches hold at and beneath `p`: `LocalFs` is about to change, or has
    /// changed, what the name stands for, and it may be a directory (rename, rmdir, mkdir).
    fn forget_tree(&self, p: &RelPath) {
        self.dirs.forget_under(p.as_bytes());
        self.files.forget_under(p.as_bytes());
    }

    /// `forget_tree` for a name that is not a directory before or after the change (unlink, a
    /// new file, node, symlink or link): only the file cached at `p` can be affected.
    fn forget_name(&self, p: &RelPath) {
        self.files.forget(p.as_bytes());
    }

    /// Opens `p` itself (never a symlink at its last name) with `flags`.
    fn open(&self, p: &RelPath, flags: i32, op: &str) -> FsResult<OwnedFd> {
        let (dir, name) = self.at(p, op)?;
        sys::openat(dir.fd(), &name, flags | libc::O_NOFOLLOW, 0).map_err(|e| FsError::io(e, op, p))
    }

    /// Opens a regular file with `flags`, and its stat; anything else is refused.
    fn open_regular(&self, p: &RelPath, flags: i32, op: &str) -> FsResult<(OwnedFd, Meta)> {
        let fd = self.open(p, flags, op)?;
        let meta = Meta::from_stat(&sys::fstat(fd.as_fd()).map_err(|e| FsError::io(e, op, p))?);
        if meta.kind != Kind::File {
            return Err(FsError::new(libc::EINVAL, op, p));
        }
        Ok((fd, meta))
    }

    /// Opens a regular file for writing; anything else is refused.
    fn open_file_wr(&self, p: &RelPath, op: &str) -> FsResult<OwnedFd> {
        Ok(self.open_regular(p, WR, op)?.0)
    }

    /// Writes `data` at `offset` of the regular file `p`, and returns the fd it wrote through.
    /// With `direct`, large aligned writes bypass the page cache (`O_DIRECT`): a mirror's
    /// files are written, not read, so caching them costs a copy of every byte. Anything else,
    /// or a file system without `O_DIRECT`, is written through the cache, from an fd kept for
    /// the writes that follow to the same file (`files`).
    fn write_fd(&self, p: &RelPath, offset: u64, data: &[u8]) -> FsResult<Arc<OwnedFd>> {
        const DIRECT_MIN: usize = 256 << 10;
        let align = sys::AlignedBuf::ALIGN;
        if self.direct && data.len() >= DIRECT_MIN && data.len() % align == 0 && offset % align as u64 == 0 {
            let direct = self
                .open(p, WR | libc::O_DIRECT, "write")
                .ok()
                .filter(|fd| sys::fstat(fd.as_fd()).is_ok_and(|st| Kind::from_mode(st.st_mode) == Kind::File));
            if let Some(fd) = direct {
                let buf = sys::AlignedBuf::copy_of(data).map_err(|e| FsError::io(e, "write", p))?;
                match sys::pwrite_all(fd.as_fd(), &buf, offset) {
                    Ok(()) => return Ok(Arc::new(fd)),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(FsError::io(e, "write", p)),
                }
            }
        }
        let mut opened = false;
        let mut fd = self.files.get(p.as_bytes(), Instant::now(), || {
            opened = true;
            self.open_file_wr(p, "write")
        })?;
        // A kept file that has lost its last name (removed or replaced behind the target's back)
        // is not written: the name is opened again, and fails as it would have.
        if !opened && !sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink > 0) {
            self.files.forget(p.as_bytes());
            fd = Arc::new(self.open_file_wr(p, "write")?);
        }
        sys::pwrite_all(fd.as_fd(), data, offset).map_err(|e| FsError::io(e, "write", p))?;
        Ok(fd)
    }

    fn entry(dir: BorrowedFd<'_>, name: &[u8], xattrs: bool, fake: bool) -> io::Result<DirEntry> {
        let c = sys::cstr(name)?;
        let mut meta = Meta::from_stat(&sys::fstatat(dir, &c, false)?);
        let mut link = if meta.kind == Kind::Symlink {
            Some(sys::readlinkat(dir, &c)?)
        } else {
            None
        };
        if fake && matches!(meta.kind, Kind::File | Kind::Dir) {
            if let Some(r) = Self::record(dir, name) {
                if meta.kind == Kind::File && r.kind() == Kind::Symlink {
                    link = Some(Self::stand_in_content(dir, &c, meta.size)?);
                }
                r.apply(&mut meta);
            }
        }
        let xattrs = if xattrs { read_xattrs(dir, name)? } else { Vec::new() };
        Ok(DirEntry {
            name: name.to_vec(),
            meta,
            link,
            xattrs,
        })
    }
}

impl LocalFs {
    /// The link target a stand-in file holds (at most PATH_MAX bytes are believed).
    fn stand_in_content(dir: BorrowedFd<'_>, name: &std::ffi::CStr, size: u64) -> io::Result<Vec<u8>> {
        if size > libc::PATH_MAX as u64 {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        let fd = sys::openat(dir, name, RD | libc::O_NOFOLLOW, 0)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::pread(fd.as_fd(), &mut buf, 0)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// `copy_file_range` until `len` bytes are copied or `s` ends.
fn kernel_copy(s: BorrowedFd<'_>, src_off: u64, d: BorrowedFd<'_>, dst_off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        match sys::copy_file_range(s, src_off + done, d, dst_off + done, (len - done) as usize)? {
            0 => break,
            n => done += n as u64,
        }
    }
    Ok(())
}

/// The (offset, length) ranges of `fd` that hold data, up to `size`.
fn segments(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let Some(start) = sys::seek_data_hole(fd, off, true)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = sys::seek_data_hole(fd, start, false)?.unwrap_or(size).min(size);
        out.push((start, end - start));
        off = end;
    }
    Ok(out)
}

fn read_xattrs(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<Xattr>> {
    let mut out = Vec::new();
    for attr in sys::llistxattr(dir, name)? {
        if crate::session::is_reserved_xattr(&attr) {
            continue;
        }
        match sys::lgetxattr(dir, name, &attr) {
            Ok(v) => out.push((attr, v)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort();
    Ok(out)
}

impl FileSystem for LocalFs {
    fn stat(&self, p: &RelPath) -> FsResult<Meta> {
        let (dir, name) = self.at(p, "stat")?;
        let mut m = sys::fstatat(dir.fd(), &name, false)
            .map(|st| Meta::from_stat(&st))
            .map_err(|e| FsError::io(e, "stat", p))?;
        if self.fake && matches!(m.kind, Kind::File | Kind::Dir) {
            if let Some(r) = Self::record(dir.fd(), name.as_bytes()) {
                r.apply(&mut m);
            }
        }
        Ok(m)
    }

    fn read_dir(&self, p: &RelPath, xattrs: bool) -> FsResult<Vec<DirEntry>> {
        let fd = self.open(p, libc::O_RDONLY | libc::O_DIRECTORY, "readdir")?;
        let list_fd = fd.try_clone().map_err(|e| FsError::io(e, "readdir", p))?;
        let names = sys::read_dir_names(list_fd).map_err(|e| FsError::io(e, "readdir", p))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match Self::entry(fd.as_fd(), &name, xattrs, self.fake) {
                Ok(e) => out.push(e),
                // Vanished between listing and stat: it is simply not there any more.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    let child = p.join(&name).unwrap_or_else(|_| p.clone());
                    return Err(FsError::io(e, "stat", &child));
                }
            }
        }
        Ok(out)
    }

    fn read_link(&self, p: &RelPath) -> FsResult<Vec<u8>> {
        let (dir, name) = self.at(p, "readlink")?;
        if self.fake {
            if Self::record(dir.fd(), name.as_bytes()).is_some_and(|r| r.kind() == Kind::Symlink) {
                let st = sys::fstatat(dir.fd(), &name, false).map_err(|e| FsError::io(e, "readlink", p))?;
                return Self::stand_in_content(dir.fd(), &name, st.st_size as u64)
                    .map_err(|e| FsError::io(e, "readlink", p));
            }
        }
        sys::readlinkat(dir.fd(), &name).map_err(|e| FsError::io(e, "readlink", p))
    }

    fn read_at(&self, p: &RelPath, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let fd = self.open(p, RD, "read")?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n =
                sys::pread(fd.as_fd(), &mut buf[got..], offset + got as u64).map_err(|e| FsError::io(e, "read", p))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn data_segments(&self, p: &RelPath, size: u64) -> FsResult<Vec<(u64, u64)>> {
        let fd = self.open(p, RD, "seek")?;
        segments(fd.as_fd(), size).map_err(|e| FsError::io(e, "seek", p))
    }

    /// One open for the whole file: both stats are of the file that was read, and a file that
    /// is not sparse is read without looking for holes.
    fn read_data(&self, p: &RelPath, max_chunk: usize) -> FsResult<FileData> {
        let err = |e| FsError::io(e, "read", p);
        let (fd, before) = self.open_regular(p, RD, "read")?;
        let segs = match before.size {
            0 => Vec::new(),
            size if before.is_sparse() => segments(fd.as_fd(), size).map_err(err)?,
            size => vec![(0, size)],
        };
        let mut chunks = Vec::new();
        for (off, len) in segs {
            let mut o = off;
            while o < off + len {
                let mut buf = vec![0u8; ((off + len - o) as usize).min(max_chunk)];
                let n = sys::pread(fd.as_fd(), &mut buf, o).map_err(err)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                chunks.push((o, buf));
                o += n as u64;
            }
        }
        let mut after = Meta::from_stat(&sys::fstat(fd.as_fd()).map_err(err)?);
        let mut before = before;
        if self.fake {
            let mut buf = [0u8; 128];
            let r = sys::fd_getxattr(fd.as_fd(), fake::XATTR, &mut buf).ok();
            if let Some(r) = r.and_then(|n| Record::parse(&buf[..n])) {
                r.apply(&mut before);
                r.apply(&mut after);
            }
        }
        Ok(FileData { before, chunks, after })
    }

    fn map_file(&self, p: &RelPath) -> FsResult<FileBytes> {
        let fd = self.open(p, RD, "map")?;
        let st = sys::fstatat(fd.as_fd(), c"", false).map_err(|e| FsError::io(e, "map", p))?;
        let m = sys::Mmap::map(fd.as_fd(), st.st_size as usize).map_err(|e| FsError::io(e, "map", p))?;
        Ok(FileBytes::Mapped(m))
    }

    fn xattrs(&self, p: &RelPath) -> FsResult<Vec<Xattr>> {
        let (dir, name) = self.at(p, "listxattr")?;
        read_xattrs(dir.fd(), name.as_bytes()).map_err(|e| FsError::io(e, "listxattr", p))
    }

    fn forget_resolved(&self) -> bool {
        let dirs = self.dirs.forget_all();
        self.files.forget_all() || dirs
    }

    fn write_at(&self, p: &RelPath, offset: u64, data: &[u8]) -> FsResult<()> {
        self.write_fd(p, offset, data).map(drop)
    }

    fn write_stamped(&self, p: &RelPath, offset: u64, data: &[u8], mtime: Option<Time>) -> FsResult<()> {
        let fd = self.write_fd(p, offset, data)?;
        match mtime {
            Some(t) => sys::futimens(fd.as_fd(), sys::TimeSet::Omit, sys::TimeSet::At(t.sec, t.nsec))
                .map_err(|e| FsError::io(e, "utimens", p)),
            None => Ok(()),
        }
    }

    fn create(&self, p: &RelPath, perm: u32, exclusive: bool) -> FsResult<()> {
        let (dir, name) = self.at(p, "create")?;
        let flags = WR | libc::O_CREAT | libc::O_NOFOLLOW | if exclusive { libc::O_EXCL } else { libc::O_TRUNC };
        self.forget_name(p);
        sys::openat(dir.fd(), &name, flags, perm)
            .map(drop)
            .map_err(|e| FsError::io(e, "create", p))
    }

    fn mkdir(&self, p: &RelPath, perm: u32) -> FsResult<()> {
        let (dir, name) = self.at(p, "mkdir")?;
        sys::mkdirat(dir.fd(), &name, perm).map_err(|e| FsError::io(e, "mkdir", p))?;
        // Whatever was resolved at this path before is gone: the name was free.
        self.forget_tree(p);
        Ok(())
    }

    fn mknod(&self, p: &RelPath, kind: Kind, perm: u32, rdev: u64) -> FsResult<()> {
        if !kind.is_special() {
            return Err(FsError::msg(
                libc::EINVAL,
                "mknod",
                p,
                format!("cannot mknod a {kind:?}"),
            ));
        }
        if self.fake {
            let r = Record {
                mode: kind.type_bits() | (perm & 0o7777),
                rdev,
                uid: 0,
                gid: 0,
            };
            return self.make_stand_in(p, "mknod", b"", r);
        }
        let (dir, name) = self.at(p, "mknod")?;
        self.forget_name(p);
        sys::mknodat(dir.fd(), &name, kind.type_bits() | perm, rdev).map_err(|e| FsError::io(e, "mknod", p))
    }

    fn symlink(&self, target: &[u8], p: &RelPath) -> FsResult<()> {
        if self.fake {
            let r = Record {
                mode: libc::S_IFLNK | 0o777,
                rdev: 0,
                uid: 0,
                gid: 0,
            };
            return self.make_stand_in(p, "symlink", target, r);
        }
        let (dir, name) = self.at(p, "symlink")?;
        let t = sys::cstr(target).map_err(|e| FsError::io(e, "symlink", p))?;
        self.forget_name(p);
        sys::symlinkat(&t, dir.fd(), &name).map_err(|e| FsError::io(e, "symlink", p))
    }

    fn link(&self, existing: &RelPath, new: &RelPath) -> FsResult<()> {
        let (od, on) = self.at(existing, "link")?;
        let (nd, nn) = self.at(new, "link")?;
        self.forget_name(new);
        sys::linkat(od.fd(), &on, nd.fd(), &nn).map_err(|e| FsError::io(e, "link", new))
    }

    fn rename(&self, from: &RelPath, to: &RelPath, flags: u32) -> FsResult<()> {
        if from.is_root() || to.is_root() {
            return Err(FsError::new(libc::EBUSY, "rename", from));
        }
        let (od, on) = self.at(from, "rename")?;
        let (nd, nn) = self.at(to, "rename")?;
        let r = sys::renameat2(od.fd(), &on, nd.fd(), &nn, flags).map_err(|e| FsError::io(e, "rename", from));
        // Either name may have been a directory, or (RENAME_EXCHANGE) both.
        self.forget_tree(from);
        self.forget_tree(to);
        r
    }

    fn unlink(&self, p: &RelPath) -> FsResult<()> {
        let (dir, name) = self.at(p, "unlink")?;
        self.forget_name(p);
        sys::unlinkat(dir.fd(), &name, false).map_err(|e| FsError::io(e, "unlink", p))
    }

    fn rmdir(&self, p: &RelPath) -> FsResult<()> {
        if p.is_root() {
            return Err(FsError::new(libc::EBUSY, "rmdir", p));
        }
        let (dir, name) = self.at(p, "rmdir")?;
        let r = sys::unlinkat(dir.fd(), &name, true).map_err(|e| FsError::io(e, "rmdir", p));
        self.forget_tree(p);
        r
    }

    fn set_perm(&self, p: &RelPath, perm: u32) -> FsResult<()> {
        if self.fake {
            return self.update_record(p, "chmod", |r| r.mode = (r.mode & libc::S_IFMT) | (perm & 0o7777));
        }
        // A symlink at the path is refused, never followed.
        let (dir, name) = self.at(p, "chmod")?;
        sys::chmod_at(dir.fd(), &name, perm).map_err(|e| FsError::io(e, "chmod", p))
    }

    fn set_owner(&self, p: &RelPath, uid: Option<u32>, gid: Option<u32>) -> FsResult<()> {
        if self.fake {
            return self.update_record(p, "chown", |r| {
                r.uid = uid.unwrap_or(r.uid);
                r.gid = gid.unwrap_or(r.gid);
            });
        }
        let (dir, name) = self.at(p, "chown")?;
        sys::fchownat(dir.fd(), &name, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
            .map_err(|e| FsError::io(e, "chown", p))
    }

    fn set_times(&self, p: &RelPath, atime: SetTime, mtime: SetTime) -> FsResult<()> {
        let (dir, name) = self.at(p, "utimens")?;
        sys::utimensat(dir.fd(), &name, atime.to_sys(), mtime.to_sys()).map_err(|e| FsError::io(e, "utimens", p))
    }

    fn truncate(&self, p: &RelPath, size: u64) -> FsResult<()> {
        let fd = self.open_file_wr(p, "truncate")?;
        sys::ftruncate(fd.as_fd(), size).map_err(|e| FsError::io(e, "truncate", p))
    }

    fn fallocate(&self, p: &RelPath, mode: i32, offset: u64, len: u64) -> FsResult<()> {
        let fd = self.open_file_wr(p, "fallocate")?;
        sys::fallocate(fd.as_fd(), mode, offset, len).map_err(|e| FsError::io(e, "fallocate", p))
    }

    fn set_xattr(&self, p: &RelPath, name: &[u8], value: &[u8]) -> FsResult<()> {
        let (dir, n) = self.at(p, "setxattr")?;
        sys::lsetxattr(dir.fd(), n.as_bytes(), name, value, 0).map_err(|e| FsError::io(e, "setxattr", p))
    }

    fn remove_xattr(&self, p: &RelPath, name: &[u8]) -> FsResult<()> {
        let (dir, n) = self.at(p, "removexattr")?;
        sys::lremovexattr(dir.fd(), n.as_bytes(), name).map_err(|e| FsError::io(e, "removexattr", p))
    }

    fn fsync(&self, p: &RelPath, datasync: bool) -> FsResult<()> {
        let fd = self.open(p, RD, "fsync")?;
        sys::fsync(fd.as_fd(), datasync).map_err(|e| FsError::io(e, "fsync", p))
    }

    fn fake_super(&self) -> bool {
        self.fake
    }

    fn claim_session(&self, known: Option<[u8; 16]>) -> FsResult<crate::session::Claim> {
        crate::session::claim(self.lock_fd()?, known).map_err(|e| FsError::io(e, "claim", &RelPath::root()))
    }

    fn fence(&self, epoch: u64) -> FsResult<Option<crate::session::Fence<'_>>> {
        crate::session::enter(self.lock_fd()?, epoch).map(Some)
    }

    fn copy_range(&self, src: &RelPath, src_off: u64, dst: &RelPath, dst_off: u64, len: u64) -> FsResult<()> {
        let s = self.open(src, RD, "copy_file_range")?;
        let d = self.open_file_wr(dst, "copy_file_range")?;
        kernel_copy(s.as_fd(), src_off, d.as_fd(), dst_off, len).map_err(|e| FsError::io(e, "copy_file_range", dst))
    }

    fn open_file(&self, p: &RelPath) -> FsResult<Option<std::fs::File>> {
        Ok(Some(std::fs::File::from(self.open_regular(p, RD, "open")?.0)))
    }

    /// In the kernel (`copy_file_range`): no copy through this process, and a reflink where the
    /// file system shares extents. Falls back to reading and writing where the kernel refuses
    /// (across file systems on old kernels, or file systems without it).
    fn copy_in(&self, p: &RelPath, offset: u64, from: &std::fs::File, len: u64) -> FsResult<()> {
        let d = self.open_file_wr(p, "copy_file_range")?;
        match kernel_copy(from.as_fd(), offset, d.as_fd(), offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) =>
            {
                log::debug!("{p}: copy_file_range refused ({e}); copying through a buffer");
                crate::fs::copy_through_buffer(self, p, offset, from, len)
            }
            Err(e) => Err(FsError::io(e, "copy_file_range", p)),
        }
    }

    /// One resolution of the parent and one fd for the whole job: create, write, size, owner,
    /// mode, xattrs, mtime, rename.
    fn install_file(
        &self,
        tmp: &RelPath,
        dst: &RelPath,
        chunks: &[(u64, Vec<u8>)],
        size: u64,
        attrs: &Attrs,
    ) -> FsResult<()> {
        if tmp.parent() != dst.parent() {
            return Err(FsError::msg(
                libc::EINVAL,
                "install",
                dst,
                "temporary file must share the directory",
            ));
        }
        let (dir, tname) = self.at(tmp, "install")?;
        let dname = sys::cstr(dst.file_name()).map_err(|e| FsError::io(e, "install", dst))?;
        let fd = sys::openat(
            dir.fd(),
            &tname,
            WR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| FsError::io(e, "create", tmp))?;
        let r = (|| -> io::Result<()> {
            let mut end = 0;
            for (off, data) in chunks {
                sys::pwrite_all(fd.as_fd(), data, *off)?;
                end = end.max(off + data.len() as u64);
            }
            if end != size {
                sys::ftruncate(fd.as_fd(), size)?;
            }
            if self.fake {
                let st = Meta::from_stat(&sys::fstat(fd.as_fd())?);
                let (uid, gid) = attrs.owner.unwrap_or((st.uid, st.gid));
                let r = Record {
                    mode: libc::S_IFREG | (attrs.perm & 0o7777),
                    rdev: 0,
                    uid,
                    gid,
                };
                Self::write_record(dir.fd(), tname.as_bytes(), &r)?;
                sys::fchmod(fd.as_fd(), r.real_perm())?;
            } else {
                if let Some((uid, gid)) = attrs.owner {
                    sys::fchown(fd.as_fd(), uid, gid)?;
                }
                sys::fchmod(fd.as_fd(), attrs.perm)?;
            }
            for (name, value) in &attrs.xattrs {
                sys::lsetxattr(dir.fd(), tname.as_bytes(), name, value, 0)?;
            }
            sys::futimens(
                fd.as_fd(),
                sys::TimeSet::Omit,
                sys::TimeSet::At(attrs.mtime.sec, attrs.mtime.nsec),
            )?;
            self.forget_name(dst);
            sys::renameat2(dir.fd(), &tname, dir.fd(), &dname, 0)
        })();
        if let Err(e) = r {
            let _ = sys::unlinkat(dir.fd(), &tname, false);
            return Err(FsError::io(e, "install", dst));
        }
        Ok(())
    }
}
