//! The mount's inode table. Every inode the kernel knows is an `O_PATH` fd on the source, keyed
//! by (dev, ino), with the kernel's lookup count; it is never re-resolved by path. Each inode also
//! remembers the places (parent inode, name) where it was seen, which is how the mount names it
//! to the target; a hard-linked file keeps every name the kernel looked up, so unlinking one
//! name leaves it the others. A place is dropped when its entry is unlinked or renamed over; an
//! inode left without a place (an open file that was unlinked) is never forwarded again, so its
//! later writes cannot reach any file on the target.
//!
//! Lookups run outside the mount's order lock. A lookup that raced with a rename or unlink could
//! record a name that is already gone, so namespace changes bump an epoch and a lookup that saw
//! the epoch move retries (`epoch`, `found_at`).
//!
//! Node ids are the source's inode numbers (so `stat` shows real ones), except the root, which
//! FUSE calls 1, and inodes from other devices or numbered 1, which get ids from a private range.
//! A held `O_PATH` fd keeps the inode alive, so its number cannot be reused while it is here.
//!
//! The kernel may cache more inodes than the process may hold open files. Past a budget of fds
//! (a share of RLIMIT_NOFILE), new inodes are anchored by a file handle (name_to_handle_at) and
//! opened by it when used, as virtiofsd does. A handle carries the inode's generation, so a
//! reused inode number is told apart and gets an id of its own.

use crate::fs::Kind;
use crate::path::RelPath;
use crate::sys;
use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Weak};

pub const ROOT: u64 = 1;
const PRIVATE_IDS: u64 = 1 << 62;

/// What keeps hold of the inode: an `O_PATH` fd, or a file handle on the filesystem of the
/// mount fd beside it.
enum Anchor {
    Fd(OwnedFd),
    Handle(sys::FileHandle, Arc<OwnedFd>),
}

/// What is shared with open handles: the anchor and the inode's I/O mode.
pub struct Inode {
    pub id: u64,
    anchor: Anchor,
    pub kind: Kind,
    pub io: Mutex<IoMode>,
    /// The change time in the attributes last given to the kernel (`stamp`), so the watcher
    /// can tell the mount's own changes, which the kernel knows of, from others.
    told: std::sync::atomic::AtomicU64,
}

/// A change time as one number, for `Inode::told`.
pub fn stamp(st: &libc::stat) -> u64 {
    ((st.st_ctime as u64) << 30) | (st.st_ctime_nsec as u64 & ((1 << 30) - 1))
}

/// An `O_PATH` fd on an inode: the held one, or one opened from its file handle for this use.
pub enum Fd<'a> {
    Held(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for Fd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Fd::Held(b) => *b,
            Fd::Opened(o) => o.as_fd(),
        }
    }
}

impl Inode {
    /// Records the attributes given to the kernel.
    pub fn told(&self, st: &libc::stat) {
        self.told.store(stamp(st), std::sync::atomic::Ordering::Relaxed);
    }

    /// The change time the kernel was last given (see `stamp`).
    pub fn told_stamp(&self) -> u64 {
        self.told.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn fd(&self) -> io::Result<Fd<'_>> {
        match &self.anchor {
            Anchor::Fd(f) => Ok(Fd::Held(f.as_fd())),
            Anchor::Handle(h, mount) => {
                sys::open_handle(mount.as_fd(), h, libc::O_PATH | libc::O_NOFOLLOW).map(Fd::Opened)
            }
        }
    }
}

/// How the inode's open files are served. The kernel refuses to mix passthrough opens with
/// cached (page-cache) opens on one inode, so the counts decide what a new open may be.
#[derive(Default)]
pub struct IoMode {
    pub passthrough: u32,
    pub cached: u32,
    pub backing: Weak<fuser::BackingId>,
}

/// A node's (dev, ino) is not stored: a node whose id is its own inode number is on the root's
/// device, and the others are in `Table::private_keys` (see `Table::key`).
struct Node {
    inode: Arc<Inode>,
    nlookup: u64,
    /// Places in this node; a node is kept while it has any.
    children: u32,
    places: Places,
}

/// A name in a directory, inline when short (most are), so a place costs no allocation.
#[derive(Clone, PartialEq, Eq)]
enum Name {
    Short(u8, [u8; 22]),
    Long(Box<[u8]>),
}

