//! `Client`: the source's end of a connection, an `Rpc` that pipelines. `submit` numbers a
//! request, queues its answer slot and writes the frame into a buffer without waiting; a reader
//! thread matches answers (which come in order) to slots. `Pending::wait` flushes the buffer
//! first, so bulk work rides in large writes while a lone syscall's request leaves at once. When
//! the connection is lost, every waiter gets `Disconnected`; with a time limit, a waiter that saw
//! no answer for that long gets `Timeout` and gives the connection up, so the requests behind it
//! fail at once rather than each waiting out a limit of its own.

use super::{auth, TransportError};
use crate::protocol::{
    self, ClientAuth, ClientHello, Reply, Request, Response, ServerAuth, ServerHello, MAGIC, PROTOCOL_VERSION,
};
use crate::rpc::{Flush, Pending, Rpc, RpcError, TargetInfo};
use crossbeam_channel::Sender;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Slot = Sender<Result<Reply, RpcError>>;

struct Queue {
    slots: VecDeque<(u64, Slot)>,
    dead: Option<String>,
    /// Set when we close on purpose, so the end of the stream is not reported as a loss.
    closing: bool,
}

struct Shared {
    writer: Mutex<(BufWriter<Box<dyn Write + Send>>, u64)>,
    queue: Mutex<Queue>,
    bytes_sent: AtomicU64,
    /// When the last answer arrived (or the connection was made).
    progress: Mutex<std::time::Instant>,
}

impl Shared {
    fn kill(&self, reason: String) {
        let mut q = self.queue.lock();
        if q.dead.is_none() && !(q.closing && q.slots.is_empty()) {
            log::warn!("target connection lost: {reason}");
            q.dead = Some(reason.clone());
        }
        for (_, slot) in q.slots.drain(..) {
            let _ = slot.send(Err(RpcError::Disconnected(reason.clone())));
        }
    }
}

impl Flush for Shared {
    fn flush(&self) {
        let mut w = self.writer.lock();
        // A connection already given up on is not written to again: another flush may just
        // have spent the whole write limit on a peer that stopped reading.
        if self.queue.lock().dead.is_some() {
            return;
        }
        let r = w.0.flush();
        drop(w);
        if let Err(e) = r {
            self.kill(e.to_string());
        }
    }

    fn last_progress(&self) -> Option<std::time::Instant> {
        Some(*self.progress.lock())
    }

    fn give_up(&self, why: String) {
        self.kill(why);
    }
}

pub struct Client {
    shared: Arc<Shared>,
    info: TargetInfo,
    timeout: Option<Duration>,
    shutdown: Box<dyn Fn(bool) + Send + Sync>,
    reader: Option<JoinHandle<()>>,
    /// Run once the stream is closed: joins an in-process target's thread, or reaps ssh.
    finish: Option<Finish>,
}

/// What ends a connection's other half (see `Client::finish`).
pub type Finish = Box<dyn FnOnce() + Send + Sync>;

impl Client {
    pub(crate) fn over_stream<S: super::Stream>(
        s: S,
        key: Option<auth::Key>,
        timeout: Option<Duration>,
        finish: Option<Finish>,
    ) -> Result<Client, TransportError> {
        let r = s.try_clone_stream().map_err(|e| TransportError::io("socket", e))?;
        let shut = s.try_clone_stream().map_err(|e| TransportError::io("socket", e))?;
        s.set_write_limit(timeout);
        // The handshake makes no progress past the time limit: a target that accepts and never
        // answers is given up on, not waited for.
        let lim = s.try_clone_stream().map_err(|e| TransportError::io("socket", e))?;
        lim.set_read_limit(timeout);
        let c = Client::handshake(
            Box::new(r),
            Box::new(s),
            key,
            timeout,
            Box::new(move |both| {
                if both {
                    shut.shutdown_both()
                } else {
                    shut.shutdown_write()
                }
            }),
            finish,
        );
        lim.set_read_limit(None);
        c
    }

