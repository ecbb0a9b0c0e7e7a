//! Sessions: how a source and a target recognise each other across reconnects, and how a newer
//! session fences an older one. It is DRBD's generation identifier and epoch, kept on the
//! target root as one extended attribute (`user.mirrorfs.session`: a 16-byte generation made at
//! the first session, then a little-endian `u64` epoch), never as a file that the mirror would
//! show.
//!
//! - `claim` starts a session: under an exclusive `flock` of the root it reads the record, bumps
//!   the epoch and writes it back, and reports what it found (`Claim`).
//! - `enter` is taken around every mutating request of a session: under a shared `flock` it
//!   checks that the record still holds the session's epoch. Once a newer session has claimed
//!   the root, an older one (a connection that a network cut left open, another `serve --stdio`
//!   process) can apply nothing more: its requests fail with a "fenced" error, and the server
//!   closes that connection.
//! - `resume` is the pure decision a reconnecting source makes from its last claim and the new
//!   one: catch up on the changed paths only, reconcile the whole tree (the target was replaced,
//!   restored or changed by someone else), or refuse (an empty root that lost its record: a
//!   removable disk that is not mounted, whose mountpoint must not be filled).
//!
//! Names under `user.mirrorfs.` are the mirror's own: scans leave them out on both sides and a
//! target refuses to set or remove them on a source's behalf.

use crate::fs::FsError;
use crate::path::RelPath;
use crate::sys;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// The record of sessions on a target root.
pub const SESSION_XATTR: &[u8] = b"user.mirrorfs.session";
/// Extended attributes that belong to mirrorfs, not to the tree being mirrored.
pub const RESERVED_XATTR_PREFIX: &[u8] = b"user.mirrorfs.";
/// The `op` of the error a fenced request gets.
pub const FENCED_OP: &str = "fence";

pub fn is_reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(RESERVED_XATTR_PREFIX)
}

/// True for the error of a request refused because a newer session took the target over.
pub fn is_fenced(e: &FsError) -> bool {
    e.op == FENCED_OP
}

/// What a target root said when a session claimed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Made at the root's first session. `None` where the target's file system keeps no
    /// extended attributes: there is then no fencing, and every reconnect reconciles the whole
    /// tree.
    pub generation: Option<[u8; 16]>,
    /// The epoch found before this claim; 0 when the root had no record.
    pub prev_epoch: u64,
    /// This session's epoch.
    pub epoch: u64,
    /// Device and inode of the root directory.
    pub dev: u64,
    pub ino: u64,
    /// The root held no entries.
    pub empty: bool,
    /// The root is empty and has no record while the source expected one: nothing was written
    /// (it looks like the mountpoint of a disk that is not mounted).
    pub vacant: bool,
}

impl Claim {
    /// The root had no record before this claim (its first session, or it lost the record).
    pub fn fresh(&self) -> bool {
        self.prev_epoch == 0
    }
}

/// How a source that reconnects goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The target is the one it left: reconcile the paths that changed meanwhile.
    Changed,
    /// Reconcile the whole tree, for this reason.
    Whole(String),
    /// Leave the target alone and stay disconnected, for this reason.
    Refuse(String),
}

/// The decision of a source whose last session on this target was `last`, now claimed `now`.
pub fn resume(last: &Claim, now: &Claim) -> Resume {
    if now.vacant {
        return Resume::Refuse(
            "the target directory is empty and has lost its session record: is its disk mounted? \
             Nothing is written beneath it until it is back (or mount again to start afresh)"
                .into(),
        );
    }
    let Some(gen) = now.generation else {
        return Resume::Whole("the target keeps no session record (its file system has no user xattrs)".into());
    };
    if now.fresh() && now.empty {
        return Resume::Refuse(
            "the target directory is empty and has lost its session record: is its disk mounted? \
             Nothing is written to what lies beneath until it is back (or remount to start afresh)"
                .into(),
        );
    }
    if (now.dev, now.ino) != (last.dev, last.ino) {
        return Resume::Whole(if now.dev != last.dev {
            "the target directory is on another device than before".into()
        } else {
            "the target directory was replaced by another one".into()
        });
    }
    if last.generation != Some(gen) {
        return Resume::Whole("the target is another copy than before".into());
    }
    if now.prev_epoch != last.epoch {
        return Resume::Whole(format!(
            "the target was changed by another session or restored from an older state (epoch {} where {} was left)",
            now.prev_epoch, last.epoch
        ));
    }
    Resume::Changed
}