impl Name {
    fn new(b: &[u8]) -> Name {
        if b.len() <= 22 {
            let mut a = [0u8; 22];
            a[..b.len()].copy_from_slice(b);
            Name::Short(b.len() as u8, a)
        } else {
            Name::Long(b.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Short(n, a) => &a[..*n as usize],
            Name::Long(b) => b,
        }
    }
}

/// Where a node is known to be, as (parent id, name), the first one preferred. Only a
/// hard-linked file has more than one, so the first is held inline.
#[derive(Default)]
struct Places {
    first: Option<(u64, Name)>,
    /// Boxed: one pointer in every node, where a `Vec` would be three for the few that use it.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<(u64, Name)>>>,
}

impl Places {
    fn len(&self) -> usize {
        self.first.is_some() as usize + self.more.as_ref().map_or(0, |m| m.len())
    }

    fn get(&self, i: usize) -> Option<&(u64, Name)> {
        if i == 0 {
            self.first.as_ref()
        } else {
            self.more.as_ref()?.get(i - 1)
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(u64, Name)> {
        self.first.iter().chain(self.more.iter().flat_map(|m| m.iter()))
    }

    fn position(&self, parent: u64, name: &[u8]) -> Option<usize> {
        self.iter().position(|(p, n)| *p == parent && n.as_bytes() == name)
    }

    /// Appends a place; its index.
    fn push(&mut self, place: (u64, Name)) -> usize {
        if self.first.is_none() {
            self.first = Some(place);
            0
        } else {
            let more = self.more.get_or_insert_with(Default::default);
            more.push(place);
            more.len()
        }
    }

    /// Removes the place at `i`; those after it move down by one.
    fn remove(&mut self, i: usize) {
        let more = &mut self.more;
        if i == 0 {
            self.first = more.as_mut().filter(|m| !m.is_empty()).map(|m| m.remove(0));
        } else if let Some(m) = more.as_mut() {
            m.remove(i - 1);
        }
        if more.as_ref().is_some_and(|m| m.is_empty()) {
            *more = None;
        }
    }
}

/// The table, laid out for memory: at a million inodes every byte per inode is a megabyte.
/// Nodes live in a slab (a vector whose unused capacity is never touched, so never resident);
/// the two indexes hold slab slots only: `index` by node id, `by_place` one entry per place,
/// as (slot, place index), found by hashing (parent, name) and comparing with the node's own
/// copy of the place, so no name is stored twice. Node ids are inode numbers, so (dev, ino)
/// needs a map only for the inodes whose id is not their number (`private_keys`).
struct Table {
    slab: Vec<Option<Node>>,
    free: Vec<u32>,
    index: HashTable<u32>,
    by_place: HashTable<(u32, u32)>,
    private_keys: HashMap<(u64, u64), u64>,
    /// ... and the other way.
    private_ids: HashMap<u64, (u64, u64)>,
    hasher: DefaultHashBuilder,
    root_dev: u64,
    next_private: u64,
    /// Inodes anchored by an fd (the root included).
    fds: usize,
}

fn node_at(slab: &[Option<Node>], s: u32) -> &Node {
    slab[s as usize]
        .as_ref()
        .unwrap_or_else(|| unreachable!("an index names a free slot"))
}

fn hash_place(h: &DefaultHashBuilder, parent: u64, name: &[u8]) -> u64 {
    h.hash_one((parent, name))
}

impl Table {
    fn slot(&self, id: u64) -> Option<u32> {
        let slab = &self.slab;
        self.index
            .find(self.hasher.hash_one(id), |&s| node_at(slab, s).inode.id == id)
            .copied()
    }

    fn node(&self, id: u64) -> Option<&Node> {
        self.slot(id).map(|s| node_at(&self.slab, s))
    }

    fn node_mut(&mut self, id: u64) -> Option<&mut Node> {
        let s = self.slot(id)?;
        self.slab[s as usize].as_mut()
    }

    fn insert(&mut self, node: Node) {
        let id = node.inode.id;
        let s = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(node);
                s
            }
            None => {
                self.slab.push(Some(node));
                (self.slab.len() - 1) as u32
            }
        };
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(id), s, |&x| hasher.hash_one(node_at(slab, x).inode.id));
    }

