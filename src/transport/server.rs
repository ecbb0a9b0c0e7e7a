//! The target's side: accept loops for unix and tcp listeners, and `serve_stream`, which runs
//! the handshake and then the request loop of one connection. Requests are applied one at a time
//! in arrival order; answers are buffered and flushed whenever no further request is already
//! waiting, so a pipelined stream costs few writes. A malformed request is answered with an error
//! under its id when the id can be read, and otherwise ends the connection with a log line; an
//! oversized frame ends the connection. Nothing here panics on input.

use super::{auth, TransportError};
use crate::fs::{FileSystem, FsError};
use crate::path::RelPath;
use crate::protocol::{
    self, ClientAuth, ClientHello, FrameError, Request, Response, ServerAuth, ServerHello, MAGIC, PROTOCOL_VERSION,
};
use crate::target::ReplicatorTarget;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// How often a long request reports progress (`KEEPALIVE_ID` frames), so that "no progress for
/// --timeout" on the source means a stuck target, not a big scan or a slow fsync.
const KEEPALIVE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// How long a peer has to finish its handshake (hello and, with a token, its proof).
pub const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections served at once by one `serve`; more are refused at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Makes a stalled handshake's read fail: shuts the socket down, or ends a `--stdio` process.
pub type Cutoff = Box<dyn FnOnce() + Send>;

/// Serves one connection until it closes. Before the handshake is done the peer gets little:
/// frames of a few KiB and `HANDSHAKE_DEADLINE`, after which `cutoff` runs. Returns an error
/// when the handshake failed or the peer sent what is not a request stream; a clean close is
/// `Ok`. Errors are logged too.
pub fn serve_stream(
    r: Box<dyn Read + Send>,
    w: Box<dyn Write + Send>,
    fs: Arc<dyn FileSystem>,
    key: Option<auth::Key>,
    cutoff: Option<Cutoff>,
) -> Result<(), TransportError> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut w = BufWriter::with_capacity(1 << 20, w);
    let (shook, deadline) = crossbeam_channel::bounded::<()>(1);
    if let Some(cutoff) = cutoff {
        std::thread::Builder::new()
            .name("handshake-deadline".into())
            .spawn(move || {
                if let Err(crossbeam_channel::RecvTimeoutError::Timeout) = deadline.recv_timeout(HANDSHAKE_DEADLINE) {
                    log::warn!("a peer did not finish its handshake within {HANDSHAKE_DEADLINE:?}; closing");
                    cutoff();
                }
            })
            .map_err(|e| TransportError::io("spawn", e))?;
    }
    let shaken = handshake(&mut r, &mut w, key, fs.fake_super());
    let _ = shook.send(());
    if let Err(e) = shaken {
        log::warn!("connection refused: {e}");
        let _ = w.flush();
        return Err(e);
    }
    let w = parking_lot::Mutex::new(w);
    // (requests begun, a request is running); the keepalive thread reads them.
    let started = AtomicU64::new(0);
    let busy = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let served = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seen = u64::MAX;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(KEEPALIVE_TICK);
                let now = started.load(Ordering::Relaxed);
                // The same request still running one tick later: say the target is alive.
                if busy.load(Ordering::Relaxed) && now == seen {
                    let mut w = w.lock();
                    let alive: (u64, Response) = (protocol::KEEPALIVE_ID, Ok(protocol::Reply::Done));
                    if protocol::write_frame(&mut *w, &alive).is_err() || w.flush().is_err() {
                        break;
                    }
                }
                seen = now;
            }
        });
        let r = serve_requests(&mut r, &w, fs, &started, &busy);
        done.store(true, Ordering::Relaxed);
        r
    });
    let _ = w.lock().flush();
    served
}

