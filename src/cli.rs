//! Command-line definitions (clap) and the checks of flag values that belong to the CLI: target
//! endpoints parsed, directories checked, a directory never synced into itself. `main.rs` runs
//! the commands.

use crate::transport::Endpoint;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "mirrorfs",
    version,
    about = "Keep a directory mirrored, exactly and at once, in another directory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One-shot reconcile: make the target an exact mirror of SRC, writing only what differs.
    Sync(SyncArgs),
    /// List every difference between SRC and the target; exit 1 if there is any.
    Verify(TargetArgs),
    /// Run the target side: apply requests beneath DIR.
    Serve(ServeArgs),
    /// Reconcile the target, then mount SRC (over itself, or at MOUNTPOINT) and replicate
    /// every change made through the mount before the syscall returns.
    Mount(MountArgs),
    /// Unmount a mirrorfs mount; the daemon finishes and exits.
    Umount(UmountArgs),
    /// Reconcile, then watch SRC (inotify, no FUSE needed) and keep the target mirrored until
    /// SIGINT or SIGTERM.
    Watch(WatchArgs),
    /// Show every running mirror of this user (mounts and watches), or the one at PATH. Exit
    /// 0 when every one listed is connected, 1 otherwise, 2 on an error, 3 when none runs.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A mountpoint or source directory: show only the mirror of it.
    pub path: Option<PathBuf>,
    /// One JSON object with a `mounts` array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Quiet time, in milliseconds, after the last event of a burst before reconciling; 0
    /// answers the first event at once and gathers what arrives during that reconcile.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub debounce_ms: u64,
    /// Seconds between rescans of what no watch covers (after the inotify watch limit is hit).
    #[arg(long, default_value_t = 2.0, value_parser = positive_secs)]
    pub rescan_secs: f64,
    /// Allow an empty source to empty a non-empty target.
    #[arg(long)]
    pub allow_mass_delete: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// The source directory.
    pub src: PathBuf,
    /// Where to mount; SRC itself when left out.
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub reach: Reach,
    /// Stay in the foreground (for systemd and tests) instead of leaving a daemon.
    #[arg(long, short)]
    pub foreground: bool,
    /// What mutating syscalls meet while the target is away: continue (succeed at the source,
    /// caught up later), block (wait until the target is back and caught up), fail (EIO, the
    /// source left unchanged).
    #[arg(long, default_value = "continue", value_parser = clap::value_parser!(crate::source::Policy))]
    pub on_disconnect: crate::source::Policy,
    /// When a write returns: syscall (once the target has its bytes), or fsync (from the page
    /// cache; fsync and close return once the target has the file). Every other change returns
    /// once the target has it, in both.
    #[arg(long, default_value = "syscall", value_parser = clap::value_parser!(crate::fuse::Ack))]
    pub ack: crate::fuse::Ack,
    /// Where the daemon writes its log (default: a file under the temp directory).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Serve reads through the daemon even where the kernel offers passthrough.
    #[arg(long)]
    pub no_passthrough: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Allow an empty source to empty a non-empty target at the startup walk.
    #[arg(long)]
    pub allow_mass_delete: bool,
    /// Do not watch the source for changes made behind the mount's back (by processes that
    /// held it open before the mount, or anyone when mounted elsewhere).
    #[arg(long)]
    pub no_watch: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// The mountpoint.
    pub path: PathBuf,
    /// Detach now even if files are still open inside (umount -l).
    #[arg(long, short)]
    pub lazy: bool,
    /// Seconds to wait for the daemon's closing summary after the unmount (its last catch-up
    /// is bounded by its own --timeout).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub wait_secs: u64,
}

/// Where the target is and how to reach it: the options every command with a target shares.
#[derive(Args, Debug, Clone)]
pub struct Reach {
    /// Target: a local DIR, unix:SOCKET, tcp:HOST:PORT, ssh://[USER@]HOST[:PORT]/PATH, or
    /// [USER@]HOST:PATH (rsync's form; a relative PATH starts in the remote home).
    #[arg(long, short)]
    pub target: String,
    /// File holding the shared token for a tcp target.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The ssh command for ssh targets, with options of its own, which win over the ones
    /// mirrorfs adds (like rsync's -e), for example "ssh -F ./cfg -i key".
    #[arg(long, env = "MIRRORFS_SSH")]
    pub ssh: Option<String>,
    /// The mirrorfs command on the far side of an ssh target (like rsync's --rsync-path);
    /// by default `mirrorfs` on the far PATH.
    #[arg(long)]
    pub remote_mirrorfs: Option<String>,
    /// An option for the far side's `serve` of an ssh target, like rsync's -M (repeatable):
    /// --remote-option=--fake-super.
    #[arg(long, allow_hyphen_values = true)]
    pub remote_option: Vec<String>,
    /// Seconds without progress from the target before it counts as lost (at start: before
    /// giving up).
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs)]
    pub timeout: f64,
}

impl Reach {
    pub fn limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout)
    }

    /// The connector for the checked endpoint `ep` (see `check_target`).
    pub fn connector(
        &self,
        ep: Endpoint,
        local: crate::transport::LocalMode,
    ) -> Result<crate::transport::Connector, String> {
        let shown = ep.to_string();
        let mut ssh = crate::transport::ssh::SshOptions::new(self.ssh.as_deref(), self.remote_mirrorfs.as_deref())?;
        ssh.remote_options = self.remote_option.clone();
        Ok(
            crate::transport::Connector::new(ep, self.token_file.as_deref(), Some(self.limit()), local)
                .map_err(|e| format!("target {shown}: {e}"))?
                .with_ssh(ssh),
        )
    }
}