    fn remove(&mut self, id: u64) -> Option<Node> {
        let slab = &self.slab;
        let e = self
            .index
            .find_entry(self.hasher.hash_one(id), |&s| node_at(slab, s).inode.id == id)
            .ok()?;
        let (s, _) = e.remove();
        self.free.push(s);
        self.slab[s as usize].take()
    }

    /// The id of the inode known to be at `name` in `parent`.
    fn at_place(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let slab = &self.slab;
        let found = self.by_place.find(hash_place(&self.hasher, parent, name), |&(s, i)| {
            node_at(slab, s)
                .places
                .get(i as usize)
                .is_some_and(|(p, n)| *p == parent && n.as_bytes() == name)
        })?;
        Some(node_at(slab, found.0).inode.id)
    }

    /// The id of the inode with this (dev, ino).
    fn by_key(&self, key: (u64, u64)) -> Option<u64> {
        if let Some(&id) = self.private_keys.get(&key) {
            return Some(id);
        }
        if key.0 != self.root_dev {
            return None;
        }
        self.node(key.1)
            .filter(|n| self.key(n.inode.id) == key)
            .map(|n| n.inode.id)
    }

    /// The (dev, ino) of the node `id`.
    fn key(&self, id: u64) -> (u64, u64) {
        self.private_ids.get(&id).copied().unwrap_or((self.root_dev, id))
    }

    fn index_place(&mut self, s: u32, i: usize) {
        let (slab, hasher) = (&self.slab, &self.hasher);
        let (p, n) = node_at(slab, s).places.get(i).unwrap_or_else(|| unreachable!());
        self.by_place
            .insert_unique(hash_place(hasher, *p, n.as_bytes()), (s, i as u32), |&(s, i)| {
                let (p, n) = node_at(slab, s)
                    .places
                    .get(i as usize)
                    .unwrap_or_else(|| unreachable!());
                hash_place(hasher, *p, n.as_bytes())
            });
    }

    /// Removes place `i` of the node in slot `s` and its index entry; the entries of the
    /// places after it follow them down.
    fn unindex_place(&mut self, s: u32, i: usize) {
        let hasher = &self.hasher;
        let node = node_at(&self.slab, s);
        for j in i..node.places.len() {
            let (p, n) = node.places.get(j).unwrap_or_else(|| unreachable!());
            let h = hash_place(hasher, *p, n.as_bytes());
            let key = (s, j as u32);
            if j == i {
                if let Ok(e) = self.by_place.find_entry(h, |&x| x == key) {
                    e.remove();
                }
            } else if let Some(x) = self.by_place.find_mut(h, |&x| x == key) {
                x.1 -= 1;
            }
        }
        if let Some(node) = self.slab[s as usize].as_mut() {
            node.places.remove(i);
        }
    }
}

pub struct Inodes {
    t: Mutex<Table>,
    /// Bumped by every rename and unlink (see `found_at`).
    epoch: std::sync::atomic::AtomicU64,
    /// The root again, for opening file handles.
    mount: Arc<OwnedFd>,
    /// How many inodes may hold an fd.
    budget: usize,
}

impl Inodes {
    /// A table holding only the root, whose `O_PATH` fd must be opened before mounting over it;
    /// at most `budget` inodes hold an fd, the rest a file handle.
    pub fn new(root: OwnedFd, st: &libc::stat, budget: usize) -> io::Result<Inodes> {
        // open_by_handle_at refuses an O_PATH mount fd.
        let mount = Arc::new(sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?);
        let mut t = Table {
            slab: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            by_place: HashTable::new(),
            private_keys: HashMap::new(),
            private_ids: HashMap::new(),
            hasher: DefaultHashBuilder::default(),
            root_dev: st.st_dev,
            next_private: PRIVATE_IDS,
            fds: 1,
        };
        let key = (st.st_dev, st.st_ino);
        t.insert(Node {
            inode: Arc::new(Inode {
                id: ROOT,
                anchor: Anchor::Fd(root),
                kind: Kind::Dir,
                io: Mutex::new(IoMode::default()),
                told: Default::default(),
            }),
            nlookup: 1,
            children: 0,
            places: Places::default(),
        });
        t.private_keys.insert(key, ROOT);
        t.private_ids.insert(ROOT, key);
        Ok(Inodes {
            t: Mutex::new(t),
            epoch: std::sync::atomic::AtomicU64::new(0),
            mount,
            budget: budget.max(2),
        })
    }

