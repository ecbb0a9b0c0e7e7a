//! The `mirrorfs` binary: parses the command line, runs the command, and turns errors into a
//! message on stderr and an exit code (0 success, 1 differences found by verify, 2 error,
//! 23 sync finished with per-path problems, as rsync's "partial transfer").

use clap::Parser;
use mirrorfs::cli::{
    self, Cli, Command, MountArgs, ServeArgs, StatusArgs, SyncArgs, TargetArgs, UmountArgs, WatchArgs,
};
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
        Command::Status(a) => status(a),
    };
    match r {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("mirrorfs: error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn connect(a: &TargetArgs, fake_super: bool) -> Result<(Arc<LocalFs>, Arc<dyn mirrorfs::rpc::Rpc>), String> {
    let src = cli::check_source(&a.src)?;
    let ep = cli::check_target(&a.reach.target, &src)?;
    let fs = Arc::new(
        LocalFs::new(&src)
            .map_err(|e| format!("source: {e}"))?
            .with_fake_super(fake_super),
    );
    let client = a
        .reach
        .connector(ep.clone(), transport::LocalMode::Threaded)?
        .connect()
        .map_err(|e| format!("target {ep}: {e}"))?;
    Ok((fs, client))
}

fn sync(a: SyncArgs) -> Result<ExitCode, String> {
    let src = cli::check_source(&a.target.src)?;
    if let Some(dir) = cli::create_missing_target(&a.target.reach.target, &src)? {
        if !a.target.quiet {
            eprintln!("created directory {}", dir.display());
        }
    }
    let (fs, client) = connect(&a.target, a.fake_super)?;
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
    if !r.not_mirrored.is_empty() && !a.target.quiet {
        eprintln!("note: {}", r.not_mirrored);
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
    let (fs, client) = connect(&a, false)?;
    // Building a source reconciles; verify must not change anything, so it uses the parts.
    let (diffs, not_mirrored) =
        mirrorfs::source::verify_only(fs, RelPath::root(), &client).map_err(|e| e.to_string())?;
    for d in &diffs {
        println!("{d}");
    }
    if !not_mirrored.is_empty() && !a.quiet {
        eprintln!("note: {not_mirrored}");
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
        let fs: Arc<dyn mirrorfs::FileSystem> = Arc::new(
            LocalFs::new(&a.dir)
                .map_err(|e| e.to_string())?
                .with_fake_super(a.fake_super),
        );
        let key = a
            .token_file
            .as_deref()
            .map(transport::auth::load_key)
            .transpose()
            .map_err(|e| e.to_string())?;
        // One connection per process: a peer that stalls its handshake ends the process.
        let cutoff: transport::server::Cutoff = Box::new(|| std::process::exit(1));
        return match transport::serve_stream(
            Box::new(std::io::stdin()),
            Box::new(std::io::stdout()),
            fs,
            key,
            Some(cutoff),
        ) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => Err(format!("serve --stdio: {e}")),
        };
    }
    let l = Listen::parse(a.listen.as_deref().unwrap_or_default())?;
    transport::listen(&l, &a.dir, a.token_file.as_deref(), a.fake_super, |addr| {
        log::info!("serving {} on {addr}", a.dir.display());
        eprintln!("mirrorfs: serving {} on {addr}", a.dir.display());
    })
    .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn mount(a: MountArgs) -> Result<ExitCode, String> {
    use mirrorfs::daemon;
    let mountpoint = a.mountpoint.clone().unwrap_or_else(|| a.src.clone());
    let daemon_log = std::env::var_os(daemon::DAEMON_ENV).map(std::path::PathBuf::from);
    if !a.foreground && daemon_log.is_none() {
        let log = match a.log_file.clone() {
            Some(l) => l,
            None => daemon::default_log(&mountpoint).map_err(|e| e.to_string())?,
        };
        let pid = daemon::spawn(&log).map_err(|e| e.to_string())?;
        eprintln!(
            "mirrorfs: {} mounted at {} (daemon pid {pid}); log: {}",
            a.src.display(),
            mountpoint.display(),
            log.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (src, mountpoint, ep) = check_mount(&a, &mountpoint)?;
    mirrorfs::sys::one_malloc_arena();
    // Everything on the source is opened before the mount covers it.
    let (root, root_st) = mirrorfs::fuse::open_root(&src).map_err(|e| format!("source {}: {e}", src.display()))?;
    let watch = (!a.no_watch).then(|| start_mount_watch(&src)).flatten();
    let rep = replicator(
        &src,
        watch.as_ref().map(|(_, w)| w.listing_hook()),
        ep.clone(),
        &a.reach,
        a.on_disconnect,
        transport::LocalMode::Inline,
        SyncOptions {
            checksum: false,
            allow_mass_delete: a.allow_mass_delete,
            progress: !a.quiet,
        },
    )?;
    let cfg = mirrorfs::fuse::MountConfig {
        mountpoint: mountpoint.clone(),
        fsname: src.display().to_string(),
        threads: a.threads as usize,
        passthrough: !a.no_passthrough,
        watched: watch.is_some(),
        ack: a.ack,
    };
    let own = watch.as_ref().is_some_and(|(_, w)| w.sees_own_changes());
    rep.track_echoes(own);
    if let Some(made) = watch.as_ref().and_then(|(_, w)| w.made_dirs()) {
        rep.on_made_dirs(made);
    }
    let mounted = mirrorfs::fuse::mount(root, &root_st, rep.clone(), &cfg).map_err(|e| e.to_string())?;
    watch_signals(mountpoint.clone(), rep.clone())?;
    let _ = std::env::set_current_dir("/");
    log::info!(
        "{} mounted at {}, replicating to {ep}",
        src.display(),
        mountpoint.display()
    );
    match &daemon_log {
        Some(log) => {
            daemon::ready(log).map_err(|e| e.to_string())?;
            daemon::cap_log(log.clone());
        }
        None => eprintln!(
            "mirrorfs: {} mounted at {}; stop with `umount {}` or Ctrl-C",
            src.display(),
            mountpoint.display(),
            mountpoint.display()
        ),
    }
    let recovery = spawn_recovery(&rep)?;
    let control = answer_status(&rep, "mount", &src, Some((&mountpoint, Box::new(mounted.ack()))));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch.map(|(fd, w)| {
        let (rep, stop, caches) = (rep.clone(), stop.clone(), mounted.caches());
        std::thread::Builder::new().name("watch".into()).spawn(move || {
            use mirrorfs::watch::Observer;
            let _fd = fd;
            let st = w.run(
                rep.as_ref(),
                &caches,
                &mirrorfs::watch::WatchOptions::under_mount(own),
                &stop,
            );
            // Nothing reports changes behind the mount any more.
            caches.covered(false);
            st
        })
    });
    let served = mounted.run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    match watcher {
        Some(Ok(t)) => match t.join() {
            Ok(st) => log::info!(
                "watcher: {} events, {} partial reconciles ({} listings), {} full rescans, {} files sent",
                st.events,
                st.reconciles,
                st.listings,
                st.rescans,
                st.files_sent
            ),
            Err(_) => log::error!("the watcher thread panicked"),
        },
        Some(Err(e)) => log::error!("could not start the watcher thread: {e}"),
        None => {}
    }
    if let Err(e) = served {
        log::error!("FUSE session ended with an error: {e}");
    }
    Ok(conclude(
        &rep,
        recovery,
        control,
        &format!("unmounted {}", mountpoint.display()),
    ))
}

/// The mount's arguments, checked: the source, the mountpoint (canonical) and the target.
fn check_mount(
    a: &MountArgs,
    mountpoint: &std::path::Path,
) -> Result<(std::path::PathBuf, std::path::PathBuf, transport::Endpoint), String> {
    mirrorfs::fuse::prepare_mountpoint(mountpoint).map_err(|e| e.to_string())?;
    let src = cli::check_source(&a.src)?;
    let mountpoint =
        std::fs::canonicalize(mountpoint).map_err(|e| format!("mountpoint {}: {e}", mountpoint.display()))?;
    let ep = cli::check_target(&a.reach.target, &src)?;
    if mountpoint != src && mountpoint.starts_with(&src) {
        return Err(format!(
            "mountpoint {} lies inside the source {}; the mount would serve itself",
            mountpoint.display(),
            src.display()
        ));
    }
    if mountpoint != src {
        if let transport::Endpoint::Local(t) = &ep {
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
    Ok((src, mountpoint, ep))
}

/// The watcher under the mount reaches the source through an fd opened now, under whatever is
/// mounted later. A watch that cannot start is logged, and the mount goes on without it.
fn start_mount_watch(src: &std::path::Path) -> Option<(std::os::fd::OwnedFd, mirrorfs::watch::Watch)> {
    let fd = match mirrorfs::fuse::open_root(src) {
        Ok((fd, _)) => fd,
        Err(e) => {
            log::error!("source {}: {e}; no watcher", src.display());
            return None;
        }
    };
    // "/." : the watch's walk starts at a directory, not at the magic link (symlinks are not
    // followed).
    let top = std::path::PathBuf::from(format!("/proc/self/fd/{}/.", std::os::fd::AsRawFd::as_raw_fd(&fd)));
    // Its watches are added by the startup walk, as it lists each directory.
    match mirrorfs::watch::Watch::others_only(&top, src) {
        Ok(w) => Some((fd, w)),
        Err(e) => {
            log::error!("{e}; changes made behind the mount's back reach the target at the next mount only");
            None
        }
    }
}

/// Opens the target's link (its first session) and runs the startup walk through it. Both are
/// bounded by `--timeout`; failing here is final and leaves nothing behind.
fn replicator(
    src: &std::path::Path,
    hook: Option<mirrorfs::reconcile::ListingHook>,
    ep: transport::Endpoint,
    reach: &cli::Reach,
    policy: mirrorfs::source::Policy,
    local: transport::LocalMode,
    opts: SyncOptions,
) -> Result<Arc<mirrorfs::source::Replicator>, String> {
    use mirrorfs::source::{Link, Replicator, Source};
    let shown = ep.to_string();
    let connector = reach.connector(ep, local)?;
    let link = Link::open(connector, policy).map_err(|e| format!("target {shown}: {e}"))?;
    let fs = Arc::new(LocalFs::new(src).map_err(|e| format!("source: {e}"))?);
    let rep = Arc::new(Replicator::new(Source::new(fs, RelPath::root(), opts), link));
    let r = rep
        .startup_walk(hook)
        .map_err(|e| format!("startup walk to {shown}: {e}"))?;
    for p in &r.problems {
        log::warn!("startup walk: {p}");
    }
    log::info!("startup walk: {} operations, {} files sent", r.ops, r.files_sent);
    if !r.not_mirrored.is_empty() {
        log::warn!("{}", r.not_mirrored);
    }
    if !r.problems.is_empty() {
        // What the walk could not copy is behind: the recovery retries it.
        rep.link().mark_scope(mirrorfs::reconcile::Scope::full());
        rep.link()
            .fell_behind(&format!("startup walk: {} paths not copied", r.problems.len()));
    }
    Ok(rep)
}

/// Answers `mirrorfs status` for this mirror until the returned guard is dropped. A control
/// socket that cannot be made is logged; the mirror runs without it.
fn answer_status(
    rep: &Arc<mirrorfs::source::Replicator>,
    kind: &'static str,
    src: &std::path::Path,
    mount: Option<(&std::path::Path, Box<dyn Fn() -> mirrorfs::fuse::Ack + Send + Sync>)>,
) -> Option<mirrorfs::control::Control> {
    let (rep, src) = (rep.clone(), src.to_path_buf());
    let mount = mount.map(|(m, ack)| (m.to_path_buf(), ack));
    match mirrorfs::control::serve(move || {
        let mnt = mount.as_ref().map(|(m, _)| m.as_path());
        let st = mirrorfs::control::MirrorStatus::from_link(kind, &src, mnt, rep.link().status());
        match &mount {
            Some((_, ack)) => st.with_ack(ack().name()),
            None => st,
        }
    }) {
        Ok(c) => Some(c),
        Err(e) => {
            log::error!("{e}; `mirrorfs status` will not list this mirror");
            None
        }
    }
}

/// The recovery thread of a replicator: reconnects and catches up for as long as it runs.
fn spawn_recovery(rep: &Arc<mirrorfs::source::Replicator>) -> Result<std::thread::JoinHandle<()>, String> {
    let rep = rep.clone();
    std::thread::Builder::new()
        .name("recovery".into())
        .spawn(move || rep.run_recovery())
        .map_err(|e| format!("recovery thread: {e}"))
}

/// The end of a mount or watch: stops the recovery, tries a last catch-up, and says whether the
/// target is in sync, in the log, on stderr and to whoever waits on the control socket (`mirrorfs
/// umount`). Exit 0 only when it is; 23 when paths are still behind.
fn conclude(
    rep: &mirrorfs::source::Replicator,
    recovery: std::thread::JoinHandle<()>,
    control: Option<mirrorfs::control::Control>,
    what: &str,
) -> ExitCode {
    rep.stop();
    if recovery.join().is_err() {
        log::error!("the recovery thread panicked");
    }
    let behind = rep.finish_up();
    let st = rep.link().status();
    rep.link().close();
    let mut summary = format!(
        "{what}: {} operations acknowledged ({} content bytes), {} repairs, {} reconnects",
        st.forwarded_ops, st.forwarded_bytes, st.repairs, st.reconnects
    );
    let code = if behind > 0 {
        let last = st.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
        let msg = if st.behind_paths == 0 {
            format!(
                "the target {} could not be reached at the end{last}, so it may be behind; the next mount or sync finishes the job",
                st.target
            )
        } else {
            format!(
                "the target {} is behind: {behind} changed paths (or regions) not caught up{last}; the next mount or sync finishes the job",
                st.target
            )
        };
        log::info!("{summary}");
        log::error!("{msg}");
        summary = format!("{summary}\n{msg}");
        23
    } else {
        summary.push_str("; the target is in sync");
        log::info!("{summary}");
        0
    };
    if let Some(c) = control {
        c.farewell(&mirrorfs::control::Farewell {
            code,
            summary: summary.clone(),
        });
    }
    if code != 0 {
        eprintln!("mirrorfs: {}", summary.lines().last().unwrap_or_default());
    }
    ExitCode::from(code)
}

/// SIGTERM and SIGINT unmount (lazily when busy), which ends the session; SIGHUP is ignored.
/// Replies held for the target (`--on-disconnect block`) are sent then: the person asked to
/// stop, and the exit code says what is still behind.
fn watch_signals(mountpoint: std::path::PathBuf, rep: Arc<mirrorfs::source::Replicator>) -> Result<(), String> {
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
                rep.release_held();
            }
        })
        .map_err(|e| format!("signal thread: {e}"))?;
    Ok(())
}

/// Unmounts, then waits for the daemon to finish (its last catch-up and the final sync of the
/// target), prints its closing summary and exits with its code. A mount whose daemon does not
/// answer on a control socket is just unmounted.
fn umount(a: UmountArgs) -> Result<ExitCode, String> {
    if !a.lazy && !mirrorfs::fuse::is_mirrorfs_mount(&a.path) {
        match std::fs::metadata(&a.path) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)) => {}
            _ => return Err(format!("{} is not a mirrorfs mount", a.path.display())),
        }
    }
    let shown = std::fs::canonicalize(&a.path).unwrap_or_else(|_| a.path.clone());
    let waiter = mirrorfs::control::query_all()
        .ok()
        .and_then(|all| {
            all.into_iter()
                .find(|m| m.mountpoint.as_deref() == Some(&*shown.display().to_string()))
        })
        .and_then(|m| mirrorfs::control::wait_for(m.pid).ok().map(|w| (m.pid, w)));
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
    // A lazy unmount ends the daemon only once the last file inside is closed: not waited for.
    let Some((pid, waiter)) = waiter.filter(|_| !a.lazy) else {
        return Ok(ExitCode::SUCCESS);
    };
    match waiter.farewell(std::time::Duration::from_secs(a.wait_secs)) {
        Some(f) => {
            for l in f.summary.lines() {
                eprintln!("mirrorfs: {l}");
            }
            Ok(ExitCode::from(f.code))
        }
        None => Err(format!(
            "unmounted {}, but the daemon (pid {pid}) gave no verdict within {} s; see its log",
            a.path.display(),
            a.wait_secs
        )),
    }
}

