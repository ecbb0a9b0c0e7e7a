//! Property tests of what a target is sent, bounded so they run on every CI run: random bytes
//! and mutated frames through the decoder and through the server's loop, and random request
//! sequences applied beneath a root that holds a symlink to a directory outside it. No panic,
//! no hang, no allocation a length field asks for, and nothing outside the root changes.
//! (`fuzz/` holds the unbounded versions, for cargo fuzz.)

mod common;

use mirrorfs::fs::{Attrs, FileSystem, Kind, LocalFs, SetTime, Time};
use mirrorfs::protocol::{self, ClientHello, Request, MAGIC, PROTOCOL_VERSION};
use mirrorfs::{Change, RelPath, ReplicatorTarget};
use proptest::prelude::*;
use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NAMES: &[&str] = &[
    "a",
    "b",
    "d",
    "link",
    "d/x",
    "d/sub",
    "link/x",
    "link/sub/inner",
    "d/../a",
];

fn path() -> impl Strategy<Value = RelPath> {
    prop::sample::select(NAMES).prop_filter_map("valid", |s| RelPath::new(s).ok())
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn set_time() -> impl Strategy<Value = SetTime> {
    prop_oneof![
        Just(SetTime::Omit),
        Just(SetTime::Now),
        (any::<i32>(), 0u32..1_000_000_000).prop_map(|(s, n)| SetTime::At(Time::new(s as i64, n))),
    ]
}

fn attrs() -> impl Strategy<Value = Attrs> {
    (0u32..0o10000, prop::option::of((0u32..70000, 0u32..70000))).prop_map(|(perm, owner)| Attrs {
        perm,
        owner,
        mtime: Default::default(),
        xattrs: vec![(b"user.p".to_vec(), b"1".to_vec())],
    })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (path(), 0u32..0o10000, any::<bool>()).prop_map(|(path, perm, exclusive)| Change::Create {
            path,
            perm,
            exclusive
        }),
        (path(), 0u32..0o10000).prop_map(|(path, perm)| Change::Mkdir { path, perm }),
        (path(), bytes(16)).prop_map(|(path, target)| Change::Symlink { path, target }),
        (path(), path()).prop_map(|(existing, path)| Change::Link { existing, path }),
        (path(), 0u64..1 << 16, bytes(64)).prop_map(|(path, offset, data)| Change::Write {
            path,
            offset,
            data,
            mtime: None
        }),
        (path(), 0u64..1 << 20).prop_map(|(path, size)| Change::Truncate { path, size }),
        (path(), 0i32..4, 0u64..1 << 16, 0u64..1 << 16).prop_map(|(path, mode, offset, len)| Change::Fallocate {
            path,
            mode,
            offset,
            len
        }),
        (path(), path(), 0u64..64).prop_map(|(src, dst, len)| Change::CopyRange {
            src,
            src_offset: 0,
            dst,
            dst_offset: 0,
            len
        }),
        (path(), prop::option::of(0u32..0o10000), set_time()).prop_map(|(path, perm, mtime)| Change::SetAttr {
            path,
            perm,
            uid: Some(65534),
            gid: None,
            atime: SetTime::Omit,
            mtime
        }),
        (path(), bytes(8)).prop_map(|(path, value)| Change::SetXattr {
            path,
            name: b"user.q".to_vec(),
            value
        }),
        path().prop_map(|path| Change::Unlink { path }),
        path().prop_map(|path| Change::Rmdir { path }),
        (path(), path(), 0u32..8).prop_map(|(from, to, flags)| Change::Rename { from, to, flags }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        4 => change().prop_map(Request::Change),
        1 => path().prop_map(|path| Request::RemoveTree { path }),
        1 => (path(), bytes(32), attrs()).prop_map(|(path, data, attrs)| Request::PutFile {
            path,
            size: data.len() as u64,
            chunks: vec![(0, data)],
            attrs,
        }),
        1 => (path(), attrs()).prop_map(|(path, attrs)| Request::ApplyAttrs { path, kind: Kind::File, attrs }),
        1 => (path(), path()).prop_map(|(existing, path)| Request::LinkReplace { existing, path }),
        1 => (0u64..3, path()).prop_map(|(stage, path)| Request::StageOpen { stage, path, sparse: true }),
        1 => (0u64..3, 0u64..1 << 16, bytes(32)).prop_map(|(stage, offset, data)| Request::StageWrite { stage, offset, data }),
        1 => (0u64..3, bytes(32)).prop_map(|(stage, delta)| Request::StageDelta { stage, offset: 0, delta }),
        1 => (0u64..3, 0u64..64, attrs()).prop_map(|(stage, size, attrs)| Request::StageCommit { stage, size, attrs, hash: None }),
        1 => path().prop_map(|path| Request::Hash { path }),
        1 => path().prop_map(|path| Request::Signature { path, block_size: 512 }),
    ]
}

/// A scratch root with `link` pointing at a directory outside it, and a copy of that outside
/// directory to compare with.
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root.join("d")).unwrap();
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("x"), b"outside").unwrap();
        fs::write(outside.join("sub/inner"), b"inner").unwrap();
        fs::write(root.join("a"), b"a").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&outside)
            .arg(tmp.path().join("reference"))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        Scratch { tmp }
    }

    fn target(&self) -> ReplicatorTarget {
        let fs: Arc<dyn FileSystem> = Arc::new(LocalFs::new(&self.tmp.path().join("root")).unwrap());
        ReplicatorTarget::new(fs, RelPath::root())
    }

    fn outside_unchanged(&self) -> Result<(), TestCaseError> {
        let d = common::tree_diff(&self.tmp.path().join("reference"), &self.tmp.path().join("outside"));
        prop_assert!(d.is_empty(), "outside the root changed:\n{}", d.join("\n"));
        Ok(())
    }
}