    pub fn get(&self, id: u64) -> Option<Arc<Inode>> {
        self.t.lock().node(id).map(|n| n.inode.clone())
    }

    /// Records that the kernel looked `name` up in `parent` and found the inode `st` describes
    /// (`fd` is an `O_PATH` fd on it); adds one to its lookup count and returns its id. The fd is
    /// dropped when the inode is already known.
    pub fn found(&self, parent: u64, name: &[u8], fd: OwnedFd, st: &libc::stat) -> u64 {
        self.found_locked(None, parent, name, fd, st)
            .unwrap_or_else(|| unreachable!())
    }

    /// With `epoch`, does nothing and returns `None` when the epoch moved (checked under the
    /// table lock, which namespace changes take after their syscall).
    fn found_locked(&self, epoch: Option<u64>, parent: u64, name: &[u8], fd: OwnedFd, st: &libc::stat) -> Option<u64> {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.t.lock();
        if epoch.is_some_and(|e| self.epoch() != e) {
            return None;
        }
        let known = match t.by_key(key) {
            // A held fd pins the inode: the same number is the same inode.
            Some(id) if t.node(id).is_some_and(|n| matches!(n.inode.anchor, Anchor::Fd(_))) => Some(id),
            // A handle does not: compare it (it holds the generation) before trusting the number.
            Some(id) => match (t.node(id).map(|n| &n.inode.anchor), sys::fd_to_handle(fd.as_fd())) {
                (Some(Anchor::Handle(h, _)), Ok(new)) if *h == new => Some(id),
                _ => None,
            },
            None => None,
        };
        let id = match known {
            Some(id) => id,
            None => {
                let reused = t.by_key(key).is_some() || t.node(st.st_ino).is_some();
                let own = st.st_dev == t.root_dev && st.st_ino != ROOT && st.st_ino < PRIVATE_IDS && !reused;
                let id = if own {
                    st.st_ino
                } else {
                    t.next_private += 1;
                    t.next_private
                };
                // Handles are opened through the root's filesystem: other devices keep an fd.
                let anchor = if t.fds < self.budget || st.st_dev != t.root_dev {
                    t.fds += 1;
                    Anchor::Fd(fd)
                } else {
                    match sys::fd_to_handle(fd.as_fd()) {
                        Ok(h) => Anchor::Handle(h, self.mount.clone()),
                        Err(_) => {
                            t.fds += 1;
                            Anchor::Fd(fd)
                        }
                    }
                };
                t.insert(Node {
                    inode: Arc::new(Inode {
                        id,
                        anchor,
                        kind: Kind::from_mode(st.st_mode),
                        io: Mutex::new(IoMode::default()),
                        told: Default::default(),
                    }),
                    nlookup: 0,
                    children: 0,
                    places: Places::default(),
                });
                if !own {
                    t.private_keys.insert(key, id);
                    t.private_ids.insert(id, key);
                }
                id
            }
        };
        if let Some(n) = t.node_mut(id) {
            n.nlookup += 1;
            n.inode.told(st);
        }
        if id != ROOT {
            add_place(&mut t, id, parent, name);
        }
        Some(id)
    }

