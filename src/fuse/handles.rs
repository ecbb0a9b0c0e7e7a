//! Open file and directory handles of the mount. A file handle is a real fd on the source inode,
//! opened with the caller's flags less those the mount handles itself (`Mirror::open_flags`); it
//! remembers how the kernel serves it (passthrough, cached or direct) so the inode's I/O mode
//! counts can be given back at release. Directories have no handles (see `Ops::opendir`).

use super::inodes::Inode;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
