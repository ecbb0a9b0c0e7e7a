//! `ReplicatorTarget`: applies requests beneath its root, in the order they arrive, through a
//! `FileSystem` (in production a `LocalFs`, which never resolves outside the root nor follows a
//! symlink). Paths from the wire are already validated `RelPath`s; they are joined beneath the
//! root here. It also keeps the per-connection state of reconcile: the scan being paged out and
//! the staged files being built (temporary names in the destination's directory, renamed into
//! place only when complete, so a killed target never leaves a half-written file under a real
//! name).

use crate::change::Change;
use crate::fs::{FileBytes, FileSystem, FsError, FsResult, SetTime};
use crate::path::RelPath;
use crate::protocol::{Reply, Request, Response};
use crate::reconcile::{scan_scope, Entry, ScanOptions, Walk};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most blocks a signature may have (12 bytes each): with the source's block size rule, files
/// up to 128 GiB.
const MAX_SIGNATURE_BLOCKS: usize = 1 << 20;
/// Entries per scan page.
const SCAN_PAGE: usize = 8192;
/// Prefix of the temporary names; leftovers from a killed target are removed by the next
/// reconcile like any other entry the source lacks.
pub const TMP_PREFIX: &str = ".mirrorfs-tmp.";

struct Stage {
    /// Destination (full path beneath the fs root).
    dst: RelPath,
    tmp: RelPath,
    sparse: bool,
    basis: Option<FileBytes>,
    hasher: blake3::Hasher,
    /// End of the delta output so far; delta pieces must arrive in order.
    delta_end: u64,
    failed: Option<FsError>,
}

/// What a scan still has to page out: a whole-tree scan walks as it is paged (a listing per
/// level of the current path in memory, not the tree); a scoped one is small and read at once.
enum ScanRest {
    Walking(Box<Walk<Arc<dyn FileSystem>>>),
    Listed(std::vec::IntoIter<Entry>),
}

impl ScanRest {
    fn next(&mut self) -> Option<Entry> {
        match self {
            ScanRest::Walking(w) => w.next().map(|(e, _)| e),
            ScanRest::Listed(l) => l.next(),
        }
    }
}

pub struct ReplicatorTarget {
    fs: Arc<dyn FileSystem>,
    root: RelPath,
    stages: HashMap<u64, Stage>,
    /// The scan being paged out, and the entry read ahead of the next page.
    scan_rest: Option<(ScanRest, Option<Entry>)>,
    /// Check every mutating request against the session's fence (a target behind a
    /// connection, which a newer session may have replaced).
    fenced: bool,
    /// The epoch this session claimed, once it has.
    epoch: Option<u64>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_name_for(dst: &RelPath) -> FsResult<RelPath> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TMP_PREFIX}{}.{n}", std::process::id());
    let parent = dst.parent().unwrap_or_default();
    parent
        .join(name.as_bytes())
        .map_err(|e| FsError::msg(libc::EINVAL, "tmpname", dst, e.to_string()))
}

/// Writes `data` at `off`, leaving 4 KiB blocks that are all zero as holes when `sparse`.
fn write_maybe_sparse(fs: &dyn FileSystem, p: &RelPath, off: u64, data: &[u8], sparse: bool) -> FsResult<()> {
    if !sparse {
        return fs.write_at(p, off, data);
    }
    const B: usize = 4096;
    let mut i = 0;
    while i < data.len() {
        // Align runs to absolute 4 KiB boundaries.
        let end = (((off as usize + i) / B + 1) * B - off as usize).min(data.len());
        let zero = data[i..end].iter().all(|b| *b == 0);
        if !zero {
            let mut j = end;
            while j < data.len() {
                let e = (j + B).min(data.len());
                if data[j..e].iter().all(|b| *b == 0) {
                    break;
                }
                j = e;
            }
            fs.write_at(p, off + i as u64, &data[i..j])?;
            i = j;
        } else {
            i = end;
        }
    }
    Ok(())
}

