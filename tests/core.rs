//! Library-level tests of the original design's API (`ReplicatorSource`, `ReplicatorTarget`,
//! `FileSystem`): the in-memory logic tests with `MemFs`, the target's refusal of every escape on
//! a real directory, and the server's behaviour on bad frames and versions over a real socket.

mod common;

use mirrorfs::fs::{FileSystem, Kind, LocalFs, MemFs, SetTime};
use mirrorfs::protocol::{self, ClientHello, Reply, Request, Response, ServerHello, MAGIC, PROTOCOL_VERSION};
use mirrorfs::Change;
use mirrorfs::{RelPath, ReplicatorSource, ReplicatorTarget};
use parking_lot::Mutex;
use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn mem_tree() -> Arc<MemFs> {
    let m = Arc::new(MemFs::new());
    m.mkdir(&p("d"), 0o755).unwrap();
    m.create(&p("d/a"), 0o644, true).unwrap();
    m.write_at(&p("d/a"), 0, b"hello").unwrap();
    m.create(&p("b"), 0o600, true).unwrap();
    m.write_at(&p("b"), 0, &vec![9u8; 200_000]).unwrap();
    m.symlink(b"d/a", &p("s")).unwrap();
    m.link(&p("d/a"), &p("hl")).unwrap();
    m.mknod(&p("fifo"), Kind::Fifo, 0o644, 0).unwrap();
    m.set_xattr(&p("b"), b"user.x", b"1").unwrap();
    m.reset_counters();
    m
}

/// The original design: a source and an in-process target joined by a closure.
fn replicate(src: &Arc<MemFs>, dst: &Arc<MemFs>) -> mirrorfs::reconcile::Report {
    let target = Mutex::new(ReplicatorTarget::new(dst.clone(), RelPath::root()));
    let rpc = move |req: Request| -> Response { target.lock().handle_request(req) };
    let s = ReplicatorSource::new(src.clone(), RelPath::root(), rpc).unwrap();
    s.last_report().clone()
}

fn mem_equal(a: &MemFs, b: &MemFs) {
    let opts = mirrorfs::reconcile::ScanOptions { checksum: true };
    let sa = mirrorfs::reconcile::scan(a, &RelPath::root(), opts).unwrap();
    let sb = mirrorfs::reconcile::scan(b, &RelPath::root(), opts).unwrap();
    let plan = mirrorfs::reconcile::plan(
        &sa,
        &sb,
        &mirrorfs::reconcile::PlanOptions {
            checksum: true,
            owners: true,
            allow_mass_delete: true,
            root_unlisted: false,
        },
    )
    .unwrap();
    assert!(plan.ops.is_empty(), "differences: {:?}", plan.ops);
}

fn mem_differ(a: &MemFs, b: &MemFs) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mem_equal(a, b))).is_err()
}