fn watch(a: WatchArgs) -> Result<ExitCode, String> {
    use mirrorfs::watch::{Watch, WatchOptions};
    let src = cli::check_source(&a.target.src)?;
    let ep = cli::check_target(&a.target.reach.target, &src)?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signals: {e}"))?;
    }
    // Watching starts with the startup walk (each directory is watched just before the walk
    // lists it), so nothing changed during it is missed.
    let w = Watch::unwatched(&src, &src).map_err(|e| e.to_string())?;
    let rep = replicator(
        &src,
        Some(w.listing_hook()),
        ep,
        &a.target.reach,
        mirrorfs::source::Policy::Continue,
        transport::LocalMode::Threaded,
        SyncOptions {
            checksum: false,
            allow_mass_delete: a.allow_mass_delete,
            progress: !a.target.quiet,
        },
    )?;
    mirrorfs::sys::release_free_memory();
    let recovery = spawn_recovery(&rep)?;
    let control = answer_status(&rep, "watch", &src, None);
    let wopts = WatchOptions {
        debounce: std::time::Duration::from_millis(a.debounce_ms),
        rescan_every: std::time::Duration::from_secs_f64(a.rescan_secs),
        ..WatchOptions::default()
    };
    log::info!("watching {}", src.display());
    let stats = w.run(rep.as_ref(), &mirrorfs::watch::NoObserver, &wopts, &stop);
    log::info!(
        "stopped watching {}: {} events, {} partial reconciles ({} listings), {} full rescans, {} renames forwarded",
        src.display(),
        stats.events,
        stats.reconciles,
        stats.listings,
        stats.rescans,
        stats.renames
    );
    Ok(conclude(
        &rep,
        recovery,
        control,
        &format!("stopped watching {}", src.display()),
    ))
}