impl ReplicatorTarget {
    /// A target applying requests beneath `root` within `fs`.
    pub fn new(fs: Arc<dyn FileSystem>, root: RelPath) -> ReplicatorTarget {
        ReplicatorTarget {
            fs,
            root,
            stages: HashMap::new(),
            scan_rest: None,
            fenced: false,
            epoch: None,
        }
    }

    /// A target behind a connection: once this session has claimed the root, each of its
    /// mutating requests is applied only while no newer session has claimed it.
    pub fn fenced(mut self) -> ReplicatorTarget {
        self.fenced = true;
        self
    }

    fn full(&self, p: &RelPath) -> RelPath {
        self.root.join_rel(p)
    }

    /// Applies one request and answers it. Never panics on any input.
    pub fn handle_request(&mut self, req: Request) -> Response {
        let fs = self.fs.clone();
        let _fence = match self.epoch {
            Some(epoch) if self.fenced && req.mutates() => fs.fence(epoch)?,
            _ => None,
        };
        let r = self.apply(req);
        if let Err(e) = &r {
            log::debug!("request failed: {e}");
        }
        r
    }

    fn stage(&mut self, id: u64) -> FsResult<&mut Stage> {
        self.stages
            .get_mut(&id)
            .ok_or_else(|| FsError::msg(libc::EBADF, "stage", &RelPath::root(), format!("no stage {id}")))
    }

    /// Applies one operation as the source made it.
    fn apply_change(&self, c: &Change) -> FsResult<()> {
        let fs = self.fs.as_ref();
        match c {
            Change::Create { path, perm, exclusive } => fs.create(&self.full(path), *perm, *exclusive)?,
            Change::Mkdir { path, perm } => fs.mkdir(&self.full(path), *perm)?,
            Change::Mknod { path, kind, perm, rdev } => fs.mknod(&self.full(path), *kind, *perm, *rdev)?,
            Change::Symlink { path, target } => fs.symlink(target, &self.full(path))?,
            Change::Link { existing, path } => fs.link(&self.full(existing), &self.full(path))?,
            Change::Write {
                path,
                offset,
                data,
                mtime,
            } => {
                fs.write_stamped(&self.full(path), *offset, data, *mtime)?;
            }
            Change::Truncate { path, size } => fs.truncate(&self.full(path), *size)?,
            Change::Fallocate {
                path,
                mode,
                offset,
                len,
            } => fs.fallocate(&self.full(path), *mode, *offset, *len)?,
            Change::CopyRange {
                src,
                src_offset,
                dst,
                dst_offset,
                len,
            } => fs.copy_range(&self.full(src), *src_offset, &self.full(dst), *dst_offset, *len)?,
            Change::SetAttr {
                path,
                perm,
                uid,
                gid,
                atime,
                mtime,
            } => {
                let p = self.full(path);
                if uid.is_some() || gid.is_some() {
                    fs.set_owner(&p, *uid, *gid)?;
                }
                if let Some(m) = perm {
                    fs.set_perm(&p, *m)?;
                }
                if *atime != SetTime::Omit || *mtime != SetTime::Omit {
                    fs.set_times(&p, *atime, *mtime)?;
                }
            }
            Change::SetXattr { name, .. } | Change::RemoveXattr { name, .. }
                if crate::session::is_reserved_xattr(name) =>
            {
                return Err(FsError::msg(
                    libc::EPERM,
                    "setxattr",
                    &RelPath::root(),
                    format!("{} is mirrorfs's own attribute", String::from_utf8_lossy(name)),
                ))
            }
            Change::SetXattr { path, name, value } => fs.set_xattr(&self.full(path), name, value)?,
            Change::RemoveXattr { path, name } => fs.remove_xattr(&self.full(path), name)?,
            Change::Unlink { path } => fs.unlink(&self.full(path))?,
            Change::Rmdir { path } => fs.rmdir(&self.full(path))?,
            Change::Rename { from, to, flags } => fs.rename(&self.full(from), &self.full(to), *flags)?,
            Change::Fsync { path, datasync } => fs.fsync(&self.full(path), *datasync)?,
        }
        Ok(())
    }

