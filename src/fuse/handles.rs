//! Open file and directory handles of the mount. A file handle is a real fd on the source inode,
//! opened with the caller's flags less those the mount handles itself (`mirror::open_flags`); it
//! remembers how the kernel serves it (passthrough, cached or direct) so the inode's I/O mode
//! counts can be given back at release. A directory handle is the open directory and its listing,
//! read at the first `readdir`: a directory whose listing the kernel keeps (see `fuse::cache`)
//! is opened and released without being read.

use super::inodes::Inode;
use crate::sys::RawDirEntry;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Reads and writes go through the daemon and the page cache.
    Cached,
    /// The kernel reads the backing file itself.
    Passthrough,
}

pub struct FileHandle {
    pub inode: Arc<Inode>,
    pub fd: OwnedFd,
    pub writable: bool,
    pub served: Served,
    /// A writable open that the kernel serves by passthrough (the inode was already open for
    /// passthrough reads, and the kernel allows no other kind of open beside them): its writes
    /// bypass the daemon, so the whole file is sent to the target at flush, fsync and release.
    pub push_at_close: bool,
    /// Keeps the kernel's backing id alive while this passthrough handle is open.
    pub backing: Option<Arc<fuser::BackingId>>,
    /// The version of the file (size, mtime, ctime) the last push sent: flush and release of
    /// an unchanged file send nothing again.
    pub pushed: parking_lot::Mutex<Option<Version>>,
}

/// What tells one content of a file from another, short of reading it.
pub type Version = (i64, i64, i64, i64, i64);

pub fn version(st: &libc::stat) -> Version {
    (st.st_size, st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec)
}

pub struct DirHandle {
    /// Taken by the first `readdir`, which reads the listing from it.
    fd: Mutex<Option<OwnedFd>>,
    listing: OnceLock<Vec<RawDirEntry>>,
}

impl DirHandle {
    pub fn new(fd: OwnedFd) -> DirHandle {
        DirHandle {
            fd: Mutex::new(Some(fd)),
            listing: OnceLock::new(),
        }
    }

    /// The directory's entries, read once, at the first call.
    pub fn entries(&self) -> io::Result<&[RawDirEntry]> {
        if let Some(l) = self.listing.get() {
            return Ok(l);
        }
        let mut fd = self.fd.lock();
        if let Some(l) = self.listing.get() {
            return Ok(l);
        }
        // A listing that failed to be read took the fd with it: the handle stays unreadable.
        let fd = fd.take().ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let list = crate::sys::read_dir_entries(fd)?;
        Ok(self.listing.get_or_init(|| list))
    }
}

pub struct Handles<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for Handles<T> {
    fn default() -> Self {
        Handles {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> Handles<T> {
    pub fn insert(&self, h: T) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.lock().insert(id, Arc::new(h));
        id
    }

    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.map.lock().get(&id).cloned()
    }

    pub fn remove(&self, id: u64) -> Option<Arc<T>> {
        self.map.lock().remove(&id)
    }
}
