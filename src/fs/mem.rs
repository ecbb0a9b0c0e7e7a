//! `MemFs`: an in-memory `FileSystem` for logic tests. It keeps inodes (so hardlinks work), never
//! follows symlinks while resolving (like `LocalFs`), and counts the content writes it receives,
//! so a test can prove that a reconcile wrote nothing it did not need to.

use super::{DirEntry, FileBytes, FileSystem, FsError, FsResult, Kind, Meta, SetTime, Time, Xattr};
use crate::path::RelPath;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone)]
struct Node {
    meta: Meta,
    data: Vec<u8>,
    children: BTreeMap<Vec<u8>, u64>,
    link: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    clock: i64,
}

pub struct MemFs {
    state: Mutex<State>,
    writes: AtomicU64,
    bytes_written: AtomicU64,
}

const ROOT: u64 = 1;

impl Default for MemFs {
    fn default() -> Self {
        Self::new()
    }
}

impl MemFs {
    pub fn new() -> MemFs {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir, 0o755, ROOT, Time::new(1_000_000, 0)));
        MemFs {
            state: Mutex::new(State {
                nodes,
                next_ino: 2,
                clock: 1_000_000,
            }),
            writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }

    /// Calls that wrote file content (write_at, install_file, copy_range, truncate to grow).
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    pub fn reset_counters(&self) {
        self.writes.store(0, Ordering::Relaxed);
        self.bytes_written.store(0, Ordering::Relaxed);
    }

    fn count(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Node {
    fn new(kind: Kind, perm: u32, ino: u64, now: Time) -> Node {
        Node {
            meta: Meta {
                kind,
                perm,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: now,
                atime: now,
                ctime: now,
                dev: 1,
                ino,
                nlink: 1,
                rdev: 0,
                blocks: 0,
            },
            data: Vec::new(),
            children: BTreeMap::new(),
            link: Vec::new(),
            xattrs: BTreeMap::new(),
        }
    }
}

fn err(errno: i32, op: &str, p: &RelPath) -> FsError {
    FsError::new(errno, op, p)
}

impl State {
    fn tick(&mut self) -> Time {
        self.clock += 1;
        Time::new(self.clock, 0)
    }

    fn lookup(&self, p: &RelPath, op: &str) -> FsResult<u64> {
        let mut cur = ROOT;
        for c in p.components() {
            let n = &self.nodes[&cur];
            match n.meta.kind {
                Kind::Dir => {}
                Kind::Symlink => return Err(err(libc::ELOOP, op, p)),
                _ => return Err(err(libc::ENOTDIR, op, p)),
            }
            cur = *n.children.get(c).ok_or_else(|| err(libc::ENOENT, op, p))?;
        }
        Ok(cur)
    }

    /// The parent directory's inode and the last name.
    fn parent<'a>(&self, p: &'a RelPath, op: &str) -> FsResult<(u64, &'a [u8])> {
        let (parent, name) = p.split().ok_or_else(|| err(libc::EBUSY, op, p))?;
        let pp = RelPath::new(parent.to_vec()).map_err(|_| err(libc::EINVAL, op, p))?;
        let ino = self.lookup(&pp, op)?;
        match self.nodes[&ino].meta.kind {
            Kind::Dir => Ok((ino, name)),
            Kind::Symlink => Err(err(libc::ELOOP, op, p)),
            _ => Err(err(libc::ENOTDIR, op, p)),
        }
    }

    fn touch_dir(&mut self, dir: u64) {
        let t = self.tick();
        let n = self.nodes.get_mut(&dir).unwrap();
        n.meta.mtime = t;
        n.meta.ctime = t;
    }

    fn add(&mut self, p: &RelPath, mut node: Node, op: &str) -> FsResult<u64> {
        let (dir, name) = self.parent(p, op)?;
        if self.nodes[&dir].children.contains_key(name) {
            return Err(err(libc::EEXIST, op, p));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        node.meta.ino = ino;
        if node.meta.kind == Kind::Dir {
            self.nodes.get_mut(&dir).unwrap().meta.nlink += 1;
            node.meta.nlink = 2;
        }
        self.nodes.insert(ino, node);
        self.nodes.get_mut(&dir).unwrap().children.insert(name.to_vec(), ino);
        self.touch_dir(dir);
        Ok(ino)
    }

    fn drop_link(&mut self, ino: u64) {
        let n = self.nodes.get_mut(&ino).unwrap();
        n.meta.nlink = n.meta.nlink.saturating_sub(1);
        if n.meta.nlink == 0 || n.meta.kind == Kind::Dir {
            self.nodes.remove(&ino);
        }
    }

    fn file_mut(&mut self, p: &RelPath, op: &str) -> FsResult<&mut Node> {
        let ino = self.lookup(p, op)?;
        let t = self.tick();
        let n = self.nodes.get_mut(&ino).unwrap();
        match n.meta.kind {
            Kind::File => {}
            Kind::Dir => return Err(err(libc::EISDIR, op, p)),
            _ => return Err(err(libc::EINVAL, op, p)),
        }
        n.meta.mtime = t;
        n.meta.ctime = t;
        Ok(n)
    }
}

fn set_size(n: &mut Node, size: u64) {
    n.data.resize(size as usize, 0);
    n.meta.size = size;
    n.meta.blocks = size.div_ceil(512);
}

impl FileSystem for MemFs {
    fn stat(&self, p: &RelPath) -> FsResult<Meta> {
        let s = self.state.lock();
        let ino = s.lookup(p, "stat")?;
        Ok(s.nodes[&ino].meta.clone())
    }

    fn read_dir(&self, p: &RelPath, xattrs: bool) -> FsResult<Vec<DirEntry>> {
        let s = self.state.lock();
        let ino = s.lookup(p, "readdir")?;
        let d = &s.nodes[&ino];
        if d.meta.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR, "readdir", p));
        }
        Ok(d.children
            .iter()
            .map(|(name, c)| {
                let n = &s.nodes[c];
                DirEntry {
                    name: name.clone(),
                    meta: n.meta.clone(),
                    link: (n.meta.kind == Kind::Symlink).then(|| n.link.clone()),
                    xattrs: if xattrs {
                        n.xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect())
    }

    fn read_link(&self, p: &RelPath) -> FsResult<Vec<u8>> {
        let s = self.state.lock();
        let n = &s.nodes[&s.lookup(p, "readlink")?];
        if n.meta.kind != Kind::Symlink {
            return Err(err(libc::EINVAL, "readlink", p));
        }
        Ok(n.link.clone())
    }

    fn read_at(&self, p: &RelPath, offset: u64, len: usize) -> FsResult<Vec<u8>> {
        let s = self.state.lock();
        let n = &s.nodes[&s.lookup(p, "read")?];
        if n.meta.kind != Kind::File {
            return Err(err(libc::EISDIR, "read", p));
        }
        let start = (offset as usize).min(n.data.len());
        let end = (start + len).min(n.data.len());
        Ok(n.data[start..end].to_vec())
    }

    fn map_file(&self, p: &RelPath) -> FsResult<FileBytes> {
        let s = self.state.lock();
        let n = &s.nodes[&s.lookup(p, "map")?];
        Ok(FileBytes::Owned(n.data.clone()))
    }

    fn xattrs(&self, p: &RelPath) -> FsResult<Vec<Xattr>> {
        let s = self.state.lock();
        let n = &s.nodes[&s.lookup(p, "listxattr")?];
        Ok(n.xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn write_at(&self, p: &RelPath, offset: u64, data: &[u8]) -> FsResult<()> {
        self.count(data.len());
        let mut s = self.state.lock();
        let n = s.file_mut(p, "write")?;
        let end = offset as usize + data.len();
        if end > n.data.len() {
            set_size(n, end as u64);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn create(&self, p: &RelPath, perm: u32, exclusive: bool) -> FsResult<()> {
        let mut s = self.state.lock();
        if let Ok(ino) = s.lookup(p, "create") {
            if exclusive {
                return Err(err(libc::EEXIST, "create", p));
            }
            let n = s.nodes.get_mut(&ino).unwrap();
            if n.meta.kind != Kind::File {
                return Err(err(libc::EISDIR, "create", p));
            }
            set_size(n, 0);
            return Ok(());
        }
        let t = s.tick();
        s.add(p, Node::new(Kind::File, perm, 0, t), "create").map(drop)
    }

    fn mkdir(&self, p: &RelPath, perm: u32) -> FsResult<()> {
        let mut s = self.state.lock();
        let t = s.tick();
        s.add(p, Node::new(Kind::Dir, perm, 0, t), "mkdir").map(drop)
    }

    fn mknod(&self, p: &RelPath, kind: Kind, perm: u32, rdev: u64) -> FsResult<()> {
        if !kind.is_special() {
            return Err(err(libc::EINVAL, "mknod", p));
        }
        let mut s = self.state.lock();
        let t = s.tick();
        let mut n = Node::new(kind, perm, 0, t);
        n.meta.rdev = rdev;
        s.add(p, n, "mknod").map(drop)
    }

    fn symlink(&self, target: &[u8], p: &RelPath) -> FsResult<()> {
        let mut s = self.state.lock();
        let t = s.tick();
        let mut n = Node::new(Kind::Symlink, 0o777, 0, t);
        n.link = target.to_vec();
        n.meta.size = target.len() as u64;
        s.add(p, n, "symlink").map(drop)
    }

    fn link(&self, existing: &RelPath, new: &RelPath) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(existing, "link")?;
        if s.nodes[&ino].meta.kind == Kind::Dir {
            return Err(err(libc::EPERM, "link", existing));
        }
        let (dir, name) = s.parent(new, "link")?;
        if s.nodes[&dir].children.contains_key(name) {
            return Err(err(libc::EEXIST, "link", new));
        }
        s.nodes.get_mut(&dir).unwrap().children.insert(name.to_vec(), ino);
        s.nodes.get_mut(&ino).unwrap().meta.nlink += 1;
        s.touch_dir(dir);
        Ok(())
    }

    fn rename(&self, from: &RelPath, to: &RelPath, flags: u32) -> FsResult<()> {
        let mut s = self.state.lock();
        let (fd, fname) = s.parent(from, "rename")?;
        let (td, tname) = s.parent(to, "rename")?;
        let src = *s.nodes[&fd]
            .children
            .get(fname)
            .ok_or_else(|| err(libc::ENOENT, "rename", from))?;
        if to.starts_with(from) && to != from {
            return Err(err(libc::EINVAL, "rename", from));
        }
        let dst = s.nodes[&td].children.get(tname).copied();
        if flags & super::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or_else(|| err(libc::ENOENT, "rename", to))?;
            s.nodes.get_mut(&fd).unwrap().children.insert(fname.to_vec(), dst);
            s.nodes.get_mut(&td).unwrap().children.insert(tname.to_vec(), src);
        } else {
            if let Some(d) = dst {
                if flags & super::RENAME_NOREPLACE != 0 {
                    return Err(err(libc::EEXIST, "rename", to));
                }
                if d == src {
                    return Ok(());
                }
                let dk = s.nodes[&d].meta.kind;
                let sk = s.nodes[&src].meta.kind;
                if dk == Kind::Dir && sk != Kind::Dir {
                    return Err(err(libc::EISDIR, "rename", to));
                }
                if dk != Kind::Dir && sk == Kind::Dir {
                    return Err(err(libc::ENOTDIR, "rename", to));
                }
                if dk == Kind::Dir && !s.nodes[&d].children.is_empty() {
                    return Err(err(libc::ENOTEMPTY, "rename", to));
                }
                s.drop_link(d);
            }
            s.nodes.get_mut(&fd).unwrap().children.remove(fname);
            s.nodes.get_mut(&td).unwrap().children.insert(tname.to_vec(), src);
        }
        s.touch_dir(fd);
        s.touch_dir(td);
        Ok(())
    }

    fn unlink(&self, p: &RelPath) -> FsResult<()> {
        let mut s = self.state.lock();
        let (dir, name) = s.parent(p, "unlink")?;
        let ino = *s.nodes[&dir]
            .children
            .get(name)
            .ok_or_else(|| err(libc::ENOENT, "unlink", p))?;
        if s.nodes[&ino].meta.kind == Kind::Dir {
            return Err(err(libc::EISDIR, "unlink", p));
        }
        s.nodes.get_mut(&dir).unwrap().children.remove(name);
        s.drop_link(ino);
        s.touch_dir(dir);
        Ok(())
    }

    fn rmdir(&self, p: &RelPath) -> FsResult<()> {
        let mut s = self.state.lock();
        let (dir, name) = s.parent(p, "rmdir")?;
        let ino = *s.nodes[&dir]
            .children
            .get(name)
            .ok_or_else(|| err(libc::ENOENT, "rmdir", p))?;
        let n = &s.nodes[&ino];
        if n.meta.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR, "rmdir", p));
        }
        if !n.children.is_empty() {
            return Err(err(libc::ENOTEMPTY, "rmdir", p));
        }
        s.nodes.get_mut(&dir).unwrap().children.remove(name);
        s.nodes.get_mut(&dir).unwrap().meta.nlink -= 1;
        s.drop_link(ino);
        s.touch_dir(dir);
        Ok(())
    }

    fn set_perm(&self, p: &RelPath, perm: u32) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(p, "chmod")?;
        let t = s.tick();
        let n = s.nodes.get_mut(&ino).unwrap();
        if n.meta.kind == Kind::Symlink {
            return Err(err(libc::ELOOP, "chmod", p));
        }
        n.meta.perm = perm & 0o7777;
        n.meta.ctime = t;
        Ok(())
    }

    fn set_owner(&self, p: &RelPath, uid: Option<u32>, gid: Option<u32>) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(p, "chown")?;
        let t = s.tick();
        let n = s.nodes.get_mut(&ino).unwrap();
        if let Some(u) = uid {
            n.meta.uid = u;
        }
        if let Some(g) = gid {
            n.meta.gid = g;
        }
        if n.meta.kind != Kind::Dir {
            n.meta.perm &= !0o6000;
        }
        n.meta.ctime = t;
        Ok(())
    }

    fn set_times(&self, p: &RelPath, atime: SetTime, mtime: SetTime) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(p, "utimens")?;
        let t = s.tick();
        let n = s.nodes.get_mut(&ino).unwrap();
        for (slot, v) in [(&mut n.meta.atime, atime), (&mut n.meta.mtime, mtime)] {
            match v {
                SetTime::At(x) => *slot = x,
                SetTime::Now => *slot = t,
                SetTime::Omit => {}
            }
        }
        n.meta.ctime = t;
        Ok(())
    }

    fn truncate(&self, p: &RelPath, size: u64) -> FsResult<()> {
        let mut s = self.state.lock();
        let n = s.file_mut(p, "truncate")?;
        if n.meta.size != size {
            set_size(n, size);
        }
        Ok(())
    }

    fn fallocate(&self, p: &RelPath, mode: i32, offset: u64, len: u64) -> FsResult<()> {
        let mut s = self.state.lock();
        let n = s.file_mut(p, "fallocate")?;
        let end = offset + len;
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            let e = (end as usize).min(n.data.len());
            let st = (offset as usize).min(e);
            n.data[st..e].fill(0);
        } else if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > n.meta.size {
            set_size(n, end);
        }
        Ok(())
    }

    fn set_xattr(&self, p: &RelPath, name: &[u8], value: &[u8]) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(p, "setxattr")?;
        s.nodes
            .get_mut(&ino)
            .unwrap()
            .xattrs
            .insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove_xattr(&self, p: &RelPath, name: &[u8]) -> FsResult<()> {
        let mut s = self.state.lock();
        let ino = s.lookup(p, "removexattr")?;
        s.nodes
            .get_mut(&ino)
            .unwrap()
            .xattrs
            .remove(name)
            .map(drop)
            .ok_or_else(|| err(libc::ENODATA, "removexattr", p))
    }

    fn fsync(&self, p: &RelPath, _datasync: bool) -> FsResult<()> {
        self.state.lock().lookup(p, "fsync").map(drop)
    }

    fn install_file(
        &self,
        tmp: &RelPath,
        dst: &RelPath,
        chunks: &[(u64, Vec<u8>)],
        size: u64,
        attrs: &super::Attrs,
    ) -> FsResult<()> {
        self.create(tmp, 0o600, true)?;
        {
            let mut s = self.state.lock();
            let n = s.file_mut(tmp, "install")?;
            set_size(n, size);
            for (off, data) in chunks {
                n.data[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        self.count(chunks.iter().map(|c| c.1.len()).sum());
        self.finish_file(tmp, dst, size, attrs)
    }
}
