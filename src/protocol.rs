//! Wire types and the frame codec. A frame is a little-endian `u32` length followed by that many
//! bytes of bincode (standard config, serde). Frames larger than `MAX_FRAME` are refused before
//! any allocation. Every request travels as `(id, Request)` and every answer as
//! `(id, Response)`; ids increase by one per request, and the target answers in order. The
//! handshake (`ClientHello` / `ServerHello`) exchanges the version and capabilities first.

pub use crate::change::Change;
use crate::fs::{Attrs, FsError, Kind};
use crate::path::RelPath;
use crate::reconcile::{Entry, Scope};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};

pub const PROTOCOL_VERSION: u32 = 5;
pub const MAGIC: [u8; 8] = *b"MIRRORFS";
/// The id of an answer that answers nothing: the target is alive and busy with a long request.
/// Request ids start at 1.
pub const KEEPALIVE_ID: u64 = 0;
/// Largest frame accepted: generous for a chunk of scan entries or a delta segment.
pub const MAX_FRAME: usize = 64 << 20;
/// Largest frame accepted before the handshake is done: hellos and token proofs are tiny.
pub const HANDSHAKE_FRAME: usize = 4 << 10;
/// Content travels in pieces of at most this size.
pub const DATA_CHUNK: usize = 8 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientHello {
    pub magic: [u8; 8],
    pub version: u32,
    pub capabilities: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerHello {
    pub magic: [u8; 8],
    pub version: u32,
    pub capabilities: Vec<String>,
    /// The target runs as root, so owners can be set.
    pub is_root: bool,
    /// Present when the server requires the token: a nonce the client must answer.
    pub challenge: Option<[u8; 32]>,
    /// Set when the server refuses the connection (for example a version mismatch).
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientAuth {
    pub nonce: [u8; 32],
    pub proof: [u8; 32],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerAuth {
    pub ok: bool,
    pub proof: [u8; 32],
}

/// A mutation or query for the target. Paths are relative to the target root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// One operation as the source made it (the mount's and the watcher's vocabulary).
    Change(Change),
    // Reconcile.
    /// Starts a scan of the target, whole or within a scope (a partial reconcile); the first
    /// page of entries comes back.
    Scan {
        checksum: bool,
        scope: Option<Scope>,
    },
    /// The next page of the scan started last.
    ScanNext,
    /// BLAKE3 of the target's file at `path`.
    Hash {
        path: RelPath,
    },
    /// rsync signature of the target's file at `path`.
    Signature {
        path: RelPath,
        block_size: u32,
    },
    /// A whole small file: written under a temporary name, given `attrs`, renamed over `path`.
    PutFile {
        path: RelPath,
        #[serde(with = "chunks")]
        chunks: Vec<(u64, Vec<u8>)>,
        size: u64,
        attrs: Attrs,
    },
    /// Starts a staged (large) file that will replace `path`; `stage` is chosen by the source.
    /// With `sparse`, all-zero blocks produced by deltas are left as holes.
    StageOpen {
        stage: u64,
        path: RelPath,
        sparse: bool,
    },
    StageWrite {
        stage: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// An rsync delta against the current file at the stage's path, producing bytes at `offset`.
    StageDelta {
        stage: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        delta: Vec<u8>,
    },
    /// Sizes, gives metadata and renames the staged file into place. With `hash`, the target
    /// checks that the delta-built content has that BLAKE3 hash first.
    StageCommit {
        stage: u64,
        size: u64,
        attrs: Attrs,
        hash: Option<[u8; 32]>,
    },
    StageAbort {
        stage: u64,
    },
    /// Owner, mode, xattrs (replaced exactly) and mtime of an existing entry.
    ApplyAttrs {
        path: RelPath,
        kind: Kind,
        attrs: Attrs,
    },
    /// Makes `path` a hard link to `existing`, replacing whatever `path` was, atomically.
    LinkReplace {
        existing: RelPath,
        path: RelPath,
    },
    /// Removes an entry and everything beneath it; absent is fine.
    RemoveTree {
        path: RelPath,
    },
    /// Starts a fenced session on the target root (see `session`); answered with `Claimed`.
    /// `known` is the target's generation as the source last saw it.
    Claim {
        known: Option<[u8; 16]>,
    },
    /// `len` bytes at `offset` of a file open in this process, copied to the same offset of the
    /// stage by the kernel (`copy_file_range`), never through a buffer. Only an in-process
    /// target takes it (it advertises `LOCAL_COPY`): the variant is never encoded nor decoded,
    /// so it cannot cross a connection. Last in the enum, so the other variants keep their tags.
    #[serde(skip)]
    StageCopy {
        stage: u64,
        offset: u64,
        len: u64,
        from: LocalFile,
    },
}

impl From<Change> for Request {
    fn from(c: Change) -> Request {
        Request::Change(c)
    }
}

/// The capability of a target that shares this process and can take `Request::StageCopy`.
pub const LOCAL_COPY: &str = "local-copy";

/// A source file opened for reading, handed to an in-process target.
#[derive(Debug, Clone)]
pub struct LocalFile(pub std::sync::Arc<std::fs::File>);

impl Request {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Change(c) => c.name(),
            Request::Scan { .. } => "scan",
            Request::ScanNext => "scan_next",
            Request::Hash { .. } => "hash",
            Request::Signature { .. } => "signature",
            Request::PutFile { .. } => "put_file",
            Request::StageOpen { .. } => "stage_open",
            Request::StageWrite { .. } => "stage_write",
            Request::StageCopy { .. } => "stage_copy",
            Request::StageDelta { .. } => "stage_delta",
            Request::StageCommit { .. } => "stage_commit",
            Request::StageAbort { .. } => "stage_abort",
            Request::ApplyAttrs { .. } => "apply_attrs",
            Request::LinkReplace { .. } => "link_replace",
            Request::RemoveTree { .. } => "remove_tree",
            Request::Claim { .. } => "claim",
        }
    }

    /// The paths a request changes (for the dirty set kept while the target is unreachable).
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Request::Change(c) => c.paths(),
            Request::Hash { path }
            | Request::Signature { path, .. }
            | Request::PutFile { path, .. }
            | Request::StageOpen { path, .. }
            | Request::ApplyAttrs { path, .. }
            | Request::RemoveTree { path } => vec![path],
            Request::LinkReplace { existing, path } => vec![existing, path],
            Request::Scan { .. }
            | Request::ScanNext
            | Request::Claim { .. }
            | Request::StageWrite { .. }
            | Request::StageCopy { .. }
            | Request::StageDelta { .. }
            | Request::StageCommit { .. }
            | Request::StageAbort { .. } => Vec::new(),
        }
    }
}