fn status(a: StatusArgs) -> Result<ExitCode, String> {
    use mirrorfs::control;
    let mut all = control::query_all().map_err(|e| e.to_string())?;
    if let Some(p) = &a.path {
        let want = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let want = want.display().to_string();
        all.retain(|m| m.source == want || m.mountpoint.as_deref() == Some(want.as_str()));
    }
    if a.json {
        println!("{}", serde_json::json!({ "mounts": all }));
    } else if all.is_empty() {
        println!(
            "no mirror is running{}",
            a.path
                .as_ref()
                .map(|p| format!(" at {}", p.display()))
                .unwrap_or_default()
        );
    } else {
        for m in &all {
            let at = match &m.mountpoint {
                Some(mp) if *mp != m.source => format!("{} mounted at {mp}", m.source),
                Some(_) => format!("{} (mounted)", m.source),
                None => format!("{} (watched)", m.source),
            };
            let l = &m.link;
            println!("{at} -> {}  [pid {}]", l.target, m.pid);
            println!("  state:     {} since {}", l.state, l.since);
            match m.ack.as_deref() {
                Some("fsync") => println!(
                    "  ack:       fsync (writes return from the page cache; fsync and close wait for the target)"
                ),
                Some(a) => println!("  ack:       {a} (every syscall waits for the target)"),
                None => {}
            }
            println!(
                "  forwarded: {} operations, {} content bytes; waits p50 {:.2} ms, p99 {:.2} ms (last minute)",
                l.forwarded_ops, l.forwarded_bytes, l.wait_p50_ms, l.wait_p99_ms
            );
            println!(
                "  behind:    {} paths; {} reconnects, {} repairs",
                l.behind_paths, l.reconnects, l.repairs
            );
            if let Some(e) = &l.last_error {
                println!("  last error: {e}");
            }
        }
    }
    Ok(if all.is_empty() {
        ExitCode::from(3)
    } else if all.iter().all(|m| m.connected()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
