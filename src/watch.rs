//! Watching: keeps a target mirrored from filesystem events, for
//! `mirrorfs watch` (no FUSE needed) and under the mount (changes made behind its back). Events
//! are only hints: each marks a region of the tree dirty, and a burst of them (coalesced by a
//! short debounce, bounded in total) is answered by a partial reconcile of those regions from
//! the source's current state, with the same scanner and planner as the startup walk.
//!
//! - A changed, created or removed entry marks itself (and, through the scope, its ancestors).
//!   Many events in one directory are rolled up into one rescan of its listing.
//! - A directory created or moved in is watched (recursively, and before it is scanned, which
//!   closes the race with files made in it before its watch existed) and rescanned whole.
//! - A rename seen at both ends is repeated on the target as a rename, so content does not
//!   travel again; the reconcile that follows checks the result either way.
//! - A queue overflow or a watch error means a full rescan, after the whole tree is watched
//!   again: coverage is never dropped silently. A reconcile that fails is tried again with the
//!   next batch. Symlinks are never followed.
//! - Where the kernel's watch limit is hit, the message names the sysctl to raise,
//!   and the part left uncovered (or a directory whose watch failed otherwise) is rescanned
//!   periodically, at most a fifth of the time, and watched again once possible.
//! - Events come from inotify (through `notify`), or under the mount from fanotify
//!   (`fanotify.rs`), which leaves out the mount's own changes. With inotify the mount's own
//!   removals are recognised as echoes (`Reconciler::is_echo`) and cost no listing rescan.
//!
//! Setting up the watch comes before (`Watch::start`) or with (`Watch::unwatched` and its
//! listing hook) the caller's startup walk, so nothing changed during that walk goes unnoticed.
//! With the hook, the walk watches each directory just before it reads its listing, which
//! spares a walk of the whole tree of its own.

mod fanotify;

use crate::path::RelPath;
use crate::reconcile::{Depth, Scope};
pub use crate::source::Reconciler;
use crate::source::SyncError;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Quiet time after the last event before reconciling; zero answers the first event of a
    /// quiet period at once.
    pub debounce: Duration,
    /// The longest a burst may delay its reconcile.
    pub max_delay: Duration,
    /// How often to rescan what the watches do not cover.
    pub rescan_every: Duration,
    /// Events in one directory beyond which its listing is rescanned instead.
    pub roll_up: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: Duration::ZERO,
            max_delay: Duration::from_millis(500),
            rescan_every: Duration::from_secs(2),
            roll_up: 64,
        }
    }
}

