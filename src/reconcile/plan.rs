//! Planning: a pure function from the two sides' entries, in path order, to the operations
//! that make the target equal to the source. No I/O happens here.
//!
//! It streams: `plan_stream` merges two sorted streams of entries (each a pre-order walk with
//! listings sorted by name) and hands out operations in batches while the walks go on, holding
//! only the directories on the current path, so memory follows the depth, not the tree. `plan`
//! is the same over two snapshots in memory.
//!
//! Order of the plan, for each entry in path order: a target entry the source lacks is removed
//! (topmost path only; never beneath a source directory whose listing failed); an entry of
//! another kind is removed before the new one is made; a directory is made before its children
//! and gets its metadata when the walk leaves it (children first), because making or removing
//! children moves a directory's mtime. Unchanged files (same size and mtime, or same hash with
//! `checksum`) get no operation at all.
//!
//! Hard links reach across directories, so files with more than one link on either side wait
//! for a last phase, when both sides' groups are known; so does the metadata of every directory
//! above them. Their groups are rebuilt with `Link` from the first path of each group; a target
//! file whose own link group differs from the source's is replaced, never changed in place.
//! What the planner keeps across directories is therefore proportional to the hard-linked
//! files, never to the tree.

use super::scan::{Entry, Snapshot};
use crate::fs::Kind;
use crate::path::RelPath;
use std::collections::{HashMap, HashSet};

/// One operation. Those that need the source's entry carry it, so applying never looks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove the target's entry (and its subtree).
    Remove(RelPath),
    /// Make a directory (private until its metadata is given when the walk leaves it).
    Mkdir(RelPath),
    /// Send content; `basis` says the target has a regular file there to delta against.
    Transfer {
        entry: Entry,
        basis: bool,
    },
    /// Same size, other mtime (a `touch`): compare content hashes, send content only if they
    /// differ, otherwise only metadata.
    Check(Entry),
    /// Make `path` a hard link of `leader`, which is already in place.
    Link {
        path: RelPath,
        leader: RelPath,
    },
    Symlink(Entry),
    /// fifo, socket or device node.
    Mknod(Entry),
    /// Give an existing entry the source's owner, mode, xattrs and mtime.
    Attrs(Entry),
}

impl Op {
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Remove(p) | Op::Mkdir(p) | Op::Link { path: p, .. } => p,
            Op::Transfer { entry: e, .. } | Op::Check(e) | Op::Symlink(e) | Op::Mknod(e) | Op::Attrs(e) => &e.path,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Compare content hashes instead of size and mtime.
    pub checksum: bool,
    /// The target can hold what needs root (it runs as root, or keeps records): uid/gid are
    /// compared and set, and device nodes made. Without, both are left out and counted in
    /// `Plan::not_mirrored`.
    pub owners: bool,
    /// Let an empty source empty a non-empty target.
    pub allow_mass_delete: bool,
    /// The snapshots are partial and do not list the root's children: the mass-delete guard has
    /// nothing to judge.
    pub root_unlisted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "refusing to delete all {0} entries of the target because the source directory is empty \
         (an unmounted disk looks like this); pass --allow-mass-delete if that is really wanted"
    )]
    MassDelete(usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub not_mirrored: NotMirrored,
}

/// What a target without privileges cannot hold, counted rather than reported per path (and
/// never a difference nor a failure): owners other than its own user, device nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotMirrored {
    pub owners: usize,
    pub devices: usize,
}

impl NotMirrored {
    pub fn is_empty(&self) -> bool {
        self.owners == 0 && self.devices == 0
    }

    pub fn add(&mut self, o: NotMirrored) {
        self.owners += o.owners;
        self.devices += o.devices;
    }
}

impl std::fmt::Display for NotMirrored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.owners > 0 {
            parts.push(format!("the owners of {} entries", self.owners));
        }
        if self.devices > 0 {
            parts.push(format!("{} device nodes", self.devices));
        }
        write!(
            f,
            "the target runs without root, so {} are not mirrored (serve --fake-super keeps them)",
            parts.join(" and ")
        )
    }
}