impl Request {
    /// False for the requests that only read the target (a fenced session may still ask them).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Request::Scan { .. }
                | Request::ScanNext
                | Request::Hash { .. }
                | Request::Signature { .. }
                | Request::Claim { .. }
        )
    }
}

/// A successful answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Scan { entries: Vec<Entry>, more: bool },
    Signature(#[serde(with = "serde_bytes")] Vec<u8>),
    Hash([u8; 32]),
    Claimed(crate::session::Claim),
}

/// Success, or an errno with a message.
pub type Response = Result<Reply, FsError>;

fn cfg() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME>,
> {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    bincode::serde::encode_into_std_write(value, &mut buf, cfg()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// The size request `id` would have as a frame on a connection. A `StageCopy` counts as the
/// `StageWrite` of its bytes that a connection would carry instead.
pub fn request_frame_len(id: u64, req: &Request) -> u64 {
    match req {
        Request::StageCopy { stage, offset, len, .. } => {
            let head = Request::StageWrite {
                stage: *stage,
                offset: *offset,
                data: Vec::new(),
            };
            // The empty data's 1-byte length becomes a varint of up to 9 bytes, plus the bytes.
            frame_len(&(id, &head)) + 8 + len
        }
        _ => frame_len(&(id, req)),
    }
}

/// The size `value` would have as a frame on a connection, without building it.
pub fn frame_len<T: Serialize>(value: &T) -> u64 {
    struct Count(u64);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(4);
    let _ = bincode::serde::encode_into_std_write(value, &mut c, cfg());
    c.0
}

/// Writes one frame; returns the bytes written.
pub fn write_frame<T: Serialize>(w: &mut impl Write, value: &T) -> Result<usize, FrameError> {
    let buf = encode(value)?;
    w.write_all(&buf)?;
    Ok(buf.len())
}

/// Reads one frame's payload. A clean EOF before the length is `Closed`.
pub fn read_payload(r: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    read_payload_max(r, MAX_FRAME)
}

/// Reads one frame of at most `max` bytes. A length field alone buys little memory: past the
/// first MiB, the rest of a large frame is allocated only once that first MiB has arrived.
pub fn read_payload_max(r: &mut impl Read, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    const FIRST: usize = 1 << 20;
    let mut buf = vec![0u8; len.min(FIRST)];
    r.read_exact(&mut buf)?;
    if len > FIRST {
        buf.resize(len, 0);
        r.read_exact(&mut buf[FIRST..])?;
    }
    Ok(buf)
}

pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (v, used) =
        bincode::serde::decode_from_slice(payload, cfg()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            payload.len() - used
        )));
    }
    Ok(v)
}

