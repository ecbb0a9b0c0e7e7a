//! The FUSE adapter: `fuser::Filesystem` for `Mirror`. Each handler only converts the kernel's
//! arguments, calls `Mirror`, and turns the result into a reply; no decision is made here. A
//! mutation's reply goes through `Replicator::answer`, which may send it later from another
//! thread (`--on-disconnect block`).

use super::inodes::ROOT;
use super::mirror::{Caller, Mirror, NewTime, SetAttrs};
use crate::fs::Time;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAX_WRITE: u32 = 1 << 20;

pub struct Ops {
    pub m: Arc<Mirror>,
    /// Ask the kernel for passthrough at init.
    pub want_passthrough: bool,
    /// Ask the kernel for its writeback cache at init (`--ack=fsync`).
    pub want_writeback: bool,
}

/// Directory entries read for one `readdir` (more than a reply's buffer holds; the rest are
/// read again by the next one, from the position after the last that fit).
const READDIR_ENTRIES: usize = 256;

fn errno(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn d_kind(d_type: u8) -> FileType {
    match d_type {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(id: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The attributes of a negative entry: only its node id, 0, counts.
fn negative() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn new_time(t: TimeOrNow) -> NewTime {
    match t {
        TimeOrNow::Now => NewTime::Now,
        TimeOrNow::SpecificTime(t) => NewTime::At(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Time::new(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
                if n == 0 {
                    Time::new(-s, 0)
                } else {
                    Time::new(-s - 1, 1_000_000_000 - n)
                }
            }
        }),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn entry(reply: ReplyEntry, ttl: Duration, r: io::Result<(u64, libc::stat)>) {
    match r {
        Ok((id, st)) => reply.entry(&ttl, &attr(id, &st), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty(reply: ReplyEmpty, r: io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr(reply: ReplyXattr, size: u32, f: impl FnOnce(&mut [u8]) -> io::Result<usize>) {
    let mut buf = vec![0u8; size as usize];
    match f(&mut buf) {
        Ok(n) if size == 0 => reply.size(n as u32),
        Ok(n) => reply.data(&buf[..n]),
        Err(e) => reply.error(errno(e)),
    }
}

impl Ops {
    /// Sends a mutation's reply, now or, under `--on-disconnect block`, once the target has
    /// caught up past it (`Replicator::answer`): this worker thread is free for reads at once.
    fn answer(&self, send: impl FnOnce() + Send + 'static) {
        self.m.replicator().answer(send)
    }
}

impl fuser::Filesystem for Ops {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let wanted =
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        // The daemon clears set-ID bits itself (`Mirror::kill_set_id`): the kernel then stops
        // asking for security.capability before every write.
        if config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2).is_ok() {
            self.m.killpriv.store(true, Ordering::Relaxed);
        }
        if self.want_writeback {
            // The kernel writes a file's cached pages and then its times back before each
            // fsync and close (FOPEN_NOFLUSH does not skip that with this cache on), and each
            // such write is forwarded like any other before it is answered.
            match config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                Ok(()) => {
                    self.m.writeback.store(true, Ordering::Relaxed);
                    log::info!(
                        "--ack=fsync: writes return from the page cache; fsync and close return once the target has the file"
                    );
                    if self.want_passthrough {
                        log::info!("no kernel passthrough for reads: the kernel cannot mix it with the writeback cache");
                    }
                }
                Err(_) => log::warn!(
                    "the kernel offers no writeback cache: every write returns once the target has it, as without --ack=fsync"
                ),
            }
        }
        if self.want_passthrough && !self.m.writeback.load(Ordering::Relaxed) {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    let _ = config.set_max_stack_depth(1);
                    self.m.passthrough.store(true, Ordering::Relaxed);
                    log::info!("kernel passthrough on for read-only opens");
                }
                Err(_) => log::warn!("the kernel offers no FUSE passthrough; reads go through the daemon"),
            }
        }
        Ok(())
    }

    /// A name that does not exist is answered with a negative entry (node id 0), which the
    /// kernel keeps as long as a positive one: `cache` drops it when the name appears behind
    /// the mount.
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ttl = self.m.cache.ttl();
        match self.m.lookup(parent.0, name.as_bytes()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => reply.entry(&ttl, &negative(), Generation(0)),
            r => entry(reply, ttl, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.m.forget(ino.0, nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.m.cache.ttl();
        match self.m.getattr(ino.0) {
            Ok(st) => reply.attr(&ttl, &attr(ino.0, &st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.m.cache.ttl();
        let a = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(new_time),
            mtime: mtime.map(new_time),
            fh: fh.map(|f| f.0),
            // fuser does not pass FATTR_KILL_SUIDGID on: the kernel sets it for a truncation by a
            // caller without CAP_FSETID, which is taken to mean one who is not root.
            kill_set_id: size.is_some() && req.uid() != 0 && self.m.killpriv.load(Ordering::Relaxed),
        };
        let r = self.m.setattr(ino.0, a);
        self.answer(move || match r {
            Ok(st) => reply.attr(&ttl, &attr(ino.0, &st)),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.m.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let ttl = self.m.cache.ttl();
        let r = self.m.mknod(parent.0, name.as_bytes(), mode, rdev as u64, caller(req));
        self.answer(move || entry(reply, ttl, r))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let ttl = self.m.cache.ttl();
        let r = self.m.mkdir(parent.0, name.as_bytes(), mode, caller(req));
        self.answer(move || entry(reply, ttl, r))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.m.unlink(parent.0, name.as_bytes(), false);
        self.answer(move || empty(reply, r))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.m.unlink(parent.0, name.as_bytes(), true);
        self.answer(move || empty(reply, r))
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let ttl = self.m.cache.ttl();
        let r = self.m.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            caller(req),
        );
        self.answer(move || entry(reply, ttl, r))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .m
            .rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), flags.bits());
        self.answer(move || empty(reply, r))
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let ttl = self.m.cache.ttl();
        let r = self.m.link(ino.0, newparent.0, newname.as_bytes());
        self.answer(move || entry(reply, ttl, r))
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC makes an open a mutation.
        let r = self.m.open(ino.0, flags.0, |fd| reply.open_backing(fd));
        self.answer(move || match r {
            Ok(o) => {
                let flags = if o.flush {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_NOFLUSH
                };
                match o.backing {
                    Some(b) => reply.opened_passthrough(FileHandle(o.fh), flags, &b),
                    None => reply.opened(FileHandle(o.fh), flags),
                }
            }
            Err(e) => reply.error(errno(e)),
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.m.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let from_cache = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let r = self.m.write(fh.0, offset, data, from_cache, kill);
        self.answer(move || match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let r = self.m.flush(fh.0);
        self.answer(move || empty(reply, r))
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let pushed = self.m.push(fh.0);
        self.m.release(fh.0);
        self.answer(move || empty(reply, pushed))
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = self.m.fsync(ino.0, Some(fh.0), datasync);
        self.answer(move || empty(reply, r))
    }

    /// Directories are never opened: the first `opendir` is answered `ENOSYS`, after which the
    /// kernel sends none (nor `releasedir`) and keeps every listing it reads, as it does for a
    /// filesystem without opendir (`FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`). Its own changes
    /// through the mount reset a kept listing, `cache` drops those that change behind it, and
    /// without a watcher the kernel checks a kept listing against the directory's mtime, which
    /// it asks for again after the one-second attribute time. A `find` then costs one request
    /// per directory (the kernel asks for its attributes after every listing, for the atime),
    /// not three.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.m.read_dir(ino.0, offset, READDIR_ENTRIES) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        for (e, next) in &entries {
            let id = match e.name.as_slice() {
                b"." => ino.0,
                b".." => ROOT,
                _ => e.ino,
            };
            if reply.add(INodeNo(id), *next, d_kind(e.d_type), OsStr::from_bytes(&e.name)) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let ttl = self.m.cache.ttl();
        let entries = match self.m.read_dir(ino.0, offset, READDIR_ENTRIES) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        for (e, next) in &entries {
            let name = OsStr::from_bytes(&e.name);
            if e.name == b"." || e.name == b".." {
                // The kernel takes no reference on "." and "..": no lookup is counted for them.
                let st = match self.m.getattr(ino.0) {
                    Ok(st) => st,
                    Err(e) => return reply.error(errno(e)),
                };
                if reply.add(INodeNo(ino.0), *next, name, &ttl, &attr(ino.0, &st), Generation(0)) {
                    break;
                }
                continue;
            }
            // An entry that vanished since the listing was read is left out.
            let Ok((id, st)) = self.m.lookup(ino.0, &e.name) else {
                continue;
            };
            if reply.add(INodeNo(id), *next, name, &ttl, &attr(id, &st), Generation(0)) {
                // Did not fit: the kernel never saw it, so the lookup is given back.
                self.m.forget(id, 1);
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let r = self.m.fsync(ino.0, None, datasync);
        self.answer(move || empty(reply, r))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.m.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.m.setxattr(ino.0, name.as_bytes(), value, flags);
        self.answer(move || empty(reply, r))
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, size, |buf| self.m.getxattr(ino.0, name.as_bytes(), buf))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, size, |buf| self.m.listxattr(ino.0, buf))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.m.removexattr(ino.0, name.as_bytes());
        self.answer(move || empty(reply, r))
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel has checked already.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let ttl = self.m.cache.ttl();
        let r = self.m.create(parent.0, name.as_bytes(), mode, flags, caller(req));
        self.answer(move || match r {
            // A new file has no passthrough opens, so its close has nothing to push (`Opened`).
            Ok((id, st, fh)) => reply.created(
                &ttl,
                &attr(id, &st),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_NOFLUSH,
            ),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // As for a truncation: fuser keeps the kernel's word, so "not root" stands in for it.
        let kill = req.uid() != 0 && self.m.killpriv.load(Ordering::Relaxed);
        let r = self.m.fallocate(fh.0, offset, length, mode, kill);
        self.answer(move || empty(reply, r))
    }

    /// No ioctl is passed through: the answer is "not a terminal" (what every program that
    /// asks, isatty() for one, expects of a regular file), quietly. fuser's default logs a
    /// warning per call, and Python asks once per open().
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        match self.m.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let kill = req.uid() != 0 && self.m.killpriv.load(Ordering::Relaxed);
        let r = self
            .m
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len, flags.bits() as u32, kill);
        self.answer(move || match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(e)),
        })
    }
}
