//! The source side of a replica. `Source` is the tree and the options; it owns the reconcile
//! cycle (target scan asked for first and run while the source is scanned, then plan, then
//! apply) and verification, each a function of (source, target, scope). `ReplicatorSource`, the
//! original design's name, binds a `Source` to one target and reconciles when built; `link`
//! keeps one target across sessions (reconnects, catch-up, changed paths) and `replicator`
//! forwards the mount's changes through it in the source's order.

use crate::change::Change;
use crate::fs::{FileSystem, FsError, Kind};
use crate::path::RelPath;
use crate::progress::Progress;
use crate::protocol::{Reply, Request};
use crate::reconcile::{self, ApplyOptions, Depth, Op, PlanError, PlanOptions, Report, ScanOptions, Scope, Snapshot};
use crate::rpc::{Pending, Rpc, RpcError};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

pub mod changed;
pub mod link;
pub mod replicator;
pub use link::{Link, LinkState, Policy};
pub use replicator::{Forward, MadeDirs, Replicator};

#[derive(Debug, Clone, Copy, Default)]
pub struct SyncOptions {
    /// Compare content hashes instead of size and mtime.
    pub checksum: bool,
    pub allow_mass_delete: bool,
    /// Show a progress bar (on a terminal only).
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("scanning the source: {0}")]
    Scan(FsError),
    #[error("scanning the target: {0}")]
    TargetScan(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Rpc(#[from] RpcError),
}

/// What a watcher needs from whoever keeps the target: a `Replicator` (under its order lock,
/// reconnecting), or a plain `ReplicatorSource` in the library. It lives here, not in `watch`,
/// so the source side does not depend on the watcher.
pub trait Reconciler {
    fn reconcile_all(&self) -> Result<Report, SyncError>;
    fn reconcile_scope(&self, scope: Scope) -> Result<Report, SyncError>;
    /// Repeats on the target a rename seen at the source; false when the target refused.
    fn rename(&self, from: &RelPath, to: &RelPath) -> bool;
    /// Paths whose changes the caller is itself forwarding (the mount's open writers): events
    /// on them are skipped.
    fn is_busy(&self, _p: &RelPath) -> bool {
        false
    }
    /// Paths whose events are the echo of the caller's own forwarded removal (the mount's
    /// `rm`): still absent, and last removed on the target by the caller. They are skipped.
    fn is_echo(&self, _p: &RelPath) -> bool {
        false
    }
}

/// The source side of a mirror, without a target: the tree (`fs` and `root` within it) and the
/// options. Every reconcile is a function of (source, target, scope), so the same source serves
/// every session of a target across reconnects.
pub struct Source {
    fs: Arc<dyn FileSystem>,
    root: RelPath,
    opts: SyncOptions,
}

impl Source {
    pub fn new(fs: Arc<dyn FileSystem>, root: RelPath, opts: SyncOptions) -> Source {
        Source { fs, root, opts }
    }

    fn plan_options(&self, rpc: &dyn Rpc, checksum: bool) -> PlanOptions {
        PlanOptions {
            checksum,
            owners: rpc.target_info().keeps_owners(),
            allow_mass_delete: self.opts.allow_mass_delete,
            root_unlisted: false,
        }
    }

    /// Makes the target behind `rpc` equal to the source, writing only what differs.
    pub fn reconcile(&self, rpc: &dyn Rpc) -> Result<Report, SyncError> {
        self.reconcile_with_progress(rpc, self.opts.progress, None)
    }

    /// `reconcile`, calling `hook` with each source directory just before its listing is read
    /// (a watcher's startup walk adds its watches this way).
    pub fn reconcile_listing(&self, rpc: &dyn Rpc, hook: reconcile::ListingHook) -> Result<Report, SyncError> {
        self.reconcile_with_progress(rpc, self.opts.progress, Some(hook))
    }

    /// The whole-tree reconcile, streamed (`stream_plan`): each batch of the plan is applied as
    /// it comes.
    fn reconcile_with_progress(
        &self,
        rpc: &dyn Rpc,
        progress: bool,
        hook: Option<reconcile::ListingHook>,
    ) -> Result<Report, SyncError> {
        let t0 = std::time::Instant::now();
        let opts = self.plan_options(rpc, self.opts.checksum);
        let scan = ScanOptions {
            checksum: self.opts.checksum,
        };
        let progress = Progress::new(progress, 0);
        let apply = ApplyOptions {
            owners: rpc.target_info().keeps_owners(),
        };
        let mut exec = reconcile::Exec::new(self.fs.as_ref(), &self.root, rpc, &apply, &progress);
        let (not_mirrored, problems) = stream_plan(&self.fs, &self.root, rpc, &opts, scan, hook, |ops| {
            progress.add_total(
                ops.iter()
                    .filter_map(|o| match o {
                        Op::Transfer { entry, .. } => Some(entry.meta.size),
                        _ => None,
                    })
                    .sum(),
            );
            exec.run(&ops)?;
            Ok(())
        })?;
        let mut report = exec.finish()?;
        progress.finish();
        report.not_mirrored = not_mirrored;
        report
            .problems
            .extend(problems.iter().map(|p| format!("source scan: {p}")));
        log::debug!("reconcile: {} operations in {:?}", report.ops, t0.elapsed());
        Ok(report)
    }

    /// Makes the target equal to the source within `scope` only (what a watcher saw change, or
    /// what changed while the target was away), with the same planner as the whole-tree walk.
    /// The scope grows where the plan needs more than it covers (a directory to make whose
    /// contents were not scanned), and a whole-tree reconcile is done instead where a partial
    /// one cannot be exact: hard-link groups reach beyond any scope. The full scope is the
    /// whole-tree walk, without a progress bar.
    pub fn reconcile_scope(&self, rpc: &dyn Rpc, mut scope: Scope) -> Result<Report, SyncError> {
        const MAX_GROWTH: usize = 8;
        for _ in 0..MAX_GROWTH {
            if scope.is_full() {
                break;
            }
            let (src, dst) = scan_both(self.fs.as_ref(), &self.root, rpc, self.opts.checksum, Some(&scope))?;
            let linked = |e: &reconcile::Entry| e.meta.kind == Kind::File && e.meta.nlink > 1;
            if src.entries.values().any(linked) || dst.entries.values().any(linked) {
                log::debug!("hard links in a partial reconcile: reconciling the whole tree");
                break;
            }
            let mut opts = self.plan_options(rpc, self.opts.checksum);
            opts.root_unlisted = !scope.lists_root();
            let plan = reconcile::plan(&src, &dst, &opts)?;
            let unseen: Vec<RelPath> = plan
                .ops
                .iter()
                .filter_map(|o| match o {
                    Op::Mkdir(p) if !scope.under_tree(p) => Some(p.clone()),
                    _ => None,
                })
                .collect();
            if unseen.is_empty() {
                return self.carry_out(rpc, &src, &plan, false);
            }
            for p in unseen {
                scope.add(p, Depth::Tree);
            }
        }
        self.reconcile_with_progress(rpc, false, None)
    }

    fn carry_out(
        &self,
        rpc: &dyn Rpc,
        src: &Snapshot,
        plan: &reconcile::Plan,
        progress: bool,
    ) -> Result<Report, SyncError> {
        let total: u64 = plan
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Transfer { entry, .. } => Some(entry.meta.size),
                _ => None,
            })
            .sum();
        let progress = Progress::new(progress, total);
        let apply = ApplyOptions {
            owners: rpc.target_info().keeps_owners(),
        };
        let mut report = reconcile::execute(self.fs.as_ref(), &self.root, plan, rpc, &apply, &progress)?;
        report.not_mirrored = plan.not_mirrored;
        progress.finish();
        report
            .problems
            .extend(src.problems.iter().map(|p| format!("source scan: {p}")));
        Ok(report)
    }

    /// Every difference between source and the target behind `rpc`, in words, comparing
    /// content by hash. Changes nothing.
    pub fn verify(&self, rpc: &dyn Rpc) -> Result<Vec<String>, SyncError> {
        verify_only(self.fs.clone(), self.root.clone(), rpc).map(|(d, _)| d)
    }

    /// The source's entry at `p` (relative to the replicated root).
    pub fn stat(&self, p: &RelPath) -> Result<crate::fs::Meta, FsError> {
        self.fs.stat(&self.root.join_rel(p))
    }
}

