//! Leaving a daemon behind: `mirrorfs mount` without `--foreground` starts itself again as a
//! child in its own process group and waits until that child says the mount is live (a `READY`
//! line on a pipe that is the child's stdout) or dies. Until then the child's stderr is the
//! user's terminal, so the startup walk's progress and any error are seen where the command was
//! typed; from then on the child writes its log to a file, whose path the parent prints.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set in the child's environment to the log file's path.
pub const DAEMON_ENV: &str = "MIRRORFS_DAEMON_LOG";

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the mount daemon: {0}")]
    Spawn(std::io::Error),
    #[error("the mount daemon stopped ({0}) before the mount was live; its messages are above")]
    Died(String),
    #[error("log file {0}: {1}")]
    Log(String, std::io::Error),
}

/// The log grows to this size, then is renamed to `<log>.1` (replacing the one before) and
/// started afresh: at most twice this on disk.
pub const LOG_CAP: u64 = 16 << 20;

/// The directory of the daemons' logs: `/var/log/mirrorfs` for root, else
/// `$XDG_STATE_HOME/mirrorfs` (`~/.local/state/mirrorfs`). Only its owner can enter it.
pub fn log_dir() -> PathBuf {
    if crate::sys::geteuid() == 0 {
        return PathBuf::from("/var/log/mirrorfs");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("mirrorfs"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".local/state/mirrorfs"),
    }
}

/// The default log file for a mount at `mountpoint`: one per mountpoint, in `log_dir`.
pub fn default_log(mountpoint: &Path) -> Result<PathBuf, DaemonError> {
    let abs = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let name: String = abs
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = log_dir();
    crate::control::ensure_private_dir(&dir).map_err(|e| DaemonError::Log(dir.display().to_string(), e))?;
    Ok(dir.join(format!("mount{name}.log")))
}

/// Opens a log for appending: made 0600, never through a symlink, and only a regular file of
/// ours.
fn open_log(log: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |e| DaemonError::Log(log.display().to_string(), e);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(log)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                err(std::io::Error::other(
                    "is a symlink; a log is never written through one",
                ))
            } else {
                err(e)
            }
        })?;
    let m = f.metadata().map_err(err)?;
    if !m.is_file() {
        return Err(err(std::io::Error::other("is not a regular file")));
    }
    if m.uid() != crate::sys::geteuid() {
        return Err(err(std::io::Error::other(format!(
            "belongs to uid {}, not to us",
            m.uid()
        ))));
    }
    Ok(f)
}

/// Starts the daemon (this program again, same arguments) and waits until its mount is live.
/// Returns its pid.
pub fn spawn(log: &Path) -> Result<u32, DaemonError> {
    let exe = std::env::current_exe().map_err(DaemonError::Spawn)?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let log = std::path::absolute(log).map_err(|e| DaemonError::Log(log.display().to_string(), e))?;
    // Checked (and made) before anything is mounted; the daemon opens it again the same way.
    drop(open_log(&log)?);
    let mut child = Command::new(exe)
        .args(args)
        .env(DAEMON_ENV, &log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(DaemonError::Spawn)?;
    let out = child.stdout.take().ok_or_else(|| DaemonError::Died("no pipe".into()))?;
    let mut line = String::new();
    let _ = BufReader::new(out).read_line(&mut line);
    if line.trim() == "READY" {
        return Ok(child.id());
    }
    let status = child.wait().map_err(DaemonError::Spawn)?;
    Err(DaemonError::Died(status.to_string()))
}

/// In the daemon: tells the waiting parent the mount is live, then sends stdout to /dev/null
/// and stderr (the log) to `log`.
pub fn ready(log: &Path) -> Result<(), DaemonError> {
    let f = open_log(log)?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| DaemonError::Log("/dev/null".into(), e))?;
    crate::sys::dup_onto(null.as_fd(), 1).map_err(|e| DaemonError::Log("stdout".into(), e))?;
    crate::sys::dup_onto(f.as_fd(), 2).map_err(|e| DaemonError::Log(log.display().to_string(), e))?;
    Ok(())
}

/// Keeps the log (the daemon's stderr) under `LOG_CAP`: checked every few seconds, renamed to
/// `<log>.1` and started afresh when past it.
pub fn cap_log(log: PathBuf) {
    let spawned = std::thread::Builder::new().name("log-cap".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(5));
        let big = std::fs::metadata(&log).map(|m| m.len() > LOG_CAP).unwrap_or(false);
        if !big {
            continue;
        }
        let mut old = log.clone().into_os_string();
        old.push(".1");
        if std::fs::rename(&log, &old).is_err() {
            continue;
        }
        match open_log(&log) {
            Ok(f) => {
                let _ = crate::sys::dup_onto(f.as_fd(), 2);
                log::info!("log started afresh; the one before is {}", Path::new(&old).display());
            }
            Err(e) => log::error!("{e}"),
        }
    });
    if let Err(e) = spawned {
        log::warn!("no log size cap: {e}");
    }
}