/// Partial reconciles (what the watcher runs): each change is followed by a reconcile of a
/// scope that covers it, and the trees must then be equal; a change outside the scope must be
/// left alone until a scope (or the whole tree) covers it.
#[test]
fn memfs_partial_reconcile_covers_its_scope_only() {
    use mirrorfs::reconcile::{Depth, Scope};
    let src = Arc::new(MemFs::new());
    let dst = Arc::new(MemFs::new());
    src.mkdir(&p("d"), 0o755).unwrap();
    src.create(&p("d/a"), 0o644, true).unwrap();
    src.write_at(&p("d/a"), 0, b"hello").unwrap();
    src.mkdir(&p("e"), 0o755).unwrap();
    src.create(&p("e/x"), 0o644, true).unwrap();
    let target = Mutex::new(ReplicatorTarget::new(dst.clone(), RelPath::root()));
    let rpc = move |req: Request| -> Response { target.lock().handle_request(req) };
    let s = ReplicatorSource::new(src.clone(), RelPath::root(), rpc).unwrap();
    mem_equal(&src, &dst);
    let scope = |r: &[(&str, Depth)]| Scope::of(r.iter().map(|(x, d)| (p(x), *d)));
    type Change = fn(&MemFs);
    // (what changes on the source, the scope reconciled afterwards)
    let table: Vec<(&str, Change, Scope)> = vec![
        (
            "write",
            |m| m.write_at(&p("d/a"), 5, b" world").unwrap(),
            scope(&[("d/a", Depth::Entry)]),
        ),
        (
            "chmod",
            |m| m.set_perm(&p("d/a"), 0o600).unwrap(),
            scope(&[("d/a", Depth::Entry)]),
        ),
        (
            "create",
            |m| {
                m.create(&p("d/b"), 0o644, true).unwrap();
                m.write_at(&p("d/b"), 0, b"new").unwrap();
            },
            scope(&[("d/b", Depth::Entry)]),
        ),
        // A directory made with contents, seen only as an entry: the scope must grow.
        (
            "mkdir with contents",
            |m| {
                m.mkdir(&p("d/n"), 0o750).unwrap();
                m.mkdir(&p("d/n/m"), 0o750).unwrap();
                m.create(&p("d/n/m/f"), 0o644, true).unwrap();
                m.write_at(&p("d/n/m/f"), 0, b"deep").unwrap();
            },
            scope(&[("d/n", Depth::Entry)]),
        ),
        (
            "unlink",
            |m| m.unlink(&p("d/b")).unwrap(),
            scope(&[("d/b", Depth::Entry)]),
        ),
        (
            "file replaced by a directory",
            |m| {
                m.unlink(&p("d/a")).unwrap();
                m.mkdir(&p("d/a"), 0o755).unwrap();
                m.create(&p("d/a/in"), 0o644, true).unwrap();
            },
            scope(&[("d", Depth::Children)]),
        ),
        (
            "directory replaced by a symlink",
            |m| {
                m.unlink(&p("d/a/in")).unwrap();
                m.rmdir(&p("d/a")).unwrap();
                m.symlink(b"elsewhere", &p("d/a")).unwrap();
            },
            scope(&[("d/a", Depth::Entry)]),
        ),
        // A whole top-level tree removed while the root's listing is out of scope: no
        // mass-delete refusal, and the rest of the target stays.
        (
            "remove a tree",
            |m| {
                m.unlink(&p("e/x")).unwrap();
                m.rmdir(&p("e")).unwrap();
            },
            scope(&[("e", Depth::Tree)]),
        ),
    ];
    for (what, change, sc) in table {
        change(&src);
        let r = s.reconcile_scope(sc).unwrap();
        assert!(r.problems.is_empty(), "{what}: {:?}", r.problems);
        mem_equal(&src, &dst);
    }
    // Out of scope: left alone.
    src.write_at(&p("d/n/m/f"), 0, b"DEEP").unwrap();
    s.reconcile_scope(scope(&[("d", Depth::Entry)])).unwrap();
    assert!(mem_differ(&src, &dst), "a change outside the scope was reconciled");
    s.reconcile_scope(scope(&[("d/n", Depth::Tree)])).unwrap();
    mem_equal(&src, &dst);
    // Hard links reach beyond any scope: the whole tree is reconciled.
    src.link(&p("d/n/m/f"), &p("hl")).unwrap();
    src.set_perm(&p("d"), 0o700).unwrap();
    s.reconcile_scope(scope(&[("hl", Depth::Entry)])).unwrap();
    mem_equal(&src, &dst);
}

#[test]
fn memfs_second_reconcile_writes_nothing() {
    let src = mem_tree();
    let dst = Arc::new(MemFs::new());
    let r = replicate(&src, &dst);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    mem_equal(&src, &dst);
    assert!(dst.write_count() > 0);
    dst.reset_counters();
    let r = replicate(&src, &dst);
    assert_eq!(r.ops, 0);
    assert_eq!(dst.write_count(), 0, "an unchanged tree was written to");
    // Metadata-only changes: still no content written.
    src.set_perm(&p("d/a"), 0o640).unwrap();
    src.set_owner(&p("b"), Some(5), Some(6)).unwrap();
    src.set_times(&p("s"), SetTime::Omit, SetTime::At(mirrorfs::fs::Time::new(42, 7)))
        .unwrap();
    let r = replicate(&src, &dst);
    assert_eq!(dst.write_count(), 0, "a metadata change wrote content");
    assert_eq!(r.files_sent, 0);
    mem_equal(&src, &dst);
}

#[test]
fn memfs_delta_sends_a_small_fraction() {
    let src = Arc::new(MemFs::new());
    let data: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    src.create(&p("big"), 0o644, true).unwrap();
    src.write_at(&p("big"), 0, &data).unwrap();
    let dst = Arc::new(MemFs::new());
    replicate(&src, &dst);
    src.write_at(&p("big"), 2_000_000, b"a small change").unwrap();
    dst.reset_counters();
    // Every request is measured as it would travel on a connection.
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let target = Mutex::new(ReplicatorTarget::new(dst.clone(), RelPath::root()));
    let counted = sent.clone();
    let rpc = move |req: Request| -> Response {
        counted.fetch_add(
            mirrorfs::protocol::request_frame_len(0, &req),
            std::sync::atomic::Ordering::Relaxed,
        );
        target.lock().handle_request(req)
    };
    let r = ReplicatorSource::new(src.clone(), RelPath::root(), rpc)
        .unwrap()
        .last_report()
        .clone();
    assert_eq!(r.delta_files, 1);
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sent * 20 < data.len() as u64,
        "a small fraction: {sent} bytes sent for a {} byte file",
        data.len()
    );
    mem_equal(&src, &dst);
}