/// The original design's source: a `Source` bound to one target. Building one reconciles the
/// target.
pub struct ReplicatorSource<R: Rpc> {
    source: Source,
    rpc: R,
    last: Report,
}

impl<R: Rpc> ReplicatorSource<R> {
    /// Mirrors `root` within `fs` to the target behind `rpc`; reconciles the target first.
    pub fn new(fs: Arc<dyn FileSystem>, root: RelPath, rpc: R) -> Result<Self, SyncError> {
        Self::with_options(fs, root, rpc, SyncOptions::default())
    }

    pub fn with_options(fs: Arc<dyn FileSystem>, root: RelPath, rpc: R, opts: SyncOptions) -> Result<Self, SyncError> {
        let source = Source::new(fs, root, opts);
        let last = source.reconcile(&rpc)?;
        Ok(ReplicatorSource { source, rpc, last })
    }

    /// What the reconcile done at construction (or the last `reconcile`) did.
    pub fn last_report(&self) -> &Report {
        &self.last
    }

    pub fn rpc(&self) -> &R {
        &self.rpc
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Makes the target equal to the source, writing only what differs.
    pub fn reconcile(&self) -> Result<Report, SyncError> {
        self.source.reconcile(&self.rpc)
    }

    /// Makes the target equal to the source within `scope` (see `Source::reconcile_scope`).
    pub fn reconcile_scope(&self, scope: Scope) -> Result<Report, SyncError> {
        self.source.reconcile_scope(&self.rpc, scope)
    }

    /// Every difference between source and target, in words, comparing content by hash.
    pub fn verify(&self) -> Result<Vec<String>, SyncError> {
        self.source.verify(&self.rpc)
    }

    /// The source's entry at `p` (relative to the replicated root).
    pub fn stat(&self, p: &RelPath) -> Result<crate::fs::Meta, FsError> {
        self.source.stat(p)
    }

    /// Sends one request to the target and waits for its answer.
    pub fn forward(&self, req: Request) -> Result<Reply, RpcError> {
        self.rpc.call(req)
    }
}

/// `ReplicatorSource` as a watcher's reconciler (the library's simplest watch; the CLI's
/// `watch` goes through a `Replicator`, which reconnects).
impl<R: Rpc> Reconciler for ReplicatorSource<R> {
    fn reconcile_all(&self) -> Result<Report, SyncError> {
        self.reconcile()
    }