/// Owner, mode, xattrs and mtime differ (mtime is not compared for directories by the caller
/// when it already knows they will be reset).
fn attrs_differ(s: &Entry, t: &Entry, opts: &PlanOptions) -> bool {
    (s.meta.kind != Kind::Symlink && s.meta.perm != t.meta.perm)
        || (opts.owners && (s.meta.uid, s.meta.gid) != (t.meta.uid, t.meta.gid))
        || s.xattrs != t.xattrs
        || s.meta.mtime != t.meta.mtime
}

fn content_same(s: &Entry, t: &Entry, opts: &PlanOptions) -> bool {
    s.meta.size == t.meta.size
        && if opts.checksum {
            s.hash.is_some() && s.hash == t.hash
        } else {
            s.meta.mtime == t.meta.mtime
        }
}

/// Operations are handed out in batches of about this many.
const BATCH: usize = 1024;

/// Plans over two snapshots in memory (a partial reconcile's scopes, `verify`): the streaming
/// planner fed from them.
pub fn plan(src: &Snapshot, dst: &Snapshot, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let mut ops = Vec::new();
    let not_mirrored = plan_stream(
        src.entries
            .values()
            .map(|e| (e.clone(), src.incomplete.contains(&e.path))),
        dst.entries.values().cloned(),
        opts,
        |batch| {
            ops.extend(batch);
            Ok::<_, PlanError>(())
        },
    )?;
    Ok(Plan { ops, not_mirrored })
}

/// Plans while both sides are walked. `src` yields the source's entries in path order, each
/// with whether it is a directory whose listing failed; `dst` the target's, in the same order.
/// `sink` gets the operations in order, in batches, as soon as they are known; an error from it
/// stops the plan. Returns what the target cannot hold.
pub fn plan_stream<E: From<PlanError>>(
    src: impl Iterator<Item = (Entry, bool)>,
    dst: impl Iterator<Item = Entry>,
    opts: &PlanOptions,
    mut sink: impl FnMut(Vec<Op>) -> Result<(), E>,
) -> Result<NotMirrored, E> {
    let mut src = src.peekable();
    let mut dst = dst.peekable();
    let (s0, t0) = (src.next(), dst.next());
    // The root's listing decides: an empty source (an unmounted disk looks like this) does not
    // empty the target unless asked.
    if !opts.root_unlisted && !opts.allow_mass_delete && src.peek().is_none() && dst.peek().is_some() {
        return Err(PlanError::MassDelete(dst.count()).into());
    }
    let mut src = s0.into_iter().chain(src).peekable();
    let mut dst = t0.into_iter().chain(dst).peekable();
    let mut p = Planner::new(*opts);
    loop {
        let order = match (src.peek(), dst.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((s, _)), Some(t)) => s.path.cmp(&t.path),
        };
        match order {
            std::cmp::Ordering::Less => p.step(src.next(), None),
            std::cmp::Ordering::Greater => p.step(None, dst.next()),
            std::cmp::Ordering::Equal => p.step(src.next(), dst.next()),
        }
        if p.ops.len() >= BATCH {
            sink(std::mem::take(&mut p.ops))?;
        }
    }
    p.finish();
    sink(std::mem::take(&mut p.ops))?;
    Ok(p.not_mirrored)
}

/// A source directory on the path to the entry being planned.
struct Frame {
    src: Entry,
    /// The target's entry here is missing or replaced: nothing of the target's beneath counts.
    gone: bool,
    /// Its metadata must be set when the walk leaves it: new, differing, or its listing changed.
    needs_attrs: bool,
    /// Its source listing, or an ancestor's, failed: nothing beneath it is deleted.
    unlisted: bool,
    /// Something beneath it waits for the hard-link phase, so its metadata waits too.
    deferred: bool,
}

/// The streaming planner's state: the directories on the current path and what waits for the
/// hard-link phase.
struct Planner {
    opts: PlanOptions,
    ops: Vec<Op>,
    not_mirrored: NotMirrored,
    /// Without owners, a new entry gets the target's user: the target root's owner.
    target_owner: Option<(u32, u32)>,
    stack: Vec<Frame>,
    /// Files with more than one link on either side, in path order, with their target entry
    /// (`None` when missing or replaced).
    linked: Vec<(Entry, Option<Entry>)>,
    /// Paths of each hard-link group (regular files with more than one link), in path order.
    src_groups: HashMap<(u64, u64), Vec<RelPath>>,
    dst_groups: HashMap<(u64, u64), Vec<RelPath>>,
    /// Directories left while something beneath them waited, children first, and whether
    /// their metadata is needed already.
    late_dirs: Vec<(Entry, bool)>,
    /// Directories whose listing the hard-link phase changes.
    late_touched: HashSet<RelPath>,
}