/// A target over a real directory with a symlink planted to the outside.
struct Escape {
    _d: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    target: ReplicatorTarget,
}

fn escape_setup() -> Escape {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("target");
    let outside = d.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    fs::write(root.join("inside"), b"in").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), root.join("filelink")).unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(LocalFs::new(&root).unwrap());
    Escape {
        target: ReplicatorTarget::new(fs, RelPath::root()),
        root,
        outside,
        _d: d,
    }
}

fn outside_untouched(e: &Escape) {
    let names: Vec<_> = fs::read_dir(&e.outside)
        .unwrap()
        .map(|x| x.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"], "something was created outside the root");
    assert_eq!(fs::read(e.outside.join("secret")).unwrap(), b"secret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(e.outside.join("secret")).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn escapes_are_refused() {
    // `..` and absolute paths cannot even be formed, and are refused when decoded off the wire.
    for bad in ["../x", "/etc/passwd", "a/../../x", "a//b", "a\0b"] {
        assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
    }
    let mut e = escape_setup();
    let attempts = vec![
        Request::Change(Change::Create {
            path: p("link/new"),
            perm: 0o644,
            exclusive: false,
        }),
        Request::Change(Change::Mkdir {
            path: p("link/newdir"),
            perm: 0o755,
        }),
        Request::Change(Change::Write {
            path: p("filelink"),
            offset: 0,
            data: b"pwned".to_vec(),
            mtime: None,
        }),
        Request::Change(Change::Write {
            path: p("link/secret"),
            offset: 0,
            data: b"pwned".to_vec(),
            mtime: None,
        }),
        Request::Change(Change::Truncate {
            path: p("filelink"),
            size: 0,
        }),
        Request::Change(Change::SetAttr {
            path: p("filelink"),
            perm: Some(0o777),
            uid: None,
            gid: None,
            atime: SetTime::Omit,
            mtime: SetTime::Omit,
        }),
        Request::Change(Change::SetXattr {
            path: p("link/secret"),
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
        }),
        Request::Change(Change::Rename {
            from: p("inside"),
            to: p("link/stolen"),
            flags: 0,
        }),
        Request::Change(Change::Link {
            existing: p("inside"),
            path: p("link/hard"),
        }),
        Request::Change(Change::Symlink {
            path: p("link/sym"),
            target: b"/".to_vec(),
        }),
        Request::Change(Change::Unlink { path: p("link/secret") }),
        Request::RemoveTree { path: p("link/secret") },
        Request::PutFile {
            path: p("link/put"),
            chunks: vec![(0, b"x".to_vec())],
            size: 1,
            attrs: mirrorfs::fs::Attrs {
                perm: 0o644,
                owner: None,
                mtime: Default::default(),
                xattrs: vec![],
            },
        },
        Request::StageOpen {
            stage: 1,
            path: p("link/staged"),
            sparse: false,
        },
        Request::Signature {
            path: p("link/secret"),
            block_size: 1024,
        },
        Request::Hash { path: p("filelink") },
        Request::Change(Change::CopyRange {
            src: p("link/secret"),
            src_offset: 0,
            dst: p("inside"),
            dst_offset: 0,
            len: 6,
        }),
        Request::RemoveTree { path: RelPath::root() },
    ];
    for req in attempts {
        let name = format!("{req:?}");
        let r = e.target.handle_request(req);
        assert!(r.is_err(), "escape attempt succeeded: {name}");
        outside_untouched(&e);
    }
    assert_eq!(fs::read(e.root.join("inside")).unwrap(), b"in");
    // Removing the planted link removes the link, not what it points to.
    assert!(e.target.handle_request(Request::RemoveTree { path: p("link") }).is_ok());
    assert!(e
        .target
        .handle_request(Request::Change(Change::Unlink { path: p("filelink") }))
        .is_ok());
    outside_untouched(&e);
    assert!(!e.root.join("link").exists());
}

/// Opens a session with the current version and reads the server's answer.
fn hello(c: &mut std::os::unix::net::UnixStream) {
    protocol::write_frame(
        c,
        &ClientHello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            capabilities: vec![],
        },
    )
    .unwrap();
    let _: ServerHello = protocol::read_frame(c).unwrap();
}

#[test]
fn server_answers_bad_frames_and_versions_without_dying() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("t");
    fs::create_dir(&dir).unwrap();
    let sock = d.path().join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let _server = common::serve(&dir, &listen, &[]);

    // A newer client is refused with both versions named.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    protocol::write_frame(
        &mut c,
        &ClientHello {
            magic: MAGIC,
            version: 99,
            capabilities: vec![],
        },
    )
    .unwrap();
    let sh: ServerHello = protocol::read_frame(&mut c).unwrap();
    let why = sh.refusal.unwrap();
    assert!(
        why.contains(&PROTOCOL_VERSION.to_string()) && why.contains("99"),
        "{why}"
    );

    // A malformed request gets an error under its id; the connection then still works.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    hello(&mut c);
    let mut junk = vec![0u8; 4];
    junk.extend_from_slice(&[5u8, 0xfe, 0xff, 0xff, 0xff, 0xff]);
    let n = (junk.len() - 4) as u32;
    junk[..4].copy_from_slice(&n.to_le_bytes());
    c.write_all(&junk).unwrap();
    let (id, r): (u64, Response) = protocol::read_frame(&mut c).unwrap();
    assert_eq!(id, 5);
    assert!(r.unwrap_err().message.contains("malformed"));
    protocol::write_frame(
        &mut c,
        &(
            6u64,
            Request::Change(Change::Mkdir {
                path: p("made"),
                perm: 0o755,
            }),
        ),
    )
    .unwrap();
    let (id, r): (u64, Response) = protocol::read_frame(&mut c).unwrap();
    assert_eq!(id, 6);
    assert!(matches!(r, Ok(Reply::Done)));
    assert!(dir.join("made").is_dir());

    // An oversized frame ends that connection cleanly...
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    hello(&mut c);
    c.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let r: Result<(u64, Response), _> = protocol::read_frame(&mut c);
    assert!(matches!(r, Err(protocol::FrameError::Closed)), "{r:?}");
    // ...and garbage instead of a hello is refused; the server still serves the next client.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"still alive").unwrap();
    common::sync(&src, &listen, &["-q"]);
    common::assert_same_tree(&src, &dir);
}

