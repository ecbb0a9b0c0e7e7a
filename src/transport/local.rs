//! `LocalTarget`: a target in this process, for a plain directory target. Requests are applied
//! by the submitting thread itself, under a lock, in submission order: no encoding, no socket,
//! no copy of the content and no thread handoff (which, measured on small writes, cost more
//! than the write). The mount's `Replicator` submits under its order lock, so the target's order
//! is the source's. `bytes_sent` counts what the same requests would have put on a connection,
//! so reports compare with remote targets.

use crate::fs::FileSystem;
use crate::path::RelPath;
use crate::protocol::Request;
use crate::rpc::{Pending, Rpc, RpcError, TargetInfo};
use crate::target::ReplicatorTarget;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct LocalTarget {
    target: Mutex<ReplicatorTarget>,
    next: AtomicU64,
    bytes: AtomicU64,
}

impl LocalTarget {
    /// A target applying requests to `fs` beneath its root.
    pub fn start(fs: Arc<dyn FileSystem>) -> std::io::Result<LocalTarget> {
        Ok(LocalTarget {
            target: Mutex::new(ReplicatorTarget::new(fs, RelPath::root())),
            next: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
        })
    }
}

impl Rpc for LocalTarget {
    fn submit(&self, req: Request) -> Pending {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(crate::protocol::frame_len(&(id, &req)), Ordering::Relaxed);
        Pending::Ready(self.target.lock().handle_request(req).map_err(RpcError::Remote))
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn target_info(&self) -> TargetInfo {
        TargetInfo {
            is_root: crate::fs::running_as_root(),
            version: crate::protocol::PROTOCOL_VERSION,
            capabilities: vec!["delta".into(), "stage".into()],
        }
    }
}
