//! The watcher's event source under the mount: fanotify, which names the process behind each
//! change, so the mount's own changes (forwarded already, as it made them) are dropped here and
//! the watcher sees only what bypassed the mount. With inotify it saw every change the mount
//! made too, and reconciled each burst of them under the mount's order lock: a `tar -x` through
//! the mount spent about a third of its time there.
//!
//! Events leave as `notify` events on the watcher's channel, so the watcher does not know which
//! source it has. Directories are marked one by one, as inotify watches are, and known by their
//! file handles, which the events carry with the entry's name. A handle the map does not know
//! becomes an event outside the tree, which the watcher answers with a whole rescan; renames of
//! directories (the mount's own too) move the map's paths along.

use crate::sys::{self, FileHandle};
use crossbeam_channel::Sender;
use notify::event::{
    AccessKind, AccessMode, CreateKind, DataChange, Flag, MetadataKind, ModifyKind, RemoveKind, RenameMode,
};
use notify::{Event, EventKind, RecursiveMode};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a marked directory reports: changes of its entries (and of itself), as inotify's watch.
const DIR_MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_RENAME
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_DELETE_SELF
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;
/// The top also reports being moved away.
const TOP_MASK: u64 = DIR_MASK | libc::FAN_MOVE_SELF;

/// A directory as events name it: its filesystem's id and its handle there (two filesystems
/// may hand out the same handle).
type Key = ([u8; 8], FileHandle);

/// Marked directories: their path under the top, or `None` once moved out of it.
type Dirs = HashMap<Key, Option<PathBuf>>;

pub struct Fanotify {
    marks: Marks,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The group and what it marked, shared by the watcher's `watch`, the reader and the mount's
/// `made` (directories it makes itself).
#[derive(Clone)]
pub struct Marks {
    group: Arc<OwnedFd>,
    top: PathBuf,
    dirs: Arc<Mutex<Dirs>>,
    tx: Sender<notify::Result<Event>>,
}

impl Fanotify {
    /// A group that marks `top` at once (which fails where the kernel or the filesystem offers
    /// no handles: the caller then uses inotify) and sends what others change on `tx`.
    pub fn new(top: &Path, tx: Sender<notify::Result<Event>>) -> io::Result<Fanotify> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_FID
            | libc::FAN_REPORT_DFID_NAME;
        // An unbounded queue needs CAP_SYS_ADMIN; without it an overflow means a whole rescan,
        // as it does with inotify.
        let group = sys::fanotify_init(flags | libc::FAN_UNLIMITED_QUEUE).or_else(|_| sys::fanotify_init(flags))?;
        let marks = Marks {
            group: Arc::new(group),
            top: top.to_path_buf(),
            dirs: Arc::default(),
            tx,
        };
        marks.mark(top)?;
        let stop = Arc::<AtomicBool>::default();
        let (m, halt) = (marks.clone(), stop.clone());
        let me = std::process::id() as i32;
        let reader = std::thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || read_loop(&m.group, &m.dirs, &halt, &m.tx, me))?;
        Ok(Fanotify {
            marks,
            stop,
            reader: Some(reader),
        })
    }

    /// For the mount, which marks the directories it makes itself (`Marks::made`).
    pub fn marks(&self) -> Marks {
        self.marks.clone()
    }

    /// Marks `p`, or (recursively) every directory beneath it too, never through a symlink.
    /// A directory that vanishes during the walk is skipped; `p` itself must be there.
    pub fn watch(&self, p: &Path, mode: RecursiveMode) -> Result<(), notify::Error> {
        self.marks.mark(p).map_err(|e| to_notify(e, p))?;
        if mode == RecursiveMode::NonRecursive {
            return Ok(());
        }
        let mut todo = vec![p.to_path_buf()];
        while let Some(d) = todo.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(it) => it,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(to_notify(e, &d)),
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let sub = e.path();
                match self.marks.mark(&sub) {
                    Ok(()) => todo.push(sub),
                    Err(e) if gone(&e) => {}
                    Err(e) => return Err(to_notify(e, &sub)),
                }
            }
        }
        Ok(())
    }
}