impl WatchOptions {
    /// For the watcher under a mount. One that sees the mount's own writes to the source too
    /// (inotify), each of whose reconciles holds the mount's order lock, waits for a quiet
    /// 20 ms and takes a burst whole rather than answering every event at once; one that sees
    /// only others' changes (fanotify) answers at once, as `mirrorfs watch` does.
    pub fn under_mount(sees_own_changes: bool) -> WatchOptions {
        WatchOptions {
            debounce: if sees_own_changes {
                Duration::from_millis(20)
            } else {
                Duration::ZERO
            },
            ..WatchOptions::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {0}: {1}")]
    Watch(String, notify::Error),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// What a watch did, for the log at its end.
#[derive(Debug, Default, Clone, Copy)]
pub struct WatchStats {
    pub events: u64,
    /// Partial reconciles.
    pub reconciles: u64,
    /// Directory listings those covered (a region of its children or its whole tree).
    pub listings: u64,
    /// Whole-tree reconciles (overflow, watch errors).
    pub rescans: u64,
    pub renames: u64,
    /// Files whose content the reconciles sent.
    pub files_sent: u64,
}

/// Told what the watcher saw, before each reconcile (the mount drops what the kernel holds of
/// those paths). The default observes nothing.
pub trait Observer {
    /// These entries changed (created, removed, renamed, written, given new attributes).
    fn changed(&self, _paths: &[RelPath]) {}
    /// Events were lost: anything may have changed.
    fn lost_track(&self) {}
    /// Whether every directory is watched, told whenever that changes.
    fn covered(&self, _all: bool) {}
}

/// Observes nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

type Events = Receiver<notify::Result<notify::Event>>;

/// Directories whose watch could not be added while a walk listed them, and why.
type Failed = Arc<Mutex<Vec<(RelPath, notify::Error)>>>;

/// Where events come from: inotify through `notify` (every process's changes), or fanotify,
/// which leaves out this process's own (`Watch::others_only`).
enum Backend {
    Inotify(notify::RecommendedWatcher),
    Fanotify(fanotify::Fanotify),
}

impl Backend {
    fn watch(&mut self, p: &Path, mode: RecursiveMode) -> Result<(), notify::Error> {
        match self {
            Backend::Inotify(w) => w.watch(p, mode),
            Backend::Fanotify(f) => f.watch(p, mode),
        }
    }

    /// The sysctl that bounds how many directories can be watched.
    fn limit(&self) -> &'static str {
        match self {
            Backend::Inotify(_) => "fs.inotify.max_user_watches",
            Backend::Fanotify(_) => "fs.fanotify.max_user_marks",
        }
    }
}

/// A recursive watch on a source tree, set up and collecting events.
pub struct Watch {
    /// Shared with the startup walk's listing hook, which adds the first watches.
    watcher: Arc<Mutex<Backend>>,
    /// Filled by the listing hook; taken up when `run` starts.
    failed: Failed,
    rx: Events,
    /// The watched path; event paths are relative to it.
    top: PathBuf,
    /// The source as the user knows it, for messages.
    shown: PathBuf,
    /// Regions no watch covers (the watch limit was hit, a watch failed): rescanned
    /// periodically.
    uncovered: Scope,
    /// A failed reconcile's scope, tried again with the next batch.
    pending: Scope,
    /// The watch-limit message was given (once until everything is watched again).
    limit_reported: bool,
}

impl Watch {
    /// Watches `top` recursively. `top` may be a `/proc/self/fd/N` path, which reaches a
    /// directory a mount now covers; messages then name it `shown`.
    pub fn start(top: &Path, shown: &Path) -> Result<Watch, WatchError> {
        let mut w = Watch::unwatched(top, shown)?;
        let r = w.watcher.lock().watch(top, RecursiveMode::Recursive);
        if let Err(e) = r {
            if !matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                return Err(WatchError::Watch(shown.display().to_string(), e));
            }
            w.limit_hit(RelPath::root());
        }
        Ok(w)
    }

    /// A watch with no directory watched yet: the caller's startup walk adds the watches as it
    /// lists each directory, through `listing_hook`, instead of a walk of its own first.
    pub fn unwatched(top: &Path, shown: &Path) -> Result<Watch, WatchError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Watch::inotify(top, shown, tx, rx)
    }

