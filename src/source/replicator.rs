//! `Replicator`: forwards the mount's mutations to the target in the order the source applied
//! them. One lock (`order`) is held from the moment an operation touches the source until its
//! requests are queued on the connection, so the target sees exactly the source's order; the
//! caller then waits, outside the lock, for its own acknowledgements only, so many operations
//! are in flight at once.
//!
//! Invariants:
//! - An operation that fails on the source forwards nothing.
//! - The source is the truth: a request that fails on the target makes the target be
//!   reconciled (repaired) from the source; the user's syscall keeps the source's result.
//! - A target that dies or stops answering costs at most one bounded wait. After that the
//!   replicator is `Lost`: operations go on at the source only, the paths they touched are kept
//!   in the dirty set (where a journal can later take them from), and the next startup walk
//!   repairs the target.

use super::{ReplicatorSource, SyncError};
use crate::path::RelPath;
use crate::protocol::Request;
use crate::reconcile::{Report, Scope};
use crate::rpc::{Pending, Rpc, RpcError};
use crate::watch::Reconciler;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the replicator has seen of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    /// The target stopped answering or the connection broke; nothing is forwarded any more.
    Lost,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub forwarded: u64,
    pub repairs: u64,
    pub unforwarded: u64,
}

pub struct Replicator<R: Rpc> {
    source: ReplicatorSource<R>,
    /// Held from the source's change until its requests are queued. Lock order: `order`, then
    /// anything the closure takes (the mount's inode table).
    order: Mutex<()>,
    lost: AtomicBool,
    /// Paths changed at the source but not acknowledged by the target, for a later catch-up.
    dirty: Mutex<BTreeSet<RelPath>>,
    forwarded: AtomicU64,
    repairs: AtomicU64,
    unforwarded: AtomicU64,
    /// Files (device, inode) whose writes reach the target later, at close (the mount's
    /// writers beside passthrough readers), with their count of such opens: the watcher
    /// leaves them alone.
    deferred: Mutex<HashMap<(u64, u64), usize>>,
}