/// `StageCopy` (what an in-process target takes instead of the bytes): the kernel copies the
/// given extents into the stage, the holes between them stay holes, and the request can never be
/// put on a connection.
#[test]
fn stage_copy_copies_extents_and_never_travels() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    // 16 MiB apparent: 1 MiB of data at the start and 1 MiB at 12 MiB, a hole between.
    let f = fs::File::create(src.join("big")).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
    f.write_all_at(&vec![9u8; 1 << 20], 12 << 20).unwrap();
    drop(f);

    let src_fs = LocalFs::new(&src).unwrap();
    let file = src_fs
        .open_file(&p("big"))
        .unwrap()
        .expect("a local file system opens files");
    let from = protocol::LocalFile(Arc::new(file));
    let mut target = ReplicatorTarget::new(Arc::new(LocalFs::new(&dst).unwrap()), RelPath::root());
    let mut ask = |req| target.handle_request(req).unwrap();
    ask(Request::StageOpen {
        stage: 1,
        path: p("big"),
        sparse: true,
    });
    for offset in [0u64, 12 << 20] {
        let from = from.clone();
        ask(Request::StageCopy {
            stage: 1,
            offset,
            len: 1 << 20,
            from,
        });
    }
    let m = fs::symlink_metadata(src.join("big")).unwrap();
    ask(Request::StageCommit {
        stage: 1,
        size: 16 << 20,
        attrs: mirrorfs::fs::Attrs {
            perm: 0o640,
            owner: None,
            mtime: mirrorfs::fs::Time::new(m.mtime(), m.mtime_nsec() as u32),
            xattrs: Vec::new(),
        },
        hash: None,
    });
    assert_eq!(fs::read(src.join("big")).unwrap(), fs::read(dst.join("big")).unwrap());
    let allocated = fs::metadata(dst.join("big")).unwrap().blocks() * 512;
    assert!(allocated < 4 << 20, "the hole was filled: {allocated} bytes allocated");
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 1, "a staging file was left behind");

    // Neither a frame nor a byte count for a connection can be made of it.
    let req = Request::StageCopy {
        stage: 2,
        offset: 0,
        len: 1 << 20,
        from,
    };
    assert!(protocol::encode(&(1u64, &req)).is_err());
    assert!(protocol::request_frame_len(1, &req) > 1 << 20);
}

/// A source whose `d/a` (1 MB) the target has; then a small change to it in the source.
fn tree_with_changed_big_file(link: bool) -> (Arc<MemFs>, Arc<MemFs>) {
    let src = Arc::new(MemFs::new());
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    src.mkdir(&p("d"), 0o755).unwrap();
    src.create(&p("d/a"), 0o644, true).unwrap();
    src.write_at(&p("d/a"), 0, &data).unwrap();
    if link {
        src.link(&p("d/a"), &p("d/b")).unwrap();
    }
    let dst = Arc::new(MemFs::new());
    replicate(&src, &dst);
    src.write_at(&p("d/a"), 500_000, b"a small change").unwrap();
    // Keep the directory's mtime, so only the target's own renames would change it.
    let old = mirrorfs::fs::Time::new(1_000_000, 5);
    src.set_times(&p("d"), SetTime::Omit, SetTime::At(old)).unwrap();
    (src, dst)
}

