//! Planning: a pure function from (source snapshot, target snapshot) to the list of operations
//! that makes the target equal to the source. No I/O happens here.
//!
//! Order of the plan: removals of what the source lacks first (topmost path only), then a
//! pre-order pass over the source (a directory is made before its children; an entry of another
//! kind is removed before the new one is made), then a post-order pass giving directories their
//! metadata, because making or removing children moves a directory's mtime. Unchanged files
//! (same size and mtime, or same hash with `checksum`) get no operation at all. Hard-link groups
//! are rebuilt with `Link` from the first path of each group; a target file whose own link group
//! differs from the source's is replaced, never changed in place.

use super::scan::{Entry, Snapshot};
use crate::fs::Kind;
use crate::path::RelPath;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove the target's entry (and its subtree).
    Remove(RelPath),
    /// Make a directory (private until its metadata is given at the end).
    Mkdir(RelPath),
    /// Send content; `basis` says the target has a regular file there to delta against.
    Transfer {
        path: RelPath,
        basis: bool,
    },
    /// Same size, other mtime (a `touch`): compare content hashes, send content only if they
    /// differ, otherwise only metadata.
    Check(RelPath),
    /// Make `path` a hard link of `leader`, which is already in place.
    Link {
        path: RelPath,
        leader: RelPath,
    },
    Symlink(RelPath),
    /// fifo, socket or device node.
    Mknod(RelPath),
    /// Give an existing entry the source's owner, mode, xattrs and mtime.
    Attrs(RelPath),
}