/// The request loop of one connection, after its handshake.
fn serve_requests(
    r: &mut BufReader<Box<dyn Read + Send>>,
    w: &parking_lot::Mutex<BufWriter<Box<dyn Write + Send>>>,
    fs: Arc<dyn FileSystem>,
    started: &AtomicU64,
    busy: &AtomicBool,
) -> Result<(), TransportError> {
    let mut target = ReplicatorTarget::new(fs, RelPath::root()).fenced();
    loop {
        let payload = match protocol::read_payload(r) {
            Ok(p) => p,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => {
                log::error!("closing connection: {e}");
                return Err(TransportError::Protocol(e.to_string()));
            }
        };
        let mut fenced = false;
        let answer: (u64, Response) = match protocol::decode::<(u64, Request)>(&payload) {
            Ok((id, req)) => {
                started.fetch_add(1, Ordering::Relaxed);
                busy.store(true, Ordering::Relaxed);
                let r = target.handle_request(req);
                busy.store(false, Ordering::Relaxed);
                fenced = matches!(&r, Err(e) if crate::session::is_fenced(e));
                (id, r)
            }
            Err(e) => match protocol::peek_id(&payload) {
                Some(id) => {
                    log::error!("malformed request {id}: {e}");
                    (
                        id,
                        Err(FsError::msg(
                            libc::EPROTO,
                            "decode",
                            &RelPath::root(),
                            format!("malformed request: {e}"),
                        )),
                    )
                }
                None => {
                    log::error!("closing connection: malformed frame without a request id: {e}");
                    return Err(TransportError::Protocol(format!("a frame that is not a request: {e}")));
                }
            },
        };
        let mut w = w.lock();
        if let Err(e) = protocol::write_frame(&mut *w, &answer) {
            log::error!("closing connection: cannot answer: {e}");
            return Err(TransportError::Protocol(e.to_string()));
        }
        if fenced {
            log::warn!("closing a connection whose session a newer one replaced");
            return Ok(());
        }
        if r.buffer().is_empty() {
            if let Err(e) = w.flush() {
                log::error!("closing connection: {e}");
                return Err(TransportError::io("answer", e));
            }
        }
    }
}

fn handshake(
    r: &mut impl BufRead,
    w: &mut impl Write,
    key: Option<auth::Key>,
    fake_super: bool,
) -> Result<(), TransportError> {
    let proto = |e: FrameError| TransportError::Protocol(e.to_string());
    let ch: ClientHello = protocol::read_handshake(r).map_err(|e| match e {
        FrameError::Closed => TransportError::Protocol("the peer closed before its hello".into()),
        FrameError::Io(e) => TransportError::io("reading the hello", e),
        _ => TransportError::NotMirrorfs,
    })?;
    if ch.magic != MAGIC {
        return Err(TransportError::NotMirrorfs);
    }
    let mut capabilities = vec!["delta".to_string(), "stage".to_string()];
    if fake_super {
        capabilities.push(crate::rpc::FAKE_SUPER.into());
    }
    let mut hello = ServerHello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        capabilities,
        is_root: crate::fs::running_as_root(),
        challenge: None,
        refusal: None,
    };
    if ch.version != PROTOCOL_VERSION {
        let e = TransportError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: ch.version,
        };
        hello.refusal = Some(e.to_string());
        protocol::write_frame(w, &hello).map_err(proto)?;
        return Err(e);
    }
    let challenge = match key {
        Some(_) => Some(auth::nonce().map_err(|e| TransportError::io("random nonce", e))?),
        None => None,
    };
    hello.challenge = challenge;
    protocol::write_frame(w, &hello).map_err(proto)?;
    w.flush().map_err(|e| TransportError::io("handshake", e))?;
    if let (Some(key), Some(challenge)) = (key, challenge) {
        let ca: ClientAuth = protocol::read_handshake(r).map_err(proto)?;
        let ok = auth::verify(&auth::proof(&key, b"client", &challenge, &ca.nonce), &ca.proof);
        let sa = ServerAuth {
            ok,
            proof: if ok {
                auth::proof(&key, b"server", &ca.nonce, &challenge)
            } else {
                [0; 32]
            },
        };
        protocol::write_frame(w, &sa).map_err(proto)?;
        w.flush().map_err(|e| TransportError::io("handshake", e))?;
        if !ok {
            return Err(TransportError::Auth("client sent a wrong token proof".into()));
        }
    }
    Ok(())
}