/// Reconciles with a target whose basis of `d/a` changes right after it gives the signature,
/// so the rebuilt file fails the source's hash and the target refuses the delta.
fn replicate_refusing_the_delta(src: &Arc<MemFs>, dst: &Arc<MemFs>) -> mirrorfs::reconcile::Report {
    let target = Mutex::new(ReplicatorTarget::new(dst.clone(), RelPath::root()));
    let spoil = dst.clone();
    let rpc = move |req: Request| -> Response {
        let signature = matches!(req, Request::Signature { .. });
        let r = target.lock().handle_request(req);
        if signature {
            spoil.write_at(&p("d/a"), 100, b"spoilt").unwrap();
        }
        r
    };
    let s = ReplicatorSource::new(src.clone(), RelPath::root(), rpc).unwrap();
    s.last_report().clone()
}

/// A refused delta is sent whole, and the directory's mtime, which that second rename changed,
/// is set again.
#[test]
fn memfs_refused_delta_is_sent_whole() {
    let (src, dst) = tree_with_changed_big_file(false);
    let r = replicate_refusing_the_delta(&src, &dst);
    assert_eq!((r.delta_files, r.files_sent), (0, 1), "{r:?}");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    mem_equal(&src, &dst);
}

/// The same refusal for the first path of a hard-link group: the file is resent before the other
/// paths are linked to it, so the group ends up one new inode, with no staging file left.
#[test]
fn memfs_refused_delta_of_a_link_group_leader() {
    let (src, dst) = tree_with_changed_big_file(true);
    let r = replicate_refusing_the_delta(&src, &dst);
    assert_eq!(r.delta_files, 0, "{r:?}");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    mem_equal(&src, &dst);
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Until a peer has sent its hello (and, with a token, its proof), it gets little: a first frame
/// of a few KiB, a deadline, and a share of a capped number of connections.
#[test]
fn serve_gives_an_unproven_peer_little() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("t");
    fs::create_dir(&dir).unwrap();
    let sock = d.path().join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let server = common::serve(&dir, &listen, &[]);
    let pid = server.0.id();

    // Ten peers announce a 60 MiB first frame: each is closed at once, and nothing is allocated.
    for _ in 0..10 {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(&(60u32 << 20).to_le_bytes()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0, "closed, not waiting for 60 MiB");
    }
    assert!(proc_status(pid, "VmRSS:") < 48 << 10, "serve's memory stays small");

    // Two hundred idle peers: at most MAX_CONNECTIONS are let in, the rest are told why.
    let t = Instant::now();
    let mut peers: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut refused = 0;
    for c in &mut peers {
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        if let Ok(sh) = protocol::read_frame::<ServerHello>(c) {
            assert!(sh.refusal.unwrap().contains("connections at most"));
            refused += 1;
        }
    }
    let limit = mirrorfs::transport::server::MAX_CONNECTIONS;
    assert!(refused >= 200 - limit, "only {refused} of 200 refused");
    let threads = proc_status(pid, "Threads:");
    assert!(threads <= 2 * limit as u64 + 4, "{threads} threads for idle peers");
    // The ones let in are closed at the handshake deadline.
    for c in &mut peers {
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 64];
        loop {
            match c.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => panic!("a stalled peer was not closed after {:?}: {e}", t.elapsed()),
            }
        }
    }
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "the target is untouched");
    // serve survives all of it and serves the next client.
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"still serving").unwrap();
    common::sync(&src, &listen, &["-q"]);
    common::assert_same_tree(&src, &dir);
}

