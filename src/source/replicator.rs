//! `Replicator`: forwards the mount's (and the watcher's) changes to the target through its
//! `Link`, in the order the source applied them, and runs the link's recovery: reconnecting with
//! backoff and catching up. One lock (`order`) is held from the moment an operation touches the
//! source until its requests are queued on the session, so the target sees exactly the source's
//! order; the caller then waits, outside the lock, for its own acknowledgements only, so many
//! operations are in flight at once.
//!
//! Invariants:
//! - An operation that fails on the source forwards nothing.
//! - The source is the truth. A request the target refuses marks the paths it names as
//!   changed; the refused syscall tries one catch-up of them before it returns (it keeps the
//!   source's result either way), and while any path is behind nothing more is forwarded: the
//!   link is `CatchingUp` and the recovery thread retries with backoff until a catch-up
//!   succeeds. A failed repair is never forgotten.
//! - A lost target is a state, not an end. The operations in flight at the moment of loss
//!   count as changed; the recovery thread reconnects (about 100 ms, doubling, up to 5 s) and
//!   catches up. Large catch-ups run first without the order lock (changes made meanwhile are
//!   marked again); the last round runs under it, so forwarding resumes with no gap and nothing
//!   applied out of order. Under `Policy::Continue` no syscall waits longer than one `--timeout`.

use super::changed;
use super::link::{is_loss, Link, LinkState, Policy, Session};
use super::Reconciler;
use super::{Source, SyncError};
use crate::change::Change;
use crate::path::RelPath;
use crate::protocol::Request;
use crate::reconcile::{Depth, Report, Scope};
use crate::rpc::{Pending, Rpc};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

