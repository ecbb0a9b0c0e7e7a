//! `LocalTarget`: a target in this process, for a plain directory target. Requests move to it as
//! values (no encoding, no socket, no copy of the content) and are applied in submission order.
//! Two ways to run it, each measured faster for its use:
//! - `inline`: the submitting thread applies the request itself, under a lock. The mount uses
//!   it: its `Replicator` already submits under its order lock, and for small operations a
//!   thread handoff cost more than the operation.
//! - `threaded`: a worker thread owns the target and the submitter goes on at once (a bounded
//!   queue holds it back when the target lags), so a bulk reconcile reads the source while the
//!   target writes.
//!
//! `bytes_sent` counts what the same requests would have put on a connection, so reports compare
//! with remote targets.

use crate::fs::FileSystem;
use crate::path::RelPath;
use crate::protocol::{Reply, Request};
use crate::rpc::{Flush, Pending, Rpc, RpcError, TargetInfo};
use crate::target::ReplicatorTarget;
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = (Request, Sender<Result<Reply, RpcError>>);

/// Requests queued ahead of a threaded target before `submit` waits.
const QUEUE: usize = 256;

enum Mode {
    Inline(Mutex<ReplicatorTarget>),
    Threaded {
        tx: Mutex<Option<Sender<Job>>>,
        worker: Mutex<Option<JoinHandle<()>>>,
    },
}

pub struct LocalTarget {
    mode: Mode,
    next: AtomicU64,
    bytes: AtomicU64,
}

struct NoFlush;
impl Flush for NoFlush {
    fn flush(&self) {}
}

impl LocalTarget {
    fn with(mode: Mode) -> LocalTarget {
        LocalTarget {
            mode,
            next: AtomicU64::new(1),
            bytes: AtomicU64::new(0),
        }
    }

    /// Requests are applied by the submitting thread.
    pub fn inline(fs: Arc<dyn FileSystem>) -> LocalTarget {
        LocalTarget::with(Mode::Inline(Mutex::new(ReplicatorTarget::new(fs, RelPath::root()))))
    }

    /// Requests are applied by a worker thread, in order.
    pub fn threaded(fs: Arc<dyn FileSystem>) -> std::io::Result<LocalTarget> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(QUEUE);
        let worker = std::thread::Builder::new().name("target".into()).spawn(move || {
            let mut t = ReplicatorTarget::new(fs, RelPath::root());
            for (req, answer) in rx {
                let _ = answer.send(t.handle_request(req).map_err(RpcError::Remote));
            }
        })?;
        Ok(LocalTarget::with(Mode::Threaded {
            tx: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(worker)),
        }))
    }
}

impl Rpc for LocalTarget {
    fn submit(&self, req: Request) -> Pending {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(crate::protocol::request_frame_len(id, &req), Ordering::Relaxed);
        match &self.mode {
            Mode::Inline(t) => Pending::Ready(t.lock().handle_request(req).map_err(RpcError::Remote)),
            Mode::Threaded { tx, .. } => {
                let (atx, arx) = crossbeam_channel::bounded(1);
                let tx = tx.lock().clone();
                match tx {
                    Some(tx) if tx.send((req, atx)).is_ok() => Pending::Waiting {
                        rx: arx,
                        flusher: Arc::new(NoFlush),
                        timeout: None,
                    },
                    _ => Pending::Ready(Err(RpcError::Disconnected("the local target has stopped".into()))),
                }
            }
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn dead(&self) -> Option<String> {
        match &self.mode {
            Mode::Threaded { worker, .. } if worker.lock().as_ref().is_some_and(|w| w.is_finished()) => {
                Some("the local target's thread has stopped".into())
            }
            _ => None,
        }
    }

    fn target_info(&self) -> TargetInfo {
        TargetInfo {
            is_root: crate::fs::running_as_root(),
            version: crate::protocol::PROTOCOL_VERSION,
            capabilities: vec!["delta".into(), "stage".into(), crate::protocol::LOCAL_COPY.into()],
        }
    }
}

impl Drop for LocalTarget {
    /// A threaded target applies everything queued before it stops.
    fn drop(&mut self) {
        if let Mode::Threaded { tx, worker } = &self.mode {
            tx.lock().take();
            if let Some(w) = worker.lock().take() {
                let _ = w.join();
            }
        }
    }
}