#[test]
fn serve_stdio_fed_garbage_exits_non_zero() {
    let d = tempfile::tempdir().unwrap();
    for input in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &(60u32 << 20).to_le_bytes()[..],
        &b""[..],
    ] {
        let mut child = std::process::Command::new(common::bin())
            .args(["serve", "--stdio"])
            .arg(d.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{input:?} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("serve --stdio"),
            "says why: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn serves_unix_socket_is_private_even_under_umask_0() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 0; exec {} serve {} --listen unix:{}",
            common::bin(),
            d.path().display(),
            sock.display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _g = common::ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "serve did not bind");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(fs::symlink_metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
}

/// While requests stream in, another process keeps swapping a directory of the target for a
/// symlink to a directory outside it (atomically, with RENAME_EXCHANGE). Nothing outside the
/// root may ever change.
#[test]
fn a_directory_swapped_for_a_symlink_mid_stream_changes_nothing_outside() {
    use mirrorfs::rpc::Rpc;
    use std::os::fd::AsFd;
    let d = tempfile::tempdir().unwrap();
    let (root, outside) = (d.path().join("root"), d.path().join("outside"));
    for dir in [root.join("d/sub"), outside.join("sub")] {
        fs::create_dir_all(&dir).unwrap();
    }
    for dir in [root.join("d"), outside.clone()] {
        fs::write(dir.join("victim"), b"original content").unwrap();
        fs::write(dir.join("sub/inner"), b"inner").unwrap();
    }
    std::os::unix::fs::symlink(&outside, root.join("evil")).unwrap();
    let reference = d.path().join("reference");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&outside)
        .arg(&reference)
        .status()
        .unwrap()
        .success());
    let sock = d.path().join("s.sock");
    let listen = format!("unix:{}", sock.display());
    let _server = common::serve(&root, &listen, &[]);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swaps = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let dir = fs::File::open(&root).unwrap();
            let (a, b) = (c"d", c"evil");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mirrorfs::sys::renameat2(dir.as_fd(), a, dir.as_fd(), b, libc::RENAME_EXCHANGE).unwrap();
                n += 1;
            }
            n
        })
    };
    let c = mirrorfs::transport::connect(&mirrorfs::transport::Endpoint::Unix(sock.clone()), None, None).unwrap();
    let attrs = mirrorfs::fs::Attrs {
        perm: 0o777,
        owner: Some((65534, 65534)),
        mtime: Default::default(),
        xattrs: vec![(b"user.pwned".to_vec(), b"1".to_vec())],
    };
    let t = Instant::now();
    let (mut rounds, mut applied, mut refused) = (0, 0, 0);
    while t.elapsed() < Duration::from_secs(3) {
        let i = rounds;
        let ch = |c: Change| Request::Change(c);
        let batch = vec![
            ch(Change::Create {
                path: p(&format!("d/f{i}")),
                perm: 0o666,
                exclusive: false,
            }),
            ch(Change::Write {
                path: p("d/victim"),
                offset: 0,
                data: b"pwned".to_vec(),
                mtime: None,
            }),
            ch(Change::Truncate {
                path: p("d/victim"),
                size: 1,
            }),
            ch(Change::SetAttr {
                path: p("d/victim"),
                perm: Some(0o777),
                uid: Some(65534),
                gid: None,
                atime: SetTime::Omit,
                mtime: SetTime::Now,
            }),
            ch(Change::SetXattr {
                path: p("d/victim"),
                name: b"user.pwned".to_vec(),
                value: b"1".to_vec(),
            }),
            ch(Change::Fallocate {
                path: p("d/victim"),
                mode: 0,
                offset: 0,
                len: 1 << 20,
            }),
            ch(Change::Mkdir {
                path: p(&format!("d/m{i}")),
                perm: 0o777,
            }),
            ch(Change::Symlink {
                path: p(&format!("d/s{i}")),
                target: b"/".to_vec(),
            }),
            ch(Change::Link {
                existing: p("d/victim"),
                path: p(&format!("d/l{i}")),
            }),
            ch(Change::Rename {
                from: p("d/victim"),
                to: p(&format!("d/r{i}")),
                flags: 0,
            }),
            ch(Change::Unlink { path: p("d/victim") }),
            Request::RemoveTree { path: p("d/sub") },
            Request::PutFile {
                path: p("d/victim"),
                chunks: vec![(0, b"put".to_vec())],
                size: 3,
                attrs: attrs.clone(),
            },
            Request::ApplyAttrs {
                path: p("d/victim"),
                kind: Kind::File,
                attrs: attrs.clone(),
            },
            Request::LinkReplace {
                existing: p(&format!("d/f{i}")),
                path: p("d/victim"),
            },
            ch(Change::CopyRange {
                src: p(&format!("d/f{i}")),
                src_offset: 0,
                dst: p("d/victim"),
                dst_offset: 0,
                len: 3,
            }),
        ];
        let pending: Vec<_> = batch.into_iter().map(|r| c.submit(r)).collect();
        for p in pending {
            match p.wait() {
                Ok(_) => applied += 1,
                Err(_) => refused += 1,
            }
        }
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = swaps.join().unwrap();
    assert!(n > 1000 && rounds > 20, "the race ran: {n} swaps, {rounds} rounds");
    assert!(
        applied > 0 && refused > 0,
        "both sides of the race were met: {applied} applied, {refused} refused"
    );
    let diff = common::tree_diff(&reference, &outside);
    assert!(diff.is_empty(), "outside the root changed:\n{}", diff.join("\n"));
}

