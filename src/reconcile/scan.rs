//! Scanning: walk a tree through `FileSystem::read_dir` (one open directory per listing, entries
//! read with `*at` calls) into a `Snapshot`: its entries in one vector sorted by `RelPath`
//! (pre-order), looked up by binary search, so a tree of 50k entries costs one allocation per
//! entry's path and no map nodes. A directory that
//! cannot be read is recorded as incomplete, never as empty, so nothing beneath it is deleted on
//! the strength of a failed read.

use super::scope::{Depth, Scope};
use crate::fs::{DirEntry, FileSystem, FsError, Kind, Meta, Xattr};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::ops::Deref;

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

/// Entries sorted by path, each path once: a map from path to entry with map-like accessors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries(Vec<Entry>);

impl Entries {
    /// Sorts by path; of entries with equal paths the first is kept.
    pub fn new(mut v: Vec<Entry>) -> Entries {
        // Already sorted in the common case (a walk in pre-order), which the sort sees in O(n).
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v.dedup_by(|a, b| a.path == b.path);
        Entries(v)
    }

    fn find(&self, p: &RelPath) -> Result<usize, usize> {
        self.0.binary_search_by(|e| e.path.cmp(p))
    }

    pub fn get(&self, p: &RelPath) -> Option<&Entry> {
        self.find(p).ok().map(|i| &self.0[i])
    }

    pub fn get_mut(&mut self, p: &RelPath) -> Option<&mut Entry> {
        self.find(p).ok().map(|i| &mut self.0[i])
    }

    pub fn contains_key(&self, p: &RelPath) -> bool {
        self.find(p).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &RelPath> + DoubleEndedIterator {
        self.0.iter().map(|e| &e.path)
    }

    pub fn values(&self) -> std::slice::Iter<'_, Entry> {
        self.0.iter()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&RelPath, &Entry)> + DoubleEndedIterator {
        self.0.iter().map(|e| (&e.path, e))
    }

    pub fn into_vec(self) -> Vec<Entry> {
        self.0
    }

    /// For each entry in order, the entry of `other` with the same path: one merge of the two
    /// sorted lists instead of a search per entry.
    pub fn counterparts<'a>(&self, other: &'a Entries) -> Vec<Option<&'a Entry>> {
        let mut out = Vec::with_capacity(self.0.len());
        let mut j = 0;
        for e in &self.0 {
            while j < other.0.len() && other.0[j].path < e.path {
                j += 1;
            }
            out.push(other.0.get(j).filter(|o| o.path == e.path));
        }
        out
    }
}

impl<'a> IntoIterator for &'a Entries {
    type Item = (&'a RelPath, &'a Entry);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Entry>, fn(&'a Entry) -> (&'a RelPath, &'a Entry)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|e| (&e.path, e))
    }
}

impl std::ops::Index<&RelPath> for Entries {
    type Output = Entry;
    fn index(&self, p: &RelPath) -> &Entry {
        self.get(p).unwrap_or_else(|| panic!("no entry {p}"))
    }
}

/// A scanned tree: every entry including the root (the empty path).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub entries: Entries,
    /// Directories whose listing failed: their contents are unknown.
    pub incomplete: BTreeSet<RelPath>,
    /// What went wrong while scanning, per path.
    pub problems: Vec<FsError>,
}

impl Snapshot {
    pub fn from_entries(entries: impl IntoIterator<Item = Entry>) -> Snapshot {
        Snapshot {
            entries: Entries::new(entries.into_iter().collect()),
            ..Default::default()
        }
    }

    pub fn get(&self, p: &RelPath) -> Option<&Entry> {
        self.entries.get(p)
    }

