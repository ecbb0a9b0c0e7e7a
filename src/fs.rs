//! The `FileSystem` interface of the original design: everything the target applies and the
//! scanner reads, expressed on `RelPath`s beneath one root. Two implementations live below it:
//! `LocalFs` (a real directory, confined beneath its root) and `MemFs` (in memory, counting the
//! writes it receives, for logic tests). This module owns the shared value types (`Meta`, `Kind`,
//! `Time`, `Attrs`) and the typed error `FsError`, which also travels on the wire.

pub mod fake;
pub mod fds;
pub mod local;
pub mod mem;

pub use local::LocalFs;
pub use mem::MemFs;

use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::File,
        }
    }

    /// The S_IFMT bits, for mknod.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// Kinds made with mknod.
    pub fn is_special(self) -> bool {
        matches!(self, Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev)
    }

    /// A device node: only a privileged process can make one.
    pub fn is_device(self) -> bool {
        matches!(self, Kind::CharDev | Kind::BlockDev)
    }
}

/// A point in time with nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn new(sec: i64, nsec: u32) -> Time {
        Time { sec, nsec }
    }
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// How a time is to be set: a value, the clock's "now", or left unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    At(Time),
    Now,
    Omit,
}

impl SetTime {
    pub fn to_sys(self) -> crate::sys::TimeSet {
        match self {
            SetTime::At(t) => crate::sys::TimeSet::At(t.sec, t.nsec),
            SetTime::Now => crate::sys::TimeSet::Now,
            SetTime::Omit => crate::sys::TimeSet::Omit,
        }
    }
}

/// What `lstat` says of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Time,
    pub atime: Time,
    pub ctime: Time,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub rdev: u64,
    /// 512-byte blocks allocated; fewer than the size needs means the file has holes.
    pub blocks: u64,
}

impl Meta {
    pub fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            kind: Kind::from_mode(st.st_mode),
            perm: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: Time::new(st.st_mtime, st.st_mtime_nsec as u32),
            atime: Time::new(st.st_atime, st.st_atime_nsec as u32),
            ctime: Time::new(st.st_ctime, st.st_ctime_nsec as u32),
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            blocks: st.st_blocks as u64,
        }
    }

    pub fn is_sparse(&self) -> bool {
        self.kind == Kind::File && self.blocks * 512 < self.size
    }
}

/// One extended attribute: name and value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// A regular file read whole: its data segments (holes left out) and its stat before and after
/// the reading, which tell whether it changed meanwhile.
#[derive(Debug, Clone)]
pub struct FileData {
    pub before: Meta,
    pub chunks: Vec<(u64, Vec<u8>)>,
    pub after: Meta,
}

/// One directory entry with what the scanner needs of it, read with the directory open.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub meta: Meta,
    /// Symlink target, for symlinks.
    pub link: Option<Vec<u8>>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// The metadata a finished file, directory or node is given: applied in the order owner, mode,
/// xattrs, mtime (chown clears setuid bits, and every change but the last would move mtime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    pub perm: u32,
    pub owner: Option<(u32, u32)>,
    pub mtime: Time,
    pub xattrs: Vec<Xattr>,
}

/// An error from a file system call: errno, what was being done, and to which path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct FsError {
    pub errno: i32,
    pub op: String,
    pub path: String,
    pub message: String,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.op, self.path, self.message)
    }
}

