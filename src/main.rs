//! The `mirrorfs` binary: parses the command line, runs the command, and turns errors into a
//! message on stderr and an exit code (0 success, 1 differences found by verify, 2 error,
//! 23 sync finished with per-path problems, as rsync's "partial transfer").

use clap::Parser;
use mirrorfs::cli::{self, Cli, Command, MountArgs, ServeArgs, SyncArgs, TargetArgs, UmountArgs, WatchArgs};
use mirrorfs::transport::{self, server::Listen};
use mirrorfs::{LocalFs, RelPath, ReplicatorSource, SyncOptions};
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) | Command::Mount(_) | Command::Watch(_) => "info,fuser::session=error",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level)).init();
    let r = match cli.command {
        Command::Sync(a) => sync(a),
        Command::Verify(a) => verify(a),
        Command::Serve(a) => serve(a),
        Command::Mount(a) => mount(a),
        Command::Umount(a) => umount(a),
        Command::Watch(a) => watch(a),
    };
    match r {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("mirrorfs: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn connect(a: &TargetArgs) -> Result<(Arc<LocalFs>, Arc<dyn mirrorfs::rpc::Rpc>), String> {
    let src = cli::check_source(&a.src)?;
    let ep = cli::check_target(&a.target, &src)?;
    let fs = Arc::new(LocalFs::new(&src).map_err(|e| format!("source: {e}"))?);
    let client = transport::open_target(&ep, a.token_file.as_deref(), None, transport::LocalMode::Threaded)
        .map_err(|e| format!("target {ep}: {e}"))?;
    Ok((fs, client))
}

fn sync(a: SyncArgs) -> Result<ExitCode, String> {
    let src = cli::check_source(&a.target.src)?;
    if let Some(dir) = cli::create_missing_target(&a.target.target, &src)? {
        if !a.target.quiet {
            eprintln!("created directory {}", dir.display());
        }
    }
    let (fs, client) = connect(&a.target)?;
    let opts = SyncOptions {
        checksum: a.checksum,
        allow_mass_delete: a.allow_mass_delete,
        progress: !a.target.quiet,
    };
    let started = std::time::Instant::now();
    let source = ReplicatorSource::with_options(fs, RelPath::root(), client, opts).map_err(|e| e.to_string())?;
    let r = source.last_report().clone();
    drop(source);
    for p in &r.problems {
        eprintln!("mirrorfs: {p}");
    }
    if !a.target.quiet {
        eprintln!(
            "synced in {:.2}s: {} operations, {} files sent ({} as deltas), {} content bytes, {} bytes on the wire{}",
            started.elapsed().as_secs_f64(),
            r.ops,
            r.files_sent,
            r.delta_files,
            r.content_bytes,
            r.wire_bytes,
            if r.problems.is_empty() {
                String::new()
            } else {
                format!(", {} problems", r.problems.len())
            }
        );
    }
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(23)
    })
}

