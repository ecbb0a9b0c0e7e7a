//! Scanning: walk a tree through `FileSystem::read_dir` (one open directory per listing, entries
//! read with `*at` calls) into a `Snapshot` keyed by `RelPath`, in pre-order. A directory that
//! cannot be read is recorded as incomplete, never as empty, so nothing beneath it is deleted on
//! the strength of a failed read.

use super::scope::{Depth, Scope};
use crate::fs::{FileSystem, FsError, Kind, Meta, Xattr};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// One entry of a scanned tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub meta: Meta,
    /// Symlink target.
    pub link: Option<Vec<u8>>,
    /// Sorted by name.
    pub xattrs: Vec<Xattr>,
    /// BLAKE3 of the content, for regular files when checksums were asked for.
    pub hash: Option<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ScanOptions {
    pub checksum: bool,
}

/// A scanned tree: every entry including the root (the empty path).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub entries: BTreeMap<RelPath, Entry>,
    /// Directories whose listing failed: their contents are unknown.
    pub incomplete: BTreeSet<RelPath>,
    /// What went wrong while scanning, per path.
    pub problems: Vec<FsError>,
}

impl Snapshot {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Snapshot {
        Snapshot {
            entries: entries.into_iter().map(|e| (e.path.clone(), e)).collect(),
            ..Default::default()
        }
    }

    pub fn get(&self, p: &RelPath) -> Option<&Entry> {
        self.entries.get(p)
    }

    /// True when `p` or one of its ancestors could not be listed.
    pub fn is_incomplete_at(&self, p: &RelPath) -> bool {
        let mut cur = p.parent();
        while let Some(c) = cur {
            if self.incomplete.contains(&c) {
                return true;
            }
            cur = c.parent();
        }
        false
    }

    pub fn total_file_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter(|e| e.meta.kind == Kind::File)
            .map(|e| e.meta.size)
            .sum()
    }
}

/// Scans the tree at `root` within `fs`; paths in the snapshot are relative to `root`.
pub fn scan(fs: &dyn FileSystem, root: &RelPath, opts: ScanOptions) -> Result<Snapshot, FsError> {
    scan_scope(fs, root, &Scope::full(), opts)
}

/// Scans the regions of `scope` beneath `root`. The root must be a directory. A region whose
/// path does not exist (or has a non-directory on the way) contributes nothing: absent on this
/// side. A region that cannot be read for another reason marks its parent incomplete, so the
/// planner deletes nothing on its strength.
pub fn scan_scope(fs: &dyn FileSystem, root: &RelPath, scope: &Scope, opts: ScanOptions) -> Result<Snapshot, FsError> {
    let meta = fs.stat(root)?;
    if meta.kind != Kind::Dir {
        return Err(FsError::new(libc::ENOTDIR, "scan", root));
    }
    let mut w = Walk {
        fs,
        root,
        opts,
        snap: Snapshot::default(),
        // Collected first and sorted once at the end: cheaper than keeping a map in order.
        found: Vec::new(),
    };
    for (path, depth) in scope.regions() {
        let Some(kind) = w.entry(path) else { continue };
        if kind != Kind::Dir || depth == Depth::Entry {
            continue;
        }
        w.walk(path, depth == Depth::Tree);
    }
    let mut found = w.found;
    found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    found.dedup_by(|a, b| a.path == b.path);
    let mut snap = w.snap;
    snap.entries = found.into_iter().map(|e| (e.path.clone(), e)).collect();
    Ok(snap)
}

struct Walk<'a> {
    fs: &'a dyn FileSystem,
    root: &'a RelPath,
    opts: ScanOptions,
    snap: Snapshot,
    found: Vec<Entry>,
}

impl Walk<'_> {
    fn hash(&mut self, path: &RelPath, kind: Kind) -> Option<[u8; 32]> {
        if !self.opts.checksum || kind != Kind::File {
            return None;
        }
        match self.fs.hash_file(&self.root.join_rel(path)) {
            Ok(h) => Some(h),
            Err(e) => {
                // Kept without a hash: it then counts as different, never as absent.
                self.snap.problems.push(e);
                None
            }
        }
    }

    /// Records the entry at `path` itself; its kind, or `None` when it is absent or unreadable.
    fn entry(&mut self, path: &RelPath) -> Option<Kind> {
        let full = self.root.join_rel(path);
        let read = (|| {
            let meta = self.fs.stat(&full)?;
            let link = if meta.kind == Kind::Symlink {
                Some(self.fs.read_link(&full)?)
            } else {
                None
            };
            let xattrs = self.fs.xattrs(&full)?;
            Ok::<_, FsError>((meta, link, xattrs))
        })();
        let (meta, link, xattrs) = match read {
            Ok(r) => r,
            Err(e) if matches!(e.errno, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => return None,
            Err(e) => {
                if let Some(parent) = path.parent() {
                    self.snap.incomplete.insert(parent);
                }
                self.snap.problems.push(e);
                return None;
            }
        };
        let kind = meta.kind;
        let hash = self.hash(path, kind);
        self.found.push(Entry {
            path: path.clone(),
            meta,
            link,
            xattrs,
            hash,
        });
        Some(kind)
    }

    /// Records what lies beneath the directory `top`: its children, or with `deep` everything.
    fn walk(&mut self, top: &RelPath, deep: bool) {
        let mut stack = vec![top.clone()];
        while let Some(dir) = stack.pop() {
            let full = self.root.join_rel(&dir);
            let list = match self.fs.read_dir(&full, true) {
                Ok(l) => l,
                Err(e) => {
                    self.snap.incomplete.insert(dir.clone());
                    self.snap.problems.push(e);
                    continue;
                }
            };
            for de in list {
                let Ok(path) = dir.join(&de.name) else {
                    continue;
                };
                let hash = self.hash(&path, de.meta.kind);
                if deep && de.meta.kind == Kind::Dir {
                    stack.push(path.clone());
                }
                self.found.push(Entry {
                    path,
                    meta: de.meta,
                    link: de.link,
                    xattrs: de.xattrs,
                    hash,
                });
            }
        }
    }
}
