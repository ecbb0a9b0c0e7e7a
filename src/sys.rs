//! Thin safe wrappers over the libc calls mirrorfs needs. This is the only module with `unsafe`
//! code: every other module calls these functions, which take Rust types, check return values and
//! turn `-1` into `io::Error`. Each `unsafe` block says why it is sound in a `// SAFETY:` line.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Turns bytes into a C string; a NUL inside is an `InvalidInput` error, never a panic.
pub fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in name"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `openat(2)`; the returned descriptor is owned.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the fd returned is new and ours alone.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` (relative, may hold several components) beneath `dir` with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: no `..` escape, no
/// symlink followed anywhere, including the last component. Falls back to a component-by-component
/// walk with `O_NOFOLLOW` where the kernel lacks openat2.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &[u8], flags: i32) -> io::Result<OwnedFd> {
    if path.is_empty() {
        return openat(dir, c".", flags, 0);
    }
    let c = cstr(path)?;
    /// `struct open_how` of openat2(2) (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `c` and `how` live across the call, and the size passed is `how`'s own size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if ret >= 0 {
        // SAFETY: the syscall returned a new descriptor that nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // Fallback walk: every component opened with O_NOFOLLOW, never `..`.
    let mut parts = path.split(|b| *b == b'/').peekable();
    let mut cur: Option<OwnedFd> = None;
    while let Some(part) = parts.next() {
        if part.is_empty() || part == b"." || part == b".." {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let last = parts.peek().is_none();
        let f = if last {
            flags | libc::O_NOFOLLOW
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW
        };
        let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
        let next = openat(base, &cstr(part)?, f, 0)?;
        cur = Some(next);
    }
    cur.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `fstatat(2)`; `follow == false` adds AT_SYMLINK_NOFOLLOW. An empty name stats `dir` itself.
pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, follow: bool) -> io::Result<libc::stat> {
    let mut flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable stat buffer; it is read only after the call succeeded.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })
    .map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: plain syscall on valid NUL-terminated strings and a valid fd.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn linkat(odir: BorrowedFd<'_>, oname: &CStr, ndir: BorrowedFd<'_>, nname: &CStr) -> io::Result<()> {
    // SAFETY: plain syscall; flags 0 means the old name is not followed if it is a symlink.
    check(unsafe { libc::linkat(odir.as_raw_fd(), oname.as_ptr(), ndir.as_raw_fd(), nname.as_ptr(), 0) }).map(drop)
}