    /// `unwatched`, seeing only the changes other processes make (the mount's watcher: its
    /// own changes were forwarded as it made them). That takes fanotify; where the kernel or
    /// the filesystem does not offer it, the watch uses inotify and sees them all.
    pub fn others_only(top: &Path, shown: &Path) -> Result<Watch, WatchError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        // For tests and for ruling fanotify out when something looks wrong.
        if std::env::var_os("MIRRORFS_NO_FANOTIFY").is_some() {
            log::info!("MIRRORFS_NO_FANOTIFY is set: watching {} with inotify", shown.display());
            return Watch::inotify(top, shown, tx, rx);
        }
        match fanotify::Fanotify::new(top, tx.clone()) {
            Ok(f) => {
                log::info!(
                    "watching {} with fanotify: the mount's own changes are left out",
                    shown.display()
                );
                Ok(Watch::with(Backend::Fanotify(f), rx, top, shown))
            }
            Err(e) => {
                log::info!(
                    "fanotify is not available for {} ({e}); watching with inotify, which sees the mount's own changes too",
                    shown.display()
                );
                Watch::inotify(top, shown, tx, rx)
            }
        }
    }

    fn inotify(
        top: &Path,
        shown: &Path,
        tx: crossbeam_channel::Sender<notify::Result<notify::Event>>,
        rx: Events,
    ) -> Result<Watch, WatchError> {
        // Symlinks are entries like any other: following one would watch a directory under a
        // second name (inotify keeps one watch per inode) or reach outside the tree.
        let config = notify::Config::default().with_follow_symlinks(false);
        let watcher = notify::RecommendedWatcher::new(
            move |r| {
                let _ = tx.send(r);
            },
            config,
        )
        .map_err(|e| WatchError::Watch(shown.display().to_string(), e))?;
        Ok(Watch::with(Backend::Inotify(watcher), rx, top, shown))
    }

    fn with(backend: Backend, rx: Events, top: &Path, shown: &Path) -> Watch {
        Watch {
            watcher: Arc::new(Mutex::new(backend)),
            failed: Failed::default(),
            rx,
            top: top.to_path_buf(),
            shown: shown.to_path_buf(),
            uncovered: Scope::default(),
            pending: Scope::default(),
            limit_reported: false,
        }
    }

    /// Whether the events include this process's own changes (inotify does; fanotify leaves
    /// them out).
    pub fn sees_own_changes(&self) -> bool {
        matches!(*self.watcher.lock(), Backend::Inotify(_))
    }

    /// For a watch that does not see this process's own changes: what watches a directory the
    /// mount made (given relative to the top), since no event will say it was made.
    pub fn made_dirs(&self) -> Option<crate::source::MadeDirs> {
        match &*self.watcher.lock() {
            Backend::Fanotify(f) => {
                let marks = f.marks();
                Some(Box::new(move |p: &RelPath| marks.made(p.as_path())))
            }
            Backend::Inotify(_) => None,
        }
    }

    /// For the startup walk of an `unwatched` watch: called with each directory just before
    /// the walk reads its listing, it watches that directory alone. A change made in it from
    /// then on raises an event; one made before is in the listing. Directories made later are
    /// watched as their events arrive (`cover`).
    pub fn listing_hook(&self) -> crate::reconcile::ListingHook {
        let (watcher, failed, top) = (self.watcher.clone(), self.failed.clone(), self.top.clone());
        Box::new(move |p: &RelPath| {
            let at = top.join(p.as_path());
            let r = watcher.lock().watch(&at, RecursiveMode::NonRecursive);
            if let Err(e) = r {
                if is_dir(&at) {
                    failed.lock().push((p.clone(), e));
                }
            }
        })
    }

    /// What the listing hook could not watch is rescanned periodically, as any uncovered part.
    fn take_up_failed(&mut self) {
        let failed = std::mem::take(&mut *self.failed.lock());
        for (p, e) in failed {
            if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                self.limit_hit(p);
            } else {
                log::warn!(
                    "watching {}: {e}; rescanning it periodically",
                    self.shown.join(p.as_path()).display()
                );
                self.uncovered.add(p, Depth::Tree);
            }
        }
    }

    fn limit_hit(&mut self, p: RelPath) {
        if !self.limit_reported {
            self.limit_reported = true;
            let knob = self.watcher.lock().limit();
            log::error!(
                "the watch limit is reached under {}; raise {knob} (sysctl {knob}=N). Until then \
                 what is not watched is rescanned periodically",
                self.shown.join(p.as_path()).display(),
            );
        }
        self.uncovered.add(p, Depth::Tree);
    }

    fn rel(&self, p: &Path) -> Option<RelPath> {
        RelPath::from_path(p.strip_prefix(&self.top).ok()?).ok()
    }

    /// Watches a directory that appeared (created or moved in) before it is scanned: a file
    /// made in it from now on raises an event, and one made before is found by the scan.
    fn cover(&mut self, p: &RelPath) {
        if let Err(e) = self.try_cover(p) {
            if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                self.limit_hit(p.clone());
            } else {
                log::warn!(
                    "watching {}: {e}; rescanning it periodically",
                    self.shown.join(p.as_path()).display()
                );
                self.uncovered.add(p.clone(), Depth::Tree);
            }
        }
    }

    /// notify's recursive watch stops at the first directory it cannot watch (one removed
    /// during the walk, say), leaving the rest of the walk unwatched: that is a failure unless
    /// `p` itself is gone or no longer a directory (the scan then sees what is there).
    fn try_cover(&mut self, p: &RelPath) -> Result<(), notify::Error> {
        let at = self.top.join(p.as_path());
        let r = self.watcher.lock().watch(&at, RecursiveMode::Recursive);
        match r {
            Err(e) if is_dir(&at) => Err(e),
            Err(e) => {
                log::debug!("watching {p}: {e} (gone)");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// After an overflow or a watch error, directories made meanwhile may lack watches: the
    /// whole tree is watched again (existing watches are kept) before it is rescanned.
    fn recover(&mut self) {
        self.cover(&RelPath::root());
    }

    /// Watches again what the limit left uncovered; what is covered now drops out of the
    /// periodic rescans (after the rescan that follows this call).
    fn retry_uncovered(&mut self) -> Scope {
        let was = std::mem::take(&mut self.uncovered);
        for (p, d) in was.regions() {
            if d != Depth::Tree {
                continue;
            }
            if self.try_cover(p).is_err() {
                self.uncovered.add(p.clone(), Depth::Tree);
            }
        }
        if !was.is_empty() && self.uncovered.is_empty() {
            log::info!("every directory is watched again");
            self.limit_reported = false;
        }
        was
    }

    /// Keeps the target behind `mirror` equal to the watched tree until `stop` is set. A
    /// reconcile that fails is tried again with the next batch (a `Replicator` keeps what a lost
    /// target missed for its own catch-up). The caller has reconciled once after `start`.
    pub fn run(
        mut self,
        mirror: &dyn Reconciler,
        seen: &dyn Observer,
        opts: &WatchOptions,
        stop: &AtomicBool,
    ) -> WatchStats {
        let mut stats = WatchStats::default();
        self.take_up_failed();
        let mut covered = self.uncovered.is_empty();
        seen.covered(covered);
        let mut last_tick = Instant::now();
        // Periodic rescans never take more than about a fifth of the time (under the mount
        // they hold its operations back).
        let mut every = opts.rescan_every;
        loop {
            let periodic = !self.uncovered.is_empty();
            let tick = periodic.then_some(last_tick + every);
            let batch = match self.next_batch(opts, stop, tick, &|p| mirror.is_busy(p), &|p| mirror.is_echo(p)) {
                None => return stats,
                // Once the mount has ended, what the batch names is left to the next startup
                // walk: another mount of the same tree may be writing the target by now.
                Some(_) if stop.load(Ordering::Relaxed) => return stats,
                Some(b) => b,
            };
            stats.events += batch.events;
            let mut scope = batch.scope;
            scope.merge(std::mem::take(&mut self.pending));
            let mut full = batch.full;
            for p in batch.limit_hits {
                self.limit_hit(p);
            }
            let ticked = periodic && last_tick.elapsed() >= every;
            if ticked {
                scope.merge(self.retry_uncovered());
            }
            if full {
                self.recover();
                seen.lost_track();
            } else {
                seen.changed(&batch.touched);
                // New directories are watched before they are scanned.
                let fresh: Vec<RelPath> = scope
                    .regions()
                    .filter(|(p, d)| *d == Depth::Tree && !p.is_root())
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in &fresh {
                    self.cover(p);
                }
            }
            for (from, to) in &batch.renames {
                if self.rename_applies(from, to) && mirror.rename(from, to) {
                    stats.renames += 1;
                }
            }
            if covered != self.uncovered.is_empty() {
                covered = !covered;
                seen.covered(covered);
            }
            full |= scope.is_full();
            if !full && scope.is_empty() {
                continue;
            }
            let started = Instant::now();
            let r = if full {
                stats.rescans += 1;
                mirror.reconcile_all()
            } else {
                stats.reconciles += 1;
                stats.listings += scope.regions().filter(|(_, d)| *d != Depth::Entry).count() as u64;
                mirror.reconcile_scope(scope.clone())
            };
            if ticked {
                last_tick = Instant::now();
                every = opts.rescan_every.max(started.elapsed() * 5);
            }
            match r {
                Ok(r) => {
                    stats.files_sent += r.files_sent;
                    if r.ops > 0 {
                        log::debug!("reconciled: {} operations", r.ops);
                    }
                    if !r.problems.is_empty() && !full {
                        // The scope may have missed what the problem depends on.
                        for p in &r.problems {
                            log::info!("{p}; reconciling the whole tree");
                        }
                        if let Err(e) = mirror.reconcile_all() {
                            log::error!("reconcile: {e}");
                        }
                    } else {
                        for p in &r.problems {
                            log::warn!("{p}");
                        }
                    }
                }
                Err(e) => {
                    // Kept, so the next batch tries again (a refused mass delete stays refused
                    // until the source is back, and nothing else in the batch is dropped).
                    log::error!("reconcile: {e}");
                    if full {
                        self.pending = Scope::full();
                    } else {
                        self.pending = scope;
                    }
                }
            }
            // A whole-tree walk or a big burst leaves freed memory behind: give it back, so an
            // idle watcher stays small. Not after every small burst: trimming costs CPU.
            if full || batch.events >= 1000 {
                crate::sys::release_free_memory();
            }
        }
    }

    /// A rename is repeated on the target only when the source still shows it: the old name
    /// gone and the new one there (otherwise later changes would be undone on the target and
    /// sent again).
    fn rename_applies(&self, from: &RelPath, to: &RelPath) -> bool {
        let at = |p: &RelPath| self.top.join(p.as_path());
        matches!(std::fs::symlink_metadata(at(from)), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            && std::fs::symlink_metadata(at(to)).is_ok()
    }

    /// Waits for the next reason to reconcile and gathers the burst: `None` when `stop` is set.
    fn next_batch(
        &mut self,
        opts: &WatchOptions,
        stop: &AtomicBool,
        tick: Option<Instant>,
        busy: &dyn Fn(&RelPath) -> bool,
        echo: &dyn Fn(&RelPath) -> bool,
    ) -> Option<Batch> {
        let poll = Duration::from_millis(100);
        let mut batch = Batch::default();
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if tick.is_some_and(|t| Instant::now() >= t) {
                return Some(batch);
            }
            match self.rx.recv_timeout(poll) {
                Ok(ev) => {
                    if batch.add(self, ev) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    batch.full = true;
                    return Some(batch);
                }
            }
        }
        // With no debounce (the default), the first event of a quiet period is answered at
        // once: only what is queued already joins it, and what arrives while its reconcile runs
        // makes the next batch. With one, the burst ends at the first quiet `debounce`.
        let burst = Instant::now();
        while burst.elapsed() < opts.max_delay {
            let ev = if opts.debounce.is_zero() {
                self.rx.try_recv().map_err(|_| ())
            } else {
                self.rx.recv_timeout(opts.debounce).map_err(|_| ())
            };
            match ev {
                Ok(ev) => {
                    batch.add(self, ev);
                }
                Err(()) => break,
            }
        }
        batch.finish(opts, busy, echo);
        Some(batch)
    }
}

/// The changes of one burst.
#[derive(Default)]
struct Batch {
    events: u64,
    full: bool,
    /// Regions beyond single entries (new directories).
    scope: Scope,
    /// Changed entries, by parent, rolled up per directory at the end.
    entries: HashMap<RelPath, Vec<RelPath>>,
    renames: Vec<(RelPath, RelPath)>,
    limit_hits: Vec<RelPath>,
    /// Every path an event named, for the observer.
    touched: Vec<RelPath>,
}

impl Batch {
    /// Takes one event in; true when it calls for a reconcile (reads do not).
    fn add(&mut self, w: &Watch, ev: notify::Result<notify::Event>) -> bool {
        let ev = match ev {
            Err(e) => {
                self.events += 1;
                if !matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    log::warn!("watch error ({e}); rescanning the whole tree");
                    self.full = true;
                    return true;
                }
                // The directory that could not be watched may already hold files.
                match e.paths.first().and_then(|p| w.rel(p)) {
                    Some(p) => {
                        self.scope.add(p.clone(), Depth::Tree);
                        self.limit_hits.push(p);
                    }
                    None => {
                        self.full = true;
                        self.limit_hits.push(RelPath::root());
                    }
                }
                return true;
            }
            Ok(ev) => ev,
        };
        if ev.need_rescan() {
            log::warn!("the event queue overflowed; rescanning the whole tree");
            self.full = true;
            self.events += 1;
            return true;
        }
        let deep = match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => false,
            EventKind::Access(_) => return false,
            EventKind::Create(CreateKind::Folder) => true,
            EventKind::Create(CreateKind::File) => false,
            // A directory may have arrived with its contents.
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => true,
            // The path may name a new directory already (`mv new d` over an old `d`): notify
            // drops watches by path when the old one goes, so the new one is watched again.
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => true,
            EventKind::Create(_) => true,
            _ => false,
        };
        self.events += 1;
        let paths: Vec<RelPath> = ev.paths.iter().filter_map(|p| w.rel(p)).collect();
        if paths.len() != ev.paths.len() {
            // Outside the watched tree, or the watched directory itself moved: start over.
            log::info!("event {:?} on {:?}; rescanning the whole tree", ev.kind, ev.paths);
            self.full = true;
            return true;
        }
        if let EventKind::Modify(ModifyKind::Name(RenameMode::Both)) = ev.kind {
            if let [from, to] = &paths[..] {
                self.renames.push((from.clone(), to.clone()));
            }
        }
        for p in &paths {
            if self.touched.last() != Some(p) {
                self.touched.push(p.clone());
            }
        }
        for (i, p) in paths.into_iter().enumerate() {
            // The "to" end of a rename is the last path.
            let new_tree = deep && (ev.paths.len() == 1 || i == 1) && is_dir(&w.top.join(p.as_path()));
            if new_tree {
                self.scope.add(p, Depth::Tree);
            } else if let Some(parent) = p.parent() {
                let seen = self.entries.entry(parent).or_default();
                if seen.last() != Some(&p) {
                    seen.push(p);
                }
            } else {
                // The watched directory itself.
                self.scope.add(p, Depth::Entry);
            }
        }
        true
    }

    /// Turns the entries seen into regions: one each, or the directory's listing when many.
    /// Entries the caller is itself forwarding are left out, and so are the echoes of its own
    /// removals (`Reconciler::is_echo`), which the observer is not told of either: the mount
    /// made them, so the kernel already knows. Their directory is still looked at itself (its
    /// own entry, not its listing): a name made and removed again behind the mount leaves it
    /// as it was but for its mtime.
    fn finish(&mut self, opts: &WatchOptions, busy: &dyn Fn(&RelPath) -> bool, echo: &dyn Fn(&RelPath) -> bool) {
        let mut echoes = std::collections::HashSet::new();
        for (parent, mut paths) in std::mem::take(&mut self.entries) {
            paths.sort_unstable();
            paths.dedup();
            let mut echoed = false;
            paths.retain(|p| {
                if echo(p) {
                    echoes.insert(p.clone());
                    echoed = true;
                    return false;
                }
                !busy(p)
            });
            if echoed {
                self.scope.add(parent.clone(), Depth::Entry);
                self.touched.push(parent.clone());
            }
            if paths.is_empty() {
                continue;
            }
            if paths.len() > opts.roll_up {
                self.scope.add(parent, Depth::Children);
            } else {
                for p in paths {
                    self.scope.add(p, Depth::Entry);
                }
            }
        }
        if !echoes.is_empty() {
            self.touched.retain(|p| !echoes.contains(p));
        }
    }
}

