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
use std::sync::Arc;

pub mod changed;
pub mod link;
pub mod replicator;
pub use link::{Link, LinkState, Policy};
pub use replicator::{Forward, Replicator};

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
        self.reconcile_with_progress(rpc, self.opts.progress)
    }

    fn reconcile_with_progress(&self, rpc: &dyn Rpc, progress: bool) -> Result<Report, SyncError> {
        let t0 = std::time::Instant::now();
        let (src, dst) = scan_both(self.fs.as_ref(), &self.root, rpc, self.opts.checksum, None)?;
        let t1 = std::time::Instant::now();
        let plan = reconcile::plan(&src, &dst, &self.plan_options(rpc, self.opts.checksum))?;
        let t2 = std::time::Instant::now();
        let r = self.carry_out(rpc, &src, &plan, progress);
        log::debug!(
            "reconcile: scans {:?} ({} source, {} target entries), plan {:?} ({} ops), apply {:?}",
            t1 - t0,
            src.entries.len(),
            dst.entries.len(),
            t2 - t1,
            plan.ops.len(),
            t2.elapsed()
        );
        r
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
        self.reconcile_with_progress(rpc, false)
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
                Op::Transfer { path, .. } => src.get(path).map(|e| e.meta.size),
                _ => None,
            })
            .sum();
        let progress = Progress::new(progress, total);
        let apply = ApplyOptions {
            owners: rpc.target_info().keeps_owners(),
        };
        let mut report = reconcile::execute(self.fs.as_ref(), &self.root, src, plan, rpc, &apply, &progress)?;
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
    let (src, dst) = scan_both(fs.as_ref(), &root, rpc, true, None)?;
    let opts = PlanOptions {
        checksum: true,
        owners: rpc.target_info().keeps_owners(),
        allow_mass_delete: true,
        root_unlisted: false,
    };
    let plan = reconcile::plan(&src, &dst, &opts)?;
    let mut out: Vec<String> = plan.ops.iter().map(|op| reconcile::describe(op, &src, &dst)).collect();
    out.extend(src.problems.iter().map(|p| format!("could not read source: {p}")));
    Ok((out, plan.not_mirrored))
}

/// Scans both sides at once: the source's scan runs on a helper thread while the target's is
/// asked for (an in-process target scans in the submitting thread).
fn scan_both(
    fs: &dyn FileSystem,
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