fn read_record(dir: BorrowedFd<'_>) -> io::Result<Option<([u8; 16], u64)>> {
    let mut buf = [0u8; 24];
    match sys::fd_getxattr(dir, SESSION_XATTR, &mut buf) {
        Ok(24) => {
            let mut gen = [0u8; 16];
            gen.copy_from_slice(&buf[..16]);
            let mut e = [0u8; 8];
            e.copy_from_slice(&buf[16..]);
            Ok(Some((gen, u64::from_le_bytes(e))))
        }
        // A record of another shape is no record: the next claim writes a good one.
        Ok(_) => Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ERANGE)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOSYS))
}

/// Unlocks on drop.
struct Locked<'a>(BorrowedFd<'a>);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = sys::flock(self.0, libc::LOCK_UN);
    }
}

fn lock(dir: BorrowedFd<'_>, op: i32) -> io::Result<Locked<'_>> {
    sys::flock(dir, op)?;
    Ok(Locked(dir))
}

/// Claims the root open as `dir` (a directory opened for reading: it is locked with `flock`).
/// `known` is the generation the claiming source last saw here: an empty root without a record
/// is then left untouched (`vacant`), so a mountpoint whose disk is gone is never taken for the
/// target.
pub fn claim(dir: BorrowedFd<'_>, known: Option<[u8; 16]>) -> io::Result<Claim> {
    let st = sys::fstat(dir)?;
    let empty = sys::read_dir_names(sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?)?.is_empty();
    let mut c = Claim {
        generation: None,
        prev_epoch: 0,
        epoch: 0,
        dev: st.st_dev,
        ino: st.st_ino,
        empty,
        vacant: false,
    };
    let _l = lock(dir, libc::LOCK_EX)?;
    let found = match read_record(dir) {
        Ok(r) => r,
        Err(e) if unsupported(&e) => return Ok(c),
        Err(e) => return Err(e),
    };
    let (gen, prev) = match found {
        Some(r) => r,
        None if empty && known.is_some() => {
            c.vacant = true;
            return Ok(c);
        }
        None => {
            let mut g = [0u8; 16];
            g.copy_from_slice(&crate::transport::auth::nonce()?[..16]);
            (g, 0)
        }
    };
    let epoch = prev + 1;
    let mut rec = [0u8; 24];
    rec[..16].copy_from_slice(&gen);
    rec[16..].copy_from_slice(&epoch.to_le_bytes());
    match sys::fd_setxattr(dir, SESSION_XATTR, &rec, 0) {
        Ok(()) => {}
        Err(e) if unsupported(&e) => return Ok(c),
        Err(e) => return Err(e),
    }
    c.generation = Some(gen);
    c.prev_epoch = prev;
    c.epoch = epoch;
    Ok(c)
}

/// Held while one request of the session with `epoch` applies: a claim waits for it.
pub struct Fence<'a> {
    _lock: Locked<'a>,
}