fn inode(e: &Entry) -> (u64, u64) {
    (e.meta.dev, e.meta.ino)
}

fn is_linked(e: &Entry) -> bool {
    e.meta.kind == Kind::File && e.meta.nlink > 1
}

impl Planner {
    fn new(opts: PlanOptions) -> Planner {
        Planner {
            opts,
            ops: Vec::new(),
            not_mirrored: NotMirrored::default(),
            target_owner: None,
            stack: Vec::new(),
            linked: Vec::new(),
            src_groups: HashMap::new(),
            dst_groups: HashMap::new(),
            late_dirs: Vec::new(),
            late_touched: HashSet::new(),
        }
    }

    /// Adds an operation; one that changes a listing marks the directory it is in.
    fn push(&mut self, op: Op) {
        if !matches!(op, Op::Attrs(_)) {
            match self.stack.last_mut() {
                Some(f) => f.needs_attrs = true,
                None => {
                    if let Some(parent) = op.path().parent() {
                        self.late_touched.insert(parent);
                    }
                }
            }
        }
        self.ops.push(op);
    }

    /// One path: its source entry (with whether its listing failed), its target entry, or both.
    fn step(&mut self, s: Option<(Entry, bool)>, t: Option<Entry>) {
        let Some(path) = s.as_ref().map(|(e, _)| &e.path).or(t.as_ref().map(|e| &e.path)) else {
            return;
        };
        while self
            .stack
            .last()
            .is_some_and(|f| *path == f.src.path || !path.starts_with(&f.src.path))
        {
            self.leave();
        }
        if let Some(te) = t.as_ref().filter(|te| is_linked(te)) {
            self.dst_groups.entry(inode(te)).or_default().push(te.path.clone());
        }
        match s {
            Some((s, unlisted)) => self.source_entry(s, unlisted, t),
            None => {
                let Some(t) = t else { return };
                // Removed only when it is the topmost: its parent is a source directory.
                let Some(top) = self.stack.last() else { return };
                let in_top = t.path.split().is_some_and(|(dir, _)| dir == top.src.path.as_bytes());
                if in_top && !top.unlisted && !top.gone {
                    self.push(Op::Remove(t.path));
                }
            }
        }
    }

    /// The walk leaves the directory on top: its metadata now, or in the hard-link phase.
    fn leave(&mut self) {
        let Some(f) = self.stack.pop() else { return };
        if f.deferred {
            if let Some(parent) = self.stack.last_mut() {
                parent.deferred = true;
            }
            self.late_dirs.push((f.src, f.needs_attrs));
        } else if f.needs_attrs {
            self.ops.push(Op::Attrs(f.src));
        }
    }