impl FsError {
    pub fn new(errno: i32, op: &str, path: &RelPath) -> FsError {
        FsError {
            errno,
            op: op.to_string(),
            path: path.to_string(),
            message: io::Error::from_raw_os_error(errno).to_string(),
        }
    }
    pub fn io(e: io::Error, op: &str, path: &RelPath) -> FsError {
        FsError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            op: op.to_string(),
            path: path.to_string(),
            message: e.to_string(),
        }
    }
    pub fn msg(errno: i32, op: &str, path: &RelPath, message: impl Into<String>) -> FsError {
        FsError {
            errno,
            op: op.to_string(),
            path: path.to_string(),
            message: message.into(),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Rename flags, as renameat2 takes them.
pub const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
pub const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

/// Size of the read/write chunks used when content is copied through the interface.
pub const CHUNK: usize = 1 << 20;

/// Everything the target applies and the scanner reads, on paths beneath one root. Nothing here
/// follows a symlink at the last component; implementations must not resolve outside the root.
pub trait FileSystem: Send + Sync {
    /// `lstat`.
    fn stat(&self, p: &RelPath) -> FsResult<Meta>;
    /// The entries of a directory, with symlink targets, and xattrs when `xattrs` is set.
    fn read_dir(&self, p: &RelPath, xattrs: bool) -> FsResult<Vec<DirEntry>>;
    fn read_link(&self, p: &RelPath) -> FsResult<Vec<u8>>;
    /// Reads up to `len` bytes at `offset`; shorter only at end of file.
    fn read_at(&self, p: &RelPath, offset: u64, len: usize) -> FsResult<Vec<u8>>;
    /// The (offset, length) ranges that hold data; holes are left out. `size` is the file size.
    fn data_segments(&self, _p: &RelPath, size: u64) -> FsResult<Vec<(u64, u64)>> {
        Ok(if size == 0 { Vec::new() } else { vec![(0, size)] })
    }
    /// Reads the regular file `p` whole, in pieces of at most `max_chunk` bytes.
    fn read_data(&self, p: &RelPath, max_chunk: usize) -> FsResult<FileData> {
        let before = self.stat(p)?;
        if before.kind != Kind::File {
            return Err(FsError::new(libc::EINVAL, "read", p));
        }
        let mut chunks = Vec::new();
        for (off, len) in self.data_segments(p, before.size)? {
            let mut o = off;
            while o < off + len {
                let data = self.read_at(p, o, ((off + len - o) as usize).min(max_chunk))?;
                if data.is_empty() {
                    break;
                }
                let n = data.len() as u64;
                chunks.push((o, data));
                o += n;
            }
        }
        let after = self.stat(p)?;
        Ok(FileData { before, chunks, after })
    }
    /// The whole content, for use as an rsync basis.
    fn map_file(&self, p: &RelPath) -> FsResult<FileBytes>;
    fn xattrs(&self, p: &RelPath) -> FsResult<Vec<Xattr>>;

    fn write_at(&self, p: &RelPath, offset: u64, data: &[u8]) -> FsResult<()>;
    /// Forgets the directories resolved and the files opened earlier (see `fds`); says whether
    /// there were any.
    fn forget_resolved(&self) -> bool {
        false
    }
    /// Writes `data` at `offset`, then sets the mtime to `mtime` when given: a mirrored write.
    /// `LocalFs` does both through one fd.
    fn write_stamped(&self, p: &RelPath, offset: u64, data: &[u8], mtime: Option<Time>) -> FsResult<()> {
        self.write_at(p, offset, data)?;
        match mtime {
            Some(t) => self.set_times(p, SetTime::Omit, SetTime::At(t)),
            None => Ok(()),
        }
    }
    /// Creates a regular file; with `exclusive` it must not exist, otherwise it is truncated.
    fn create(&self, p: &RelPath, perm: u32, exclusive: bool) -> FsResult<()>;
    fn mkdir(&self, p: &RelPath, perm: u32) -> FsResult<()>;
    fn mknod(&self, p: &RelPath, kind: Kind, perm: u32, rdev: u64) -> FsResult<()>;
    fn symlink(&self, target: &[u8], p: &RelPath) -> FsResult<()>;
    fn link(&self, existing: &RelPath, new: &RelPath) -> FsResult<()>;
    fn rename(&self, from: &RelPath, to: &RelPath, flags: u32) -> FsResult<()>;
    fn unlink(&self, p: &RelPath) -> FsResult<()>;
    fn rmdir(&self, p: &RelPath) -> FsResult<()>;
    fn set_perm(&self, p: &RelPath, perm: u32) -> FsResult<()>;
    /// `None` leaves that id unchanged. Never follows a symlink.
    fn set_owner(&self, p: &RelPath, uid: Option<u32>, gid: Option<u32>) -> FsResult<()>;
    /// Never follows a symlink.
    fn set_times(&self, p: &RelPath, atime: SetTime, mtime: SetTime) -> FsResult<()>;
    fn truncate(&self, p: &RelPath, size: u64) -> FsResult<()>;
    fn fallocate(&self, p: &RelPath, mode: i32, offset: u64, len: u64) -> FsResult<()>;
    fn set_xattr(&self, p: &RelPath, name: &[u8], value: &[u8]) -> FsResult<()>;
    fn remove_xattr(&self, p: &RelPath, name: &[u8]) -> FsResult<()>;
    fn fsync(&self, p: &RelPath, datasync: bool) -> FsResult<()>;

    /// Keeps owners, full modes and special files in records (`--fake-super`, see `fake`).
    fn fake_super(&self) -> bool {
        false
    }

    /// Starts a session on the root and fences the older ones (see `session`). By default the
    /// file system keeps no record: the claim says so, and nothing is fenced.
    fn claim_session(&self, _known: Option<[u8; 16]>) -> FsResult<crate::session::Claim> {
        let root = RelPath::root();
        let m = self.stat(&root)?;
        Ok(crate::session::Claim {
            generation: None,
            prev_epoch: 0,
            epoch: 0,
            dev: m.dev,
            ino: m.ino,
            empty: self.read_dir(&root, false)?.is_empty(),
            vacant: false,
        })
    }

    /// Held while a request of the session with `epoch` applies; fails once a newer session
    /// has claimed the root. `None` where there is nothing to fence.
    fn fence(&self, _epoch: u64) -> FsResult<Option<crate::session::Fence<'_>>> {
        Ok(None)
    }

    /// A regular file of this file system opened for reading, to hand to an in-process target
    /// (`Request::StageCopy`); `None` where there is no kernel file behind it.
    fn open_file(&self, _p: &RelPath) -> FsResult<Option<std::fs::File>> {
        Ok(None)
    }

    /// Copies `len` bytes at `offset` of `from` (a file open in this process) to the same offset
    /// of `p`. Stops early at the end of `from`.
    fn copy_in(&self, p: &RelPath, offset: u64, from: &std::fs::File, len: u64) -> FsResult<()> {
        copy_through_buffer(self, p, offset, from, len)
    }

    /// Copies a byte range between two files.
    fn copy_range(&self, src: &RelPath, src_off: u64, dst: &RelPath, dst_off: u64, len: u64) -> FsResult<()> {
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            let data = self.read_at(src, src_off + done, n)?;
            if data.is_empty() {
                break;
            }
            self.write_at(dst, dst_off + done, &data)?;
            done += data.len() as u64;
        }
        Ok(())
    }

    /// Gives a finished file (or any entry) its metadata, in the order `Attrs` documents, and
    /// replaces its xattrs with exactly `attrs.xattrs`.
    fn apply_attrs(&self, p: &RelPath, kind: Kind, attrs: &Attrs) -> FsResult<()> {
        if let Some((uid, gid)) = attrs.owner {
            self.set_owner(p, Some(uid), Some(gid))?;
        }
        if kind != Kind::Symlink {
            self.set_perm(p, attrs.perm)?;
        }
        let have = self.xattrs(p)?;
        for (name, _) in &have {
            if !attrs.xattrs.iter().any(|(n, _)| n == name) {
                self.remove_xattr(p, name)?;
            }
        }
        for (name, value) in &attrs.xattrs {
            if !have.iter().any(|(n, v)| n == name && v == value) {
                self.set_xattr(p, name, value)?;
            }
        }
        self.set_times(p, SetTime::Omit, SetTime::At(attrs.mtime))
    }

    /// Writes a complete file under the temporary name `tmp` (which must not exist), gives it its
    /// metadata and renames it over `dst`, so `dst` never holds a half-written file. Only the
    /// given chunks are written; the rest up to `size` stays a hole.
    fn install_file(
        &self,
        tmp: &RelPath,
        dst: &RelPath,
        chunks: &[(u64, Vec<u8>)],
        size: u64,
        attrs: &Attrs,
    ) -> FsResult<()> {
        self.create(tmp, 0o600, true)?;
        let r = (|| {
            for (off, data) in chunks {
                self.write_at(tmp, *off, data)?;
            }
            self.finish_file(tmp, dst, size, attrs)
        })();
        if r.is_err() {
            let _ = self.unlink(tmp);
        }
        r
    }

    /// Sets the size and metadata of the staged file `tmp` and renames it over `dst`.
    fn finish_file(&self, tmp: &RelPath, dst: &RelPath, size: u64, attrs: &Attrs) -> FsResult<()> {
        self.truncate(tmp, size)?;
        self.apply_attrs(tmp, Kind::File, attrs)?;
        self.rename(tmp, dst, 0)
    }

    /// Removes an entry and, for a directory, everything beneath it, without following symlinks.
    fn remove_tree(&self, p: &RelPath) -> FsResult<()> {
        let meta = match self.stat(p) {
            Ok(m) => m,
            Err(e) if e.errno == libc::ENOENT => return Ok(()),
            Err(e) => return Err(e),
        };
        if meta.kind != Kind::Dir {
            return self.unlink(p);
        }
        if meta.perm & 0o700 != 0o700 {
            // A directory we cannot enter or write is opened up first (as rm -rf does as root).
            let _ = self.set_perm(p, meta.perm | 0o700);
        }
        for e in self.read_dir(p, false)? {
            let child = p
                .join(&e.name)
                .map_err(|err| FsError::msg(libc::EINVAL, "remove", p, err.to_string()))?;
            if e.meta.kind == Kind::Dir {
                self.remove_tree(&child)?;
            } else {
                self.unlink(&child)?;
            }
        }
        self.rmdir(p)
    }

    /// BLAKE3 of the whole content.
    fn hash_file(&self, p: &RelPath) -> FsResult<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        let mut off = 0u64;
        loop {
            let data = self.read_at(p, off, CHUNK)?;
            if data.is_empty() {
                break;
            }
            h.update(&data);
            off += data.len() as u64;
        }
        Ok(*h.finalize().as_bytes())
    }
}

/// File content held either in memory or as a read-only map of a file.
pub enum FileBytes {
    Owned(Vec<u8>),
    Mapped(crate::sys::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Owned(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

/// Whether this process may set owners (is root).
/// `FileSystem::copy_in` by reading `from` and writing `p`, a piece at a time.
pub fn copy_through_buffer<F: FileSystem + ?Sized>(
    fs: &F,
    p: &RelPath,
    offset: u64,
    from: &std::fs::File,
    len: u64,
) -> FsResult<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (len as usize).min(CHUNK)];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        let got = from
            .read_at(&mut buf[..n], offset + done)
            .map_err(|e| FsError::io(e, "read", p))?;
        if got == 0 {
            break;
        }
        fs.write_at(p, offset + done, &buf[..got])?;
        done += got as u64;
    }
    Ok(())
}

pub fn running_as_root() -> bool {
    crate::sys::geteuid() == 0
}
