//! Control: every running mirror (a mount's daemon, a `watch`) answers `mirrorfs status` on a
//! unix socket of its own, `<dir>/<pid>.sock`, in a directory only its user can enter
//! (`$XDG_RUNTIME_DIR/mirrorfs`, else `/run/mirrorfs` for root, else `/tmp/mirrorfs-<uid>`).
//! The socket is mode 0600 and a peer of another uid is turned away (`SO_PEERCRED`). A client
//! sends one line: `status` gets one line of JSON (`MirrorStatus`) and the end of the stream;
//! `wait` gets, when the mirror ends, one line of JSON (`Farewell`: its exit code and closing
//! summary), which is how `mirrorfs umount` reports the daemon's verdict. Answering takes only
//! the link's short-held locks, never the order lock, so `status` never waits behind a blocked
//! or slow mutation.

#[cfg(test)]
use crate::source::link::rfc3339;
use crate::source::link::{LinkState, LinkStatus};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
#[cfg(test)]
use std::time::SystemTime;

/// What `status` shows of one mirror; the JSON keys are part of the interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MirrorStatus {
    /// "mount" or "watch".
    pub kind: String,
    pub pid: u32,
    pub source: String,
    /// `None` for a watch.
    pub mountpoint: Option<String>,
    /// When a mount's writes return, as the kernel agreed (`syscall` or `fsync`, see `--ack`);
    /// `None` for a watch.
    #[serde(default)]
    pub ack: Option<String>,
    /// The target's own figures: `target`, `state`, `since`, `forwarded_ops`, …
    #[serde(flatten)]
    pub link: LinkStatus,
}

impl MirrorStatus {
    pub fn from_link(kind: &str, source: &Path, mountpoint: Option<&Path>, link: LinkStatus) -> MirrorStatus {
        MirrorStatus {
            kind: kind.into(),
            pid: std::process::id(),
            source: source.display().to_string(),
            mountpoint: mountpoint.map(|m| m.display().to_string()),
            ack: None,
            link,
        }
    }

    pub fn with_ack(mut self, ack: &str) -> MirrorStatus {
        self.ack = Some(ack.into());
        self
    }

    pub fn connected(&self) -> bool {
        self.link.state == LinkState::Connected.name()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control directory {0}: {1}")]
    Dir(String, String),
    #[error("control socket {0}: {1}")]
    Socket(String, std::io::Error),
}

/// The directory holding this user's control sockets.
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("mirrorfs");
    }
    let uid = crate::sys::geteuid();
    if uid == 0 {
        PathBuf::from("/run/mirrorfs")
    } else {
        PathBuf::from(format!("/tmp/mirrorfs-{uid}"))
    }
}

/// Makes the directory (mode 0700) or checks that an existing one is ours and closed to others.
fn ensure_dir(d: &Path) -> Result<(), ControlError> {
    ensure_private_dir(d).map_err(|e| ControlError::Dir(d.display().to_string(), e.to_string()))
}

/// Makes `d` (and its parents) with mode 0700 from the start, or checks that an existing `d` is
/// a real directory of ours, and closes it to others.
pub fn ensure_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = d.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(d)?;
            if !m.is_dir() {
                return Err(std::io::Error::other("exists and is not a directory"));
            }
            if m.uid() != crate::sys::geteuid() {
                return Err(std::io::Error::other(format!("belongs to uid {}, not to us", m.uid())));
            }
            if m.mode() & 0o077 != 0 {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What a mirror says as it ends, to those who asked to `wait`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Farewell {
    pub code: u8,
    pub summary: String,
}

/// A mirror's control socket, removed when dropped.
pub struct Control {
    path: PathBuf,
    waiters: std::sync::Arc<parking_lot::Mutex<Vec<UnixStream>>>,
}

impl Control {
    /// Tells everyone waiting how the mirror ended.
    pub fn farewell(&self, f: &Farewell) {
        let Ok(mut line) = serde_json::to_string(f) else { return };
        line.push('\n');
        for mut s in self.waiters.lock().drain(..) {
            let _ = s.write_all(line.as_bytes());
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn socket_of(pid: u32) -> PathBuf {
    dir().join(format!("{pid}.sock"))
}

/// Starts answering `status` on this process's control socket with what `report` says.
pub fn serve(report: impl Fn() -> MirrorStatus + Send + 'static) -> Result<Control, ControlError> {
    let d = dir();
    ensure_dir(&d)?;
    let path = socket_of(std::process::id());
    let _ = std::fs::remove_file(&path);
    let lis = UnixListener::bind(&path).map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let me = crate::sys::geteuid();
    let waiters = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let w = waiters.clone();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for s in lis.incoming() {
                let Ok(mut s) = s else { continue };
                match crate::sys::peer_uid(s.as_fd()) {
                    Ok(uid) if uid == me || uid == 0 => {}
                    _ => continue,
                }
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut cmd = String::new();
                let Ok(r) = s.try_clone() else { continue };
                if BufReader::new(r.take(64)).read_line(&mut cmd).is_err() {
                    continue;
                }
                match cmd.trim() {
                    "wait" => w.lock().push(s),
                    _ => {
                        if let Ok(mut line) = serde_json::to_string(&report()) {
                            line.push('\n');
                            let _ = s.write_all(line.as_bytes());
                        }
                    }
                }
            }
        })
        .map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
    Ok(Control { path, waiters })
}

/// Asks every running mirror of this user for its status. Sockets nobody answers on (left by
/// a killed process) are removed.
pub fn query_all() -> Result<Vec<MirrorStatus>, ControlError> {
    let d = dir();
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ControlError::Dir(d.display().to_string(), e.to_string())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "sock") {
            continue;
        }
        match UnixStream::connect(&p) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"status\n");
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() {
                    if let Ok(st) = serde_json::from_str::<MirrorStatus>(&line) {
                        out.push(st);
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                let _ = std::fs::remove_file(&p);
            }
            Err(_) => {}
        }
    }
    out.sort_by(|a, b| (&a.source, a.pid).cmp(&(&b.source, b.pid)));
    Ok(out)
}

/// Asks the mirror with `pid` to tell how it ends; `Waiter::farewell` then blocks until it has.
pub fn wait_for(pid: u32) -> std::io::Result<Waiter> {
    let mut s = UnixStream::connect(socket_of(pid))?;
    s.write_all(b"wait\n")?;
    Ok(Waiter(s))
}

pub struct Waiter(UnixStream);

impl Waiter {
    /// The mirror's last word, or `None` if it ended without one (killed) or `limit` passed.
    pub fn farewell(self, limit: Duration) -> Option<Farewell> {
        let _ = self.0.set_read_timeout(Some(limit));
        let mut line = String::new();
        BufReader::new(self.0).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_212_800), "2026-12-02T12:00:00Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