    /// The kernel forgot `n` lookups of `id`.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut t = self.t.lock();
        if let Some(node) = t.node_mut(id) {
            node.nlookup = node.nlookup.saturating_sub(n);
        }
        prune(&mut t, id);
    }

    /// The path of `id` relative to the root, or `None` when it has no place any more.
    pub fn path(&self, id: u64) -> Option<RelPath> {
        let t = self.t.lock();
        let mut names: Vec<&[u8]> = Vec::new();
        let mut cur = id;
        while cur != ROOT {
            let (parent, name) = t.node(cur)?.places.get(0)?;
            names.push(name.as_bytes());
            cur = *parent;
            if names.len() > 4096 {
                return None;
            }
        }
        let mut bytes = Vec::new();
        for n in names.iter().rev() {
            if !bytes.is_empty() {
                bytes.push(b'/');
            }
            bytes.extend_from_slice(n);
        }
        RelPath::new(bytes).ok()
    }

    /// `name` in `parent`'s path.
    pub fn child_path(&self, parent: u64, name: &[u8]) -> Option<RelPath> {
        self.path(parent)?.join(name).ok()
    }

    /// The entry `name` in `parent` is gone (unlinked, or replaced by a rename).
    pub fn removed(&self, parent: u64, name: &[u8]) {
        let mut t = self.t.lock();
        if let Some(id) = t.at_place(parent, name) {
            remove_place(&mut t, id, parent, name);
            prune(&mut t, id);
        }
    }

    /// A rename moved `name` in `parent` to `newname` in `newparent`; with `exchange`, the two
    /// entries swapped.
    pub fn renamed(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], exchange: bool) {
        let mut t = self.t.lock();
        let from = t.at_place(parent, name);
        let to = t.at_place(newparent, newname);
        if let Some(to) = to {
            remove_place(&mut t, to, newparent, newname);
        }
        if let Some(from) = from {
            remove_place(&mut t, from, parent, name);
            add_place(&mut t, from, newparent, newname);
        }
        if let Some(to) = to {
            if exchange {
                add_place(&mut t, to, parent, name);
            } else {
                prune(&mut t, to);
            }
        }
        if let Some(from) = from {
            prune(&mut t, from);
        }
    }

    /// Called (under the mount's order lock) before a rename or unlink: lookups that started
    /// before it will retry.
    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `found`, unless a rename or unlink happened since `epoch` was read; then `None` (the fd
    /// is dropped, nothing is counted) and the caller looks up again.
    pub fn found_at(&self, epoch: u64, parent: u64, name: &[u8], fd: OwnedFd, st: &libc::stat) -> Option<u64> {
        self.found_locked(Some(epoch), parent, name, fd, st)
    }

    /// The inode at `path` as the kernel was told it, name by name from the root.
    pub fn resolve(&self, path: &RelPath) -> Option<u64> {
        let t = self.t.lock();
        let mut cur = ROOT;
        for name in path.components() {
            cur = t.at_place(cur, name)?;
        }
        Some(cur)
    }

    /// The inode the kernel was told sits at `name` in `parent`, with its (dev, ino).
    pub fn at(&self, parent: u64, name: &[u8]) -> Option<(Arc<Inode>, (u64, u64))> {
        let t = self.t.lock();
        let n = t.node(t.at_place(parent, name)?)?;
        Some((n.inode.clone(), t.key(n.inode.id)))
    }

    /// Every inode held, and every known directory with the names the kernel was told in it.
    pub fn known(&self) -> (Vec<u64>, Vec<KnownDir>) {
        let t = self.t.lock();
        let nodes = || t.slab.iter().flatten();
        let mut dirs: HashMap<u64, (Arc<Inode>, Vec<Vec<u8>>)> = nodes()
            .filter(|n| n.inode.kind == Kind::Dir)
            .map(|n| (n.inode.id, (n.inode.clone(), Vec::new())))
            .collect();
        for (parent, name) in nodes().flat_map(|n| n.places.iter()) {
            if let Some(d) = dirs.get_mut(parent) {
                d.1.push(name.as_bytes().to_vec());
            }
        }
        let ids = nodes().map(|n| n.inode.id).collect();
        let dirs = dirs
            .into_iter()
            .map(|(id, (inode, names))| KnownDir { id, inode, names })
            .collect();
        (ids, dirs)
    }

    /// How many inodes are held (for tests and logs).
    pub fn len(&self) -> usize {
        self.t.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A directory the kernel knows, and the names it was told in it.
pub struct KnownDir {
    pub id: u64,
    pub inode: Arc<Inode>,
    pub names: Vec<Vec<u8>>,
}

/// Records that `id` is at `name` in `parent`; an inode recorded there before is not any more.
fn add_place(t: &mut Table, id: u64, parent: u64, name: &[u8]) {
    match t.at_place(parent, name) {
        Some(prev) if prev == id => return,
        Some(prev) => {
            remove_place(t, prev, parent, name);
            prune(t, prev);
        }
        None => {}
    }
    let Some(s) = t.slot(id) else { return };
    let Some(node) = t.slab[s as usize].as_mut() else {
        return;
    };
    let i = node.places.push((parent, Name::new(name)));
    t.index_place(s, i);
    if let Some(p) = t.node_mut(parent) {
        p.children += 1;
    }
}

/// Forgets that `id` is at `name` in `parent` (the parent is pruned if that was its last
/// reference).
fn remove_place(t: &mut Table, id: u64, parent: u64, name: &[u8]) {
    let Some(s) = t.slot(id) else { return };
    let Some(i) = node_at(&t.slab, s).places.position(parent, name) else {
        return;
    };
    t.unindex_place(s, i);
    if let Some(p) = t.node_mut(parent) {
        p.children = p.children.saturating_sub(1);
    }
    prune(t, parent);
}

/// Drops `id` once nothing refers to it, then its parent if that was its last reference.
fn prune(t: &mut Table, mut id: u64) {
    loop {
        if id == ROOT {
            return;
        }
        let Some(s) = t.slot(id) else { return };
        let n = node_at(&t.slab, s);
        if n.nlookup > 0 || n.children > 0 {
            return;
        }
        // Its places go; each parent loses a reference and may go too.
        let mut parents = Vec::new();
        while let Some((parent, _)) = node_at(&t.slab, s).places.get(0) {
            let parent = *parent;
            t.unindex_place(s, 0);
            if let Some(p) = t.node_mut(parent) {
                p.children = p.children.saturating_sub(1);
                parents.push(parent);
            }
        }
        let n = t.remove(id).unwrap_or_else(|| unreachable!());
        if let Some(key) = t.private_ids.remove(&id) {
            if t.private_keys.get(&key) == Some(&id) {
                t.private_keys.remove(&key);
            }
        }
        if matches!(n.inode.anchor, Anchor::Fd(_)) {
            t.fds -= 1;
        }
        match parents.as_slice() {
            [] => return,
            [one] => id = *one,
            many => {
                for &p in many {
                    prune(t, p);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At a million inodes every byte here is a megabyte of the daemon's memory: the slab's
    /// node, and the inode's heap block (its `Arc` counts beside it).
    #[test]
    fn a_node_and_its_inode_stay_small() {
        let (node, inode) = (std::mem::size_of::<Option<Node>>(), std::mem::size_of::<Inode>());
        eprintln!(
            "node {node} B, inode {inode} B, anchor {} B",
            std::mem::size_of::<Anchor>()
        );
        assert!(node <= 64, "a node takes {node} bytes");
        assert!(inode <= 88, "an inode takes {inode} bytes");
    }

    fn fake(ino: u64) -> (OwnedFd, libc::stat) {
        let f = std::fs::File::open("/").unwrap();
        let mut st: libc::stat = crate::sys::fstat(f.as_fd()).unwrap();
        st.st_ino = ino;
        st.st_mode = libc::S_IFREG | 0o644;
        (OwnedFd::from(f), st)
    }

    fn table() -> Inodes {
        let (fd, mut st) = fake(2);
        st.st_mode = libc::S_IFDIR | 0o755;
        Inodes::new(fd, &st, 1000).unwrap()
    }

    #[test]
    fn paths_follow_renames_and_unlinks() {
        let t = table();
        let (fd, st) = fake(10);
        let mut dst = st;
        dst.st_mode = libc::S_IFDIR | 0o755;
        let d = t.found(ROOT, b"d", fd, &dst);
        let (fd, st) = fake(11);
        let f = t.found(d, b"f", fd, &st);
        assert_eq!(t.path(f).unwrap().as_bytes(), b"d/f");
        t.renamed(ROOT, b"d", ROOT, b"e", false);
        assert_eq!(t.path(f).unwrap().as_bytes(), b"e/f");
        t.renamed(d, b"f", ROOT, b"g", false);
        assert_eq!(t.path(f).unwrap().as_bytes(), b"g");
        t.removed(ROOT, b"g");
        assert!(t.path(f).is_none(), "an unlinked inode has no path");
        assert!(t.get(f).is_some(), "still held while looked up");
        t.forget(f, 1);
        assert!(t.get(f).is_none());
    }

    #[test]
    fn exchange_swaps_and_rename_over_drops_the_victim() {
        let t = table();
        let (fd, st) = fake(20);
        let a = t.found(ROOT, b"a", fd, &st);
        let (fd, st) = fake(21);
        let b = t.found(ROOT, b"b", fd, &st);
        t.renamed(ROOT, b"a", ROOT, b"b", true);
        assert_eq!(t.path(a).unwrap().as_bytes(), b"b");
        assert_eq!(t.path(b).unwrap().as_bytes(), b"a");
        t.renamed(ROOT, b"a", ROOT, b"b", false);
        assert_eq!(t.path(b).unwrap().as_bytes(), b"b");
        assert!(t.path(a).is_none());
    }

    #[test]
    fn parents_stay_while_children_are_known() {
        let t = table();
        let (fd, mut st) = fake(30);
        st.st_mode = libc::S_IFDIR | 0o755;
        let d = t.found(ROOT, b"d", fd, &st);
        let (fd, st) = fake(31);
        let f = t.found(d, b"f", fd, &st);
        t.forget(d, 1);
        assert!(t.get(d).is_some(), "kept while its child is known");
        assert_eq!(t.path(f).unwrap().as_bytes(), b"d/f");
        t.forget(f, 1);
        assert!(t.get(d).is_none(), "dropped with its last child");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_hard_link_keeps_its_other_names() {
        let t = table();
        let (fd, st) = fake(40);
        let a = t.found(ROOT, b"a", fd, &st);
        let (fd, st) = fake(40);
        let b = t.found(ROOT, b"b", fd, &st);
        assert_eq!(a, b, "one inode, one id");
        t.removed(ROOT, b"a");
        assert_eq!(t.path(a).unwrap().as_bytes(), b"b", "the other name is left");
        t.renamed(ROOT, b"b", ROOT, b"c", false);
        assert_eq!(t.path(a).unwrap().as_bytes(), b"c");
        t.removed(ROOT, b"c");
        assert!(t.path(a).is_none(), "no name left");
        let (fd, st) = fake(40);
        t.found(ROOT, b"d", fd, &st);
        assert_eq!(
            t.path(a).unwrap().as_bytes(),
            b"d",
            "a new lookup gives it a name again"
        );
        t.forget(a, 3);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn every_name_of_a_many_linked_inode_stays_found() {
        let t = table();
        let names: Vec<Vec<u8>> = (0..6)
            .map(|i| format!("name-{i}-{}", "long".repeat(i)).into_bytes())
            .collect();
        let mut id = 0;
        for n in &names {
            let (fd, st) = fake(60);
            id = t.found(ROOT, n, fd, &st);
        }
        // Removed out of order: the first, one in the middle, the last; the others stay.
        let mut gone = Vec::new();
        for g in [0, 3, 5] {
            t.removed(ROOT, &names[g]);
            gone.push(g);
            for (i, n) in names.iter().enumerate() {
                let want = (!gone.contains(&i)).then_some(id);
                assert_eq!(
                    t.at(ROOT, n).map(|(n, _)| n.id),
                    want,
                    "name {i} after removing {gone:?}"
                );
            }
        }
        t.renamed(ROOT, &names[1], ROOT, b"moved", false);
        let mut left: Vec<Vec<u8>> = vec![names[2].clone(), names[4].clone(), b"moved".to_vec()];
        for n in &left {
            assert_eq!(t.at(ROOT, n).map(|(n, _)| n.id), Some(id));
        }
        assert_eq!(
            t.path(id).unwrap().as_bytes(),
            &names[2][..],
            "the oldest name left is first"
        );
        while let Some(n) = left.pop() {
            t.removed(ROOT, &n);
        }
        assert!(t.path(id).is_none());
        t.forget(id, 6);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_lookup_that_raced_a_rename_is_refused() {
        let t = table();
        let epoch = t.epoch();
        t.bump_epoch();
        let (fd, st) = fake(50);
        assert!(t.found_at(epoch, ROOT, b"x", fd, &st).is_none());
        assert_eq!(t.len(), 1, "nothing recorded");
        let (fd, st) = fake(50);
        assert!(t.found_at(t.epoch(), ROOT, b"x", fd, &st).is_some());
    }
}
