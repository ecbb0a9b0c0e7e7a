//! `FdCache`: what `LocalFs` has opened beneath its root, kept for a short while, keyed by path.
//! `LocalFs` keeps two: the directories it resolved (`O_PATH`), so the steps of a request and the
//! requests that follow in the same directory resolve only their last name instead of walking
//! the whole path again with `openat2`; and the regular files it opened for writing, so the
//! writes that follow to the same file (4 KiB random writes, the pieces of a large one) go
//! through the same fd instead of an open, a stat and a close each.
//!
//! An entry is trusted for `TTL` at most, and closed soon after (`Reaper`), and only while
//! `LocalFs` itself has not moved or removed what is at its path or above it: every rename and
//! rmdir it applies drops the entries at and beneath both paths (`forget_under`), and every
//! unlink and every name it makes drops the file kept at that name (`forget`). A request
//! that fails because a directory on its way is gone is applied once more with every entry
//! dropped (`forget_all`, from the target), so a directory removed or replaced behind the
//! target's back costs one retry, not a wrong answer; `LocalFs` writes a kept file only while
//! it still has a name (`st_nlink`), so one removed or renamed over is opened again by name.
//! What someone else on the target's machine moves elsewhere keeps its cached fd until the entry
//! expires, so for up to `TTL` requests may still land in it where it now is: what can happen
//! to a single `openat2` racing that rename, with a window of `TTL` instead of microseconds. The
//! same goes for a kept file removed behind the target's back while another hard link to it
//! remains, and on NFS for one removed by another process of the target's machine (the client
//! renames an open file to `.nfsXXXX` instead, so it keeps its link).
//! Paths from the peer still never resolve through `..` or a symlink: every directory entry was
//! resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and every file opened from one
//! with `O_NOFOLLOW`.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How long a resolution is trusted.
pub const TTL: Duration = Duration::from_millis(100);

struct Entry {
    fd: Arc<OwnedFd>,
    at: Instant,
}

type Map = Mutex<HashMap<Vec<u8>, Entry>>;

pub struct FdCache {
    map: Arc<Map>,
    /// Most entries kept. A full cache first drops what has expired, and starts over if that
    /// leaves it full (the working set is a few directories and files).
    cap: usize,
    /// Expired entries are closed by the reaper, not left open until their path comes again.
    reaped: bool,
}

/// Closes expired entries of every reaped cache, so nothing stays open much past its `TTL`: a
/// file kept open for writing makes `execve` of it fail (`ETXTBSY`) and keeps a removed file's
/// space, and a kept directory keeps its filesystem busy. One thread for all caches, running
/// only while some cache holds an entry; it wakes every `TTL`, so an fd is closed at most
/// `2 * TTL` after it was opened.
struct Reaper {
    caches: Vec<Weak<Map>>,
    running: bool,
}

static REAPER: Mutex<Reaper> = Mutex::new(Reaper {
    caches: Vec::new(),
    running: false,
});

fn reap() {
    loop {
        std::thread::sleep(TTL);
        let mut r = REAPER.lock();
        let now = Instant::now();
        let mut held = false;
        r.caches.retain(|w| match w.upgrade() {
            Some(map) => {
                let mut map = map.lock();
                map.retain(|_, e| now.saturating_duration_since(e.at) < TTL);
                held |= !map.is_empty();
                true
            }
            None => false,
        });
        if !held {
            r.running = false;
            return;
        }
    }
}

impl FdCache {
    /// A cache whose expired entries stay until their path is used again or the cache fills
    /// (for tests that drive the clock themselves).
    pub fn new(cap: usize) -> FdCache {
        FdCache {
            map: Arc::new(Mutex::new(HashMap::new())),
            cap,
            reaped: false,
        }
    }

    /// A cache whose expired entries are closed within a `TTL` by the reaper thread.
    pub fn reaped(cap: usize) -> FdCache {
        let c = FdCache {
            reaped: true,
            ..FdCache::new(cap)
        };
        REAPER.lock().caches.push(Arc::downgrade(&c.map));
        c
    }

    /// What is at `path` (relative to the root, not empty): from the cache when it was opened
    /// less than `TTL` before `now`, else opened afresh with `resolve`. An expired entry whose
    /// path no longer opens is dropped.
    pub fn get<E>(
        &self,
        path: &[u8],
        now: Instant,
        resolve: impl FnOnce() -> Result<OwnedFd, E>,
    ) -> Result<Arc<OwnedFd>, E> {
        let stale = match self.map.lock().get(path) {
            Some(e) if now.saturating_duration_since(e.at) < TTL => return Ok(e.fd.clone()),
            Some(_) => true,
            None => false,
        };
        match resolve() {
            Ok(fd) => Ok(self.put(path, fd, now)),
            Err(e) => {
                if stale {
                    self.map.lock().remove(path);
                }
                Err(e)
            }
        }
    }

    /// Keeps `fd`, just opened, as what is at `path`.
    fn put(&self, path: &[u8], fd: OwnedFd, now: Instant) -> Arc<OwnedFd> {
        let fd = Arc::new(fd);
        let mut map = self.map.lock();
        if map.len() >= self.cap && !map.contains_key(path) {
            map.retain(|_, e| now.saturating_duration_since(e.at) < TTL);
            if map.len() >= self.cap {
                map.clear();
            }
        }
        map.insert(
            path.to_vec(),
            Entry {
                fd: fd.clone(),
                at: now,
            },
        );
        drop(map);
        if self.reaped {
            let mut r = REAPER.lock();
            if !r.running {
                // Without it, entries stay until their path comes again or the cache fills.
                match std::thread::Builder::new().name("fd-reaper".into()).spawn(reap) {
                    Ok(_) => r.running = true,
                    Err(e) => log::warn!("the fd cache's reaper thread could not start: {e}"),
                }
            }
        }
        fd
    }

