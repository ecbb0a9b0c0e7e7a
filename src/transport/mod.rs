//! Transports: where a target is and how to reach it. `Endpoint` parses `unix:PATH`,
//! `tcp:HOST:PORT`, `ssh://[user@]host[:port]/path` or rsync's `[user@]host:path`, or a plain
//! local directory (served in-process). `Connector` opens sessions to one endpoint, again and
//! again. `client` holds the pipelined connection (`Client`, an `Rpc`), `server` the accept
//! loops and the per-connection request loop, `auth` the token challenge, `ssh` the spawned
//! `ssh` whose standard input and output carry a connection.

pub mod auth;
pub mod client;
pub mod local;
pub mod server;
pub mod ssh;

pub use client::Client;
pub use server::{listen, serve_stream};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A directory on this machine, served in-process.
    Local(PathBuf),
    Unix(PathBuf),
    Tcp(String),
    /// Another machine, through the system's ssh and `mirrorfs serve --stdio` there.
    Ssh(ssh::SshTarget),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, TransportError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(TransportError::BadEndpoint(s.into(), "unix: needs a socket path"));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    return Ok(Endpoint::Tcp(a.into()))
                }
                _ => return Err(TransportError::BadEndpoint(s.into(), "tcp: needs HOST:PORT")),
            }
        }
        if s.is_empty() {
            return Err(TransportError::BadEndpoint(s.into(), "empty target"));
        }
        let bad = |(why, whole): (&'static str, String)| TransportError::BadEndpoint(whole, why);
        if s.starts_with("ssh://") {
            return ssh::parse_url(s).map(Endpoint::Ssh).map_err(bad);
        }
        match ssh::parse_short(s) {
            Some(r) => r.map(Endpoint::Ssh).map_err(bad),
            None => Ok(Endpoint::Local(s.into())),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Local(p) => write!(f, "{}", p.display()),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Ssh(t) => write!(f, "{t}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad target {0:?}: {1}")]
    BadEndpoint(String, &'static str),
    #[error("{0}")]
    Io(String),
    #[error("protocol version mismatch: this mirrorfs speaks version {ours}, the other side speaks version {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("the other side is not a mirrorfs endpoint")]
    NotMirrorfs,
    #[error("target refused the connection: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A session over ssh that did not start, explained (see `ssh::explain`).
    #[error("{0}")]
    Ssh(String),
}

impl TransportError {
    pub fn io(what: impl fmt::Display, e: impl fmt::Display) -> TransportError {
        TransportError::Io(format!("{what}: {e}"))
    }
}

/// A socket that can be split into a reader and a writer, and half-closed.
pub trait Stream: std::io::Read + std::io::Write + Send + Sync + Sized + 'static {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
    fn shutdown_write(&self);
    /// Closes both directions, so a reader blocked on a peer that stopped answering wakes up.
    fn shutdown_both(&self);
    /// Bounds how long one write may block on a peer that stopped reading.
    fn set_write_limit(&self, limit: Option<Duration>);
    /// Bounds how long one read may block (the handshake's deadline).
    fn set_read_limit(&self, limit: Option<Duration>);
}

impl Stream for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn set_write_limit(&self, limit: Option<Duration>) {
        let _ = self.set_write_timeout(limit);
    }
    fn set_read_limit(&self, limit: Option<Duration>) {
        let _ = self.set_read_timeout(limit);
    }
}

impl Stream for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        let _ = self.set_nodelay(true);
        self.try_clone()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn set_write_limit(&self, limit: Option<Duration>) {
        let _ = self.set_write_timeout(limit);
    }
    fn set_read_limit(&self, limit: Option<Duration>) {
        let _ = self.set_read_timeout(limit);
    }
}

/// How an in-process target runs (see `local`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMode {
    /// Applied by the submitting thread: for the mount's single operations.
    Inline,
    /// Applied by a worker thread: for bulk reconciles.
    Threaded,
}

/// How to reach one target, again and again: the endpoint, the token (read once, at start, so
/// a bad token file is an error then and not at every reconnect), the time limit and how an
/// in-process target runs. Each `connect` opens a new session: a new connection, or a local
/// directory opened afresh (a removable disk mounted again is seen as it is now).
pub struct Connector {
    ep: Endpoint,
    key: Option<auth::Key>,
    timeout: Option<Duration>,
    local: LocalMode,
    ssh: ssh::SshOptions,
}

impl Connector {
    pub fn new(
        ep: Endpoint,
        token_file: Option<&Path>,
        timeout: Option<Duration>,
        local: LocalMode,
    ) -> Result<Connector, TransportError> {
        let key = token_file
            .map(auth::load_key)
            .transpose()
            .map_err(|e| TransportError::Io(e.to_string()))?;
        Ok(Connector {
            ep,
            key,
            timeout,
            local,
            ssh: ssh::SshOptions::default(),
        })
    }