    /// True when `p` or one of its ancestors could not be listed.
    pub fn is_incomplete_at(&self, p: &RelPath) -> bool {
        if self.incomplete.is_empty() {
            return false;
        }
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
pub fn scan(fs: &(dyn FileSystem + 'static), root: &RelPath, opts: ScanOptions) -> Result<Snapshot, FsError> {
    scan_scope(fs, root, &Scope::full(), opts)
}

/// Scans the regions of `scope` beneath `root`. The root must be a directory. A region whose
/// path does not exist (or has a non-directory on the way) contributes nothing: absent on this
/// side. A region that cannot be read for another reason marks its parent incomplete, so the
/// planner deletes nothing on its strength.
pub fn scan_scope(
    fs: &(dyn FileSystem + 'static),
    root: &RelPath,
    scope: &Scope,
    opts: ScanOptions,
) -> Result<Snapshot, FsError> {
    check_root(fs, root)?;
    let mut snap = Snapshot::default();
    // Collected first and sorted once at the end: cheaper than keeping a map in order.
    let mut found = Vec::new();
    for (path, depth) in scope.regions() {
        let mut w = Walk::region(fs, root.clone(), path, depth, opts);
        for (e, unlisted) in &mut w {
            if unlisted {
                snap.incomplete.insert(e.path.clone());
            }
            found.push(e);
        }
        if let Some(dir) = w.failed_parent {
            snap.incomplete.insert(dir);
        }
        snap.problems.append(&mut w.problems);
    }
    snap.entries = Entries::new(found);
    Ok(snap)
}

fn check_root(fs: &dyn FileSystem, root: &RelPath) -> Result<(), FsError> {
    let meta = fs.stat(root)?;
    if meta.kind != Kind::Dir {
        return Err(FsError::new(libc::ENOTDIR, "scan", root));
    }
    Ok(())
}

/// Called with each directory a walk is about to list (a watcher adds its watch there).
pub type ListingHook = Box<dyn FnMut(&RelPath) + Send>;

/// A lazy walk of a tree in pre-order, each listing sorted by name, which is the order of
/// `RelPath`: the entries come out sorted, one directory listing per level of the current path
/// held at a time, so memory follows the depth and the widest directory, not the tree. Each
/// entry comes with whether it is a directory whose listing failed (its contents are unknown,
/// not empty). A directory that vanished while the walk went on counts as unlisted too, quietly.
pub struct Walk<F: Deref<Target = dyn FileSystem>> {
    fs: F,
    root: RelPath,
    opts: ScanOptions,
    /// The top entry, read and yielded first, and whether to list it.
    pending_top: Option<(RelPath, bool)>,
    stack: Vec<(RelPath, std::vec::IntoIter<DirEntry>)>,
    /// List the directories met beneath the top, not only the top.
    deep: bool,
    /// What went wrong, per path.
    pub problems: Vec<FsError>,
    before_listing: Option<ListingHook>,
    /// The top entry could not be read (not absent): its parent's view is incomplete.
    pub failed_parent: Option<RelPath>,
}

impl<F: Deref<Target = dyn FileSystem>> Walk<F> {
    /// The whole tree at `root`, which must be a directory; the root's entry first.
    pub fn tree(fs: F, root: RelPath, opts: ScanOptions) -> Result<Walk<F>, FsError> {
        check_root(&*fs, &root)?;
        Ok(Walk::region(fs, root, &RelPath::root(), Depth::Tree, opts))
    }

    /// The entry at `top` and, if it is a directory, as much beneath it as `depth` says.
    fn region(fs: F, root: RelPath, top: &RelPath, depth: Depth, opts: ScanOptions) -> Walk<F> {
        let mut w = Walk {
            fs,
            root,
            opts,
            pending_top: None,
            stack: Vec::new(),
            deep: depth == Depth::Tree,
            problems: Vec::new(),
            before_listing: None,
            failed_parent: None,
        };
        w.pending_top = Some((top.clone(), depth != Depth::Entry));
        w
    }

    /// Calls `hook` with each directory before its listing is read, the top's included.
    pub fn before_listing(mut self, hook: ListingHook) -> Walk<F> {
        self.before_listing = Some(hook);
        self
    }

    fn top(&mut self, path: &RelPath, list: bool) -> Option<(Entry, bool)> {
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
                self.failed_parent = path.parent();
                self.problems.push(e);
                return None;
            }
        };
        let kind = meta.kind;
        let unlisted = kind == Kind::Dir && list && !self.push_listing(path);
        let hash = self.hash(path, kind);
        Some((
            Entry {
                path: path.clone(),
                meta,
                link,
                xattrs,
                hash,
            },
            unlisted,
        ))
    }

    fn hash(&mut self, path: &RelPath, kind: Kind) -> Option<[u8; 32]> {
        if !self.opts.checksum || kind != Kind::File {
            return None;
        }
        match self.fs.hash_file(&self.root.join_rel(path)) {
            Ok(h) => Some(h),
            Err(e) => {
                // Kept without a hash: it then counts as different, never as absent.
                self.problems.push(e);
                None
            }
        }
    }

    /// Lists `dir` (sorted by name) onto the stack; false when it cannot be read.
    fn push_listing(&mut self, dir: &RelPath) -> bool {
        if let Some(hook) = self.before_listing.as_mut() {
            hook(dir);
        }
        match self.fs.read_dir(&self.root.join_rel(dir), true) {
            Ok(mut l) => {
                l.sort_unstable_by(|a, b| a.name.cmp(&b.name));
                self.stack.push((dir.clone(), l.into_iter()));
                true
            }
            Err(e) => {
                if e.errno != libc::ENOENT {
                    self.problems.push(e);
                }
                false
            }
        }
    }
}

impl<F: Deref<Target = dyn FileSystem>> Iterator for Walk<F> {
    type Item = (Entry, bool);

    fn next(&mut self) -> Option<(Entry, bool)> {
        if let Some((top, list)) = self.pending_top.take() {
            if let Some(first) = self.top(&top, list) {
                return Some(first);
            }
        }
        loop {
            let (dir, list) = self.stack.last_mut()?;
            let Some(de) = list.next() else {
                self.stack.pop();
                continue;
            };
            let Ok(path) = dir.join(&de.name) else {
                continue;
            };
            let hash = self.hash(&path, de.meta.kind);
            let unlisted = de.meta.kind == Kind::Dir && self.deep && !self.push_listing(&path);
            return Some((
                Entry {
                    path,
                    meta: de.meta,
                    link: de.link,
                    xattrs: de.xattrs,
                    hash,
                },
                unlisted,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, size: u64) -> Entry {
        Entry {
            path: if path.is_empty() {
                RelPath::root()
            } else {
                RelPath::new(path).unwrap()
            },
            meta: Meta {
                kind: Kind::File,
                perm: 0o644,
                uid: 0,
                gid: 0,
                size,
                mtime: Default::default(),
                atime: Default::default(),
                ctime: Default::default(),
                dev: 1,
                ino: size,
                nlink: 1,
                rdev: 0,
                blocks: 0,
            },
            link: None,
            xattrs: Vec::new(),
            hash: None,
        }
    }

    fn paths(es: &Entries) -> Vec<String> {
        es.keys().map(|p| p.to_string()).collect()
    }

    #[test]
    fn entries_are_sorted_by_component_and_unique() {
        // "a/x" sorts before "a.b" (component order), and a repeated path keeps its first entry.
        let es = Entries::new(vec![e("a.b", 1), e("a/x", 2), e("", 0), e("a", 3), e("a/x", 9)]);
        assert_eq!(paths(&es), [".", "a", "a/x", "a.b"]);
        assert_eq!(es.get(&RelPath::new("a/x").unwrap()).unwrap().meta.size, 2);
        assert!(es.contains_key(&RelPath::new("a.b").unwrap()));
        assert!(!es.contains_key(&RelPath::new("a/y").unwrap()));
    }

    #[test]
    fn counterparts_pair_equal_paths() {
        let cases: &[(&[&str], &[&str], &[bool])] = &[
            (
                &["", "a", "a/x", "b"],
                &["", "a/x", "b", "c"],
                &[true, false, true, true],
            ),
            (&["", "a"], &[""], &[true, false]),
            (&[""], &["", "a", "b"], &[true]),
            (&["", "z"], &["", "a", "b", "z"], &[true, true]),
        ];
        for (a, b, want) in cases {
            let a = Entries::new(a.iter().map(|p| e(p, 0)).collect());
            let b = Entries::new(b.iter().map(|p| e(p, 0)).collect());
            let got: Vec<bool> = a
                .counterparts(&b)
                .iter()
                .zip(a.values())
                .map(|(o, x)| o.is_some_and(|o| o.path == x.path))
                .collect();
            assert_eq!(&got, want, "{:?} against {:?}", paths(&a), paths(&b));
        }
    }
}