    /// Drops `path` only (a name that is not a directory: nothing is cached beneath it).
    pub fn forget(&self, path: &[u8]) {
        let mut map = self.map.lock();
        if !map.is_empty() {
            map.remove(path);
        }
    }

    /// Drops `path` and every entry beneath it (a scan of the whole cache).
    pub fn forget_under(&self, path: &[u8]) {
        let mut map = self.map.lock();
        if map.is_empty() {
            return;
        }
        map.retain(|k, _| !is_under(k, path));
    }

    /// Drops every entry; says whether there were any.
    pub fn forget_all(&self) -> bool {
        let mut map = self.map.lock();
        let had = !map.is_empty();
        map.clear();
        had
    }

    #[cfg(test)]
    fn cached(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<_> = self.map.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

/// Whether `p` is `base` or beneath it (whole components: `ab` is not beneath `a`).
fn is_under(p: &[u8], base: &[u8]) -> bool {
    base.is_empty() || (p.starts_with(base) && (p.len() == base.len() || p[base.len()] == b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io;

    const CAP: usize = 8;

    fn dir() -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(std::fs::File::open("/")?))
    }

    #[test]
    fn under_is_by_whole_components() {
        for (p, base, want) in [
            ("a", "a", true),
            ("a/b", "a", true),
            ("a/b/c", "a/b", true),
            ("ab", "a", false),
            ("ab/c", "a", false),
            ("a", "a/b", false),
            ("b/a", "a", false),
            ("x", "", true),
        ] {
            assert_eq!(is_under(p.as_bytes(), base.as_bytes()), want, "{p} under {base}");
        }
    }

    #[test]
    fn resolves_once_within_the_ttl_and_again_after() {
        let c = FdCache::new(CAP);
        let calls = Cell::new(0);
        let resolve = || {
            calls.set(calls.get() + 1);
            dir()
        };
        let t0 = Instant::now();
        c.get(b"a/b", t0, resolve).unwrap();
        c.get(b"a/b", t0 + TTL / 2, resolve).unwrap();
        assert_eq!(calls.get(), 1, "a second use within the TTL must not resolve again");
        c.get(b"a/b", t0 + TTL, resolve).unwrap();
        assert_eq!(calls.get(), 2, "an expired entry must be resolved again");
    }

    #[test]
    fn forgetting_drops_the_path_and_what_is_beneath_it_only() {
        let c = FdCache::new(CAP);
        let now = Instant::now();
        for p in ["a", "a/b", "a/b/c", "ab", "b/a"] {
            c.get(p.as_bytes(), now, dir).unwrap();
        }
        c.forget_under(b"a/b");
        assert_eq!(c.cached(), vec![b"a".to_vec(), b"ab".to_vec(), b"b/a".to_vec()]);
        c.forget_under(b"a");
        assert_eq!(c.cached(), vec![b"ab".to_vec(), b"b/a".to_vec()]);
    }

    #[test]
    fn forgetting_a_name_drops_that_entry_only() {
        let c = FdCache::new(CAP);
        let now = Instant::now();
        for p in ["a", "a/b"] {
            c.get(p.as_bytes(), now, dir).unwrap();
        }
        c.forget(b"a");
        assert_eq!(c.cached(), vec![b"a/b".to_vec()]);
    }

    #[test]
    fn the_reaper_closes_what_has_expired() {
        let c = FdCache::reaped(CAP);
        c.get(b"a", Instant::now(), dir).unwrap();
        std::thread::sleep(TTL * 2 + Duration::from_millis(100));
        assert!(c.cached().is_empty(), "still open: {:?}", c.cached());
    }

    #[test]
    fn an_expired_entry_whose_path_fails_is_dropped() {
        let c = FdCache::new(CAP);
        let t0 = Instant::now();
        c.get(b"a", t0, dir).unwrap();
        assert!(c
            .get(b"a", t0 + TTL, || Err(io::Error::from_raw_os_error(libc::EACCES)))
            .is_err());
        assert!(c.cached().is_empty());
    }

    #[test]
    fn a_failed_resolution_is_not_cached() {
        let c = FdCache::new(CAP);
        let now = Instant::now();
        assert!(c
            .get(b"x", now, || Err(io::Error::from_raw_os_error(libc::ENOENT)))
            .is_err());
        assert!(c.cached().is_empty());
    }

    #[test]
    fn a_full_cache_drops_what_has_expired_first() {
        let c = FdCache::new(CAP);
        let t0 = Instant::now();
        c.get(b"old", t0, dir).unwrap();
        for i in 1..CAP {
            c.get(format!("d{i}").as_bytes(), t0 + TTL, dir).unwrap();
        }
        c.get(b"one-more", t0 + TTL, dir).unwrap();
        let kept = c.cached();
        assert_eq!(kept.len(), CAP, "only the expired entry goes: {kept:?}");
        assert!(!kept.contains(&b"old".to_vec()));
    }

    #[test]
    fn a_full_cache_starts_over() {
        let c = FdCache::new(CAP);
        let now = Instant::now();
        for i in 0..CAP {
            c.get(format!("d{i}").as_bytes(), now, dir).unwrap();
        }
        assert_eq!(c.cached().len(), CAP);
        c.get(b"one-more", now, dir).unwrap();
        assert_eq!(c.cached(), vec![b"one-more".to_vec()]);
    }
}
