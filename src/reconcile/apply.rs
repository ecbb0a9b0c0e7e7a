//! Applying a plan: turns each `Op` into requests for the target and pipelines them, reading
//! source content as it goes. Small files travel whole in one `PutFile`; large ones are staged in
//! 8 MiB pieces, or, when the target has an older version, as rsync deltas against it (verified
//! by a BLAKE3 hash on the target, with a whole-file fallback). A target in this process takes
//! large files as kernel copies from the open source file instead (`StageCopy`), so their bytes
//! never pass through a buffer here. Holes are never sent. A file that
//! changes while it is read is read again, so the target never gets a torn copy stamped with a
//! stale mtime. Per-path failures are collected in the report; a lost connection aborts.

use super::plan::{Op, Plan};
use super::scan::Entry;
use crate::change::Change;
use crate::fs::{Attrs, FileSystem, Kind, Meta};
use crate::path::RelPath;
use crate::progress::Progress;
use crate::protocol::{LocalFile, Reply, Request, DATA_CHUNK, LOCAL_COPY};
use crate::rpc::{Pending, Rpc, RpcError};
use std::collections::VecDeque;
use std::sync::Arc;

/// Files up to this size travel in a single request.
pub const SMALL_FILE: u64 = 4 << 20;
/// Files from this size are sent as deltas when the target has a version, over a connection.
pub const DELTA_MIN: u64 = 4 << 10;
/// The same for a target in this process. There the bytes cross no link and a delta costs more
/// CPU than the copy it replaces, so the many small files go as copies; larger ones still go as
/// deltas, which keeps `bytes on the wire` what a link would carry.
pub const DELTA_MIN_LOCAL: u64 = 64 << 10;
const MAX_INFLIGHT: usize = 4096;
/// Signatures asked for ahead of the files that need them, so the target computes the next
/// ones while this side diffs, instead of both waiting in turn.
const SIGNATURES_AHEAD: usize = 64;
const READ_TRIES: usize = 3;

#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Send uid/gid.
    pub owners: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub ops: u64,
    pub files_sent: u64,
    pub delta_files: u64,
    /// Content bytes of the files sent (whole size, whether sent whole or as delta).
    pub content_bytes: u64,
    /// Bytes the transport put on the wire during the apply.
    pub wire_bytes: u64,
    /// Per-path failures, in words.
    pub problems: Vec<String>,
    /// What the target cannot hold (no root there): counted, not a failure.
    pub not_mirrored: super::NotMirrored,
}

/// Applies a plan as it comes, batch by batch (`run`), and reports at the end (`finish`).
pub struct Exec<'a> {
    fs: &'a dyn FileSystem,
    root: &'a RelPath,
    rpc: &'a dyn Rpc,
    opts: &'a ApplyOptions,
    progress: &'a Progress,
    inflight: VecDeque<(Pending, RelPath, &'static str, OnError)>,
    /// Files whose delta the target refused: sent whole by `finish_deltas`.
    resend: Vec<Entry>,
    /// Files whose delta commit was sent and not yet answered for by `finish_deltas`.
    delta_commits: std::collections::HashSet<RelPath>,
    report: Report,
    next_stage: u64,
    /// The target shares this process and takes `StageCopy`.
    local_copy: bool,
    /// Files from this size are sent as deltas.
    delta_min: u64,
    /// Files the plan will send as deltas, in plan order, and the next one to ask a signature
    /// for; those already sent are dropped from the front as batches come.
    delta_queue: VecDeque<(RelPath, u64)>,
    next_signature: usize,
    /// Signatures asked for and not yet used, in plan order.
    signatures: VecDeque<(RelPath, Pending)>,
}

/// A file's data segments, each with its offset.
type Chunks = Vec<(u64, Vec<u8>)>;

/// Why a delta could not be used; the file is then sent whole.
struct NoDelta;

/// What a failed answer means.
#[derive(Debug, Clone)]
enum OnError {
    /// A per-path problem for the report.
    Report,
    /// Nothing by itself: a delta piece, whose failure fails the stage's commit too.
    Ignore,
    /// The commit of a delta: the target refused the rebuilt file, which is then sent whole.
    /// Holds the file and the bytes counted for it.
    Resend(Box<Entry>, u64),
}