    fn source_entry(&mut self, s: Entry, unlisted: bool, t: Option<Entry>) {
        let opts = self.opts;
        let parent = self.stack.last();
        let parent_unlisted = parent.is_some_and(|f| f.unlisted);
        let mut t = if parent.is_some_and(|f| f.gone) { None } else { t };
        if s.path.is_root() {
            self.target_owner = t.as_ref().map(|te| (te.meta.uid, te.meta.gid));
            let needs_attrs = t.as_ref().is_none_or(|te| attrs_differ(&s, te, &opts));
            self.stack.push(Frame {
                src: s,
                gone: t.is_none(),
                needs_attrs,
                unlisted,
                deferred: false,
            });
            return;
        }
        if !opts.owners {
            let theirs = t.as_ref().map(|te| (te.meta.uid, te.meta.gid)).or(self.target_owner);
            if theirs.is_some_and(|o| o != (s.meta.uid, s.meta.gid)) {
                self.not_mirrored.owners += 1;
            }
        }
        if !opts.owners && s.meta.kind.is_device() {
            // Left out: whatever else the target has there goes, as the source has none of it.
            self.not_mirrored.devices += 1;
            if t.is_some_and(|te| te.meta.kind != s.meta.kind || te.meta.rdev != s.meta.rdev) {
                self.push(Op::Remove(s.path));
            }
            return;
        }
        if let Some(te) = &t {
            let same_kind = te.meta.kind == s.meta.kind;
            let same_node = match s.meta.kind {
                Kind::Symlink => te.link == s.link,
                k if k.is_special() => te.meta.rdev == s.meta.rdev,
                _ => true,
            };
            if !same_kind || !same_node {
                self.push(Op::Remove(s.path.clone()));
                t = None;
            }
        }
        match s.meta.kind {
            Kind::Dir => {
                if t.is_none() {
                    self.push(Op::Mkdir(s.path.clone()));
                }
                let needs_attrs = t.as_ref().is_none_or(|te| attrs_differ(&s, te, &opts));
                self.stack.push(Frame {
                    src: s,
                    gone: t.is_none(),
                    needs_attrs,
                    unlisted: unlisted || parent_unlisted,
                    deferred: false,
                });
            }
            Kind::File if is_linked(&s) || t.as_ref().is_some_and(is_linked) => {
                if is_linked(&s) {
                    self.src_groups.entry(inode(&s)).or_default().push(s.path.clone());
                }
                if let Some(f) = self.stack.last_mut() {
                    f.deferred = true;
                }
                self.linked.push((s, t));
            }
            Kind::File => {
                self.file(s, t.as_ref(), false);
            }
            _ => match t {
                Some(te) => {
                    if attrs_differ(&s, &te, &opts) {
                        self.push(Op::Attrs(s));
                    }
                }
                None => {
                    let op = if s.meta.kind == Kind::Symlink {
                        Op::Symlink(s.clone())
                    } else {
                        Op::Mknod(s.clone())
                    };
                    self.push(op);
                    self.push(Op::Attrs(s));
                }
            },
        }
    }

    /// A regular file's content and metadata; true when the target gets a new inode for it.
    /// `shared_wrongly`: the target's inode is shared with paths other than the source's group,
    /// so it is never changed in place (that would change the other paths too).
    fn file(&mut self, s: Entry, t: Option<&Entry>, shared_wrongly: bool) -> bool {
        let opts = self.opts;
        match t {
            Some(te) if content_same(&s, te, &opts) && !shared_wrongly => {
                if attrs_differ(&s, te, &opts) {
                    self.push(Op::Attrs(s));
                }
                false
            }
            Some(te) if !opts.checksum && !shared_wrongly && te.meta.size == s.meta.size && s.meta.size > 0 => {
                self.push(Op::Check(s));
                true
            }
            _ => {
                let basis = t.is_some_and(|te| te.meta.size > 0 && !shared_wrongly);
                self.push(Op::Transfer { entry: s, basis });
                true
            }
        }
    }

    /// The end of both walks: the directories still open are left, then the hard-link phase
    /// runs, then the metadata of the directories that waited for it, children first.
    fn finish(&mut self) {
        while !self.stack.is_empty() {
            self.leave();
        }
        let linked = std::mem::take(&mut self.linked);
        // The target inode each waiting source path has now.
        let target_inode: HashMap<RelPath, (u64, u64)> = linked
            .iter()
            .filter_map(|(s, t)| Some((s.path.clone(), inode(t.as_ref()?))))
            .collect();
        let mut rewritten: HashSet<RelPath> = HashSet::new();
        for (s, t) in linked {
            let group = is_linked(&s).then(|| self.src_groups[&inode(&s)].clone());
            if let Some(leader) = group.as_ref().map(|g| &g[0]).filter(|l| **l != s.path) {
                let in_place = t
                    .as_ref()
                    .zip(target_inode.get(leader))
                    .is_some_and(|(te, tl)| inode(te) == *tl && !rewritten.contains(leader));
                if !in_place {
                    self.push(Op::Link {
                        path: s.path,
                        leader: leader.clone(),
                    });
                }
                continue;
            }
            let shared_wrongly = t.as_ref().is_some_and(|te| {
                if te.meta.nlink <= 1 {
                    return false;
                }
                let tg = self.dst_groups.get(&inode(te)).map(Vec::as_slice).unwrap_or(&[]);
                let sg: &[RelPath] = group.as_deref().unwrap_or(std::slice::from_ref(&s.path));
                te.meta.nlink as usize != tg.len() || tg != sg
            });
            let path = s.path.clone();
            if self.file(s, t.as_ref(), shared_wrongly) {
                rewritten.insert(path);
            }
        }
        for (dir, needed) in std::mem::take(&mut self.late_dirs) {
            if needed || self.late_touched.contains(&dir.path) {
                self.ops.push(Op::Attrs(dir));
            }
        }
    }
}