/// The request id at the start of a payload, so that even a request whose body does not decode
/// can be answered with an error under its own id.
pub fn peek_id(payload: &[u8]) -> Option<u64> {
    bincode::serde::decode_from_slice::<u64, _>(payload, cfg())
        .ok()
        .map(|(id, _)| id)
}

pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    decode(&read_payload(r)?)
}

/// A handshake frame (hello, auth): at most `HANDSHAKE_FRAME` bytes, from a peer not yet trusted.
pub fn read_handshake<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    decode(&read_payload_max(r, HANDSHAKE_FRAME)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_limits() {
        let req = (
            7u64,
            Request::Change(Change::Write {
                path: RelPath::new("a/b").unwrap(),
                offset: 3,
                data: vec![1, 2, 3],
                mtime: None,
            }),
        );
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        let (id, back): (u64, Request) = read_frame(&mut &buf[..]).unwrap();
        assert_eq!(id, 7);
        assert!(matches!(back, Request::Change(Change::Write { offset: 3, .. })));
        assert_eq!(peek_id(&buf[4..]), Some(7));

        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(read_payload(&mut &huge[..]), Err(FrameError::TooLarge(_))));
        assert!(matches!(read_payload(&mut &[][..]), Err(FrameError::Closed)));
        let junk = [3u8, 0, 0, 0, 1, 0xff, 0xff];
        assert!(matches!(
            read_frame::<(u64, Request)>(&mut &junk[..]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn bad_path_on_the_wire_is_refused() {
        // `Request::Change(Change::Create { .. })`, with a path no `RelPath` accepts.
        #[derive(Serialize)]
        enum FakeRequest {
            Change(FakeChange),
        }
        #[derive(Serialize)]
        enum FakeChange {
            #[allow(dead_code)]
            Create {
                path: serde_bytes_like::B,
                perm: u32,
                exclusive: bool,
            },
        }
        mod serde_bytes_like {
            pub struct B(pub &'static [u8]);
            impl serde::Serialize for B {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(self.0)
                }
            }
        }
        let evil = (
            1u64,
            FakeRequest::Change(FakeChange::Create {
                path: serde_bytes_like::B(b"../../etc/passwd"),
                perm: 0o644,
                exclusive: false,
            }),
        );
        let mut buf = Vec::new();
        write_frame(&mut buf, &evil).unwrap();
        let r: Result<(u64, Request), _> = read_frame(&mut &buf[..]);
        assert!(matches!(r, Err(FrameError::Malformed(m)) if m.contains("..")));
    }
}

/// File content travels as raw bytes (serde's bytes), not as a sequence of numbers: bincode then
/// copies it in one go (the wire format is the same either way).
mod chunks {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[(u64, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(o, d)| (*o, serde_bytes::Bytes::new(d))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, Vec<u8>)>, D::Error> {
        let v: Vec<(u64, serde_bytes::ByteBuf)> = Deserialize::deserialize(d)?;
        Ok(v.into_iter().map(|(o, b)| (o, b.into_vec())).collect())
    }
}