    fn reconcile_scope(&self, scope: Scope) -> Result<Report, SyncError> {
        ReplicatorSource::reconcile_scope(self, scope)
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> bool {
        forward_rename(&self.rpc, from, to)
    }
}

/// Repeats a rename seen at the source on the target; false when the target refused it.
pub fn forward_rename(rpc: &dyn Rpc, from: &RelPath, to: &RelPath) -> bool {
    let req = Request::Change(Change::Rename {
        from: from.clone(),
        to: to.clone(),
        flags: 0,
    });
    match rpc.call(req) {
        Ok(_) => true,
        Err(e) => {
            log::debug!("rename {from} -> {to} on the target: {e}; the reconcile sends it instead");
            false
        }
    }
}

/// Lists the differences without changing anything (building a `ReplicatorSource` would
/// reconcile first), and what a target without root cannot hold (not differences).
pub fn verify_only(
    fs: Arc<dyn FileSystem>,
    root: RelPath,
    rpc: &dyn Rpc,
) -> Result<(Vec<String>, reconcile::NotMirrored), SyncError> {
    let opts = PlanOptions {
        checksum: true,
        owners: rpc.target_info().keeps_owners(),
        allow_mass_delete: true,
        root_unlisted: false,
    };
    let mut ops = Vec::new();
    let scan = ScanOptions { checksum: true };
    let (not_mirrored, problems) = stream_plan(&fs, &root, rpc, &opts, scan, None, |batch| {
        ops.extend(batch);
        Ok(())
    })?;
    // Only the differences are held, and described from both sides' entries at their paths.
    let scope = Scope::of(ops.iter().map(|op| (op.path().clone(), Depth::Entry)));
    let (src, dst) = if ops.is_empty() {
        (Snapshot::default(), Snapshot::default())
    } else {
        scan_both(fs.as_ref(), &root, rpc, false, Some(&scope))?
    };
    let mut out: Vec<String> = ops.iter().map(|op| reconcile::describe(op, &src, &dst)).collect();
    out.extend(problems.iter().map(|p| format!("could not read source: {p}")));
    Ok((out, not_mirrored))
}

/// The plan of the whole tree, streamed: the source is walked on a helper thread and the target
/// pages its walk in, both in path order, and `sink` gets each batch of operations as the merge
/// makes it. Memory follows the widest directory and the depth, not the tree. A walk that stops
/// early never counts as the end of its tree: nothing planned after it reaches `sink`, and the
/// whole fails. Returns what the plan leaves out and the source walk's problems.
fn stream_plan(
    fs: &Arc<dyn FileSystem>,
    root: &RelPath,
    rpc: &dyn Rpc,
    opts: &PlanOptions,
    scan: ScanOptions,
    hook: Option<reconcile::ListingHook>,
    mut sink: impl FnMut(Vec<Op>) -> Result<(), SyncError>,
) -> Result<(reconcile::NotMirrored, Vec<FsError>), SyncError> {
    let mut walk = reconcile::Walk::tree(fs.clone(), root.clone(), scan).map_err(SyncError::Scan)?;
    if let Some(hook) = hook {
        walk = walk.before_listing(hook);
    }
    let source_stopped = Cell::new(false);
    let target_failed = RefCell::new(None);
    let stopped = || {
        SyncError::Scan(FsError::msg(
            libc::EIO,
            "scan",
            root,
            "the source walk stopped before its end",
        ))
    };
    let first_page = rpc.submit(Request::Scan {
        checksum: scan.checksum,
        scope: None,
    });
    rpc.flush();
    std::thread::scope(|sc| {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<(reconcile::Entry, bool)>>(SOURCE_BATCHES_AHEAD);
        let walker = sc.spawn(move || walk_into(walk, tx));
        let src = SourceStream {
            rx,
            batch: Vec::new().into_iter(),
            ended: false,
            stopped: &source_stopped,
        };
        let dst = TargetStream {
            rpc,
            next: Some(first_page),
            page: Vec::new().into_iter(),
            failed: &target_failed,
        };
        let planned = reconcile::plan_stream(src, dst, opts, |ops| {
            if source_stopped.get() {
                return Err(stopped());
            }
            if let Some(e) = target_failed.borrow_mut().take() {
                return Err(e);
            }
            sink(ops)
        });
        let problems = walker.join();
        let not_mirrored = planned?;
        let problems =
            problems.map_err(|_| SyncError::Scan(FsError::msg(libc::EIO, "scan", root, "the source walk panicked")))?;
        // A walk that ended early after the last batch was handed on.
        if source_stopped.get() {
            return Err(stopped());
        }
        if let Some(e) = target_failed.borrow_mut().take() {
            return Err(e);
        }
        Ok((not_mirrored, problems))
    })
}

/// Source entries are handed from the walking thread in batches of this many...
const SOURCE_BATCH: usize = 1024;
/// ...with at most this many batches waiting.
const SOURCE_BATCHES_AHEAD: usize = 16;

/// Walks the source into `tx` in batches, then sends an empty batch: the end. Returns what went
/// wrong on the way.
fn walk_into(
    mut walk: reconcile::Walk<Arc<dyn FileSystem>>,
    tx: crossbeam_channel::Sender<Vec<(reconcile::Entry, bool)>>,
) -> Vec<FsError> {
    let mut batch = Vec::with_capacity(SOURCE_BATCH);
    for item in &mut walk {
        batch.push(item);
        if batch.len() == SOURCE_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(SOURCE_BATCH));
            if tx.send(full).is_err() {
                // The plan stopped.
                return walk.problems;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(batch);
    }
    let _ = tx.send(Vec::new());
    walk.problems
}

/// The source's entries as the walking thread sends them. A channel that closes without the
/// end marker sets `stopped`.
struct SourceStream<'a> {
    rx: crossbeam_channel::Receiver<Vec<(reconcile::Entry, bool)>>,
    batch: std::vec::IntoIter<(reconcile::Entry, bool)>,
    ended: bool,
    stopped: &'a Cell<bool>,
}

impl Iterator for SourceStream<'_> {
    type Item = (reconcile::Entry, bool);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(x) = self.batch.next() {
                return Some(x);
            }
            if self.ended {
                return None;
            }
            match self.rx.recv() {
                Ok(b) if b.is_empty() => self.ended = true,
                Ok(b) => self.batch = b.into_iter(),
                Err(_) => {
                    self.stopped.set(true);
                    self.ended = true;
                }
            }
        }
    }
}