/// Found by the fuzzer: tiny blocks asked of a huge (sparse) file would make a huge signature.
#[test]
fn a_signature_is_bounded_whatever_block_size_is_asked() {
    let d = tempfile::tempdir().unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(LocalFs::new(d.path()).unwrap());
    let mut t = ReplicatorTarget::new(fs, RelPath::root());
    let f = fs::File::create(d.path().join("huge")).unwrap();
    f.set_len(1 << 30).unwrap();
    let r = t.handle_request(Request::Signature {
        path: p("huge"),
        block_size: 64,
    });
    assert_eq!(r.unwrap_err().errno, libc::EFBIG);
    // The source's own rule (about sqrt(size) per block) is served.
    let block_size = mirrorfs::reconcile::apply::block_size(1 << 30);
    assert!(t
        .handle_request(Request::Signature {
            path: p("huge"),
            block_size
        })
        .is_ok());
}

/// The target keeps resolved directories a moment (`fs::fds`). A directory removed and made
/// again behind its back costs the next change one retry, and the change lands in the new one.
#[test]
fn a_directory_replaced_behind_the_target_gets_the_next_change() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut t = ReplicatorTarget::new(Arc::new(LocalFs::new(&root).unwrap()), RelPath::root());
    let ch = |t: &mut ReplicatorTarget, c: Change| t.handle_request(Request::Change(c));
    ch(
        &mut t,
        Change::Mkdir {
            path: p("d"),
            perm: 0o755,
        },
    )
    .unwrap();
    let create = |name: &str| Change::Create {
        path: p(&format!("d/{name}")),
        perm: 0o644,
        exclusive: true,
    };
    ch(&mut t, create("f")).unwrap();
    // Removed and made again by someone else: the resolved fd names a deleted directory.
    fs::remove_dir_all(root.join("d")).unwrap();
    fs::create_dir(root.join("d")).unwrap();
    ch(&mut t, create("g")).unwrap();
    assert!(root.join("d/g").exists(), "the change landed in the directory now at d");
    // Removed for good: the change fails as it would have without the cache.
    fs::remove_dir_all(root.join("d")).unwrap();
    let e = ch(&mut t, create("h")).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
}

/// A fresh target root with `d/` in it, and the `LocalFs` over it.
fn local_target() -> (tempfile::TempDir, std::path::PathBuf, LocalFs) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir_all(root.join("d")).unwrap();
    let lfs = LocalFs::new(&root).unwrap();
    (d, root, lfs)
}

/// The target keeps the files it writes open a moment (`fs::fds`). Whatever the target itself
/// then does to the name (a rename over it, an unlink and a new file, a rename or removal of the
/// directory above, a file installed over it) sends the next write to the file the name stands
/// for now, never to the one it stood for. Each case writes through the name first, so its fd is
/// cached, and checks the inode it replaced too, where that is still reachable.
#[test]
fn the_targets_own_namespace_changes_send_the_next_write_to_the_new_file() {
    type Step = fn(&LocalFs);
    let create = |fs: &LocalFs, path: &str| fs.create(&p(path), 0o644, true).unwrap();
    let cases: [(&str, Step, Option<&str>); 6] = [
        (
            "renamed over",
            |fs| {
                fs.create(&p("d/g"), 0o644, true).unwrap();
                fs.rename(&p("d/g"), &p("d/f"), 0).unwrap();
            },
            None,
        ),
        (
            "unlinked and made again",
            |fs| {
                fs.unlink(&p("d/f")).unwrap();
                fs.create(&p("d/f"), 0o644, true).unwrap();
            },
            None,
        ),
        (
            "moved away, another put in its place",
            |fs| {
                fs.rename(&p("d/f"), &p("d/old"), 0).unwrap();
                fs.create(&p("d/f"), 0o644, true).unwrap();
            },
            Some("d/old"),
        ),
        (
            "its directory replaced",
            |fs| {
                fs.rename(&p("d"), &p("d-old"), 0).unwrap();
                fs.mkdir(&p("d"), 0o755).unwrap();
                fs.create(&p("d/f"), 0o644, true).unwrap();
            },
            Some("d-old/f"),
        ),
        (
            "exchanged with another file",
            |fs| {
                fs.create(&p("d/g"), 0o644, true).unwrap();
                fs.rename(&p("d/g"), &p("d/f"), libc::RENAME_EXCHANGE).unwrap();
            },
            Some("d/g"),
        ),
        (
            "a file installed over it",
            |fs| {
                let attrs = mirrorfs::fs::Attrs {
                    perm: 0o644,
                    owner: None,
                    mtime: mirrorfs::fs::Time { sec: 1, nsec: 0 },
                    xattrs: Vec::new(),
                };
                fs.install_file(&p("d/.tmp"), &p("d/f"), &[], 0, &attrs).unwrap();
            },
            None,
        ),
    ];
    for (what, step, old) in cases {
        let (_d, root, lfs) = local_target();
        create(&lfs, "d/f");
        lfs.write_at(&p("d/f"), 0, b"first").unwrap();
        step(&lfs);
        lfs.write_at(&p("d/f"), 0, b"second").unwrap();
        assert_eq!(
            fs::read(root.join("d/f")).unwrap(),
            b"second",
            "{what}: the file now at the name"
        );
        if let Some(old) = old {
            assert_eq!(
                fs::read(root.join(old)).unwrap(),
                b"first",
                "{what}: the file it replaced"
            );
        }
    }
}