/// Enters the fence of the session with `epoch` on the root open as `dir`; fails with the
/// fenced error once a newer session has claimed the root.
pub fn enter(dir: BorrowedFd<'_>, epoch: u64) -> Result<Fence<'_>, FsError> {
    let root = RelPath::root();
    let l = lock(dir, libc::LOCK_SH).map_err(|e| FsError::io(e, "flock", &root))?;
    match read_record(dir.as_fd()) {
        Ok(Some((_, e))) if e == epoch => Ok(Fence { _lock: l }),
        Ok(found) => Err(FsError::msg(
            libc::ESTALE,
            FENCED_OP,
            &root,
            format!(
                "a newer session took this target over (epoch {} after ours, {epoch}); this connection applies nothing more",
                found.map(|f| f.1).unwrap_or(0)
            ),
        )),
        Err(e) => Err(FsError::io(e, FENCED_OP, &root)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_at(gen: Option<u8>, prev: u64, dev: u64, ino: u64, empty: bool) -> Claim {
        Claim {
            generation: gen.map(|g| [g; 16]),
            prev_epoch: prev,
            epoch: prev + 1,
            dev,
            ino,
            empty,
            vacant: false,
        }
    }

    #[test]
    fn how_a_reconnecting_source_resumes() {
        let last = claim_at(Some(1), 4, 10, 100, false);
        // (claim now, expected decision: 'c' changed, 'w' whole, 'r' refuse)
        let table = [
            (claim_at(Some(1), 5, 10, 100, false), 'c'),
            // The same target, with the session record still ours but the tree emptied: only
            // the record can tell, and it says nothing changed.
            (claim_at(Some(1), 5, 10, 100, true), 'c'),
            // Another session claimed it meanwhile, or an old backup was restored in place.
            (claim_at(Some(1), 3, 10, 100, false), 'w'),
            (claim_at(Some(1), 9, 10, 100, false), 'w'),
            // Another copy, another directory, another disk.
            (claim_at(Some(2), 5, 10, 100, false), 'w'),
            (claim_at(Some(1), 5, 10, 101, false), 'w'),
            (claim_at(Some(1), 5, 11, 100, false), 'w'),
            // A copy without the record, holding files: reconciled whole.
            (claim_at(Some(3), 0, 10, 100, false), 'w'),
            // No xattrs on the target's file system: no way to know.
            (claim_at(None, 0, 10, 100, false), 'w'),
            // An empty directory that lost its record: an unmounted disk's mountpoint.
            (claim_at(Some(3), 0, 12, 7, true), 'r'),
            (claim_at(Some(3), 0, 10, 100, true), 'r'),
            (
                Claim {
                    vacant: true,
                    ..claim_at(None, 0, 12, 7, true)
                },
                'r',
            ),
        ];
        for (now, want) in table {
            let got = match resume(&last, &now) {
                Resume::Changed => 'c',
                Resume::Whole(_) => 'w',
                Resume::Refuse(_) => 'r',
            };
            assert_eq!(got, want, "claim {now:?}");
        }
    }

    #[test]
    fn a_claim_fences_the_sessions_before_it() {
        let d = tempfile::tempdir().unwrap();
        let open = || std::fs::File::open(d.path()).unwrap();
        let (a, b) = (open(), open());
        let first = claim(a.as_fd(), None).unwrap();
        assert!(first.generation.is_some(), "tmp dirs here keep user xattrs");
        assert!(first.fresh() && first.empty);
        assert!(enter(a.as_fd(), first.epoch).is_ok());
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let second = claim(b.as_fd(), first.generation).unwrap();
        assert_eq!(second.generation, first.generation);
        assert_eq!(second.prev_epoch, first.epoch);
        assert!(!second.empty);
        let e = enter(a.as_fd(), first.epoch)
            .err()
            .expect("the older session is fenced");
        assert!(is_fenced(&e), "{e}");
        assert!(enter(b.as_fd(), second.epoch).is_ok());
        assert_eq!(resume(&first, &second), Resume::Changed);

        // An empty directory without a record, where a source expected its target: left alone.
        let e = tempfile::tempdir().unwrap();
        let c = claim(std::fs::File::open(e.path()).unwrap().as_fd(), first.generation).unwrap();
        assert!(c.vacant);
        assert!(matches!(resume(&first, &c), Resume::Refuse(_)));
        let mut buf = [0u8; 64];
        assert!(
            sys::fd_getxattr(std::fs::File::open(e.path()).unwrap().as_fd(), SESSION_XATTR, &mut buf).is_err(),
            "nothing was written"
        );
    }
}