impl Op {
    pub fn path(&self) -> &RelPath {
        match self {
            Op::Remove(p) | Op::Mkdir(p) | Op::Symlink(p) | Op::Mknod(p) | Op::Attrs(p) | Op::Check(p) => p,
            Op::Transfer { path, .. } | Op::Link { path, .. } => path,
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

fn inode(e: &Entry) -> (u64, u64) {
    (e.meta.dev, e.meta.ino)
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

/// Paths of each hard-link group (regular files with more than one link), in pre-order.
fn link_groups(snap: &Snapshot) -> HashMap<(u64, u64), Vec<RelPath>> {
    let mut g: HashMap<(u64, u64), Vec<RelPath>> = HashMap::new();
    for e in snap.entries.values() {
        if e.meta.kind == Kind::File && e.meta.nlink > 1 {
            g.entry(inode(e)).or_default().push(e.path.clone());
        }
    }
    g
}

pub fn plan(src: &Snapshot, dst: &Snapshot, opts: &PlanOptions) -> Result<Plan, PlanError> {
    if !opts.root_unlisted && src.entries.len() <= 1 && dst.entries.len() > 1 && !opts.allow_mass_delete {
        return Err(PlanError::MassDelete(dst.entries.len() - 1));
    }
    let mut ops = Vec::new();
    let mut not_mirrored = NotMirrored::default();
    // Without owners, a new entry gets the target's user: the target root's owner.
    let target_owner = dst.get(&RelPath::root()).map(|e| (e.meta.uid, e.meta.gid));
    // Target directories whose listing changes, so their mtime must be set again at the end.
    let mut touched: HashSet<RelPath> = HashSet::new();
    // Target paths removed or replaced: the target's entries beneath them are gone.
    let mut replaced: HashSet<RelPath> = HashSet::new();
    // Source files whose target inode is new after this plan.
    let mut rewritten: HashSet<RelPath> = HashSet::new();

    let push = |ops: &mut Vec<Op>, touched: &mut HashSet<RelPath>, op: Op| {
        if !matches!(op, Op::Attrs(_)) {
            if let Some(parent) = op.path().parent() {
                touched.insert(parent);
            }
        }
        ops.push(op);
    };

    // 1. What the source lacks.
    for (p, in_src) in dst.entries.keys().zip(dst.entries.counterparts(&src.entries)) {
        if p.is_root() || in_src.is_some() || src.is_incomplete_at(p) {
            continue;
        }
        let parent = p.parent().unwrap_or_default();
        if src.get(&parent).is_some_and(|e| e.meta.kind == Kind::Dir) && !src.incomplete.contains(&parent) {
            push(&mut ops, &mut touched, Op::Remove(p.clone()));
        }
    }

    let src_groups = link_groups(src);
    let dst_groups = link_groups(dst);
    let gone = |replaced: &HashSet<RelPath>, p: &RelPath| {
        if replaced.is_empty() {
            return false;
        }
        let mut cur = Some(p.clone());
        while let Some(c) = cur {
            if replaced.contains(&c) {
                return true;
            }
            cur = c.parent();
        }
        false
    };

    // 2. Pre-order pass over the source.
    let in_dst = src.entries.counterparts(&dst.entries);
    for ((p, s), &t0) in src.entries.iter().zip(&in_dst) {
        if p.is_root() {
            continue;
        }
        let mut t = if gone(&replaced, p) { None } else { t0 };
        if !opts.owners {
            let theirs = t.map(|te| (te.meta.uid, te.meta.gid)).or(target_owner);
            if theirs.is_some_and(|o| o != (s.meta.uid, s.meta.gid)) {
                not_mirrored.owners += 1;
            }
        }
        if !opts.owners && s.meta.kind.is_device() {
            // Left out: whatever else the target has there goes, as the source has none of it.
            not_mirrored.devices += 1;
            if t.is_some_and(|te| te.meta.kind != s.meta.kind || te.meta.rdev != s.meta.rdev) {
                push(&mut ops, &mut touched, Op::Remove(p.clone()));
                replaced.insert(p.clone());
            }
            continue;
        }
        if let Some(te) = t {
            let same_kind = te.meta.kind == s.meta.kind;
            let same_node = match s.meta.kind {
                Kind::Symlink => te.link == s.link,
                k if k.is_special() => te.meta.rdev == s.meta.rdev,
                _ => true,
            };
            if !same_kind || !same_node {
                push(&mut ops, &mut touched, Op::Remove(p.clone()));
                replaced.insert(p.clone());
                t = None;
            }
        }
        match s.meta.kind {
            Kind::Dir => {
                if t.is_none() {
                    push(&mut ops, &mut touched, Op::Mkdir(p.clone()));
                }
            }
            Kind::File => {
                let group = (s.meta.nlink > 1).then(|| &src_groups[&inode(s)]);
                if let Some(leader) = group.map(|g| &g[0]).filter(|l| *l != p) {
                    let linked = t.zip(dst.get(leader)).is_some_and(|(te, tl)| {
                        inode(te) == inode(tl) && !rewritten.contains(leader) && !gone(&replaced, leader)
                    });
                    if !linked {
                        push(
                            &mut ops,
                            &mut touched,
                            Op::Link {
                                path: p.clone(),
                                leader: leader.clone(),
                            },
                        );
                    }
                    continue;
                }
                // A target inode shared with paths other than the source's group is never
                // changed in place: that would change the other paths too.
                let shared_wrongly = t.is_some_and(|te| {
                    if te.meta.nlink <= 1 {
                        return false;
                    }
                    let tg = dst_groups.get(&inode(te)).map(Vec::as_slice).unwrap_or(&[]);
                    let sg: &[RelPath] = group.map(Vec::as_slice).unwrap_or(std::slice::from_ref(p));
                    te.meta.nlink as usize != tg.len() || tg != sg
                });
                match t {
                    Some(te) if content_same(s, te, opts) && !shared_wrongly => {
                        if attrs_differ(s, te, opts) {
                            push(&mut ops, &mut touched, Op::Attrs(p.clone()));
                        }
                    }
                    Some(te) if !opts.checksum && !shared_wrongly && te.meta.size == s.meta.size && s.meta.size > 0 => {
                        push(&mut ops, &mut touched, Op::Check(p.clone()));
                        rewritten.insert(p.clone());
                    }
                    _ => {
                        let basis = t.is_some_and(|te| te.meta.size > 0 && !shared_wrongly);
                        push(&mut ops, &mut touched, Op::Transfer { path: p.clone(), basis });
                        rewritten.insert(p.clone());
                    }
                }
            }
            _ => match t {
                Some(te) => {
                    if attrs_differ(s, te, opts) {
                        push(&mut ops, &mut touched, Op::Attrs(p.clone()));
                    }
                }
                None => {
                    let op = if s.meta.kind == Kind::Symlink {
                        Op::Symlink(p.clone())
                    } else {
                        Op::Mknod(p.clone())
                    };
                    push(&mut ops, &mut touched, op);
                    push(&mut ops, &mut touched, Op::Attrs(p.clone()));
                }
            },
        }
    }

    // 3. Post-order pass: directory metadata, children before parents.
    for ((p, s), &t0) in src.entries.iter().zip(&in_dst).rev() {
        if s.meta.kind != Kind::Dir {
            continue;
        }
        let t = if gone(&replaced, p) { None } else { t0 };
        let needed = match t {
            None => true,
            Some(te) => touched.contains(p) || attrs_differ(s, te, opts),
        };
        if needed {
            ops.push(Op::Attrs(p.clone()));
        }
    }
    Ok(Plan { ops, not_mirrored })
}

/// Explains in words how the target differs from the source for one planned operation.
pub fn describe(op: &Op, src: &Snapshot, dst: &Snapshot) -> String {
    let s = src.get(op.path());
    let t = dst.get(op.path());
    match op {
        Op::Remove(p) if s.is_none() => format!("only on target: {p}"),
        Op::Remove(p) => format!("different kind or node on target: {p}"),
        Op::Mkdir(p) => format!("directory missing on target: {p}"),
        Op::Transfer { path, .. } if t.is_none() => format!("file missing on target: {path}"),
        Op::Transfer { path, .. } => format!("content differs: {path}"),
        Op::Check(p) => format!("mtime differs, content may too: {p}"),
        Op::Link { path, leader } => format!("not hard-linked to {leader} on target: {path}"),
        Op::Symlink(p) => format!("symlink missing on target: {p}"),
        Op::Mknod(p) => format!("special file missing on target: {p}"),
        Op::Attrs(p) => {
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
                Op::Transfer { path, basis } => {
                    format!("put {path}{}", if *basis { " (delta)" } else { "" })
                }
                Op::Link { path, leader } => format!("link {path} -> {leader}"),
                Op::Symlink(p) => format!("symlink {p}"),
                Op::Mknod(p) => format!("mknod {p}"),
                Op::Attrs(p) => format!("attrs {p}"),
                Op::Check(p) => format!("check {p}"),
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
                "empty target gets everything, dirs first, dir attrs last deepest first",
                &["d:a", "f:a/x:3:100", "d:a/b", "l:s:t", "p:fifo"],
                &[],
                &[
                    "mkdir a",
                    "mkdir a/b",
                    "put a/x",
                    "mknod fifo",
                    "attrs fifo",
                    "symlink s",
                    "attrs s",
                    "attrs a/b",
                    "attrs a",
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
                &["rm a/b", "rm z", "attrs a", "attrs ."],
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
