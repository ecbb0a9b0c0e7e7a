//! `LocalTarget`: a target in this process, for a plain directory target. A worker thread owns a
//! `ReplicatorTarget` and applies requests in the order they were submitted, exactly as a
//! connection would, but requests move to it as values: no encoding, no socket, no copy of the
//! content. The channel is bounded, so a fast source waits for the target instead of queueing
//! without limit. `bytes_sent` counts what the same requests would have put on a connection,
//! so reports compare with remote targets.

use crate::fs::FileSystem;
use crate::path::RelPath;
use crate::protocol::{Reply, Request};
use crate::rpc::{Flush, Pending, Rpc, RpcError, TargetInfo};
use crate::target::ReplicatorTarget;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = (Request, Sender<Result<Reply, RpcError>>);

/// Requests queued ahead of the target before `submit` waits.
const QUEUE: usize = 256;

pub struct LocalTarget {
    next: AtomicU64,
    bytes: AtomicU64,
    tx: Mutex<Option<Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

struct NoFlush;
impl Flush for NoFlush {
    fn flush(&self) {}
}

impl LocalTarget {
    /// Starts the worker applying requests to `fs` beneath its root.
    pub fn start(fs: Arc<dyn FileSystem>) -> std::io::Result<LocalTarget> {
        let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::bounded(QUEUE);
        let worker = std::thread::Builder::new().name("target".into()).spawn(move || {
            let mut t = ReplicatorTarget::new(fs, RelPath::root());
            for (req, answer) in rx {
                let _ = answer.send(t.handle_request(req).map_err(RpcError::Remote));
            }
        })?;
        Ok(LocalTarget {
            next: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        })
    }
}

impl Rpc for LocalTarget {
    fn submit(&self, req: Request) -> Pending {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(crate::protocol::frame_len(&(id, &req)), Ordering::Relaxed);
        let (atx, arx) = crossbeam_channel::bounded(1);
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) if tx.send((req, atx)).is_ok() => Pending::Waiting {
                rx: arx,
                flusher: Arc::new(NoFlush),
                timeout: None,
            },
            _ => Pending::Ready(Err(RpcError::Disconnected("the local target has stopped".into()))),
        }
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

impl Drop for LocalTarget {
    /// Lets the worker apply everything queued, then joins it.
    fn drop(&mut self) {
        self.tx.lock().take();
        if let Some(w) = self.worker.lock().take() {
            let _ = w.join();
        }
    }
}