/// Applies a whole plan.
pub fn execute(
    fs: &dyn FileSystem,
    root: &RelPath,
    plan: &Plan,
    rpc: &dyn Rpc,
    opts: &ApplyOptions,
    progress: &Progress,
) -> Result<Report, RpcError> {
    let mut ex = Exec::new(fs, root, rpc, opts, progress);
    ex.run(&plan.ops)?;
    ex.finish()
}

impl<'a> Exec<'a> {
    pub fn new(
        fs: &'a dyn FileSystem,
        root: &'a RelPath,
        rpc: &'a dyn Rpc,
        opts: &'a ApplyOptions,
        progress: &'a Progress,
    ) -> Exec<'a> {
        let local_copy = rpc.target_info().capabilities.iter().any(|c| c == LOCAL_COPY);
        Exec {
            fs,
            root,
            rpc,
            opts,
            progress,
            inflight: VecDeque::new(),
            resend: Vec::new(),
            delta_commits: Default::default(),
            report: Report {
                wire_bytes: rpc.bytes_sent(),
                ..Default::default()
            },
            next_stage: 1,
            local_copy,
            delta_min: if local_copy { DELTA_MIN_LOCAL } else { DELTA_MIN },
            delta_queue: VecDeque::new(),
            next_signature: 0,
            signatures: VecDeque::new(),
        }
    }

    /// Applies the next operations of a plan, pipelined with those before.
    pub fn run(&mut self, ops: &[Op]) -> Result<(), RpcError> {
        // The queue holds what is still to come: this batch's delta files.
        let done = self.next_signature.min(self.delta_queue.len());
        self.delta_queue.drain(..done);
        self.next_signature -= done;
        for op in ops {
            if let Op::Transfer { entry, basis: true } = op {
                if entry.meta.size >= self.delta_min {
                    self.delta_queue.push_back((entry.path.clone(), entry.meta.size));
                }
            }
        }
        // The first signatures are computed while the first files are sent.
        self.ask_signatures_ahead();
        for op in ops {
            self.report.ops += 1;
            self.op(op)?;
        }
        Ok(())
    }

    /// Waits for everything in flight and reports.
    pub fn finish(mut self) -> Result<Report, RpcError> {
        // Signatures asked for but not used (a file that shrank below the delta size): drained so
        // their answers do not outlive the apply.
        for (_, p) in self.signatures.drain(..) {
            if let Err(e @ (RpcError::Disconnected(_) | RpcError::Timeout(_))) = p.wait() {
                return Err(e);
            }
        }
        // Every transfer is followed by its directory's metadata, before which refused deltas
        // are resent; this is for plans that set none.
        self.finish_deltas()?;
        self.settle(0)?;
        self.report.wire_bytes = self.rpc.bytes_sent() - self.report.wire_bytes;
        Ok(self.report)
    }
}

/// rsync's block size rule: about the square root of the length, a multiple of 8, within
/// [700, 128 KiB].
pub fn block_size(len: u64) -> u32 {
    let root = (len as f64).sqrt() as u64;
    (root.div_ceil(8) * 8).clamp(704, 128 << 10) as u32
}

/// Whether two stats of the same file show it unchanged in between.
fn same_version(a: &Meta, b: &Meta) -> bool {
    (a.size, a.mtime, a.ctime, a.ino) == (b.size, b.mtime, b.ctime, b.ino)
}