/// The target's entries, page by page, the next page asked for as soon as one arrives. A
/// failure ends the stream and is left in `failed`.
struct TargetStream<'a> {
    rpc: &'a dyn Rpc,
    next: Option<Pending>,
    page: std::vec::IntoIter<reconcile::Entry>,
    failed: &'a RefCell<Option<SyncError>>,
}

impl Iterator for TargetStream<'_> {
    type Item = reconcile::Entry;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.page.next() {
                return Some(e);
            }
            let pending = self.next.take()?;
            let err = match pending.wait() {
                Ok(Reply::Scan { entries, more }) => {
                    if more {
                        self.next = Some(self.rpc.submit(Request::ScanNext));
                        self.rpc.flush();
                    }
                    self.page = entries.into_iter();
                    continue;
                }
                Ok(other) => SyncError::TargetScan(format!("unexpected answer {other:?}")),
                Err(RpcError::Remote(e)) => SyncError::TargetScan(e.to_string()),
                Err(e) => e.into(),
            };
            *self.failed.borrow_mut() = Some(err);
            return None;
        }
    }
}

/// Scans both sides at once: the source's scan runs on a helper thread while the target's is
/// asked for (an in-process target scans in the submitting thread).
fn scan_both(
    fs: &(dyn FileSystem + 'static),
    root: &RelPath,
    rpc: &dyn Rpc,
    checksum: bool,
    scope: Option<&Scope>,
) -> Result<(Snapshot, Snapshot), SyncError> {
    let opts = ScanOptions { checksum };
    if let Some(scope) = scope {
        // Small: not worth a thread.
        let pending = rpc.submit(Request::Scan {
            checksum,
            scope: Some(scope.clone()),
        });
        rpc.flush();
        let src = reconcile::scan_scope(fs, root, scope, opts).map_err(SyncError::Scan)?;
        return Ok((src, collect_scan(rpc, pending)?));
    }
    std::thread::scope(|s| {
        let t0 = std::time::Instant::now();
        let src = s.spawn(move || {
            let r = reconcile::scan(fs, root, opts);
            log::debug!("source scan {:?}", t0.elapsed());
            r
        });
        let pending = rpc.submit(Request::Scan { checksum, scope: None });
        rpc.flush();
        let dst = collect_scan(rpc, pending);
        log::debug!("target scan {:?}", t0.elapsed());
        let src = src
            .join()
            .unwrap_or_else(|_| Err(FsError::msg(libc::EIO, "scan", root, "source scan panicked")))
            .map_err(SyncError::Scan)?;
        Ok((src, dst?))
    })
}

fn collect_scan(rpc: &dyn Rpc, first: Pending) -> Result<Snapshot, SyncError> {
    let mut entries = Vec::new();
    let mut next = first;
    loop {
        match next.wait() {
            Ok(Reply::Scan { entries: page, more }) => {
                entries.extend(page);
                if !more {
                    break;
                }
            }
            Ok(other) => return Err(SyncError::TargetScan(format!("unexpected answer {other:?}"))),
            Err(RpcError::Remote(e)) => return Err(SyncError::TargetScan(e.to_string())),
            Err(e) => return Err(e.into()),
        }
        next = rpc.submit(Request::ScanNext);
    }
    Ok(Snapshot::from_entries(entries))
}