thread_local! {
    /// The mark this thread's last operations wait for under `Policy::Block` (0: none): set by
    /// `hold`, taken by `answer`.
    static HOLD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The most removals `Echoes` remembers; past it, it forgets them all (the watcher then
/// reconciles what it sees, as it would without them).
const ECHOES_MAX: usize = 1 << 16;

/// Above this many regions, a catch-up round runs without the order lock first.
const LOCKED_CATCH_UP: usize = 256;
/// Unlocked rounds before the last one is taken under the lock regardless.
const UNLOCKED_ROUNDS: usize = 3;

/// The changes one source operation produced, to be applied on the target in this order, and
/// whether they fall short of what happened on the source (a path the mount cannot name, a step
/// that failed after an earlier one took effect): the tree is then resynced from the source.
pub struct Forward {
    pub changes: Vec<Change>,
    pub resync: bool,
}

impl Forward {
    pub fn none() -> Forward {
        Forward::of(Vec::new())
    }
    pub fn of(changes: Vec<Change>) -> Forward {
        Forward { changes, resync: false }
    }
    pub fn resync() -> Forward {
        Forward {
            changes: Vec::new(),
            resync: true,
        }
    }
}

/// Requests queued by `start`, to be waited for by `finish`.
pub struct Ticket(Option<Queued>);

struct Queued {
    session: Arc<Session>,
    pending: Vec<(Pending, &'static str)>,
    regions: Vec<(RelPath, Depth)>,
    bytes: u64,
    started: Instant,
}

pub struct Replicator {
    source: Source,
    /// Held from the source's change until its requests are queued. Lock order: `order`, then
    /// anything the closure takes (the mount's inode table), then the link's locks.
    order: Mutex<()>,
    link: Link,
    /// Held through a whole catch-up: two at once would interleave their scans and stages on
    /// one session. Lock order: `catching`, then `order`.
    catching: Mutex<()>,
    stop: AtomicBool,
    /// Files (device, inode) whose writes reach the target later, at close (the mount's
    /// writers beside passthrough readers), with their count of such opens: the watcher
    /// leaves them alone.
    deferred: Mutex<HashMap<(u64, u64), usize>>,
    /// Names this mount removed (unlink, rmdir) and forwarded as removed: the watcher sees the
    /// removal too, and skips a name that is still absent (`is_echo`). A name is forgotten
    /// when the mount makes anything else of it, and all are forgotten when a rename, a
    /// catch-up or a watcher's reconcile that changed the target may have put something there
    /// that no removal of the mount's accounts for. So a skipped name is absent on the source,
    /// and the last thing that touched it on the target was the mount's removal.
    echoes: Mutex<HashSet<RelPath>>,
    /// Only a watcher that sees the mount's own changes (inotify) needs `echoes`.
    track_echoes: AtomicBool,
    /// Told of each directory the mount makes, before the mount answers: a watcher that does
    /// not see the mount's own changes (fanotify) watches it from there.
    made_dirs: std::sync::OnceLock<MadeDirs>,
}

/// See `Replicator::made_dirs`.
pub type MadeDirs = Box<dyn Fn(&RelPath) + Send + Sync>;

impl Replicator {
    /// Wraps a source and a link whose target has just been reconciled.
    pub fn new(source: Source, link: Link) -> Self {
        Replicator {
            source,
            order: Mutex::new(()),
            link,
            catching: Mutex::new(()),
            stop: AtomicBool::new(false),
            deferred: Mutex::new(HashMap::new()),
            echoes: Mutex::new(HashSet::new()),
            track_echoes: AtomicBool::new(false),
            made_dirs: std::sync::OnceLock::new(),
        }
    }

    /// Reconciles the target through the link's first session (the startup walk). Its failure
    /// is final: retrying starts only after a successful start.
    /// `hook` is called with each source directory before the walk lists it.
    pub fn startup_walk(&self, hook: Option<crate::reconcile::ListingHook>) -> Result<Report, SyncError> {
        let s = self
            .link
            .session()
            .ok_or_else(|| SyncError::Rpc(crate::rpc::RpcError::Disconnected("no session".into())))?;
        match hook {
            Some(h) => self.source.reconcile_listing(s.rpc.as_ref(), h),
            None => self.source.reconcile(s.rpc.as_ref()),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    fn policy_refuses(&self) -> bool {
        self.link.policy() == Policy::Fail && self.link.state() != LinkState::Connected
    }

    /// Runs `op` on the source under the order lock; on success queues what it returned for the
    /// target, then waits for the target's acknowledgements. Returns `op`'s own result. While
    /// the target is away, `Policy::Fail` refuses the operation before it touches the source.
    pub fn apply<T, E: From<std::io::Error>>(&self, op: impl FnOnce() -> Result<(T, Forward), E>) -> Result<T, E> {
        self.apply_with(true, op)
    }

    /// `apply` for what the mount cannot refuse, because the source already has it (writeback
    /// of a shared mmap, a passthrough writer's file): `Policy::Fail` marks it changed instead.
    pub fn apply_unrefused<T, E: From<std::io::Error>>(
        &self,
        op: impl FnOnce() -> Result<(T, Forward), E>,
    ) -> Result<T, E> {
        self.apply_with(false, op)
    }

    fn apply_with<T, E: From<std::io::Error>>(
        &self,
        refusable: bool,
        op: impl FnOnce() -> Result<(T, Forward), E>,
    ) -> Result<T, E> {
        let guard = self.order.lock();
        let session = self.link.forwarding();
        if session.is_none() && refusable && self.policy_refuses() {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        let (value, mut fwd) = op()?;
        if std::mem::take(&mut fwd.resync) {
            let n = self.link.mark_scope(Scope::full());
            drop(guard);
            if session.is_some() {
                self.repair_now("a change could not be forwarded as it was made");
            }
            self.hold(n);
            return Ok(value);
        }
        if fwd.changes.is_empty() {
            return Ok(value);
        }
        self.note_own(&fwd.changes);
        let Some(session) = session else {
            let n = self.link.mark(&fwd.changes);
            drop(guard);
            self.hold(n);
            return Ok(value);
        };
        let q = Self::queue(session, fwd);
        drop(guard);
        self.settle(q);
        Ok(value)
    }

    /// Tells the watcher of the changes just made by the mount (the caller holds the order
    /// lock). The directories it made go to `made_dirs`. In `echoes` removals are remembered,
    /// anything else done to a name forgets it, and a rename (which may bring a whole tree
    /// under other names) forgets them all.
    fn note_own(&self, changes: &[Change]) {
        if let Some(made) = self.made_dirs.get() {
            for c in changes {
                if let Change::Mkdir { path, .. } = c {
                    made(path);
                }
            }
        }
        if !self.track_echoes.load(Ordering::Relaxed) {
            return;
        }
        let mut e = self.echoes.lock();
        for c in changes {
            match c {
                Change::Unlink { path } | Change::Rmdir { path } => {
                    if e.len() >= ECHOES_MAX {
                        e.clear();
                    }
                    e.insert(path.clone());
                }
                Change::Rename { .. } => e.clear(),
                c if !e.is_empty() => {
                    for p in c.paths() {
                        e.remove(p);
                    }
                }
                _ => {}
            }
        }
    }

    /// Set when the mount's watcher sees the mount's own changes (`Watch::sees_own_changes`).
    pub fn track_echoes(&self, on: bool) {
        self.track_echoes.store(on, Ordering::Relaxed);
    }

    /// Set once, by a mount whose watcher does not see its own changes (`Watch::made_dirs`).
    pub fn on_made_dirs(&self, f: MadeDirs) {
        let _ = self.made_dirs.set(f);
    }

    fn forget_echoes(&self) {
        self.echoes.lock().clear();
    }

    /// Under `Policy::Block`, the calling thread's operation is not done until a catch-up has
    /// covered mark `n`: `answer` sends its reply then.
    fn hold(&self, n: u64) {
        if self.link.policy() == Policy::Block {
            HOLD.with(|h| h.set(h.get().max(n)));
        }
    }

    /// Sends the reply of the mutation this thread just made: at once, or, when `Policy::Block`
    /// holds it, from the thread that completes the catch-up past it. The caller's thread is
    /// free either way, so a blocked mutation never holds a thread that reads need. A thread
    /// that never calls this (the watcher) simply continues.
    pub fn answer(&self, send: impl FnOnce() + Send + 'static) {
        match HOLD.with(|h| h.replace(0)) {
            0 => send(),
            n => self.link.after_caught_up(n, Box::new(send)),
        }
    }

    /// Queues requests that change nothing (fsync) in order, without waiting; `finish` waits.
    pub fn start(&self, make: impl FnOnce() -> Forward) -> Ticket {
        let _g = self.order.lock();
        let fwd = make();
        match self.link.forwarding() {
            Some(s) if !fwd.changes.is_empty() => Ticket(Some(Self::queue(s, fwd))),
            _ => Ticket(None),
        }
    }

    /// Waits for what `start` queued.
    pub fn finish(&self, t: Ticket) {
        if let Some(q) = t.0 {
            self.settle(q);
        }
    }

    /// Submits an operation's changes on the session, in order; the caller holds the order
    /// lock. The regions are kept in case they do not all land.
    fn queue(session: Arc<Session>, fwd: Forward) -> Queued {
        let mut regions = Vec::new();
        let mut bytes = 0;
        for c in &fwd.changes {
            regions.extend(changed::regions(c));
            bytes += c.payload_len();
        }
        let pending = fwd
            .changes
            .into_iter()
            .map(|c| {
                let what = c.name();
                (session.rpc.submit(Request::Change(c)), what)
            })
            .collect();
        Queued {
            session,
            pending,
            regions,
            bytes,
            started: Instant::now(),
        }
    }

    /// Waits for every answer of one operation and deals with failures.
    fn settle(&self, q: Queued) {
        let Queued {
            session,
            pending,
            regions,
            bytes,
            started,
        } = q;
        let mut refused = None;
        let mut lost = None;
        let n = pending.len() as u64;
        for (p, what) in pending {
            match p.wait() {
                Ok(_) => {}
                Err(e) if is_loss(&e) => {
                    lost = Some(format!("{what}: {e}"));
                    break;
                }
                Err(e) => {
                    refused.get_or_insert(format!("the target refused a {what}: {e}"));
                }
            }
        }
        if let Some(why) = lost {
            // Marked before the session is let go, so the catch-up sees it.
            let m = self.link.mark_regions(regions);
            self.link.lost(&session, &why);
            self.hold(m);
            return;
        }
        self.link.note_forwarded(n, bytes, started.elapsed());
        if let Some(why) = refused {
            let m = self.link.mark_regions(regions);
            drop(session);
            self.repair_now(&why);
            self.hold(m);
        }
    }

    /// A refusal: forwarding stops, and one catch-up of what is marked is tried at once, so
    /// the syscall returns with the target repaired where it can be. If the link was already
    /// behind, the recovery thread's schedule takes it instead (no repair storm).
    fn repair_now(&self, why: &str) {
        // `catching` first (the lock order): the recovery thread, woken by the state change
        // below, must not take the repair from this syscall.
        let _c = self.catching.lock();
        let _g = self.order.lock();
        if !self.link.fell_behind(why) {
            return;
        }
        log::warn!("{why}; repairing the target from the source");
        self.catch_up_locked();
    }

    /// Reconciles everything marked, under the order lock (the caller holds it); on success
    /// the link is connected again.
    fn catch_up_locked(&self) -> bool {
        let Some(s) = self.link.session() else {
            return false;
        };
        let (scope, upto) = self.link.take_changed();
        if scope.is_empty() {
            self.link.caught_up(upto);
            return true;
        }
        self.link.note_repair();
        match self.reconcile_on(&s, scope.clone()) {
            Ok(()) => {
                self.link.caught_up(upto);
                true
            }
            Err(why) => {
                self.link.mark_scope(scope);
                self.link.catch_up_failed(&why);
                false
            }
        }
    }

    /// One reconcile of `scope` through session `s`; a loss ends the session, per-path
    /// problems leave the scope to be tried again.
    fn reconcile_on(&self, s: &Arc<Session>, scope: Scope) -> Result<(), String> {
        self.forget_echoes();
        let rpc = s.rpc.as_ref();
        let t = Instant::now();
        let whole = scope.is_full();
        let r = self.source.reconcile_scope(rpc, scope);
        match r {
            Ok(r) if r.problems.is_empty() => {
                if r.ops > 0 || whole {
                    log::info!(
                        "caught up in {:.3} s{}: {} operations, {} files sent",
                        t.elapsed().as_secs_f64(),
                        if whole { " (whole tree)" } else { "" },
                        r.ops,
                        r.files_sent
                    );
                }
                Ok(())
            }
            Ok(r) => {
                for p in r.problems.iter().take(5) {
                    log::warn!("catch-up: {p}");
                }
                Err(format!(
                    "catch-up left {} paths behind, first: {}",
                    r.problems.len(),
                    r.problems[0]
                ))
            }
            Err(SyncError::Rpc(e)) => {
                let why = format!("catch-up: {e}");
                if is_loss(&e) {
                    self.link.lost(s, &why);
                }
                Err(why)
            }
            Err(e) => Err(format!("catch-up: {e}")),
        }
    }

    /// The catch-up after a reconnect or a refusal: big sets in rounds without the order lock,
    /// the last round under it.
    fn catch_up(&self) {
        let _c = self.catching.lock();
        for _ in 0..UNLOCKED_ROUNDS {
            let (n, full) = self.link.behind();
            if !full && n <= LOCKED_CATCH_UP {
                break;
            }
            let Some(s) = self.link.session() else { return };
            let (scope, _) = self.link.take_changed();
            if let Err(why) = self.reconcile_on(&s, scope.clone()) {
                self.link.mark_scope(scope);
                if self.link.state() == LinkState::Disconnected {
                    return;
                }
                log::debug!("unlocked catch-up round: {why}");
            }
        }
        let _g = self.order.lock();
        self.catch_up_locked();
    }

    /// The recovery thread: reconnects while disconnected and catches up while behind, until
    /// `stop`. Spawned once the mount (or watch) is live.
    pub fn run_recovery(&self) {
        let stopped = || self.stop.load(Ordering::Relaxed);
        let mut last_try: Option<Instant> = None;
        while !stopped() {
            let state = self.link.state();
            if state == LinkState::Connected {
                self.link.wait_change(Duration::from_millis(250));
                self.link.check_identity();
                continue;
            }
            // Every retry waits its backoff, counted from the last attempt.
            if let Some(t) = last_try {
                let due = t + self.link.backoff();
                let now = Instant::now();
                if now < due {
                    self.link.wait_change((due - now).min(Duration::from_millis(200)));
                    continue;
                }
            }
            last_try = Some(Instant::now());
            match state {
                LinkState::Disconnected => {
                    self.link.drain_lost(&stopped);
                    if self.link.reconnect().is_ok() {
                        self.catch_up();
                    }
                }
                LinkState::CatchingUp => self.catch_up(),
                LinkState::Connected => {}
            }
            if self.link.state() == LinkState::Connected {
                last_try = None;
            }
        }
    }

    /// Sends every reply held for a catch-up now, and holds none from here on (the mount is
    /// being stopped).
    pub fn release_held(&self) {
        self.link.release_held();
    }

    /// Stops the recovery thread (and releases blocked callers).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.link.release_held();
        self.link.wake();
    }

    /// At the end: one last catch-up if the target is behind but reachable, then waits until
    /// everything forwarded is durable on the target. Returns how many regions are still
    /// behind (0: the target equals what the source forwarded).
    pub fn finish_up(&self) -> usize {
        if self.link.state() == LinkState::Disconnected {
            self.link.drain_lost(&|| false);
            if self.link.reconnect().is_ok() {
                self.catch_up();
            }
        } else if self.link.state() == LinkState::CatchingUp {
            self.catch_up();
        }
        if let Some(s) = self.link.forwarding() {
            let p = {
                let _g = self.order.lock();
                s.rpc.submit(Request::Change(Change::Fsync {
                    path: RelPath::root(),
                    datasync: false,
                }))
            };
            if let Err(e) = p.wait() {
                if is_loss(&e) {
                    self.link.lost(&s, &e.to_string());
                } else {
                    log::warn!("final sync of the target root: {e}");
                }
            }
        }
        let (n, _) = self.link.behind();
        if self.link.state() == LinkState::Connected {
            n
        } else {
            n.max(1)
        }
    }
}

impl Replicator {
    /// A file is open for writes that reach the target at close only.
    pub fn defer(&self, dev: u64, ino: u64) {
        *self.deferred.lock().entry((dev, ino)).or_default() += 1;
    }

    /// One such open ended (after its file was sent).
    pub fn undefer(&self, dev: u64, ino: u64) {
        let mut d = self.deferred.lock();
        if let Some(n) = d.get_mut(&(dev, ino)) {
            *n -= 1;
            if *n == 0 {
                d.remove(&(dev, ino));
            }
        }
    }

    /// Runs a watcher's reconcile while no mutation can run. While the link is not
    /// connected, the scope joins the changed paths instead, for the catch-up.
    fn reconcile_with(&self, scope: Scope) -> Result<Report, SyncError> {
        let _g = self.order.lock();
        let Some(s) = self.link.forwarding() else {
            self.link.mark_scope(scope);
            return Ok(Report::default());
        };
        let r = self.source.reconcile_scope(s.rpc.as_ref(), scope.clone());
        // One that changed the target may have made there a name the mount had removed.
        // The watcher, the only one to consult the echoes, asks again only after this.
        if !matches!(&r, Ok(rep) if rep.ops == 0) {
            self.forget_echoes();
        }
        match r {
            Err(SyncError::Rpc(e)) if is_loss(&e) => {
                self.link.mark_scope(scope);
                self.link.lost(&s, &format!("watch: {e}"));
                Ok(Report::default())
            }
            r => r,
        }
    }
}

/// The watcher (under the mount, or `mirrorfs watch`): changes are reconciled under the order
/// lock, so they never interleave with the mount's own forwarding.
impl Reconciler for Replicator {
    fn reconcile_all(&self) -> Result<Report, SyncError> {
        self.reconcile_with(Scope::full())
    }

    fn reconcile_scope(&self, scope: Scope) -> Result<Report, SyncError> {
        self.reconcile_with(scope)
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> bool {
        let _g = self.order.lock();
        self.forget_echoes();
        match self.link.forwarding() {
            Some(s) => super::forward_rename(s.rpc.as_ref(), from, to),
            None => false,
        }
    }

    fn is_busy(&self, p: &RelPath) -> bool {
        let d = self.deferred.lock();
        if d.is_empty() {
            return false;
        }
        self.source.stat(p).is_ok_and(|m| d.contains_key(&(m.dev, m.ino)))
    }

    fn is_echo(&self, p: &RelPath) -> bool {
        if !self.echoes.lock().contains(p) {
            return false;
        }
        matches!(self.source.stat(p), Err(e) if e.errno == libc::ENOENT)
    }
}