#[derive(Args, Debug)]
pub struct TargetArgs {
    /// The source directory.
    pub src: PathBuf,
    #[command(flatten)]
    pub reach: Reach,
    /// No progress bar and no summary.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Compare content hashes instead of size and modification time.
    #[arg(long, short)]
    pub checksum: bool,
    /// Allow an empty source to empty a non-empty target.
    #[arg(long)]
    pub allow_mass_delete: bool,
    /// The source was written by `serve --fake-super`: restore what its records say (owners,
    /// modes, device nodes, symlinks).
    #[arg(long)]
    pub fake_super: bool,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["listen", "stdio"])))]
pub struct ServeArgs {
    /// The target directory; must exist.
    pub dir: PathBuf,
    /// unix:PATH or tcp:HOST:PORT. TCP off loopback requires --token-file.
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve one connection on standard input and output (for ssh).
    #[arg(long)]
    pub stdio: bool,
    /// File holding the shared token clients must prove they know.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Without root: keep owners, full modes and device nodes (and symlinks and special files,
    /// as regular files) in `user.mirrorfs.stat` records, as rsync's --fake-super does.
    #[arg(long)]
    pub fake_super: bool,
}

/// A source directory, checked.
pub fn check_source(src: &Path) -> Result<PathBuf, String> {
    let meta = std::fs::metadata(src).map_err(|e| format!("source {}: {e}", src.display()))?;
    if !meta.is_dir() {
        return Err(format!("source {} is not a directory", src.display()));
    }
    std::fs::canonicalize(src).map_err(|e| format!("source {}: {e}", src.display()))
}

/// Parses the target; a local one must be an existing directory that neither contains the
/// source nor lies inside it, and comes back as an absolute path.
pub fn check_target(target: &str, src: &Path) -> Result<Endpoint, String> {
    let ep = Endpoint::parse(target).map_err(|e| e.to_string())?;
    if let Endpoint::Local(dir) = &ep {
        let meta = std::fs::metadata(dir).map_err(|e| format!("target {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("target {} is not a directory", dir.display()));
        }
        let t = std::fs::canonicalize(dir).map_err(|e| format!("target {}: {e}", dir.display()))?;
        check_nesting(&t, src)?;
        // Absolute: every later session opens it again, from whatever the working directory is
        // by then (the daemon's is /).
        return Ok(Endpoint::Local(t));
    }
    Ok(ep)
}

/// Like rsync, `sync` makes a local target directory that does not exist yet, when its parent
/// does; the same checks as for an existing one come first. Returns the directory it made.
pub fn create_missing_target(target: &str, src: &Path) -> Result<Option<PathBuf>, String> {
    let Ok(Endpoint::Local(dir)) = Endpoint::parse(target) else {
        return Ok(None);
    };
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => return Ok(None),
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(None);
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let parent = std::fs::canonicalize(parent).map_err(|e| format!("target {}: {e}", dir.display()))?;
    check_nesting(&parent.join(name), src)?;
    std::fs::create_dir(&dir).map_err(|e| format!("creating target {}: {e}", dir.display()))?;
    Ok(Some(dir))
}

/// Refuses a target that is the source, lies inside it, or contains it.
fn check_nesting(t: &Path, src: &Path) -> Result<(), String> {
    if t == src {
        return Err(format!("source and target are the same directory ({})", t.display()));
    }
    if t.starts_with(src) {
        return Err(format!(
            "target {} lies inside the source {}; that would sync a directory into itself",
            t.display(),
            src.display()
        ));
    }
    if src.starts_with(t) {
        return Err(format!(
            "source {} lies inside the target {}; the sync would delete or overwrite its own source",
            src.display(),
            t.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("inner")).unwrap();
        let src = check_source(&src).unwrap();
        let inner = src.join("inner");
        assert!(check_target(inner.to_str().unwrap(), &src)
            .unwrap_err()
            .contains("inside the source"));
        assert!(check_target(d.path().to_str().unwrap(), &src)
            .unwrap_err()
            .contains("inside the target"));
        assert!(check_target(src.to_str().unwrap(), &src)
            .unwrap_err()
            .contains("same directory"));
        std::fs::create_dir(d.path().join("other")).unwrap();
        assert!(check_target(d.path().join("other").to_str().unwrap(), &src).is_ok());
        assert!(check_target("tcp:nohost", &src).is_err());
        assert!(check_target(d.path().join("missing").to_str().unwrap(), &src).is_err());
        // A missing target is made only where an existing one would be accepted.
        let new_inner = src.join("new");
        assert!(create_missing_target(new_inner.to_str().unwrap(), &src)
            .unwrap_err()
            .contains("inside the source"));
        assert!(!new_inner.exists());
        let deep = d.path().join("no/such");
        assert!(create_missing_target(deep.to_str().unwrap(), &src).is_err());
        assert!(!d.path().join("no").exists());
        let made = d.path().join("made");
        assert_eq!(
            create_missing_target(made.to_str().unwrap(), &src).unwrap(),
            Some(made.clone())
        );
        assert!(made.is_dir());
        assert_eq!(create_missing_target(made.to_str().unwrap(), &src).unwrap(), None);
        assert_eq!(create_missing_target("tcp:127.0.0.1:1", &src).unwrap(), None);
    }
}