/// Where `serve` listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(a)
                .map_err(|e| format!("bad tcp address {a:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("tcp address {a:?} resolves to nothing"))?;
            return Ok(Listen::Tcp(addr));
        }
        Err(format!("--listen takes unix:PATH or tcp:HOST:PORT, not {s:?}"))
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

/// Checks the listen address against the token rule: TCP off loopback needs a token.
pub fn check_listen(l: &Listen, have_token: bool) -> Result<(), String> {
    if let Listen::Tcp(a) = l {
        if !is_loopback(a.ip()) && !have_token {
            return Err(format!(
                "listening on {a}, which is not a loopback address, requires --token-file"
            ));
        }
    }
    Ok(())
}

/// Accepts connections forever, one thread each. `ready` is called once the socket is bound.
pub fn listen(
    l: &Listen,
    dir: &Path,
    token_file: Option<&Path>,
    fake_super: bool,
    ready: impl FnOnce(String),
) -> Result<(), TransportError> {
    check_listen(l, token_file.is_some()).map_err(TransportError::Io)?;
    let key = token_file
        .map(auth::load_key)
        .transpose()
        .map_err(|e| TransportError::Io(e.to_string()))?;
    // Checked now; each connection opens the directory afresh, so a session always sees what
    // is at the path now (a disk mounted again, a directory swapped), not what was there once.
    crate::fs::LocalFs::new(dir).map_err(|e| TransportError::Io(format!("target directory: {e}")))?;
    let dir = dir.to_path_buf();
    match l {
        Listen::Unix(path) => {
            replace_stale_socket(path)?;
            // Made 0600 from the moment it exists (no window before a chmod): serve binds
            // before it starts any other thread, so the process-wide umask touches nothing else.
            let old = crate::sys::set_umask(0o177);
            let bound = UnixListener::bind(path);
            crate::sys::set_umask(old);
            let lis = bound.map_err(|e| TransportError::io(format!("bind {}", path.display()), e))?;
            ready(format!("unix:{}", path.display()));
            accept_loop(lis.incoming(), &dir, key, fake_super);
        }
        Listen::Tcp(addr) => {
            let lis = TcpListener::bind(addr).map_err(|e| TransportError::io(format!("bind {addr}"), e))?;
            let local = lis.local_addr().map_err(|e| TransportError::io("bind", e))?;
            ready(format!("tcp:{local}"));
            accept_loop(lis.incoming(), &dir, key, fake_super);
        }
    }
    Ok(())
}

/// Makes room for a unix socket at `path`: nothing there is fine, and a socket on which nothing
/// answers (left by a server that was killed) is removed. A live socket, or anything that is not
/// a socket, is refused and left alone.
fn replace_stale_socket(path: &Path) -> Result<(), TransportError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TransportError::io(path.display(), e)),
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(TransportError::Io(format!(
            "{} exists and is not a socket; refusing to replace it (remove it, or choose another path)",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(TransportError::Io(format!(
            "{} is held by another running mirrorfs serve; stop it first, or choose another path",
            path.display()
        )));
    }
    log::info!("replacing the stale socket {} (nothing answers on it)", path.display());
    std::fs::remove_file(path).map_err(|e| TransportError::io(format!("removing {}", path.display()), e))
}

/// Serves every accepted connection on its own thread, at most `MAX_CONNECTIONS` at once: one
/// more is told so and closed.
fn accept_loop<S: super::Stream>(
    incoming: impl Iterator<Item = std::io::Result<S>>,
    dir: &Path,
    key: Option<auth::Key>,
    fake_super: bool,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for s in incoming {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept: {e}");
                // Out of file descriptors, say: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            log::warn!("refusing a connection: {MAX_CONNECTIONS} are open already");
            refuse(
                s,
                &format!("the target serves {MAX_CONNECTIONS} connections at most; try again later"),
            );
            continue;
        }
        let fs: Arc<dyn FileSystem> = match crate::fs::LocalFs::new(dir) {
            Ok(fs) => Arc::new(fs.with_fake_super(fake_super)),
            Err(e) => {
                log::error!("refusing a connection: target directory {}: {e}", dir.display());
                refuse(s, &format!("target directory: {e}"));
                continue;
            }
        };
        let (r, cut) = match (s.try_clone_stream(), s.try_clone_stream()) {
            (Ok(r), Ok(cut)) => (r, cut),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("accept: {e}");
                continue;
            }
        };
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        let served = std::thread::Builder::new().name("connection".into()).spawn(move || {
            let cutoff: Cutoff = Box::new(move || cut.shutdown_both());
            let _ = serve_stream(Box::new(r), Box::new(s), fs, key, Some(cutoff));
            open.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = served {
            log::warn!("accept: no thread for a connection: {e}");
        }
    }
}

/// Tells a peer why it is not served (a hello with a refusal) and closes; never blocks long.
fn refuse<S: super::Stream>(mut s: S, why: &str) {
    s.set_write_limit(Some(std::time::Duration::from_millis(200)));
    let hello = ServerHello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        capabilities: Vec::new(),
        is_root: false,
        challenge: None,
        refusal: Some(why.to_string()),
    };
    let _ = protocol::write_frame(&mut s, &hello);
    s.shutdown_write();
}