pub fn renameat2(odir: BorrowedFd<'_>, oname: &CStr, ndir: BorrowedFd<'_>, nname: &CStr, flags: u32) -> io::Result<()> {
    // SAFETY: plain syscall on valid fds and NUL-terminated names.
    check(unsafe {
        libc::renameat2(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `fchmodat` on the entry itself. Linux cannot chmod a symlink, so callers never ask for one.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `fchownat(AT_SYMLINK_NOFOLLOW)`; `u32::MAX` leaves an id unchanged.
pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

/// A time to set: a value, "now", or "leave as is".
#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    At(i64, u32),
    Now,
    Omit,
}

fn timespec(t: TimeSet) -> libc::timespec {
    match t {
        TimeSet::At(sec, nsec) => libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
        TimeSet::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        TimeSet::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

/// `utimensat(AT_SYMLINK_NOFOLLOW)`: sets times on the entry itself, symlinks included.
pub fn utimensat(dir: BorrowedFd<'_>, name: &CStr, atime: TimeSet, mtime: TimeSet) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `ts` is an array of two timespecs as the call requires.
    check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

pub fn futimens(fd: BorrowedFd<'_>, atime: TimeSet, mtime: TimeSet) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `ts` is an array of two timespecs as the call requires.
    check(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let n = check_size(unsafe {
            libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    check_size(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is readable for its length.
        let n =
            check_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset as libc::off_t) })?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// `lseek` with SEEK_DATA / SEEK_HOLE; `None` when there is no more data (ENXIO).
pub fn seek_data_hole(fd: BorrowedFd<'_>, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The path `/proc/self/fd/<dir>/<name>`: used for the xattr calls, which have no `*at` form.
/// The `l*xattr` calls do not follow the last component, and the fd link pins the directory.
fn fd_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if !name.is_empty() {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    cstr(&p)
}

/// `/proc/self/fd`, opened once (`O_PATH`): the inode behind an fd is then reached by the fd's
/// number alone (one name and its magic link) instead of a walk of `/proc/self/fd/N` from `/`.
/// -1 until first used, and again in a forked child, whose fd table is its own.
static PROC_FD_DIR: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn forget_proc_fd_dir() {
    PROC_FD_DIR.store(-1, std::sync::atomic::Ordering::Relaxed);
}

/// `/proc/self/fd` and the name of `fd` in it.
fn proc_fd(fd: BorrowedFd<'_>) -> io::Result<(BorrowedFd<'static>, CString)> {
    use std::sync::atomic::Ordering;
    let name = cstr(fd.as_raw_fd().to_string().as_bytes())?;
    let mut dir = PROC_FD_DIR.load(Ordering::Acquire);
    if dir < 0 {
        static AT_FORK: std::sync::Once = std::sync::Once::new();
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        AT_FORK.call_once(|| unsafe {
            libc::pthread_atfork(None, None, Some(forget_proc_fd_dir));
        });
        let opened = openat(
            // SAFETY: AT_FDCWD is a valid dirfd for the life of the process; the path is absolute.
            unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        use std::os::fd::IntoRawFd;
        let raw = opened.into_raw_fd();
        dir = match PROC_FD_DIR.compare_exchange(-1, raw, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => raw,
            Err(theirs) => {
                // SAFETY: `raw` is ours alone and was never published.
                drop(unsafe { OwnedFd::from_raw_fd(raw) });
                theirs
            }
        };
    }
    // SAFETY: the published fd stays open for the life of the process (it is never closed).
    Ok((unsafe { BorrowedFd::borrow_raw(dir) }, name))
}

/// Set once the kernel has said it lacks getxattrat(2) (Linux < 6.13).
static NO_GETXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const SYS_GETXATTRAT: libc::c_long = 464;

/// `struct xattr_args` of getxattrat(2).
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Set once the kernel has said it lacks listxattrat(2) (Linux < 6.13).
static NO_LISTXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const SYS_LISTXATTRAT: libc::c_long = 465;

/// Lists the xattr names of `name` in `dir` (the entry itself, never a symlink's target). Uses
/// listxattrat(2) where the kernel has it, which saves resolving a `/proc/self/fd` path.
pub fn llistxattr(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    use std::sync::atomic::Ordering;
    let at_name = cstr(if name.is_empty() { b"." } else { name })?;
    let mut proc_path = None;
    let mut buf = vec![0u8; 1024];
    loop {
        let r = if !NO_LISTXATTRAT.load(Ordering::Relaxed) {
            // SAFETY: `at_name` is NUL-terminated and `buf` is writable for its length.
            let r = unsafe {
                libc::syscall(
                    SYS_LISTXATTRAT,
                    dir.as_raw_fd(),
                    at_name.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                NO_LISTXATTRAT.store(true, Ordering::Relaxed);
                continue;
            }
            r as isize
        } else {
            if proc_path.is_none() {
                proc_path = Some(fd_path(dir, name)?);
            }
            let p = proc_path.as_ref().unwrap_or_else(|| unreachable!());
            // SAFETY: `p` is NUL-terminated and `buf` is writable for its length.
            unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => {
                    buf.resize(buf.len() * 4, 0);
                    continue;
                }
                Some(libc::ENOTSUP) => return Ok(Vec::new()),
                _ => return Err(e),
            }
        }
        buf.truncate(r as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect());
    }
}

pub fn lgetxattr(dir: BorrowedFd<'_>, name: &[u8], attr: &[u8]) -> io::Result<Vec<u8>> {
    let p = fd_path(dir, name)?;
    let a = cstr(attr)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for its length.
        let r = unsafe { libc::lgetxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 20 {
                buf.resize(buf.len() * 8, 0);
                continue;
            }
            return Err(e);
        }
        buf.truncate(r as usize);
        return Ok(buf);
    }
}

pub fn lsetxattr(dir: BorrowedFd<'_>, name: &[u8], attr: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let p = fd_path(dir, name)?;
    let a = cstr(attr)?;
    // SAFETY: all pointers are valid for the lengths given.
    check(unsafe { libc::lsetxattr(p.as_ptr(), a.as_ptr(), value.as_ptr().cast(), value.len(), flags) }).map(drop)
}

pub fn lremovexattr(dir: BorrowedFd<'_>, name: &[u8], attr: &[u8]) -> io::Result<()> {
    let p = fd_path(dir, name)?;
    let a = cstr(attr)?;
    // SAFETY: valid NUL-terminated strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), a.as_ptr()) }).map(drop)
}

/// Lists the names in the directory `fd` (without `.` and `..`). The fd must be opened for reading.
pub fn read_dir_names(fd: OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let all = read_dir_at(fd, 0, usize::MAX)?;
    Ok(all
        .into_iter()
        .map(|(e, _)| e.name)
        .filter(|n| n != b"." && n != b"..")
        .collect())
}

/// A read-only memory map of a whole file, unmapped on drop. Used for the rsync basis on the
/// target, which only mirrorfs writes.
pub struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing `&[u8]` across threads is sound.
unsafe impl Send for Mmap {}
// SAFETY: as above; no interior mutability.
unsafe impl Sync for Mmap {}

impl Mmap {
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mmap> {
        if len == 0 {
            return Ok(Mmap {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh private read-only mapping of `len` bytes of a file we hold open.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmap { ptr, len })
    }
}

impl std::ops::Deref for Mmap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Sends `sig` to process `pid` without forking (a child's exec would close, and so flush, every
/// file the caller holds open).
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill takes two integers and touches no memory.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

pub fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// Set once the kernel has said it lacks fchmodat2(2) (Linux < 6.6).
static NO_FCHMODAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// fchmodat2(2) (Linux 6.6); `None` once the kernel has said it lacks it.
fn fchmodat2(dir: BorrowedFd<'_>, name: &CStr, mode: u32, flags: i32) -> Option<io::Result<()>> {
    use std::sync::atomic::Ordering;
    if NO_FCHMODAT2.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `name` is NUL-terminated; plain syscall on a valid fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::c_uint,
            flags as libc::c_uint,
        )
    };
    if r == 0 {
        return Some(Ok(()));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Some(Err(e));
    }
    NO_FCHMODAT2.store(true, Ordering::Relaxed);
    None
}

/// `chmod` of the inode an `O_PATH` fd refers to (fchmod refuses O_PATH fds): fchmodat2(2) with
/// `AT_EMPTY_PATH` where the kernel has it, else through the fd's `/proc/self/fd` link, a path
/// walk more. The fd pins the inode, so no symlink can be swapped in.
pub fn chmod_opath(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    if let Some(r) = fchmodat2(fd, c"", mode, libc::AT_EMPTY_PATH) {
        return r;
    }
    let (dir, name) = proc_fd(fd)?;
    // SAFETY: `name` is NUL-terminated; plain syscall (following the fd's magic link).
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

/// `copy_file_range(2)` between two fds; returns the bytes copied (0 at end of input).
pub fn copy_file_range(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    copy_file_range_flags(src, src_off, dst, dst_off, len, 0)
}

// ---- Calls used by the FUSE mount (`fuse/`) ----

/// `chmod` of `name` in `dir`, never following a symlink there (a symlink is refused with
/// `EOPNOTSUPP`): fchmodat2(2) with `AT_SYMLINK_NOFOLLOW` where the kernel has it (Linux 6.6),
/// else through an `O_PATH` fd of the entry.
pub fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    if let Some(r) = fchmodat2(dir, name, mode, libc::AT_SYMLINK_NOFOLLOW) {
        return r;
    }
    let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    chmod_opath(fd.as_fd(), mode)
}

/// Opens the inode behind `fd` (usually an `O_PATH` fd) again with `flags`, through its
/// `/proc/self/fd` link. `O_NOFOLLOW` and `O_CREAT` are dropped: the link names the inode itself.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let (dir, name) = proc_fd(fd)?;
    openat(
        dir,
        &name,
        flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL),
        0,
    )
}

/// `fstat` of any fd, `O_PATH` ones included.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    fstatat(fd, c"", false)
}

/// `statvfs` of the filesystem holding `fd`.
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is a writable buffer read only after success.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded and filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// The filesystem id of the filesystem `fd` is on, as fanotify reports it (statfs's
/// `f_fsid`, as its 8 bytes).
pub fn fsid(fd: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a writable buffer read only after success.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded and filled `st`; fsid_t is two ints, 8 plain bytes.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [u8; 8]>(st.assume_init().f_fsid) })
}

/// `utimensat(fd, "", AT_EMPTY_PATH)`: sets the times of the inode `fd` refers to, symlinks
/// included.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSet, mtime: TimeSet) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `ts` holds two timespecs; the empty name is a valid C string.
    check(unsafe { libc::utimensat(fd.as_raw_fd(), c"".as_ptr(), ts.as_ptr(), libc::AT_EMPTY_PATH) }).map(drop)
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`: changes the owner of the inode `fd` refers to; `u32::MAX`
/// (-1) leaves a field unchanged.
pub fn fchown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the empty name is a valid C string; plain syscall on a valid fd.
    check(unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) }).map(drop)
}

/// Links the inode behind `fd` (an `O_PATH` fd) under `name` in `dir`, through its
/// `/proc/self/fd` link (`AT_SYMLINK_FOLLOW` follows the magic link only).
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let (proc_dir, p) = proc_fd(fd)?;
    // SAFETY: both names are NUL-terminated; plain syscall.
    check(unsafe {
        libc::linkat(
            proc_dir.as_raw_fd(),
            p.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

/// An extended-attribute call on the inode behind `fd`, through `/proc/self/fd/N` (the magic
/// link is followed, nothing beyond it). Sizes follow the xattr(7) convention: a zero-length
/// buffer asks for the size.
pub fn fd_getxattr(fd: BorrowedFd<'_>, attr: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    use std::sync::atomic::Ordering;
    let a = cstr(attr)?;
    if !NO_GETXATTRAT.load(Ordering::Relaxed) {
        let (dir, name) = proc_fd(fd)?;
        let args = XattrArgs {
            value: buf.as_mut_ptr() as u64,
            size: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            flags: 0,
        };
        // SAFETY: names are NUL-terminated, `args` points into `buf` for at most its length,
        // and the size passed is `args`'s own.
        let r = unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                0 as libc::c_uint,
                a.as_ptr(),
                &args as *const XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
        NO_GETXATTRAT.store(true, Ordering::Relaxed);
    }
    let p = fd_path(fd, b"")?;
    // SAFETY: `buf` is writable for its length; names are NUL-terminated.
    check_size(unsafe { libc::getxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn fd_listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let p = fd_path(fd, b"")?;
    // SAFETY: `buf` is writable for its length; the path is NUL-terminated.
    check_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn fd_setxattr(fd: BorrowedFd<'_>, attr: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let p = fd_path(fd, b"")?;
    let a = cstr(attr)?;
    // SAFETY: all pointers are valid for the lengths given.
    check(unsafe { libc::setxattr(p.as_ptr(), a.as_ptr(), value.as_ptr().cast(), value.len(), flags) }).map(drop)
}

pub fn fd_removexattr(fd: BorrowedFd<'_>, attr: &[u8]) -> io::Result<()> {
    let p = fd_path(fd, b"")?;
    let a = cstr(attr)?;
    // SAFETY: valid NUL-terminated strings.
    check(unsafe { libc::removexattr(p.as_ptr(), a.as_ptr()) }).map(drop)
}

/// One directory entry as `getdents` gives it.
pub struct RawDirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub d_type: u8,
}

/// Up to `max` entries of the directory `fd` (opened for reading) from position `offset` (0:
/// the start, else a position an earlier call returned), each with the position after it,
/// `.` and `..` included. Positions are the filesystem's own cookies, which stay valid while
/// entries come and go, so a listing read in pieces never skips or repeats an entry that was
/// there throughout.
pub fn read_dir_at(fd: OwnedFd, offset: u64, max: usize) -> io::Result<Vec<(RawDirEntry, u64)>> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an open directory fd we own; fdopendir takes it over on success.
    let dir = unsafe { libc::fdopendir(raw) };
    if dir.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so we still own `raw` and close it once.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    if offset != 0 {
        // SAFETY: `dir` is a valid DIR*; the position is one its own readdir returned.
        unsafe { libc::seekdir(dir, offset as libc::c_long) };
    }
    let mut out = Vec::new();
    let result = loop {
        if out.len() >= max {
            break Ok(());
        }
        // SAFETY: errno is thread-local; reset so a NULL from readdir can be told apart.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is a valid DIR* until closedir below.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let (name, ino, d_type, next) = unsafe {
            (
                CStr::from_ptr((*ent).d_name.as_ptr()).to_bytes(),
                (*ent).d_ino,
                (*ent).d_type,
                (*ent).d_off,
            )
        };
        out.push((
            RawDirEntry {
                name: name.to_vec(),
                ino,
                d_type,
            },
            next as u64,
        ));
    };
    // SAFETY: `dir` came from fdopendir and is closed exactly once.
    unsafe { libc::closedir(dir) };
    result.map(|()| out)
}

/// `pwrite(2)` once; returns how much was written.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is readable for its length.
    check_size(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset as libc::off_t) })
}

/// `lseek(2)`.
pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

/// `copy_file_range(2)` with explicit offsets and flags; returns the bytes copied.
pub fn copy_file_range_flags(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    let mut so = src_off as libc::loff_t;
    let mut d = dst_off as libc::loff_t;
    // SAFETY: the offsets are valid locals the kernel updates; fds are open.
    check_size(
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut so, dst.as_raw_fd(), &mut d, len, flags) }
            as libc::ssize_t,
    )
}

/// Sets the process umask; returns the old one. The mount daemon runs with 0 because the kernel
/// has already applied the caller's umask to every mode it sends.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail and touches no memory.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// `umount2(2)`; `lazy` adds MNT_DETACH.
pub fn umount(path: &std::path::Path, lazy: bool) -> io::Result<()> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is NUL-terminated; plain syscall.
    check(unsafe { libc::umount2(c.as_ptr(), flags) }).map(drop)
}

/// `statvfs` of the file system at `path` (on FUSE, always answered by the daemon).
pub fn statvfs(path: &std::path::Path) -> io::Result<libc::statvfs> {
    let c = cstr(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` a writable buffer read only after success.
    check(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: statvfs succeeded and filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Makes `dst` (0, 1 or 2) refer to what `src` refers to, as dup2(2) does.
pub fn dup_onto(src: BorrowedFd<'_>, dst: RawFd) -> io::Result<()> {
    // SAFETY: `src` is a valid fd; dup2 atomically replaces `dst`, which we own by convention
    // (a standard stream of this process).
    check(unsafe { libc::dup2(src.as_raw_fd(), dst) }).map(drop)
}

/// Raises the limit on open files as far as allowed: the mount holds one fd per inode the
/// kernel has cached. Root may raise the hard limit up to `fs.nr_open`; others get the hard limit.
pub fn raise_nofile_limit() -> u64 {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 0;
    }
    let want = libc::rlimit {
        rlim_cur: nr_open.max(r.rlim_max),
        rlim_max: nr_open.max(r.rlim_max),
    };
    // SAFETY: `want` is a valid rlimit the kernel only reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
        return want.rlim_cur;
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    r.rlim_cur
}

/// `getpid()`.
pub fn getpid() -> u32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() as u32 }
}

/// A file handle (name_to_handle_at(2)): names an inode on its filesystem without holding an
/// fd open. The mount keeps one per inode past its fd budget, so a short handle (ext4's, xfs's
/// and btrfs's are 8 to 20 bytes) is held inline, a longer one on the heap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileHandle {
    /// The filesystem's handle type, the length and the bytes.
    Inline(i32, u8, [u8; HANDLE_INLINE]),
    Heap(i32, Box<[u8]>),
}

const HANDLE_INLINE: usize = 20;
const MAX_HANDLE_SZ: usize = 128;

impl FileHandle {
    pub fn new(ty: i32, bytes: &[u8]) -> FileHandle {
        if bytes.len() <= HANDLE_INLINE {
            let mut a = [0u8; HANDLE_INLINE];
            a[..bytes.len()].copy_from_slice(bytes);
            FileHandle::Inline(ty, bytes.len() as u8, a)
        } else {
            FileHandle::Heap(ty, bytes.into())
        }
    }

    /// The filesystem's handle type.
    pub fn ty(&self) -> i32 {
        match self {
            FileHandle::Inline(t, ..) | FileHandle::Heap(t, _) => *t,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            FileHandle::Inline(_, n, a) => &a[..*n as usize],
            FileHandle::Heap(_, b) => b,
        }
    }
}

/// The file handle of the inode `fd` refers to (an `O_PATH` fd is fine).
pub fn fd_to_handle(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, 4-byte aligned.
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a file_handle with room for MAX_HANDLE_SZ bytes, as handle_bytes says;
    // the empty name is a valid C string.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    check(r)?;
    let len = (buf[0] as usize).min(MAX_HANDLE_SZ);
    // SAFETY: reading the first `len` bytes of the f_handle array the kernel filled.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().add(2).cast::<u8>(), len) };
    Ok(FileHandle::new(buf[1] as i32, bytes))
}

/// Opens the inode a handle names, on the filesystem `mount_fd` is on (needs
/// CAP_DAC_READ_SEARCH). A handle of a deleted inode gives `ESTALE`.
pub fn open_handle(mount_fd: BorrowedFd<'_>, h: &FileHandle, flags: i32) -> io::Result<OwnedFd> {
    let mut buf = [0u32; 2 + MAX_HANDLE_SZ / 4];
    let bytes = h.bytes();
    let len = bytes.len().min(MAX_HANDLE_SZ);
    buf[0] = len as u32;
    buf[1] = h.ty() as u32;
    // SAFETY: copying `len` bytes into the f_handle array, which has MAX_HANDLE_SZ bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_mut_ptr().add(2).cast::<u8>(), len) };
    // SAFETY: `buf` is a valid file_handle; the returned fd is new and ours alone.
    let fd = check(unsafe {
        libc::open_by_handle_at(mount_fd.as_raw_fd(), buf.as_mut_ptr().cast(), flags | libc::O_CLOEXEC)
    })?;
    // SAFETY: `fd` was just returned and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A heap copy of some bytes at a 4 KiB-aligned address, as `O_DIRECT` writes need.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is owned and plain bytes; nothing is shared behind it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// A copy of `data` (which must not be empty).
    pub fn copy_of(data: &[u8]) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(data.len().max(1), Self::ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { std::alloc::alloc(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the new allocation holds at least `data.len()` bytes and does not overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        Ok(AlignedBuf { ptr, layout })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated with `layout` in `copy_of` and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Gives freed heap memory back to the kernel (glibc keeps it otherwise), so a long-running
/// watcher's resident size falls back after each reconcile's peak.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns unused heap pages; it touches no live allocation.
    unsafe { libc::malloc_trim(0) };
}

/// Makes every thread allocate from one glibc arena. glibc gives each thread that allocates
/// its own arena, and the mount's worker threads interleave the inode table's long-lived nodes
/// with short-lived request buffers in each: at a million inodes that left about 80 MB of holes.
/// Called before any thread starts.
pub fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator tunable; no memory is passed or touched.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// `flock(2)` on `fd` (`LOCK_SH`, `LOCK_EX` or `LOCK_UN`); waits for the lock.
pub fn flock(fd: BorrowedFd<'_>, op: i32) -> io::Result<()> {
    loop {
        // SAFETY: flock takes an fd and an integer; no memory is passed.
        match check(unsafe { libc::flock(fd.as_raw_fd(), op) }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r.map(drop),
        }
    }
}

/// The uid of the process at the other end of a unix socket (`SO_PEERCRED`).
pub fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the kernel fills at most
    // `len` bytes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// `fanotify_init(2)`: a notification group reporting directory handles and names.
pub fn fanotify_init(flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = check(unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_CLOEXEC) as u32) })?;
    // SAFETY: `fd` was just returned and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fanotify_mark(2)` adding `mask` to the inode `dir` refers to (no path: the fd itself).
pub fn fanotify_mark_add(group: BorrowedFd<'_>, mask: u64, dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a null pathname makes the kernel mark the object `dir` refers to.
    check(unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            libc::FAN_MARK_ADD,
            mask,
            dir.as_raw_fd(),
            std::ptr::null(),
        )
    })
    .map(|_| ())
}

/// Waits up to `ms` for `fd` to be readable: true when it is.
pub fn poll_readable(fd: BorrowedFd<'_>, ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    match unsafe { libc::poll(&mut p, 1, ms) } {
        -1 => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                Ok(false)
            } else {
                Err(e)
            }
        }
        n => Ok(n > 0),
    }
}

/// `read(2)` into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    check_size(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}