    /// How an `ssh` endpoint is reached (`--ssh`, `--remote-mirrorfs`).
    pub fn with_ssh(mut self, o: ssh::SshOptions) -> Connector {
        self.ssh = o;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// Opens a session: a local directory gets an in-process `LocalTarget` (requests move to it
    /// as values), anything else a connection, whose connect and handshake give up after the
    /// time limit.
    pub fn connect(&self) -> Result<std::sync::Arc<dyn crate::rpc::Rpc>, TransportError> {
        if let Endpoint::Local(dir) = &self.ep {
            let fs = crate::fs::LocalFs::new(dir).map_err(|e| TransportError::Io(format!("target: {e}")))?;
            let fs = fs.with_direct_writes(matches!(self.local, LocalMode::Inline));
            let fs: std::sync::Arc<dyn crate::fs::FileSystem> = std::sync::Arc::new(fs);
            let t = match self.local {
                LocalMode::Inline => local::LocalTarget::inline(fs),
                LocalMode::Threaded => {
                    local::LocalTarget::threaded(fs).map_err(|e| TransportError::io("start target", e))?
                }
            };
            return Ok(std::sync::Arc::new(t));
        }
        Ok(std::sync::Arc::new(self.connect_wire()?))
    }

    /// Connects over a socket; a local directory is served by a thread over a socketpair (the
    /// same code path as a remote target, used by the tests of the wire).
    pub fn connect_wire(&self) -> Result<Client, TransportError> {
        let (key, timeout) = (self.key, self.timeout);
        match &self.ep {
            Endpoint::Local(dir) => {
                let fs = crate::fs::LocalFs::new(dir).map_err(|e| TransportError::Io(format!("target: {e}")))?;
                let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| TransportError::io("socketpair", e))?;
                let fs: std::sync::Arc<dyn crate::fs::FileSystem> = std::sync::Arc::new(fs);
                let b2 = b.try_clone().map_err(|e| TransportError::io("socketpair", e))?;
                let server = std::thread::Builder::new()
                    .name("target".into())
                    .spawn(move || {
                        let _ = serve_stream(Box::new(b), Box::new(b2), fs, None, None);
                    })
                    .map_err(|e| TransportError::io("spawn target thread", e))?;
                Client::over_stream(
                    a,
                    key,
                    timeout,
                    Some(Box::new(move || {
                        let _ = server.join();
                    })),
                )
            }
            Endpoint::Ssh(t) => {
                let (stream, process) = ssh::spawn(t, &self.ssh, timeout)?;
                let process = std::sync::Arc::new(parking_lot::Mutex::new(Some(process)));
                let p2 = process.clone();
                let finish: client::Finish = Box::new(move || {
                    if let Some(p) = p2.lock().take() {
                        p.finish()
                    }
                });
                Client::over_stream(stream, key, timeout, Some(finish)).map_err(|e| {
                    let p = process.lock().take();
                    match p {
                        Some(p) => p.explain(t, &self.ssh, e),
                        None => e,
                    }
                })
            }
            Endpoint::Unix(path) => {
                let s = std::os::unix::net::UnixStream::connect(path)
                    .map_err(|e| TransportError::io(format!("connect {}", path.display()), e))?;
                Client::over_stream(s, key, timeout, None)
            }
            Endpoint::Tcp(addr) => Client::over_stream(tcp_connect(addr, timeout)?, key, timeout, None),
        }
    }
}

/// Connects to every address `addr` resolves to in turn, each attempt bounded by `timeout`.
fn tcp_connect(addr: &str, timeout: Option<Duration>) -> Result<std::net::TcpStream, TransportError> {
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| TransportError::io(format!("resolve {addr}"), e))?
        .collect();
    let mut last = None;
    for a in addrs {
        let r = match timeout {
            Some(t) => std::net::TcpStream::connect_timeout(&a, t),
            None => std::net::TcpStream::connect(a),
        };
        match r {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => TransportError::io(format!("connect {addr}"), e),
        None => TransportError::Io(format!("{addr} resolves to no address")),
    })
}

/// Opens a target once (see `Connector::connect`).
pub fn open_target(
    ep: &Endpoint,
    token_file: Option<&Path>,
    timeout: Option<Duration>,
    local: LocalMode,
) -> Result<std::sync::Arc<dyn crate::rpc::Rpc>, TransportError> {
    Connector::new(ep.clone(), token_file, timeout, local)?.connect()
}

/// Connects to a target over a socket once (see `Connector::connect_wire`).
pub fn connect(ep: &Endpoint, token_file: Option<&Path>, timeout: Option<Duration>) -> Result<Client, TransportError> {
    Connector::new(ep.clone(), token_file, timeout, LocalMode::Threaded)?.connect_wire()
}
