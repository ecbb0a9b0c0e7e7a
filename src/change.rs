//! `Change`: one mutation as the source made it, in the terms of the source tree (paths beneath
//! the mirrored root, the source's resulting metadata), whatever target it is bound for. The
//! mount's FUSE layer and the watcher produce changes; the replicator sequences them, the link
//! marks their regions while the target is away, and a transport carries them to the target
//! (inside `Request::Change`), where `ReplicatorTarget` applies them. Nothing here knows about
//! connections, sessions or the reconcile's own requests.

use crate::fs::{Kind, SetTime, Time};
use crate::path::RelPath;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Change {
    // Creating entries.
    Create {
        path: RelPath,
        perm: u32,
        exclusive: bool,
    },
    Mkdir {
        path: RelPath,
        perm: u32,
    },
    Mknod {
        path: RelPath,
        kind: Kind,
        perm: u32,
        rdev: u64,
    },
    Symlink {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Link {
        existing: RelPath,
        path: RelPath,
    },
    // Changing content.
    /// With `mtime`, the file is then given the mtime the write produced on the source.
    Write {
        path: RelPath,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        mtime: Option<Time>,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    /// `mode` is fallocate's: 0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | KEEP_SIZE, ...
    Fallocate {
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    CopyRange {
        src: RelPath,
        src_offset: u64,
        dst: RelPath,
        dst_offset: u64,
        len: u64,
    },
    // Changing metadata.
    SetAttr {
        path: RelPath,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: SetTime,
        mtime: SetTime,
    },
    SetXattr {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    RemoveXattr {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    // Removing and moving.
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    // Durability.
    Fsync {
        path: RelPath,
        datasync: bool,
    },
}

impl Change {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Create { .. } => "create",
            Change::Mkdir { .. } => "mkdir",
            Change::Mknod { .. } => "mknod",
            Change::Symlink { .. } => "symlink",
            Change::Link { .. } => "link",
            Change::Write { .. } => "write",
            Change::Truncate { .. } => "truncate",
            Change::Fallocate { .. } => "fallocate",
            Change::CopyRange { .. } => "copy_range",
            Change::SetAttr { .. } => "setattr",
            Change::SetXattr { .. } => "setxattr",
            Change::RemoveXattr { .. } => "removexattr",
            Change::Unlink { .. } => "unlink",
            Change::Rmdir { .. } => "rmdir",
            Change::Rename { .. } => "rename",
            Change::Fsync { .. } => "fsync",
        }
    }

    /// The paths the change touches.
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Change::Create { path, .. }
            | Change::Mkdir { path, .. }
            | Change::Mknod { path, .. }
            | Change::Symlink { path, .. }
            | Change::Write { path, .. }
            | Change::Truncate { path, .. }
            | Change::Fallocate { path, .. }
            | Change::SetAttr { path, .. }
            | Change::SetXattr { path, .. }
            | Change::RemoveXattr { path, .. }
            | Change::Unlink { path }
            | Change::Rmdir { path }
            | Change::Fsync { path, .. } => vec![path],
            Change::Link { existing, path } => vec![existing, path],
            Change::CopyRange { src, dst, .. } => vec![src, dst],
            Change::Rename { from, to, .. } => vec![from, to],
        }
    }

    /// Content bytes the change carries.
    pub fn payload_len(&self) -> u64 {
        match self {
            Change::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}