fn frame(value: &impl serde::Serialize) -> Vec<u8> {
    let mut buf = Vec::new();
    protocol::write_frame(&mut buf, value).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_without_panic(b in bytes(512)) {
        let _ = protocol::decode::<(u64, Request)>(&b);
        let _ = protocol::decode::<ClientHello>(&b);
        let _ = protocol::read_payload(&mut &b[..]);
        let _ = protocol::read_handshake::<ClientHello>(&mut &b[..]);
    }

    #[test]
    fn mutated_frames_decode_to_valid_requests_or_errors(
        req in request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut f = frame(&(1u64, &req));
        for (i, v) in flips {
            let n = i.index(f.len());
            f[n] = v;
        }
        // Whatever was bent, a request that decodes holds only paths a RelPath accepts: no
        // `..`, no absolute path, no empty component, no NUL.
        if let Ok((_, r)) = protocol::read_frame::<(u64, Request)>(&mut &f[..]) {
            for p in r.paths() {
                prop_assert!(p.is_root() || RelPath::new(p.as_bytes().to_vec()).is_ok(), "{p:?}");
                prop_assert!(!p.components().any(|c| c == b".." || c == b"." || c.is_empty()), "{p:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn request_sequences_stay_beneath_the_root(reqs in prop::collection::vec(request(), 1..40)) {
        let s = Scratch::new();
        let mut t = s.target();
        for r in reqs {
            let _ = t.handle_request(r);
        }
        s.outside_unchanged()?;
    }

    #[test]
    fn the_server_loop_ends_on_any_stream(
        reqs in prop::collection::vec(request(), 0..8),
        garbage in bytes(256),
        cut in any::<prop::sample::Index>(),
    ) {
        let s = Scratch::new();
        let mut input = frame(&ClientHello { magic: MAGIC, version: PROTOCOL_VERSION, capabilities: vec![] });
        for (i, r) in reqs.iter().enumerate() {
            input.extend(frame(&(i as u64 + 1, r)));
        }
        input.extend(&garbage);
        // A prefix of it, as if the peer went away mid-frame.
        let n = cut.index(input.len() + 1);
        input.truncate(n.max(input.len().min(4)));
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let b2 = b.try_clone().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(LocalFs::new(&s.tmp.path().join("root")).unwrap());
        let t = Instant::now();
        let server = std::thread::spawn(move || {
            let _ = mirrorfs::transport::serve_stream(Box::new(b), Box::new(b2), fs, None, None);
        });
        // Answers are drained so the server never blocks on a full socket.
        let mut reader = a.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let _ = a.write_all(&input);
        let _ = a.shutdown(std::net::Shutdown::Write);
        server.join().unwrap();
        let _ = a.shutdown(std::net::Shutdown::Both);
        drain.join().unwrap();
        prop_assert!(t.elapsed() < Duration::from_secs(10), "the server loop took {:?}", t.elapsed());
        s.outside_unchanged()?;
    }
}

/// The fuzzers' seed corpus (`fuzz/corpus/`, kept in the repository) is made of real frames:
/// every seed decodes. `MIRRORFS_WRITE_FUZZ_SEEDS=1 cargo test --release --test props seed`
/// writes it afresh first.
#[test]
fn the_fuzz_seed_corpus_is_real_frames() {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let (frames, streams) = (base.join("frame"), base.join("handle_request"));
    if std::env::var("MIRRORFS_WRITE_FUZZ_SEEDS").as_deref() == Ok("1") {
        write_fuzz_seeds(&frames, &streams);
    }
    let mut seen = 0;
    for e in fs::read_dir(&frames).unwrap() {
        let f = fs::read(e.unwrap().path()).unwrap();
        let ok = protocol::read_handshake::<ClientHello>(&mut &f[..]).is_ok()
            || protocol::read_handshake::<protocol::ClientAuth>(&mut &f[..]).is_ok()
            || protocol::read_frame::<(u64, Request)>(&mut &f[..]).is_ok();
        assert!(ok, "a frame seed that is not a frame");
        seen += 1;
    }
    for e in fs::read_dir(&streams).unwrap() {
        let f = fs::read(e.unwrap().path()).unwrap();
        let mut r = &f[..];
        let mut n = 0;
        while !r.is_empty() {
            protocol::read_frame::<(u64, Request)>(&mut r).expect("a stream seed of requests");
            n += 1;
        }
        assert!(n > 0);
        seen += 1;
    }
    assert!(seen >= 100, "{seen} seeds");
}

fn write_fuzz_seeds(frames: &std::path::Path, streams: &std::path::Path) {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    fs::create_dir_all(frames).unwrap();
    fs::create_dir_all(streams).unwrap();
    let hello = frame(&ClientHello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        capabilities: vec!["delta".into()],
    });
    fs::write(frames.join("hello"), &hello).unwrap();
    let auth = frame(&protocol::ClientAuth {
        nonce: [7; 32],
        proof: [9; 32],
    });
    fs::write(frames.join("auth"), &auth).unwrap();
    let mut runner = TestRunner::deterministic();
    for i in 0..64 {
        let mut stream = Vec::new();
        for j in 0..(1 + i % 8) {
            let r = request().new_tree(&mut runner).unwrap().current();
            let f = frame(&(j as u64 + 1, &r));
            if j == 0 {
                fs::write(frames.join(format!("request-{i:02}")), &f).unwrap();
            }
            stream.extend(f);
        }
        fs::write(streams.join(format!("stream-{i:02}")), &stream).unwrap();
    }
}