/// Requests queued by `start`, to be waited for by `finish`.
pub struct Ticket(Vec<(Pending, &'static str)>);

/// The requests one source operation produced, to be applied on the target in this order.
pub struct Forward {
    pub requests: Vec<Request>,
}

impl Forward {
    pub fn none() -> Forward {
        Forward { requests: Vec::new() }
    }
    pub fn of(requests: Vec<Request>) -> Forward {
        Forward { requests }
    }
}

impl<R: Rpc> Replicator<R> {
    /// Wraps a source whose target has just been reconciled.
    pub fn new(source: ReplicatorSource<R>) -> Self {
        Replicator {
            source,
            order: Mutex::new(()),
            lost: AtomicBool::new(false),
            dirty: Mutex::new(BTreeSet::new()),
            forwarded: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
            unforwarded: AtomicU64::new(0),
            deferred: Mutex::new(HashMap::new()),
        }
    }

    pub fn source(&self) -> &ReplicatorSource<R> {
        &self.source
    }

    pub fn link(&self) -> Link {
        if self.lost.load(Ordering::Relaxed) {
            Link::Lost
        } else {
            Link::Up
        }
    }

    pub fn counters(&self) -> Counters {
        Counters {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            repairs: self.repairs.load(Ordering::Relaxed),
            unforwarded: self.unforwarded.load(Ordering::Relaxed),
        }
    }

    /// Paths changed since the target was lost (or whose repair failed).
    pub fn dirty(&self) -> Vec<RelPath> {
        self.dirty.lock().iter().cloned().collect()
    }

    /// Runs `op` on the source under the order lock; on success queues what it returned for the
    /// target, then waits for the target's acknowledgements. Returns `op`'s own result.
    pub fn apply<T, E>(&self, op: impl FnOnce() -> Result<(T, Forward), E>) -> Result<T, E> {
        let guard = self.order.lock();
        let (value, fwd) = op()?;
        if fwd.requests.is_empty() {
            return Ok(value);
        }
        if self.lost.load(Ordering::Relaxed) {
            self.note_unforwarded(&fwd.requests);
            return Ok(value);
        }
        let pending = self.queue(fwd);
        drop(guard);
        self.settle(pending);
        Ok(value)
    }

    /// Queues requests that change nothing (fsync) in order, without waiting; `finish` waits.
    pub fn start(&self, make: impl FnOnce() -> Forward) -> Ticket {
        let _g = self.order.lock();
        let fwd = make();
        if self.lost.load(Ordering::Relaxed) {
            return Ticket(Vec::new());
        }
        Ticket(self.queue(fwd))
    }

    /// Submits an operation's requests, in order; the caller holds the order lock. Only the
    /// request's name is kept for the log: a refusal's own error names the path.
    fn queue(&self, fwd: Forward) -> Vec<(Pending, &'static str)> {
        fwd.requests
            .into_iter()
            .map(|r| {
                let what = r.name();
                (self.source.rpc().submit(r), what)
            })
            .collect()
    }

    /// Waits for what `start` queued.
    pub fn finish(&self, t: Ticket) {
        self.settle(t.0);
    }

    /// Waits for every answer of one operation and deals with failures.
    fn settle(&self, pending: Vec<(Pending, &'static str)>) {
        let mut failed = None;
        for (p, what) in pending {
            match p.wait() {
                Ok(_) => {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Err(RpcError::Remote(e)) => {
                    log::warn!("target refused a {what}: {e}; repairing the target from the source");
                    failed.get_or_insert(what);
                }
                Err(e @ (RpcError::Timeout(_) | RpcError::Disconnected(_))) => {
                    self.lose(&format!("{what}: {e}"));
                    return;
                }
            }
        }
        if failed.is_some() {
            self.repair();
        }
    }

    /// Gives up on the target: logs once, closes the connection, forwards nothing more.
    fn lose(&self, why: &str) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            log::error!(
                "target lost ({why}); the mount goes on at the source only, and the next start reconciles the target"
            );
            self.source.rpc().abandon(why);
        }
    }

    fn note_unforwarded(&self, reqs: &[Request]) {
        self.unforwarded.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        let mut d = self.dirty.lock();
        for r in reqs {
            for p in r.paths() {
                d.insert(p.clone());
            }
        }
    }

    /// Reconciles the target from the source while no mutation can run (the order lock is held),
    /// so the walk sees a still source.
    pub fn repair(&self) {
        let _g = self.order.lock();
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        self.repairs.fetch_add(1, Ordering::Relaxed);
        match self.source.reconcile() {
            Ok(r) => {
                log::info!("repair: {} operations", r.ops);
                for p in &r.problems {
                    log::warn!("repair: {p}");
                }
            }
            Err(SyncError::Rpc(e)) => {
                drop(_g);
                self.lose(&format!("repair: {e}"));
            }
            Err(e) => log::error!("repair failed: {e}"),
        }
    }

    /// Waits until everything queued so far is acknowledged (used before unmount completes).
    pub fn drain(&self) {
        if self.lost.load(Ordering::Relaxed) {
            return;
        }
        let p = {
            let _g = self.order.lock();
            self.source.rpc().submit(Request::Fsync {
                path: RelPath::root(),
                datasync: false,
            })
        };
        if let Err(e) = p.wait() {
            match e {
                RpcError::Remote(e) => log::warn!("final sync of the target root: {e}"),
                e => self.lose(&e.to_string()),
            }
        }
    }
}

impl<R: Rpc> Replicator<R> {
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

    /// Runs a reconcile while no mutation can run; a lost target ends forwarding as in `settle`.
    fn reconcile_with(
        &self,
        f: impl FnOnce(&ReplicatorSource<R>) -> Result<Report, SyncError>,
    ) -> Result<Report, SyncError> {
        let g = self.order.lock();
        if self.lost.load(Ordering::Relaxed) {
            return Ok(Report::default());
        }
        match f(&self.source) {
            Err(SyncError::Rpc(e)) => {
                drop(g);
                self.lose(&format!("watch: {e}"));
                Ok(Report::default())
            }
            r => r,
        }
    }
}

/// The watcher under the mount: changes made behind the mount's back are reconciled under the
/// order lock, so they never interleave with the mount's own forwarding.
impl<R: Rpc> Reconciler for Replicator<R> {
    fn reconcile_all(&self) -> Result<Report, SyncError> {
        self.reconcile_with(|s| s.reconcile())
    }

    fn reconcile_scope(&self, scope: Scope) -> Result<Report, SyncError> {
        self.reconcile_with(|s| s.reconcile_scope(scope))
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> bool {
        let _g = self.order.lock();
        !self.lost.load(Ordering::Relaxed) && Reconciler::rename(&self.source, from, to)
    }

    fn is_busy(&self, p: &RelPath) -> bool {
        let d = self.deferred.lock();
        if d.is_empty() {
            return false;
        }
        self.source.stat(p).is_ok_and(|m| d.contains_key(&(m.dev, m.ino)))
    }
}
