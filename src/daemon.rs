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

/// The default log file for a mount at `mountpoint`: one per mountpoint, under the temp dir.
pub fn default_log(mountpoint: &Path) -> PathBuf {
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
    std::env::temp_dir().join(format!("mirrorfs{name}.log"))
}

/// Starts the daemon (this program again, same arguments) and waits until its mount is live.
/// Returns its pid.
pub fn spawn(log: &Path) -> Result<u32, DaemonError> {
    let exe = std::env::current_exe().map_err(DaemonError::Spawn)?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let log = std::path::absolute(log).map_err(|e| DaemonError::Log(log.display().to_string(), e))?;
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
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| DaemonError::Log(log.display().to_string(), e))?;
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