impl Marks {
    fn mark(&self, p: &Path) -> io::Result<()> {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(p)?;
        let key = (sys::fsid(dir.as_fd())?, sys::fd_to_handle(dir.as_fd())?);
        // Known before it is marked, so its first event finds it.
        self.dirs.lock().insert(key, Some(p.to_path_buf()));
        let mask = if p == self.top { TOP_MASK } else { DIR_MASK };
        sys::fanotify_mark_add(self.group.as_fd(), mask, dir.as_fd())
    }

    /// The mount made directory `rel` (its creation is one of its own events, which the reader
    /// drops): it is marked before the mount answers. Whatever someone else put in it before
    /// the mark is in its listing, so a directory found not empty is reported as new, to be
    /// scanned whole; a mark that fails is reported as the watch would report it.
    pub fn made(&self, rel: &Path) {
        let p = self.top.join(rel);
        let ev = match self.mark(&p) {
            Ok(()) if std::fs::read_dir(&p).is_ok_and(|mut it| it.next().is_none()) => return,
            Ok(()) => Ok(Event::new(EventKind::Create(CreateKind::Folder)).add_path(p)),
            Err(e) if gone(&e) => return,
            Err(e) => Err(to_notify(e, &p)),
        };
        let _ = self.tx.send(ev);
    }
}

impl Drop for Fanotify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP))
}

fn to_notify(e: io::Error, p: &Path) -> notify::Error {
    let err = if e.raw_os_error() == Some(libc::ENOSPC) {
        notify::Error::new(notify::ErrorKind::MaxFilesWatch)
    } else {
        notify::Error::io(e)
    };
    err.add_path(p.to_path_buf())
}

/// After a read that found events, the reader waits this long before the next. Events of one
/// process on one object merge in the kernel's queue while nobody reads them, so a burst of
/// the mount's own writes (each an event, to be dropped) wakes this thread about once per
/// pause instead of once per write; waking it per 4 KiB write cost random writes about 20%.
const READ_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

fn read_loop(group: &OwnedFd, dirs: &Mutex<Dirs>, stop: &AtomicBool, tx: &Sender<notify::Result<Event>>, me: i32) {
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let n = match sys::poll_readable(group.as_fd(), 100).and_then(|ready| match ready {
            true => sys::read(group.as_fd(), &mut buf),
            false => Ok(0),
        }) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
            Err(e) => {
                let _ = tx.send(Err(notify::Error::io(e)));
                return;
            }
        };
        for raw in parse(&buf[..n]) {
            for ev in translate(&raw, me, &mut dirs.lock()) {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
        }
        if n > 0 {
            std::thread::sleep(READ_PAUSE);
        }
    }
}

/// One event as read: its mask, the process behind it, and its handle records.
#[derive(Debug)]
struct Raw<'a> {
    mask: u64,
    pid: i32,
    records: Vec<Record<'a>>,
}

#[derive(Debug)]
struct Record<'a> {
    ty: u8,
    key: Key,
    /// The entry's name, for the `*DFID_NAME` records.
    name: &'a [u8],
}

/// Splits a read into events (struct fanotify_event_metadata, then info records of struct
/// fanotify_event_info_fid). Whatever is truncated or malformed ends the list.
fn parse(buf: &[u8]) -> Vec<Raw<'_>> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(meta)) = (u32_at(buf, at), u16_at(buf, at + 6)) {
        let (len, meta) = (len as usize, meta as usize);
        let Some(ev) = buf.get(at..at + len).filter(|_| meta >= 24 && len >= meta) else {
            break;
        };
        let mask = u64::from_ne_bytes(ev[8..16].try_into().unwrap());
        let pid = i32::from_ne_bytes(ev[20..24].try_into().unwrap());
        let mut records = Vec::new();
        let mut i = meta;
        while let (Some(&ty), Some(rlen)) = (ev.get(i), u16_at(ev, i + 2)) {
            let rlen = rlen as usize;
            let Some(rec) = ev.get(i..i + rlen).filter(|_| rlen >= 4) else {
                break;
            };
            // header (4), fsid (8), handle_bytes (4), handle_type (4), f_handle, [name NUL]
            if let (Some(hb), Some(ht)) = (u32_at(rec, 12), u32_at(rec, 16)) {
                let hb = hb as usize;
                if let Some(h) = rec.get(20..20 + hb) {
                    let rest = &rec[20 + hb..];
                    let name = &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())];
                    records.push(Record {
                        ty,
                        key: (rec[4..12].try_into().unwrap(), FileHandle::new(ht as i32, h)),
                        name,
                    });
                }
            }
            i += rlen;
        }
        out.push(Raw { mask, pid, records });
        at += len;
    }
    out
}