fn is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn many_events_in_one_directory_roll_up_into_its_listing() {
        let opts = WatchOptions {
            roll_up: 3,
            ..WatchOptions::default()
        };
        // (entries seen, busy paths, echoes, expected regions)
        type Row<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<(&'a str, Depth)>);
        let table: Vec<Row> = vec![
            (
                vec!["d/a", "d/b"],
                vec![],
                vec![],
                vec![
                    ("", Depth::Entry),
                    ("d", Depth::Entry),
                    ("d/a", Depth::Entry),
                    ("d/b", Depth::Entry),
                ],
            ),
            // The same path many times is one entry.
            (
                vec!["d/a", "d/a", "d/a", "d/a"],
                vec![],
                vec![],
                vec![("", Depth::Entry), ("d", Depth::Entry), ("d/a", Depth::Entry)],
            ),
            (
                vec!["d/a", "d/b", "d/c", "d/e", "x"],
                vec![],
                vec![],
                vec![("", Depth::Entry), ("d", Depth::Children), ("x", Depth::Entry)],
            ),
            (
                vec!["d/a", "d/b"],
                vec!["d/a"],
                vec![],
                vec![("", Depth::Entry), ("d", Depth::Entry), ("d/b", Depth::Entry)],
            ),
            (vec!["d/a"], vec!["d/a"], vec![], vec![]),
            // The echoes of the caller's own removals make no region, nor a roll-up: four
            // removals in d, three of them echoes, leave one entry.
            (
                vec!["d/a", "d/b", "d/c", "d/e"],
                vec![],
                vec!["d/a", "d/b", "d/c"],
                vec![("", Depth::Entry), ("d", Depth::Entry), ("d/e", Depth::Entry)],
            ),
            // Their directory itself is looked at, not its listing.
            (
                vec!["d/a", "d/b"],
                vec![],
                vec!["d/a", "d/b"],
                vec![("", Depth::Entry), ("d", Depth::Entry)],
            ),
        ];
        for (seen, busy, echoes, want) in table {
            let mut b = Batch::default();
            for s in &seen {
                let s = p(s);
                b.entries.entry(s.parent().unwrap()).or_default().push(s.clone());
                b.touched.push(s);
            }
            let busy: Vec<RelPath> = busy.iter().map(|s| p(s)).collect();
            let echoes: Vec<RelPath> = echoes.iter().map(|s| p(s)).collect();
            b.finish(&opts, &|x| busy.contains(x), &|x| echoes.contains(x));
            let got: Vec<(RelPath, Depth)> = b.scope.regions().map(|(x, d)| (x.clone(), d)).collect();
            let want: Vec<(RelPath, Depth)> = want.iter().map(|(x, d)| (p(x), *d)).collect();
            assert_eq!(got, want, "seen {seen:?}");
            let mut told: Vec<RelPath> = seen.iter().map(|s| p(s)).filter(|x| !echoes.contains(x)).collect();
            if !echoes.is_empty() {
                told.push(p("d"));
            }
            assert_eq!(b.touched, told, "the observer is told of all but the echoes: {seen:?}");
        }
    }
}