    fn apply(&mut self, req: Request) -> Response {
        let fs = self.fs.clone();
        let fs = fs.as_ref();
        match req {
            Request::Change(c) => match self.apply_change(&c) {
                // A directory on the way may have been removed or replaced behind the target's
                // back since it was resolved: once more, resolving every path afresh. A request
                // that failed with one of these errors changed nothing.
                Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR) && fs.forget_resolved() => {
                    self.apply_change(&c)?
                }
                r => r?,
            },
            Request::Claim { known } => {
                let c = fs.claim_session(known)?;
                self.epoch = c.generation.map(|_| c.epoch);
                return Ok(Reply::Claimed(c));
            }
            Request::Scan { checksum, scope } => {
                let opts = ScanOptions { checksum };
                let rest = match scope.filter(|s| !s.is_full()) {
                    None => ScanRest::Walking(Box::new(Walk::tree(self.fs.clone(), self.root.clone(), opts)?)),
                    Some(scope) => {
                        let snap = scan_scope(fs, &self.root, &scope, opts)?;
                        for p in &snap.problems {
                            log::warn!("target scan: {p}");
                        }
                        ScanRest::Listed(snap.entries.into_vec().into_iter())
                    }
                };
                self.scan_rest = Some((rest, None));
                return Ok(self.scan_page());
            }
            Request::ScanNext => return Ok(self.scan_page()),
            Request::Hash { path } => return Ok(Reply::Hash(fs.hash_file(&self.full(&path))?)),
            Request::Signature { path, block_size } => {
                if !(64..=(1 << 20)).contains(&block_size) {
                    return Err(FsError::msg(
                        libc::EINVAL,
                        "signature",
                        &path,
                        format!("block size {block_size} out of range"),
                    ));
                }
                let data = fs.map_file(&self.full(&path))?;
                // The source picks about sqrt(size) bytes per block; a peer asking for tiny
                // blocks of a huge file would make the answer huge.
                let blocks = data.len().div_ceil(block_size as usize);
                if blocks > MAX_SIGNATURE_BLOCKS {
                    return Err(FsError::msg(
                        libc::EFBIG,
                        "signature",
                        &path,
                        format!("{blocks} blocks of {block_size} bytes: more than {MAX_SIGNATURE_BLOCKS}"),
                    ));
                }
                let sig = fast_rsync::Signature::calculate(
                    &data,
                    fast_rsync::SignatureOptions {
                        block_size,
                        crypto_hash_size: 8,
                    },
                );
                return Ok(Reply::Signature(sig.into_serialized()));
            }
            Request::PutFile {
                path,
                chunks,
                size,
                attrs,
            } => {
                let dst = self.full(&path);
                let tmp = tmp_name_for(&dst)?;
                fs.install_file(&tmp, &dst, &chunks, size, &attrs)?
            }
            Request::StageOpen { stage, path, sparse } => {
                let dst = self.full(&path);
                let tmp = tmp_name_for(&dst)?;
                fs.create(&tmp, 0o600, true)?;
                let old = self.stages.insert(
                    stage,
                    Stage {
                        dst,
                        tmp,
                        sparse,
                        basis: None,
                        hasher: blake3::Hasher::new(),
                        delta_end: 0,
                        failed: None,
                    },
                );
                if let Some(old) = old {
                    let _ = fs.unlink(&old.tmp);
                }
            }
            Request::StageWrite { stage, offset, data } => {
                let st = self.stage(stage)?;
                let tmp = st.tmp.clone();
                if let Err(e) = fs.write_at(&tmp, offset, &data) {
                    st.failed = Some(e.clone());
                    return Err(e);
                }
            }
            Request::StageCopy {
                stage,
                offset,
                len,
                from,
            } => {
                let st = self.stage(stage)?;
                let tmp = st.tmp.clone();
                if let Err(e) = fs.copy_in(&tmp, offset, &from.0, len) {
                    st.failed = Some(e.clone());
                    return Err(e);
                }
            }
            Request::StageDelta { stage, offset, delta } => {
                let st = self.stage(stage)?;
                let r = Self::apply_delta(fs, st, offset, &delta);
                if let Err(e) = &r {
                    st.failed = Some(e.clone());
                }
                r?
            }
            Request::StageCommit {
                stage,
                size,
                attrs,
                hash,
            } => {
                let st = self
                    .stages
                    .remove(&stage)
                    .ok_or_else(|| FsError::msg(libc::EBADF, "stage", &RelPath::root(), format!("no stage {stage}")))?;
                let check = || -> FsResult<()> {
                    if let Some(e) = st.failed.clone() {
                        return Err(e);
                    }
                    if let Some(h) = hash {
                        if st.delta_end != size || *st.hasher.finalize().as_bytes() != h {
                            return Err(FsError::msg(
                                libc::EIO,
                                "delta",
                                &st.dst,
                                "rebuilt content does not match the source's hash",
                            ));
                        }
                    }
                    fs.finish_file(&st.tmp, &st.dst, size, &attrs)
                };
                let r = check();
                if r.is_err() {
                    let _ = fs.unlink(&st.tmp);
                }
                r?
            }
            Request::StageAbort { stage } => {
                if let Some(st) = self.stages.remove(&stage) {
                    fs.unlink(&st.tmp)?;
                }
            }
            Request::ApplyAttrs { path, kind, attrs } => fs.apply_attrs(&self.full(&path), kind, &attrs)?,
            Request::LinkReplace { existing, path } => {
                let dst = self.full(&path);
                let tmp = tmp_name_for(&dst)?;
                fs.link(&self.full(&existing), &tmp)?;
                let r = fs.rename(&tmp, &dst, 0);
                // A rename onto another link of the same inode does nothing and leaves `tmp`.
                let _ = fs.unlink(&tmp);
                r?
            }
            Request::RemoveTree { path } => {
                if path.is_root() {
                    return Err(FsError::msg(
                        libc::EBUSY,
                        "remove",
                        &path,
                        "refusing to remove the target root",
                    ));
                }
                fs.remove_tree(&self.full(&path))?
            }
        }
        Ok(Reply::Done)
    }

    fn apply_delta(fs: &dyn FileSystem, st: &mut Stage, offset: u64, delta: &[u8]) -> FsResult<()> {
        if offset != st.delta_end {
            return Err(FsError::msg(
                libc::EINVAL,
                "delta",
                &st.dst,
                "delta pieces out of order",
            ));
        }
        if st.basis.is_none() {
            st.basis = Some(fs.map_file(&st.dst)?);
        }
        let basis = st.basis.as_deref().unwrap_or(&[]);
        let mut out = Vec::with_capacity(crate::protocol::DATA_CHUNK);
        fast_rsync::apply_limited(basis, delta, &mut out, crate::protocol::DATA_CHUNK)
            .map_err(|e| FsError::msg(libc::EIO, "delta", &st.dst, e.to_string()))?;
        st.hasher.update(&out);
        write_maybe_sparse(fs, &st.tmp, offset, &out, st.sparse)?;
        st.delta_end += out.len() as u64;
        Ok(())
    }

    fn scan_page(&mut self) -> Reply {
        let Some((rest, ahead)) = self.scan_rest.as_mut() else {
            return Reply::Scan {
                entries: Vec::new(),
                more: false,
            };
        };
        let mut entries: Vec<Entry> = Vec::with_capacity(SCAN_PAGE);
        entries.extend(ahead.take());
        while entries.len() < SCAN_PAGE {
            match rest.next() {
                Some(e) => entries.push(e),
                None => break,
            }
        }
        *ahead = rest.next();
        let more = ahead.is_some();
        if let ScanRest::Walking(w) = rest {
            for p in w.problems.drain(..) {
                log::warn!("target scan: {p}");
            }
        }
        if !more {
            self.scan_rest = None;
        }
        Reply::Scan { entries, more }
    }
}

impl Drop for ReplicatorTarget {
    /// Staged files of a connection that ended are removed.
    fn drop(&mut self) {
        for (_, st) in self.stages.drain() {
            let _ = self.fs.unlink(&st.tmp);
        }
    }
}