/// Outside the top: the watcher starts over with a whole rescan.
fn outside() -> PathBuf {
    PathBuf::from("/")
}

/// The `notify` events one fanotify event stands for, keeping `dirs` true to directory
/// removals and renames (the mount's own too, which are otherwise dropped here).
fn translate(raw: &Raw<'_>, me: i32, dirs: &mut Dirs) -> Vec<Event> {
    let m = raw.mask;
    if m & libc::FAN_Q_OVERFLOW != 0 {
        return vec![Event::new(EventKind::Other).set_flag(Flag::Rescan)];
    }
    let rec = |ty: u8| raw.records.iter().find(|r| r.ty == ty);
    // Some(path) of a record: None when its directory has left the top; `outside()` when the
    // directory is unknown.
    let resolve = |dirs: &Dirs, r: &Record<'_>| -> Option<PathBuf> {
        match dirs.get(&r.key) {
            Some(Some(d)) if r.name.is_empty() || r.name == b"." => Some(d.clone()),
            Some(Some(d)) => Some(d.join(OsStr::from_bytes(r.name))),
            Some(None) => None,
            None => Some(outside()),
        }
    };
    let dir = m & libc::FAN_ONDIR != 0;
    let mut out = Vec::new();
    if m & libc::FAN_RENAME != 0 {
        let end = |ty: u8| {
            let r = rec(ty)?;
            let d = dirs.get(&r.key).cloned().flatten()?;
            Some(d.join(OsStr::from_bytes(r.name)))
        };
        let from = end(libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME);
        let to = end(libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME);
        if dir {
            move_dirs(dirs, from.as_deref(), to.as_deref());
        }
        if raw.pid != me {
            let ev = |mode| Event::new(EventKind::Modify(ModifyKind::Name(mode)));
            out.push(match (from, to) {
                (Some(f), Some(t)) => ev(RenameMode::Both).add_path(f).add_path(t),
                (None, Some(t)) => ev(RenameMode::To).add_path(t),
                (Some(f), None) => ev(RenameMode::From).add_path(f),
                (None, None) => ev(RenameMode::Any).add_path(outside()),
            });
        }
    }
    // The object itself (a directory's own events) or the entry a directory reports.
    let named = rec(libc::FAN_EVENT_INFO_TYPE_DFID_NAME).or(rec(libc::FAN_EVENT_INFO_TYPE_DFID));
    let own = rec(libc::FAN_EVENT_INFO_TYPE_FID);
    let mut removed_dir = None;
    if m & libc::FAN_DELETE_SELF != 0 {
        if let Some(r) = own.or(named) {
            removed_dir = dirs.remove(&r.key).flatten();
        }
    }
    if raw.pid == me {
        return out;
    }
    // A removed directory's own event names it by the handle just dropped from the map.
    let path = if m & libc::FAN_DELETE_SELF != 0 {
        removed_dir.clone()
    } else {
        named.or(own).and_then(|r| resolve(dirs, r))
    };
    let Some(path) = path else {
        return out;
    };
    let mut push = |kind| out.push(Event::new(kind).add_path(path.clone()));
    if m & libc::FAN_CREATE != 0 {
        push(EventKind::Create(if dir {
            CreateKind::Folder
        } else {
            CreateKind::File
        }));
    }
    if m & libc::FAN_MODIFY != 0 {
        push(EventKind::Modify(ModifyKind::Data(DataChange::Any)));
    }
    if m & libc::FAN_ATTRIB != 0 {
        push(EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)));
    }
    if m & libc::FAN_CLOSE_WRITE != 0 {
        push(EventKind::Access(AccessKind::Close(AccessMode::Write)));
    }
    if m & libc::FAN_DELETE != 0 {
        push(EventKind::Remove(if dir {
            RemoveKind::Folder
        } else {
            RemoveKind::File
        }));
    }
    if m & libc::FAN_DELETE_SELF != 0 && removed_dir.is_some() {
        push(EventKind::Remove(RemoveKind::Folder));
    }
    if m & libc::FAN_MOVE_SELF != 0 {
        push(EventKind::Modify(ModifyKind::Name(RenameMode::From)));
    }
    out
}