/// A kept file that loses its name behind the target's back (removed, or replaced by a rename
/// over it) is never written within the TTL either: the write goes by name, so a removed file's
/// write fails (and the mount repairs the target) instead of vanishing into the deleted inode.
#[test]
fn a_file_removed_or_replaced_behind_the_target_is_not_written_through_its_kept_fd() {
    let (_d, root, lfs) = local_target();
    lfs.create(&p("d/f"), 0o644, true).unwrap();
    lfs.write_at(&p("d/f"), 0, b"first").unwrap();
    fs::remove_file(root.join("d/f")).unwrap();
    let e = lfs.write_at(&p("d/f"), 0, b"lost?").unwrap_err();
    assert_eq!(e.errno, libc::ENOENT, "a removed file's write must fail, not vanish");

    lfs.create(&p("d/g"), 0o644, true).unwrap();
    lfs.write_at(&p("d/g"), 0, b"first").unwrap();
    fs::write(root.join("d/new"), b"").unwrap();
    fs::rename(root.join("d/new"), root.join("d/g")).unwrap();
    lfs.write_at(&p("d/g"), 0, b"second").unwrap();
    assert_eq!(
        fs::read(root.join("d/g")).unwrap(),
        b"second",
        "the file now at the name"
    );
}

/// Nothing the target writes stays open for long after: a file held open for writing could
/// not be run on the target's machine (`ETXTBSY`). Checked in this process's own fd table.
#[test]
fn the_target_closes_a_written_file_soon_after() {
    let (_d, root, lfs) = local_target();
    lfs.create(&p("tool"), 0o755, true).unwrap();
    lfs.write_at(&p("tool"), 0, b"#!/bin/sh\n").unwrap();
    let file = root.join("tool");
    let open = || {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .any(|l| l == file)
    };
    assert!(open(), "kept open right after the write (the cache works)");
    std::thread::sleep(mirrorfs::fs::fds::TTL * 2 + Duration::from_millis(150));
    assert!(!open(), "still open {:?} after the write", mirrorfs::fs::fds::TTL * 2);
}

/// A file replaced behind the target's back is written where the name points once its cached
/// fd has expired (`fs::fds::TTL`).
#[test]
fn a_file_replaced_behind_the_target_is_written_by_name_after_the_ttl() {
    let (_d, root, lfs) = local_target();
    lfs.create(&p("d/f"), 0o644, true).unwrap();
    lfs.write_at(&p("d/f"), 0, b"first").unwrap();
    fs::rename(root.join("d/f"), root.join("d/aside")).unwrap();
    fs::write(root.join("d/f"), b"").unwrap();
    std::thread::sleep(mirrorfs::fs::fds::TTL + Duration::from_millis(20));
    lfs.write_at(&p("d/f"), 0, b"second").unwrap();
    assert_eq!(fs::read(root.join("d/f")).unwrap(), b"second");
    assert_eq!(fs::read(root.join("d/aside")).unwrap(), b"first");
}

/// A directory that someone moves out of the root behind the target's back: its resolution is
/// trusted for `fs::fds::TTL` at most, after which nothing reaches it where it now is.
#[test]
fn a_directory_moved_out_of_the_root_is_not_written_after_the_ttl() {
    let d = tempfile::tempdir().unwrap();
    let (root, outside) = (d.path().join("root"), d.path().join("outside"));
    fs::create_dir_all(root.join("d")).unwrap();
    fs::create_dir(&outside).unwrap();
    let mut t = ReplicatorTarget::new(Arc::new(LocalFs::new(&root).unwrap()), RelPath::root());
    let write = |t: &mut ReplicatorTarget, data: &[u8]| {
        t.handle_request(Request::Change(Change::Write {
            path: p("d/f"),
            offset: 0,
            data: data.to_vec(),
            mtime: None,
        }))
    };
    t.handle_request(Request::Change(Change::Create {
        path: p("d/f"),
        perm: 0o644,
        exclusive: true,
    }))
    .unwrap();
    write(&mut t, b"inside").unwrap();
    fs::rename(root.join("d"), outside.join("d")).unwrap();
    std::thread::sleep(mirrorfs::fs::fds::TTL + Duration::from_millis(20));
    let e = write(&mut t, b"escaped").unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(
        fs::read(outside.join("d/f")).unwrap(),
        b"inside",
        "nothing reached it outside"
    );
}
