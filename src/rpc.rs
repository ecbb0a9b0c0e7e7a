//! `Rpc`: anything that carries a `Request` to a target and brings back its `Response`. Requests
//! are submitted in order and may be pipelined: `submit` returns a `Pending` at once, and
//! `Pending::wait` blocks for that request's own answer only. An in-process closure (as in the
//! original design) is an `Rpc` that answers at once; `transport::Client` is one over a connection.

use crate::fs::FsError;
use crate::protocol::{Reply, Request, Response};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The target applied the request and it failed there.
    #[error("target: {0}")]
    Remote(FsError),
    #[error("target connection lost: {0}")]
    Disconnected(String),
    #[error("target did not answer within {0:?}")]
    Timeout(Duration),
}

/// What the target said about itself in the handshake.
#[derive(Debug, Clone, Default)]
pub struct TargetInfo {
    pub is_root: bool,
    pub version: u32,
    pub capabilities: Vec<String>,
}

/// The capability of a target that keeps what needs root in records (`serve --fake-super`).
pub const FAKE_SUPER: &str = "fake-super";

impl TargetInfo {
    /// The target can hold owners and device nodes: it runs as root, or keeps them in records.
    pub fn keeps_owners(&self) -> bool {
        self.is_root || self.capabilities.iter().any(|c| c == FAKE_SUPER)
    }
}

/// Something that flushes buffered requests so that a waiter's request reaches the target, and
/// tells when the target last showed progress (answered anything).
pub trait Flush: Send + Sync {
    fn flush(&self);
    fn last_progress(&self) -> Option<Instant> {
        None
    }
    /// A waiter saw no progress for the whole time limit: the connection is given up, so every
    /// other request on it fails at once instead of waiting out a time limit of its own.
    fn give_up(&self, _why: String) {}
}

/// An answer that may not have arrived yet.
pub enum Pending {
    Ready(Result<Reply, RpcError>),
    Waiting {
        rx: Receiver<Result<Reply, RpcError>>,
        flusher: Arc<dyn Flush>,
        /// Give up once the target has shown no progress for this long (not: once this answer
        /// took this long; a busy target that answers earlier requests is making progress).
        timeout: Option<Duration>,
    },
}

impl Pending {
    /// Blocks until the answer is there, or the target has made no progress for the time
    /// limit (counted from this call at the earliest, and including the flush).
    pub fn wait(self) -> Result<Reply, RpcError> {
        match self {
            Pending::Ready(r) => r,
            Pending::Waiting { rx, flusher, timeout } => {
                if let Ok(r) = rx.try_recv() {
                    return r;
                }
                let start = Instant::now();
                flusher.flush();
                let closed = || Err(RpcError::Disconnected("answer channel closed".into()));
                let Some(t) = timeout else {
                    return rx.recv().unwrap_or_else(|_| closed());
                };
                let slice = (t / 8).max(Duration::from_millis(5));
                loop {
                    match rx.recv_timeout(slice) {
                        Ok(r) => return r,
                        Err(RecvTimeoutError::Disconnected) => return closed(),
                        Err(RecvTimeoutError::Timeout) => {
                            let since = flusher.last_progress().map_or(start, |p| p.max(start));
                            if since.elapsed() >= t {
                                flusher.give_up(format!("no answer within {t:?}"));
                                return Err(RpcError::Timeout(t));
                            }
                        }
                    }
                }
            }
        }
    }

    /// True once the answer has arrived (never blocks).
    pub fn is_ready(&self) -> bool {
        match self {
            Pending::Ready(_) => true,
            Pending::Waiting { rx, .. } => !rx.is_empty(),
        }
    }
}

pub trait Rpc: Send + Sync {
    /// Sends a request; requests are applied by the target in submission order.
    fn submit(&self, req: Request) -> Pending;

    fn call(&self, req: Request) -> Result<Reply, RpcError> {
        self.submit(req).wait()
    }

    /// Sends buffered requests now, without waiting for answers.
    fn flush(&self) {}

    /// Bytes put on the wire so far (0 where there is no wire).
    fn bytes_sent(&self) -> u64 {
        0
    }

    /// Why the connection is known to be gone (its reader saw it close), if it is; a link
    /// polls this so that a target that dies while nothing is being forwarded is noticed too.
    fn dead(&self) -> Option<String> {
        None
    }

    /// Gives up on a target that stopped answering: every waiter gets `Disconnected` and later
    /// submits fail at once instead of blocking.
    fn abandon(&self, _why: &str) {}

    fn target_info(&self) -> TargetInfo {
        TargetInfo {
            is_root: crate::fs::running_as_root(),
            version: crate::protocol::PROTOCOL_VERSION,
            capabilities: Vec::new(),
        }
    }
}

/// An in-process closure is an `Rpc` that answers at once.
impl<F> Rpc for F
where
    F: Fn(Request) -> Response + Send + Sync,
{
    fn submit(&self, req: Request) -> Pending {
        Pending::Ready(self(req).map_err(RpcError::Remote))
    }
}

impl<R: Rpc + ?Sized> Rpc for Arc<R> {
    fn submit(&self, req: Request) -> Pending {
        (**self).submit(req)
    }
    fn flush(&self) {
        (**self).flush()
    }
    fn bytes_sent(&self) -> u64 {
        (**self).bytes_sent()
    }
    fn target_info(&self) -> TargetInfo {
        (**self).target_info()
    }
    fn abandon(&self, why: &str) {
        (**self).abandon(why)
    }
    fn dead(&self) -> Option<String> {
        (**self).dead()
    }
}