fn verify(a: TargetArgs) -> Result<ExitCode, String> {
    let (fs, client) = connect(&a)?;
    // Building a source reconciles; verify must not change anything, so it uses the parts.
    let diffs = mirrorfs::source::verify_only(fs, RelPath::root(), &client).map_err(|e| e.to_string())?;
    for d in &diffs {
        println!("{d}");
    }
    if !a.quiet {
        eprintln!("{} differences", diffs.len());
    }
    Ok(if diffs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn serve(a: ServeArgs) -> Result<ExitCode, String> {
    let meta = std::fs::metadata(&a.dir).map_err(|e| format!("target directory {}: {e}", a.dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("target directory {} is not a directory", a.dir.display()));
    }
    if a.stdio {
        let fs: Arc<dyn mirrorfs::FileSystem> = Arc::new(LocalFs::new(&a.dir).map_err(|e| e.to_string())?);
        let key = a
            .token_file
            .as_deref()
            .map(transport::auth::load_key)
            .transpose()
            .map_err(|e| e.to_string())?;
        transport::serve_stream(Box::new(std::io::stdin()), Box::new(std::io::stdout()), fs, key);
        return Ok(ExitCode::SUCCESS);
    }
    let l = Listen::parse(a.listen.as_deref().unwrap_or_default())?;
    transport::listen(&l, &a.dir, a.token_file.as_deref(), |addr| {
        log::info!("serving {} on {addr}", a.dir.display());
        eprintln!("mirrorfs: serving {} on {addr}", a.dir.display());
    })
    .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn mount(a: MountArgs) -> Result<ExitCode, String> {
    use mirrorfs::daemon;
    use mirrorfs::fuse::{self, MountConfig};
    use mirrorfs::rpc::Rpc;
    use mirrorfs::source::{Link, Replicator};
    let mountpoint = a.mountpoint.clone().unwrap_or_else(|| a.src.clone());
    let daemon_log = std::env::var_os(daemon::DAEMON_ENV).map(std::path::PathBuf::from);
    if !a.foreground && daemon_log.is_none() {
        let log = a.log_file.clone().unwrap_or_else(|| daemon::default_log(&mountpoint));
        let pid = daemon::spawn(&log).map_err(|e| e.to_string())?;
        eprintln!(
            "mirrorfs: {} mounted at {} (daemon pid {pid}); log: {}",
            a.src.display(),
            mountpoint.display(),
            log.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    fuse::prepare_mountpoint(&mountpoint).map_err(|e| e.to_string())?;
    let src = cli::check_source(&a.src)?;
    let mountpoint =
        std::fs::canonicalize(&mountpoint).map_err(|e| format!("mountpoint {}: {e}", mountpoint.display()))?;
    let ep = cli::check_target(&a.target, &src)?;
    if mountpoint != src && mountpoint.starts_with(&src) {
        return Err(format!(
            "mountpoint {} lies inside the source {}; the mount would serve itself",
            mountpoint.display(),
            src.display()
        ));
    }
    if mountpoint != src {
        if let mirrorfs::transport::Endpoint::Local(t) = &ep {
            if std::fs::canonicalize(t)
                .map(|t| t.starts_with(&mountpoint))
                .unwrap_or(false)
            {
                return Err(format!(
                    "target {} lies inside the mountpoint {}",
                    t.display(),
                    mountpoint.display()
                ));
            }
        }
    }
    // Everything on the source is opened before the mount covers it.
    let (root, root_st) = fuse::open_root(&src).map_err(|e| format!("source {}: {e}", src.display()))?;
    let fs = Arc::new(LocalFs::new(&src).map_err(|e| format!("source: {e}"))?);
    // The watcher reaches the source through an fd opened now, under whatever is mounted later.
    let watch = if a.no_watch {
        None
    } else {
        let (fd, _) = fuse::open_root(&src).map_err(|e| format!("source {}: {e}", src.display()))?;
        // "/." : the watch's walk starts at a directory, not at the magic link (symlinks are
        // not followed).
        let top = std::path::PathBuf::from(format!("/proc/self/fd/{}/.", std::os::fd::AsRawFd::as_raw_fd(&fd)));
        match mirrorfs::watch::Watch::start(&top, &src) {
            Ok(w) => Some((fd, w)),
            Err(e) => {
                log::error!("{e}; changes made behind the mount's back reach the target at the next mount only");
                None
            }
        }
    };
    let limit = std::time::Duration::from_secs_f64(a.timeout);
    let rpc: Arc<dyn Rpc> =
        transport::open_target(&ep, a.token_file.as_deref(), Some(limit), transport::LocalMode::Inline)
            .map_err(|e| format!("target {ep}: {e}"))?;
    let opts = SyncOptions {
        checksum: false,
        allow_mass_delete: a.allow_mass_delete,
        progress: !a.quiet,
    };
    let source = ReplicatorSource::with_options(fs, RelPath::root(), rpc, opts).map_err(|e| e.to_string())?;
    let r = source.last_report().clone();
    for p in &r.problems {
        log::warn!("startup walk: {p}");
    }
    log::info!("startup walk: {} operations, {} files sent", r.ops, r.files_sent);
    let rep = Arc::new(Replicator::new(source));
    let cfg = MountConfig {
        mountpoint: mountpoint.clone(),
        fsname: src.display().to_string(),
        threads: a.threads as usize,
        passthrough: !a.no_passthrough,
    };
    let mounted = fuse::mount(root, &root_st, rep.clone(), &cfg).map_err(|e| e.to_string())?;
    watch_signals(mountpoint.clone())?;
    let _ = std::env::set_current_dir("/");
    log::info!(
        "{} mounted at {}, replicating to {ep}",
        src.display(),
        mountpoint.display()
    );
    match &daemon_log {
        Some(log) => daemon::ready(log).map_err(|e| e.to_string())?,
        None => eprintln!(
            "mirrorfs: {} mounted at {}; stop with `umount {}` or Ctrl-C",
            src.display(),
            mountpoint.display(),
            mountpoint.display()
        ),
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch.map(|(fd, w)| {
        let (rep, stop) = (rep.clone(), stop.clone());
        std::thread::Builder::new().name("watch".into()).spawn(move || {
            let _fd = fd;
            w.run(rep.as_ref(), &mirrorfs::watch::WatchOptions::default(), &stop)
        })
    });
    let served = mounted.run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    match watcher {
        Some(Ok(t)) => match t.join() {
            Ok(st) => log::info!(
                "watcher: {} events, {} partial reconciles, {} full rescans, {} files sent",
                st.events,
                st.reconciles,
                st.rescans,
                st.files_sent
            ),
            Err(_) => log::error!("the watcher thread panicked"),
        },
        Some(Err(e)) => log::error!("could not start the watcher thread: {e}"),
        None => {}
    }
    let c = rep.counters();
    let link = rep.link();
    let dirty = rep.dirty().len();
    drop(rep);
    if let Err(e) = served {
        log::error!("FUSE session ended with an error: {e}");
    }
    log::info!(
        "unmounted {}: {} requests acknowledged, {} repairs, {} not forwarded",
        mountpoint.display(),
        c.forwarded,
        c.repairs,
        c.unforwarded
    );
    if link == Link::Lost {
        log::error!(
            "the target was lost while mounted; {dirty} paths changed since; the next mount or sync repairs them"
        );
        return Ok(ExitCode::from(23));
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT unmount (lazily when busy), which ends the session; SIGHUP is ignored.
fn watch_signals(mountpoint: std::path::PathBuf) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    continue;
                }
                log::info!("signal {sig}: unmounting {}", mountpoint.display());
                if let Err(e) = mirrorfs::fuse::unmount(&mountpoint, false) {
                    log::warn!("unmount {}: {e}; detaching lazily", mountpoint.display());
                    if let Err(e) = mirrorfs::fuse::unmount(&mountpoint, true) {
                        log::error!("lazy unmount {}: {e}", mountpoint.display());
                    }
                }
            }
        })
        .map_err(|e| format!("signal thread: {e}"))?;
    Ok(())
}

fn umount(a: UmountArgs) -> Result<ExitCode, String> {
    if !a.lazy && !mirrorfs::fuse::is_mirrorfs_mount(&a.path) {
        match std::fs::metadata(&a.path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
            _ => return Err(format!("{} is not a mirrorfs mount", a.path.display())),
        }
    }
    mirrorfs::fuse::unmount(&a.path, a.lazy).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            format!(
                "{} is busy (a file is open or a process works inside); close them, or use --lazy",
                a.path.display()
            )
        } else {
            format!("unmount {}: {e}", a.path.display())
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn watch(a: WatchArgs) -> Result<ExitCode, String> {
    use mirrorfs::watch::{Watch, WatchOptions};
    let src = cli::check_source(&a.target.src)?;
    let (fs, client) = connect(&a.target)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signals: {e}"))?;
    }
    // Watching starts before the startup walk, so nothing changed during it is missed.
    let w = Watch::start(&src, &src).map_err(|e| e.to_string())?;
    let opts = SyncOptions {
        checksum: false,
        allow_mass_delete: a.allow_mass_delete,
        progress: !a.target.quiet,
    };
    let source = ReplicatorSource::with_options(fs, RelPath::root(), client, opts).map_err(|e| e.to_string())?;
    mirrorfs::sys::release_free_memory();
    let wopts = WatchOptions {
        debounce: std::time::Duration::from_millis(a.debounce_ms),
        rescan_every: std::time::Duration::from_secs_f64(a.rescan_secs),
        ..WatchOptions::default()
    };
    log::info!("watching {}", src.display());
    let stats = w.run(&source, &wopts, &stop);
    log::info!(
        "stopped watching {}: {} events, {} partial reconciles, {} full rescans, {} renames forwarded",
        src.display(),
        stats.events,
        stats.reconciles,
        stats.rescans,
        stats.renames
    );
    if stats.lost {
        eprintln!("mirrorfs: the target was lost; the next watch or sync reconciles it");
        return Ok(ExitCode::from(23));
    }
    Ok(ExitCode::SUCCESS)
}