    /// Runs the handshake over a reader and writer, then starts the answer reader.
    pub fn handshake(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        key: Option<auth::Key>,
        timeout: Option<Duration>,
        shutdown: Box<dyn Fn(bool) + Send + Sync>,
        finish: Option<Finish>,
    ) -> Result<Client, TransportError> {
        let mut r = BufReader::with_capacity(1 << 20, r);
        let mut w = BufWriter::with_capacity(1 << 20, w);
        let proto = |e: protocol::FrameError| match e {
            protocol::FrameError::Io(e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                TransportError::Io(format!(
                    "the target accepted the connection but did not answer the handshake within {:?}",
                    timeout.unwrap_or_default()
                ))
            }
            e => TransportError::Protocol(format!("during handshake: {e}")),
        };
        let hello = ClientHello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            capabilities: vec!["delta".into(), "stage".into()],
        };
        protocol::write_frame(&mut w, &hello).map_err(proto)?;
        w.flush().map_err(|e| TransportError::io("handshake", e))?;
        let sh: ServerHello = protocol::read_handshake(&mut r).map_err(|e| match e {
            protocol::FrameError::Malformed(_) | protocol::FrameError::TooLarge(_) => TransportError::NotMirrorfs,
            e => proto(e),
        })?;
        if sh.magic != MAGIC {
            return Err(TransportError::NotMirrorfs);
        }
        if sh.version != PROTOCOL_VERSION {
            return Err(TransportError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: sh.version,
            });
        }
        if let Some(why) = sh.refusal {
            return Err(TransportError::Refused(why));
        }
        if let Some(challenge) = sh.challenge {
            let key =
                key.ok_or_else(|| TransportError::Auth("the target requires a token; pass --token-file".into()))?;
            let nonce = auth::nonce().map_err(|e| TransportError::io("random nonce", e))?;
            let ca = ClientAuth {
                nonce,
                proof: auth::proof(&key, b"client", &challenge, &nonce),
            };
            protocol::write_frame(&mut w, &ca).map_err(proto)?;
            w.flush().map_err(|e| TransportError::io("handshake", e))?;
            let sa: ServerAuth = protocol::read_handshake(&mut r).map_err(proto)?;
            if !sa.ok {
                return Err(TransportError::Auth("the target rejected our token".into()));
            }
            if !auth::verify(&auth::proof(&key, b"server", &nonce, &challenge), &sa.proof) {
                return Err(TransportError::Auth(
                    "the target could not prove it knows the token".into(),
                ));
            }
        } else if key.is_some() {
            log::warn!("a token file was given but the target does not ask for authentication");
        }
        let info = TargetInfo {
            is_root: sh.is_root,
            version: sh.version,
            capabilities: sh.capabilities,
        };
        let shared = Arc::new(Shared {
            writer: Mutex::new((w, 1)),
            queue: Mutex::new(Queue {
                slots: VecDeque::new(),
                dead: None,
                closing: false,
            }),
            bytes_sent: AtomicU64::new(0),
            progress: Mutex::new(std::time::Instant::now()),
        });
        let s2 = shared.clone();
        let reader = std::thread::Builder::new()
            .name("rpc-reader".into())
            .spawn(move || read_answers(r, s2))
            .map_err(|e| TransportError::io("spawn reader", e))?;
        Ok(Client {
            shared,
            info,
            timeout,
            shutdown,
            reader: Some(reader),
            finish,
        })
    }
}

fn read_answers(mut r: BufReader<Box<dyn Read + Send>>, shared: Arc<Shared>) {
    loop {
        match protocol::read_frame::<(u64, Response)>(&mut r) {
            Ok((id, resp)) => {
                *shared.progress.lock() = std::time::Instant::now();
                if id == protocol::KEEPALIVE_ID {
                    continue;
                }
                let front = shared.queue.lock().slots.pop_front();
                match front {
                    Some((want, slot)) if want == id => {
                        let _ = slot.send(resp.map_err(RpcError::Remote));
                    }
                    other => {
                        let want = other.map(|o| o.0);
                        shared.kill(format!("answer {id} arrived while {want:?} was expected"));
                        return;
                    }
                }
            }
            Err(protocol::FrameError::Closed) => {
                shared.kill("the target closed the connection".into());
                return;
            }
            Err(e) => {
                shared.kill(e.to_string());
                return;
            }
        }
    }
}

impl Rpc for Client {
    fn submit(&self, req: Request) -> Pending {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut w = self.shared.writer.lock();
        let id = w.1;
        {
            let mut q = self.shared.queue.lock();
            if let Some(why) = &q.dead {
                return Pending::Ready(Err(RpcError::Disconnected(why.clone())));
            }
            q.slots.push_back((id, tx));
        }
        w.1 += 1;
        match protocol::write_frame(&mut w.0, &(id, &req)) {
            Ok(n) => {
                self.shared.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                drop(w);
                self.shared.kill(format!("sending {}: {e}", req.name()));
            }
        }
        Pending::Waiting {
            rx,
            flusher: self.shared.clone(),
            timeout: self.timeout,
        }
    }

    fn flush(&self) {
        Flush::flush(&*self.shared);
    }

    fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::Relaxed)
    }

    fn target_info(&self) -> TargetInfo {
        self.info.clone()
    }

    fn dead(&self) -> Option<String> {
        self.shared.queue.lock().dead.clone()
    }

    fn abandon(&self, why: &str) {
        self.shared.kill(why.to_string());
        (self.shutdown)(true);
    }
}

impl Drop for Client {
    /// Sends what is buffered, closes our half, and waits until the target has applied all of
    /// it and closed its side (and, in-process, until its thread ended).
    fn drop(&mut self) {
        self.shared.flush();
        let dead = {
            let mut q = self.shared.queue.lock();
            q.closing = true;
            q.dead.is_some()
        };
        // A lost target may never answer again: close both ways so the reader stops waiting.
        (self.shutdown)(dead);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        if let Some(f) = self.finish.take() {
            f();
        }
    }
}