impl Exec<'_> {
    fn attrs(&self, meta: &Meta, e: &Entry) -> Attrs {
        Attrs {
            perm: meta.perm,
            owner: self.opts.owners.then_some((meta.uid, meta.gid)),
            mtime: meta.mtime,
            xattrs: e.xattrs.clone(),
        }
    }

    fn problem(&mut self, what: String) {
        log::warn!("{what}");
        self.report.problems.push(what);
    }

    /// Records one answer; a lost connection is fatal, anything else is dealt with per path.
    fn record(&mut self, r: Result<Reply, RpcError>, path: &RelPath, name: &str, on: OnError) -> Result<(), RpcError> {
        match (r, on) {
            (Ok(_), _) | (Err(RpcError::Remote(_)), OnError::Ignore) => Ok(()),
            (Err(RpcError::Remote(e)), OnError::Report) => {
                self.problem(format!("{name} {path}: {e}"));
                Ok(())
            }
            (Err(RpcError::Remote(e)), OnError::Resend(entry, bytes)) => {
                log::info!("{path}: delta rejected by the target ({e}); sending whole");
                self.report.delta_files -= 1;
                self.report.files_sent -= 1;
                self.report.content_bytes -= bytes;
                self.resend.push(*entry);
                Ok(())
            }
            (Err(e), _) => Err(e),
        }
    }

    fn send(&mut self, path: &RelPath, req: impl Into<Request>) -> Result<(), RpcError> {
        self.send_as(path, req.into(), OnError::Report)
    }

    fn send_as(&mut self, path: &RelPath, req: Request, on: OnError) -> Result<(), RpcError> {
        let name = req.name();
        let p = self.rpc.submit(req);
        self.inflight.push_back((p, path.clone(), name, on));
        while self.inflight.front().is_some_and(|(p, ..)| p.is_ready()) {
            self.settle_one()?;
        }
        self.settle(MAX_INFLIGHT)
    }

    fn settle_one(&mut self) -> Result<(), RpcError> {
        if let Some((p, path, name, on)) = self.inflight.pop_front() {
            let r = p.wait();
            self.record(r, &path, name, on)?;
        }
        Ok(())
    }

    /// Waits until at most `keep` requests are in flight.
    fn settle(&mut self, keep: usize) -> Result<(), RpcError> {
        while self.inflight.len() > keep {
            self.settle_one()?;
        }
        Ok(())
    }

    fn op(&mut self, op: &Op) -> Result<(), RpcError> {
        match op {
            Op::Remove(p) => self.send(p, Request::RemoveTree { path: p.clone() }),
            Op::Mkdir(p) => self.send(
                p,
                Change::Mkdir {
                    path: p.clone(),
                    perm: 0o700,
                },
            ),
            Op::Attrs(e) => {
                // Directory metadata comes last (it may make a directory read-only, and its
                // mtime must follow every change inside): refused deltas are resent before it.
                if e.meta.kind == Kind::Dir && !self.delta_commits.is_empty() {
                    self.finish_deltas()?;
                }
                let req = Request::ApplyAttrs {
                    path: e.path.clone(),
                    kind: e.meta.kind,
                    attrs: self.attrs(&e.meta, e),
                };
                self.send(&e.path, req)
            }
            Op::Symlink(e) => self.send(
                &e.path,
                Change::Symlink {
                    path: e.path.clone(),
                    target: e.link.clone().unwrap_or_default(),
                },
            ),
            Op::Mknod(e) => {
                let m = &e.meta;
                let req = Change::Mknod {
                    path: e.path.clone(),
                    kind: m.kind,
                    perm: m.perm,
                    rdev: m.rdev,
                };
                self.send(&e.path, req)
            }
            Op::Link { path, leader } => {
                // The leader must be in its final state before others are linked to it.
                if self.delta_commits.contains(leader) {
                    self.finish_deltas()?;
                }
                self.send(
                    path,
                    Request::LinkReplace {
                        existing: leader.clone(),
                        path: path.clone(),
                    },
                )
            }
            Op::Check(e) => {
                let path = &e.path;
                let pending = self.rpc.submit(Request::Hash { path: path.clone() });
                self.rpc.flush();
                let mine = self.fs.hash_file(&self.root.join_rel(path));
                let theirs = match pending.wait() {
                    Ok(Reply::Hash(h)) => Some(h),
                    Ok(_) | Err(RpcError::Remote(_)) => None,
                    Err(e) => return Err(e),
                };
                if mine.is_ok_and(|m| Some(m) == theirs) {
                    let req = Request::ApplyAttrs {
                        path: path.clone(),
                        kind: e.meta.kind,
                        attrs: self.attrs(&e.meta, e),
                    };
                    return self.send(path, req);
                }
                self.transfer(e, true)
            }
            Op::Transfer { entry, basis } => self.transfer(entry, *basis),
        }
    }

    fn transfer(&mut self, e: &Entry, basis: bool) -> Result<(), RpcError> {
        if basis && e.meta.size >= self.delta_min {
            match self.send_delta(e)? {
                Ok(()) => return Ok(()),
                Err(NoDelta) => log::debug!("{}: delta not usable, sending whole", e.path),
            }
        }
        self.send_whole(e)
    }

    /// Reads the data segments of a source file, again if it changed while being read.
    /// Returns the stat it was read under and the chunks, or `None` after a problem was noted.
    fn read_stable(&mut self, path: &RelPath, max_chunk: usize) -> Option<(Meta, Chunks)> {
        let full = self.root.join_rel(path);
        let mut last_err = String::new();
        for _ in 0..READ_TRIES {
            let r = self.fs.read_data(&full, max_chunk);
            match r {
                Ok(d) if same_version(&d.before, &d.after) => return Some((d.after, d.chunks)),
                Ok(_) => last_err = "changed while being read".into(),
                Err(e) => {
                    self.problem(format!("read {path}: {e}"));
                    return None;
                }
            }
        }
        self.problem(format!(
            "read {path}: {last_err} ({READ_TRIES} tries); left for the next reconcile"
        ));
        None
    }

    fn send_whole(&mut self, e: &Entry) -> Result<(), RpcError> {
        let path = &e.path;
        if e.meta.size > SMALL_FILE {
            return self.send_staged(e);
        }
        let Some((meta, chunks)) = self.read_stable(path, DATA_CHUNK) else {
            return Ok(());
        };
        if meta.size > SMALL_FILE {
            return self.send_staged(e);
        }
        let attrs = self.attrs(&meta, e);
        self.count_file(meta.size);
        self.send(
            path,
            Request::PutFile {
                path: path.clone(),
                chunks,
                size: meta.size,
                attrs,
            },
        )
    }

    fn count_file(&mut self, bytes: u64) {
        self.report.files_sent += 1;
        self.report.content_bytes += bytes;
        self.progress.file_done(self.report.files_sent, bytes);
    }

    /// A large file, piece by piece, holes skipped. Read piecewise, so memory stays bounded.
    fn send_staged(&mut self, e: &Entry) -> Result<(), RpcError> {
        let path = &e.path;
        let full = self.root.join_rel(path);
        for _ in 0..READ_TRIES {
            let before = match self
                .fs
                .stat(&full)
                .and_then(|m| Ok((self.fs.data_segments(&full, m.size)?, m)))
            {
                Ok(x) => x,
                Err(e) => {
                    self.problem(format!("read {path}: {e}"));
                    return Ok(());
                }
            };
            let (segs, m0) = before;
            let stage = self.next_stage;
            self.next_stage += 1;
            self.send(
                path,
                Request::StageOpen {
                    stage,
                    path: path.clone(),
                    sparse: m0.is_sparse(),
                },
            )?;
            // An in-process target copies in the kernel; the copies must be done before the
            // second stat can tell whether they saw one version of the file.
            let local = if self.local_copy {
                self.fs.open_file(&full).ok().flatten()
            } else {
                None
            };
            let mut failed = None;
            if let Some(file) = local {
                let from = LocalFile(Arc::new(file));
                for (offset, len) in segs {
                    let req = Request::StageCopy {
                        stage,
                        offset,
                        len,
                        from: from.clone(),
                    };
                    self.send(path, req)?;
                }
                self.settle(0)?;
            } else {
                failed = self.stage_writes(path, &full, stage, segs)?;
            }
            let stable = self.fs.stat(&full).map(|m1| same_version(&m0, &m1)).unwrap_or(false);
            if failed.is_some() || !stable {
                self.send(path, Request::StageAbort { stage })?;
                if let Some(e) = failed {
                    self.problem(format!("read {path}: {e}"));
                    return Ok(());
                }
                continue;
            }
            let attrs = self.attrs(&m0, e);
            self.count_file(m0.size);
            return self.send(
                path,
                Request::StageCommit {
                    stage,
                    size: m0.size,
                    attrs,
                    hash: None,
                },
            );
        }
        self.problem(format!(
            "read {path}: changed while being read ({READ_TRIES} tries); left for the next reconcile"
        ));
        Ok(())
    }

    /// Reads the data segments of `full` and sends them to `stage` piece by piece; the read
    /// error that stopped it, if any.
    fn stage_writes(
        &mut self,
        path: &RelPath,
        full: &RelPath,
        stage: u64,
        segs: Vec<(u64, u64)>,
    ) -> Result<Option<String>, RpcError> {
        for (off, len) in segs {
            let mut o = off;
            while o < off + len {
                let n = ((off + len - o) as usize).min(DATA_CHUNK);
                match self.fs.read_at(full, o, n) {
                    Ok(data) if data.is_empty() => break,
                    Ok(data) => {
                        let l = data.len() as u64;
                        self.send(path, Request::StageWrite { stage, offset: o, data })?;
                        o += l;
                    }
                    Err(e) => return Ok(Some(e.to_string())),
                }
            }
        }
        Ok(None)
    }

    /// Waits for the delta commits in flight and sends whole the files whose delta was refused.
    fn finish_deltas(&mut self) -> Result<(), RpcError> {
        self.settle(0)?;
        self.delta_commits.clear();
        for e in std::mem::take(&mut self.resend) {
            self.send_whole(&e)?;
        }
        Ok(())
    }

    /// The target's signature of `path`, asked for now unless it was asked for ahead; and
    /// the signatures of the next few delta files asked for ahead.
    fn signature(&mut self, path: &RelPath, size: u64) -> Pending {
        // Answers for files passed over (not sent as deltas after all) are dropped; the plan,
        // and so the queue, is in path order.
        while self.signatures.front().is_some_and(|(p, _)| p < path) {
            self.signatures.pop_front();
        }
        let mine = match self.signatures.front() {
            Some((p, _)) if p == path => self.signatures.pop_front().map(|(_, pending)| pending),
            _ => None,
        };
        // Skip the queue (sorted like the plan) up to and past this file, then ask ahead.
        while self
            .delta_queue
            .get(self.next_signature)
            .is_some_and(|(q, _)| q <= path)
        {
            self.next_signature += 1;
        }
        let mine = mine.unwrap_or_else(|| {
            self.rpc.submit(Request::Signature {
                path: path.clone(),
                block_size: block_size(size),
            })
        });
        self.ask_signatures_ahead();
        mine
    }

    fn ask_signatures_ahead(&mut self) {
        while self.signatures.len() < SIGNATURES_AHEAD && self.next_signature < self.delta_queue.len() {
            let (p, size) = self.delta_queue[self.next_signature].clone();
            self.next_signature += 1;
            let pending = self.rpc.submit(Request::Signature {
                path: p.clone(),
                block_size: block_size(size),
            });
            self.signatures.push_back((p, pending));
        }
    }

    /// An rsync delta against the target's current file, in segments of `DATA_CHUNK`.
    fn send_delta(&mut self, e: &Entry) -> Result<Result<(), NoDelta>, RpcError> {
        let path = &e.path;
        let full = self.root.join_rel(path);
        let m0 = match self.fs.stat(&full) {
            Ok(m) => m,
            Err(_) => return Ok(Err(NoDelta)),
        };
        let sig = match self.signature(path, m0.size).wait() {
            Ok(Reply::Signature(s)) => s,
            Ok(_) | Err(RpcError::Remote(_)) => return Ok(Err(NoDelta)),
            Err(e) => return Err(e),
        };
        let Ok(sig) = fast_rsync::Signature::deserialize(sig) else {
            return Ok(Err(NoDelta));
        };
        let index = sig.index();
        let stage = self.next_stage;
        self.next_stage += 1;
        // Pipelined like any other file: the commit's answer is checked when it arrives, and a
        // refused delta is sent whole after the plan (`OnError::Resend`).
        let open = Request::StageOpen {
            stage,
            path: path.clone(),
            sparse: m0.is_sparse(),
        };
        self.send_as(path, open, OnError::Ignore)?;
        let mut hasher = blake3::Hasher::new();
        let mut off = 0u64;
        let mut ok = true;
        while off < m0.size {
            let data = match self.fs.read_at(&full, off, DATA_CHUNK) {
                Ok(d) if !d.is_empty() => d,
                _ => {
                    ok = false;
                    break;
                }
            };
            hasher.update(&data);
            let mut delta = Vec::new();
            if fast_rsync::diff(&index, &data, &mut delta).is_err() {
                ok = false;
                break;
            }
            let piece = Request::StageDelta {
                stage,
                offset: off,
                delta,
            };
            self.send_as(path, piece, OnError::Ignore)?;
            off += data.len() as u64;
        }
        let stable = ok && off == m0.size && self.fs.stat(&full).map(|m1| same_version(&m0, &m1)).unwrap_or(false);
        if !stable {
            self.send_as(path, Request::StageAbort { stage }, OnError::Ignore)?;
            return Ok(Err(NoDelta));
        }
        let attrs = self.attrs(&m0, e);
        let commit = Request::StageCommit {
            stage,
            size: m0.size,
            attrs,
            hash: Some(*hasher.finalize().as_bytes()),
        };
        self.report.delta_files += 1;
        self.count_file(m0.size);
        self.delta_commits.insert(path.clone());
        self.send_as(path, commit, OnError::Resend(Box::new(e.clone()), m0.size))?;
        Ok(Ok(()))
    }
}