/// Explains in words how the target differs from the source for one planned operation.
pub fn describe(op: &Op, src: &Snapshot, dst: &Snapshot) -> String {
    let s = src.get(op.path());
    let t = dst.get(op.path());
    match op {
        Op::Remove(p) if s.is_none() => format!("only on target: {p}"),
        Op::Remove(p) => format!("different kind or node on target: {p}"),
        Op::Mkdir(p) => format!("directory missing on target: {p}"),
        Op::Transfer { entry, .. } if t.is_none() => format!("file missing on target: {}", entry.path),
        Op::Transfer { entry, .. } => format!("content differs: {}", entry.path),
        Op::Check(e) => format!("mtime differs, content may too: {}", e.path),
        Op::Link { path, leader } => format!("not hard-linked to {leader} on target: {path}"),
        Op::Symlink(e) => format!("symlink missing on target: {}", e.path),
        Op::Mknod(e) => format!("special file missing on target: {}", e.path),
        Op::Attrs(e) => {
            let p = &e.path;
            let (Some(s), Some(t)) = (s, t) else {
                return format!("metadata to set: {p}");
            };
            let mut what = Vec::new();
            if s.meta.kind != Kind::Symlink && s.meta.perm != t.meta.perm {
                what.push(format!("mode {:04o} vs {:04o}", s.meta.perm, t.meta.perm));
            }
            if (s.meta.uid, s.meta.gid) != (t.meta.uid, t.meta.gid) {
                what.push(format!(
                    "owner {}:{} vs {}:{}",
                    s.meta.uid, s.meta.gid, t.meta.uid, t.meta.gid
                ));
            }
            if s.xattrs != t.xattrs {
                what.push("xattrs".to_string());
            }
            if s.meta.mtime != t.meta.mtime {
                what.push(format!(
                    "mtime {}.{:09} vs {}.{:09}",
                    s.meta.mtime.sec, s.meta.mtime.nsec, t.meta.mtime.sec, t.meta.mtime.nsec
                ));
            }
            format!("metadata differs: {p} ({})", what.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{Meta, Time};

    fn meta(kind: Kind, ino: u64) -> Meta {
        Meta {
            kind,
            perm: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            mtime: Time::new(100, 0),
            atime: Time::new(100, 0),
            ctime: Time::new(100, 0),
            dev: 1,
            ino,
            nlink: 1,
            rdev: 0,
            blocks: 0,
        }
    }

    /// Builds a snapshot from a compact description: "d:path", "f:path:size:mtime",
    /// "l:path:target", "h:path:ino" (hard-linked file, shares `ino`), "p:path" (fifo).
    fn snap(items: &[&str]) -> Snapshot {
        let mut entries = vec![Entry {
            path: RelPath::root(),
            meta: meta(Kind::Dir, 1),
            link: None,
            xattrs: vec![],
            hash: None,
        }];
        let mut links: HashMap<u64, u64> = HashMap::new();
        for item in items {
            if let Some(ino) = item.strip_prefix("h:").and_then(|r| r.rsplit(':').next()) {
                *links.entry(ino.parse().unwrap()).or_default() += 1;
            }
        }
        for (i, item) in items.iter().enumerate() {
            let parts: Vec<&str> = item.split(':').collect();
            let path = RelPath::new(parts[1]).unwrap();
            let ino = 1000 + i as u64;
            let e = match parts[0] {
                "d" => Entry {
                    path,
                    meta: meta(Kind::Dir, ino),
                    link: None,
                    xattrs: vec![],
                    hash: None,
                },
                "f" => {
                    let mut m = meta(Kind::File, ino);
                    m.size = parts[2].parse().unwrap();
                    m.mtime = Time::new(parts[3].parse().unwrap(), 0);
                    Entry {
                        path,
                        meta: m,
                        link: None,
                        xattrs: vec![],
                        hash: None,
                    }
                }
                "h" => {
                    let ino: u64 = parts[2].parse().unwrap();
                    let mut m = meta(Kind::File, ino);
                    m.nlink = links[&ino];
                    m.size = 5;
                    Entry {
                        path,
                        meta: m,
                        link: None,
                        xattrs: vec![],
                        hash: None,
                    }
                }
                "l" => Entry {
                    path,
                    meta: meta(Kind::Symlink, ino),
                    link: Some(parts[2].as_bytes().to_vec()),
                    xattrs: vec![],
                    hash: None,
                },
                "p" => Entry {
                    path,
                    meta: meta(Kind::Fifo, ino),
                    link: None,
                    xattrs: vec![],
                    hash: None,
                },
                "c" => Entry {
                    path,
                    meta: Meta {
                        rdev: 0x0103,
                        ..meta(Kind::CharDev, ino)
                    },
                    link: None,
                    xattrs: vec![],
                    hash: None,
                },
                other => panic!("bad kind {other}"),
            };
            entries.push(e);
        }
        Snapshot::from_entries(entries)
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn show(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                Op::Remove(p) => format!("rm {p}"),
                Op::Mkdir(p) => format!("mkdir {p}"),
                Op::Transfer { entry, basis } => {
                    format!("put {}{}", entry.path, if *basis { " (delta)" } else { "" })
                }
                Op::Link { path, leader } => format!("link {path} -> {leader}"),
                Op::Symlink(e) => format!("symlink {}", e.path),
                Op::Mknod(e) => format!("mknod {}", e.path),
                Op::Attrs(e) => format!("attrs {}", e.path),
                Op::Check(e) => format!("check {}", e.path),
            })
            .collect()
    }

    fn run(src: &[&str], dst: &[&str]) -> Vec<String> {
        show(
            &plan(
                &snap(src),
                &snap(dst),
                &PlanOptions {
                    allow_mass_delete: true,
                    ..Default::default()
                },
            )
            .unwrap()
            .ops,
        )
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[&str], &[&str], &[&str])] = &[
            (
                "identical trees need nothing",
                &["d:a", "f:a/x:3:100", "l:s:t"],
                &["d:a", "f:a/x:3:100", "l:s:t"],
                &[],
            ),
            (
                "empty target gets everything in path order, a dir's attrs when the walk leaves it",
                &["d:a", "f:a/x:3:100", "d:a/b", "l:s:t", "p:fifo"],
                &[],
                &[
                    "mkdir a",
                    "mkdir a/b",
                    "attrs a/b",
                    "put a/x",
                    "attrs a",
                    "mknod fifo",
                    "attrs fifo",
                    "symlink s",
                    "attrs s",
                    "attrs .",
                ],
            ),
            (
                "changed size sends a delta",
                &["f:x:4:100"],
                &["f:x:3:100"],
                &["put x (delta)", "attrs ."],
            ),
            (
                "changed mtime with the same size is checked by hash",
                &["f:x:3:200"],
                &["f:x:3:100"],
                &["check x", "attrs ."],
            ),
            (
                "extra entries are removed, topmost only",
                &["d:a"],
                &["d:a", "d:a/b", "f:a/b/c:1:100", "f:z:1:100"],
                &["rm a/b", "attrs a", "rm z", "attrs ."],
            ),
            (
                "target file where source has a dir with children",
                &["d:a", "d:a/b", "f:a/b/c:1:100"],
                &["f:a:1:100"],
                &[
                    "rm a",
                    "mkdir a",
                    "mkdir a/b",
                    "put a/b/c",
                    "attrs a/b",
                    "attrs a",
                    "attrs .",
                ],
            ),
            (
                "target dir tree where source has a file",
                &["f:a:1:100"],
                &["d:a", "d:a/b", "f:a/b/c:1:100"],
                &["rm a", "put a", "attrs ."],
            ),
            (
                "target symlink where source has a dir is removed, not followed",
                &["d:a", "f:a/x:1:100"],
                &["l:a:/etc"],
                &["rm a", "mkdir a", "put a/x", "attrs a", "attrs ."],
            ),
            (
                "symlink with another target is replaced",
                &["l:s:new"],
                &["l:s:old"],
                &["rm s", "symlink s", "attrs s", "attrs ."],
            ),
            (
                "hard links are rebuilt from the leader",
                &["h:a:7", "h:b:7"],
                &[],
                &["put a", "link b -> a", "attrs ."],
            ),
            (
                "hard links already in place need nothing",
                &["h:a:7", "h:b:7"],
                &["h:a:9", "h:b:9"],
                &[],
            ),
            (
                "hard links wait for the end, and so do the attrs of the dirs above them",
                &["d:a", "h:a/x:7", "d:b", "h:b/y:7", "f:c:1:100", "d:d", "f:d/z:1:100"],
                &[],
                &[
                    "mkdir a",
                    "mkdir b",
                    "put c",
                    "mkdir d",
                    "put d/z",
                    "attrs d",
                    "put a/x",
                    "link b/y -> a/x",
                    "attrs a",
                    "attrs b",
                    "attrs .",
                ],
            ),
            (
                "a link group already in place across dirs needs nothing",
                &["d:a", "h:a/x:7", "d:b", "h:b/y:7"],
                &["d:a", "h:a/x:9", "d:b", "h:b/y:9"],
                &[],
            ),
            (
                "a target-only tree goes from its top, whatever lies beneath",
                &["d:a"],
                &[
                    "d:a",
                    "d:a/old",
                    "d:a/old/deep",
                    "f:a/old/deep/f:1:1",
                    "h:a/old/l:3",
                    "h:a/m:3",
                ],
                &["rm a/m", "rm a/old", "attrs a"],
            ),
            (
                "target links the source does not have are split",
                &["f:a:5:100", "f:b:5:100"],
                &["h:a:9", "h:b:9"],
                &["put a", "put b", "attrs ."],
            ),
        ];
        for (name, src, dst, want) in cases {
            assert_eq!(run(src, dst), *want, "case: {name}");
        }
    }

    #[test]
    fn the_plan_streams_while_the_walks_go_on() {
        // 100,000 new files in 100 directories: the first operations come out after about one
        // batch of entries, not after the walk, and the planner holds no more than the
        // directories on the path.
        let consumed = std::cell::Cell::new(0usize);
        let mut first_batch_at = None;
        let mut ops = 0usize;
        let total = 100 * 1000;
        let root = snap(&[]).entries.into_vec().remove(0);
        let src = std::iter::once((root, false)).chain((0..total).map(|i| {
            consumed.set(consumed.get() + 1);
            let (d, f) = (i / 1000, i % 1000);
            let (path, kind) = if f == 0 {
                (format!("d{d:03}"), Kind::Dir)
            } else {
                (format!("d{d:03}/f{f:04}"), Kind::File)
            };
            let e = Entry {
                path: p(&path),
                meta: meta(kind, 10 + i as u64),
                link: None,
                xattrs: vec![],
                hash: None,
            };
            (e, false)
        }));
        let dst = snap(&[]).entries.into_vec().into_iter();
        plan_stream(src, dst, &PlanOptions::default(), |batch| {
            first_batch_at.get_or_insert(consumed.get());
            ops += batch.len();
            Ok::<_, PlanError>(())
        })
        .unwrap();
        // Every entry made, each directory given its attrs, and the root's.
        assert_eq!(ops, total + 100 + 1);
        let first = first_batch_at.unwrap();
        assert!(
            first <= 2 * BATCH,
            "the first batch came after {first} of {total} entries"
        );
    }

    #[test]
    fn metadata_only_change_sends_attrs_only() {
        let src = snap(&["f:x:3:100"]);
        let mut dst = snap(&["f:x:3:100"]);
        dst.entries.get_mut(&p("x")).unwrap().meta.perm = 0o600;
        let ops = plan(&src, &dst, &PlanOptions::default()).unwrap().ops;
        assert_eq!(show(&ops), ["attrs x"]);
        let d = describe(&ops[0], &src, &dst);
        assert!(d.contains("mode 0644 vs 0600"), "{d}");
    }

    #[test]
    fn owners_only_compared_when_asked() {
        let src = snap(&["f:x:3:100"]);
        let mut dst = snap(&["f:x:3:100"]);
        dst.entries.get_mut(&p("x")).unwrap().meta.uid = 5;
        assert!(plan(&src, &dst, &PlanOptions::default()).unwrap().ops.is_empty());
        assert_eq!(
            show(
                &plan(
                    &src,
                    &dst,
                    &PlanOptions {
                        owners: true,
                        ..Default::default()
                    }
                )
                .unwrap()
                .ops
            ),
            ["attrs x"]
        );
    }

    #[test]
    fn checksum_compares_hashes() {
        let mut src = snap(&["f:x:3:100"]);
        let mut dst = snap(&["f:x:3:100"]);
        src.entries.get_mut(&p("x")).unwrap().hash = Some([1; 32]);
        dst.entries.get_mut(&p("x")).unwrap().hash = Some([2; 32]);
        let opts = PlanOptions {
            checksum: true,
            ..Default::default()
        };
        assert_eq!(
            show(&plan(&src, &dst, &opts).unwrap().ops),
            ["put x (delta)", "attrs ."]
        );
        dst.entries.get_mut(&p("x")).unwrap().hash = Some([1; 32]);
        dst.entries.get_mut(&p("x")).unwrap().meta.mtime = Time::new(5, 0);
        assert_eq!(show(&plan(&src, &dst, &opts).unwrap().ops), ["attrs x"]);
    }

    #[test]
    fn a_target_without_root_leaves_out_devices_and_owners_and_counts_them() {
        // The source's entries belong to root, the target's to its user 1000.
        let src = snap(&["c:null", "f:x:3:100", "p:fifo", "f:old:1:1"]);
        let mut dst = snap(&["f:x:3:100", "p:fifo", "f:null:1:1"]);
        let paths: Vec<RelPath> = dst.entries.keys().cloned().collect();
        for k in paths {
            let m = &mut dst.entries.get_mut(&k).unwrap().meta;
            (m.uid, m.gid) = (1000, 1000);
        }
        let unprivileged = PlanOptions {
            allow_mass_delete: true,
            ..Default::default()
        };
        let p = plan(&src, &dst, &unprivileged).unwrap();
        // The device is not made; a file where it should be goes. Owners are not compared.
        assert_eq!(show(&p.ops), ["rm null", "put old", "attrs ."]);
        assert_eq!(p.not_mirrored, NotMirrored { owners: 4, devices: 1 });
        assert!(p
            .not_mirrored
            .to_string()
            .contains("the owners of 4 entries and 1 device nodes"));
        let root = PlanOptions {
            owners: true,
            allow_mass_delete: true,
            ..Default::default()
        };
        let p = plan(&src, &dst, &root).unwrap();
        assert!(show(&p.ops).contains(&"mknod null".to_string()), "{:?}", show(&p.ops));
        assert!(p.not_mirrored.is_empty());
    }

    #[test]
    fn mass_delete_is_refused_unless_allowed() {
        let e = plan(&snap(&[]), &snap(&["f:x:1:1"]), &PlanOptions::default()).unwrap_err();
        assert_eq!(e, PlanError::MassDelete(1));
        assert!(plan(&snap(&[]), &snap(&[]), &PlanOptions::default()).is_ok());
        assert!(plan(
            &snap(&[]),
            &snap(&["f:x:1:1"]),
            &PlanOptions {
                allow_mass_delete: true,
                ..Default::default()
            }
        )
        .is_ok());
    }

    #[test]
    fn unreadable_source_dir_deletes_nothing_beneath() {
        let mut src = snap(&["d:a"]);
        src.incomplete.insert(p("a"));
        let ops = plan(&src, &snap(&["d:a", "f:a/keep:1:1"]), &PlanOptions::default())
            .unwrap()
            .ops;
        assert!(!ops.iter().any(|o| matches!(o, Op::Remove(_))), "{ops:?}");
    }
}
