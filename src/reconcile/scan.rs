//! Scanning: walk a tree through `FileSystem::read_dir` (one open directory per listing, entries
//! read with `*at` calls) into a `Snapshot` keyed by `RelPath`, in pre-order. A directory that
//! cannot be read is recorded as incomplete, never as empty, so nothing beneath it is deleted on
//! the strength of a failed read.

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
    let meta = fs.stat(root)?;
    if meta.kind != Kind::Dir {
        return Err(FsError::new(libc::ENOTDIR, "scan", root));
    }
    let xattrs = fs.xattrs(root)?;
    let mut snap = Snapshot::default();
    // Collected first and sorted once at the end: cheaper than keeping a map in order throughout.
    let mut found = vec![Entry {
        path: RelPath::root(),
        meta,
        link: None,
        xattrs,
        hash: None,
    }];
    let mut stack = vec![RelPath::root()];
    while let Some(dir) = stack.pop() {
        let full = root.join_rel(&dir);
        let list = match fs.read_dir(&full, true) {
            Ok(l) => l,
            Err(e) => {
                snap.incomplete.insert(dir.clone());
                snap.problems.push(e);
                continue;
            }
        };
        for de in list {
            let Ok(path) = dir.join(&de.name) else {
                continue;
            };
            let hash = if opts.checksum && de.meta.kind == Kind::File {
                match fs.hash_file(&root.join_rel(&path)) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        // Kept without a hash: it then counts as different, never as absent.
                        snap.problems.push(e);
                        None
                    }
                }
            } else {
                None
            };
            if de.meta.kind == Kind::Dir {
                stack.push(path.clone());
            }
            found.push(Entry {
                path,
                meta: de.meta,
                link: de.link,
                xattrs: de.xattrs,
                hash,
            });
        }
    }
    found.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    snap.entries = found.into_iter().map(|e| (e.path.clone(), e)).collect();
    Ok(snap)
}