/// A directory moved from `from` to `to` (either may be outside the top): the marked
/// directories beneath it move with it, or leave the top.
fn move_dirs(dirs: &mut Dirs, from: Option<&Path>, to: Option<&Path>) {
    let Some(from) = from else { return };
    for p in dirs.values_mut() {
        let Some(d) = p else { continue };
        if let Ok(rest) = d.strip_prefix(from) {
            *p = to.map(|t| {
                if rest.as_os_str().is_empty() {
                    t.to_path_buf()
                } else {
                    t.join(rest)
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out: metadata, then (type, handle byte, name) records.
    fn event(mask: u64, pid: i32, records: &[(u8, u8, &str)]) -> Vec<u8> {
        let mut recs = Vec::new();
        for &(ty, h, name) in records {
            let mut r = vec![ty, 0, 0, 0];
            r.extend_from_slice(&FSID); // fsid
            r.extend_from_slice(&8u32.to_ne_bytes());
            r.extend_from_slice(&1i32.to_ne_bytes());
            r.extend_from_slice(&[h; 8]);
            if !name.is_empty() {
                r.extend_from_slice(name.as_bytes());
                r.push(0);
            }
            while r.len() % 4 != 0 {
                r.push(0);
            }
            let n = r.len() as u16;
            r[2..4].copy_from_slice(&n.to_ne_bytes());
            recs.extend(r);
        }
        let len = (24 + recs.len()) as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&len.to_ne_bytes());
        e.extend_from_slice(&[3, 0]);
        e.extend_from_slice(&24u16.to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&pid.to_ne_bytes());
        e.extend(recs);
        e
    }

    const FSID: [u8; 8] = [9, 8, 7, 6, 5, 4, 3, 2];

    fn h(b: u8) -> Key {
        (FSID, FileHandle::new(1, &[b; 8]))
    }

    fn show(evs: &[Event]) -> Vec<String> {
        evs.iter()
            .map(|e| {
                let paths: Vec<String> = e.paths.iter().map(|p| p.display().to_string()).collect();
                format!(
                    "{:?} {}{}",
                    e.kind,
                    paths.join(" "),
                    if e.need_rescan() { " rescan" } else { "" }
                )
            })
            .collect()
    }

    const ME: i32 = 100;
    const OTHER: i32 = 200;
    const DN: u8 = libc::FAN_EVENT_INFO_TYPE_DFID_NAME;
    const FID: u8 = libc::FAN_EVENT_INFO_TYPE_FID;
    const OLD: u8 = libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME;
    const NEW: u8 = libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME;

    #[test]
    fn events_become_notify_events_and_the_mounts_own_are_dropped() {
        // (mask, process, records, events wanted)
        type Row<'a> = (u64, i32, Vec<(u8, u8, &'a str)>, Vec<&'a str>);
        let table: Vec<Row> = vec![
            (libc::FAN_CREATE, OTHER, vec![(DN, 1, "f")], vec!["Create(File) /t/f"]),
            (libc::FAN_CREATE, ME, vec![(DN, 1, "f")], vec![]),
            (
                libc::FAN_CREATE | libc::FAN_ONDIR,
                OTHER,
                vec![(DN, 2, "e")],
                vec!["Create(Folder) /t/d/e"],
            ),
            (
                libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE,
                OTHER,
                vec![(DN, 1, "f"), (FID, 9, "")],
                vec!["Modify(Data(Any)) /t/f", "Access(Close(Write)) /t/f"],
            ),
            (libc::FAN_DELETE, OTHER, vec![(DN, 1, "f")], vec!["Remove(File) /t/f"]),
            // A directory's own attributes.
            (
                libc::FAN_ATTRIB | libc::FAN_ONDIR,
                OTHER,
                vec![(DN, 2, "."), (FID, 2, "")],
                vec!["Modify(Metadata(Any)) /t/d"],
            ),
            (
                libc::FAN_RENAME,
                OTHER,
                vec![(OLD, 1, "a"), (NEW, 2, "b")],
                vec!["Modify(Name(Both)) /t/a /t/d/b"],
            ),
            // Moved in from, and out to, directories the top does not hold.
            (
                libc::FAN_RENAME,
                OTHER,
                vec![(OLD, 7, "a"), (NEW, 1, "b")],
                vec!["Modify(Name(To)) /t/b"],
            ),
            (
                libc::FAN_RENAME,
                OTHER,
                vec![(OLD, 1, "a"), (NEW, 7, "b")],
                vec!["Modify(Name(From)) /t/a"],
            ),
            // An unknown directory: a whole rescan.
            (libc::FAN_CREATE, OTHER, vec![(DN, 7, "x")], vec!["Create(File) /"]),
            // Handle 5 is known on another filesystem only.
            (libc::FAN_CREATE, OTHER, vec![(DN, 5, "x")], vec!["Create(File) /"]),
            (libc::FAN_Q_OVERFLOW, OTHER, vec![], vec!["Other  rescan"]),
            (libc::FAN_Q_OVERFLOW, ME, vec![], vec!["Other  rescan"]),
        ];
        for (mask, pid, records, want) in table {
            let mut dirs: Dirs = HashMap::new();
            dirs.insert(h(1), Some(PathBuf::from("/t")));
            dirs.insert(h(2), Some(PathBuf::from("/t/d")));
            dirs.insert(
                ([1; 8], FileHandle::new(1, &[5; 8])),
                Some(PathBuf::from("/t/other-fs")),
            );
            let buf = event(mask, pid, &records);
            let raws = parse(&buf);
            assert_eq!(raws.len(), 1, "{records:?}");
            let got = show(&translate(&raws[0], ME, &mut dirs));
            assert_eq!(got, want, "mask {mask:#x} from {pid}, {records:?}");
        }
    }

    #[test]
    fn directory_renames_and_removals_keep_the_map_true_whoever_made_them() {
        let mut dirs: Dirs = HashMap::new();
        dirs.insert(h(1), Some(PathBuf::from("/t")));
        dirs.insert(h(2), Some(PathBuf::from("/t/d")));
        dirs.insert(h(3), Some(PathBuf::from("/t/d/e")));
        // The mount's own rename of d to n: dropped, but the map follows.
        let mut buf = event(libc::FAN_RENAME | libc::FAN_ONDIR, ME, &[(OLD, 1, "d"), (NEW, 1, "n")]);
        // Then someone else writes in what was d/e.
        buf.extend(event(libc::FAN_MODIFY, OTHER, &[(DN, 3, "f"), (FID, 9, "")]));
        // Then moves n out of the top, and writes in it again: nothing to watch there.
        buf.extend(event(
            libc::FAN_RENAME | libc::FAN_ONDIR,
            OTHER,
            &[(OLD, 1, "n"), (NEW, 7, "x")],
        ));
        buf.extend(event(libc::FAN_MODIFY, OTHER, &[(DN, 3, "f"), (FID, 9, "")]));
        let mut got = Vec::new();
        for raw in parse(&buf) {
            got.extend(show(&translate(&raw, ME, &mut dirs)));
        }
        assert_eq!(
            got,
            vec!["Modify(Data(Any)) /t/n/e/f", "Modify(Name(From)) /t/n"],
            "{dirs:?}"
        );
        // A removed directory leaves the map, and someone else's removal of one is told by
        // its path.
        let buf = event(
            libc::FAN_DELETE_SELF | libc::FAN_ONDIR,
            ME,
            &[(DN, 1, "."), (FID, 1, "")],
        );
        assert!(translate(&parse(&buf)[0], ME, &mut dirs).is_empty());
        assert!(!dirs.contains_key(&h(1)));
        dirs.insert(h(4), Some(PathBuf::from("/t/g")));
        let buf = event(
            libc::FAN_DELETE_SELF | libc::FAN_ONDIR,
            OTHER,
            &[(DN, 4, "."), (FID, 4, "")],
        );
        assert_eq!(
            show(&translate(&parse(&buf)[0], ME, &mut dirs)),
            vec!["Remove(Folder) /t/g"]
        );
        assert!(!dirs.contains_key(&h(4)));
    }

    #[test]
    fn a_truncated_read_ends_the_list() {
        let mut buf = event(libc::FAN_CREATE, OTHER, &[(DN, 1, "f")]);
        let whole = buf.len();
        buf.extend(event(libc::FAN_CREATE, OTHER, &[(DN, 1, "g")]));
        assert_eq!(parse(&buf).len(), 2);
        assert_eq!(parse(&buf[..whole + 10]).len(), 1);
        assert_eq!(parse(&buf[..5]).len(), 0);
    }
}
