//! `Link`: one target, kept across sessions. It owns the connector (how to reach the target
//! again), the current session (an `Rpc` and the claim it made on the target root), the state
//! machine, the set of paths the target has not caught up with, and what `status` reports.
//!
//! ```text
//!   Connected --(connection lost, no progress for --timeout, fenced)--> Disconnected
//!   Connected --(the target refused a change)--> CatchingUp
//!   Disconnected --(reconnected, claim accepted)--> CatchingUp
//!   CatchingUp --(every changed path reconciled, under the order lock)--> Connected
//!   CatchingUp --(connection lost)--> Disconnected
//! ```
//!
//! Only in `Connected` are changes forwarded; in the other states they are added to `changed`
//! (and, with `Policy::Block`, their replies are held until a catch-up has covered them). The
//! catch-up itself, which needs the source and the order lock, is the `Replicator`'s; the link
//! decides how to resume a reconnected session (`session::resume`): the changed paths only, the
//! whole tree, or not at all.
//!
//! Lock order: the replicator's order lock, then `inner`, then `changed`.

use super::changed::Changed;
use crate::change::Change;
use crate::path::RelPath;
use crate::protocol::{Reply, Request};
use crate::reconcile::{Depth, Scope};
use crate::rpc::{Rpc, RpcError, TargetInfo};
use crate::session::{self, Claim, Resume};
use crate::transport::{Connector, Endpoint, TransportError};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// What the user's mutating syscalls meet while the target is away (`--on-disconnect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Succeed at the source; the changed paths are kept for the catch-up.
    #[default]
    Continue,
    /// Return only once the target is back and has caught up past the change.
    Block,
    /// Fail with EIO, leaving the source unchanged.
    Fail,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "continue" => Ok(Policy::Continue),
            "block" => Ok(Policy::Block),
            "fail" => Ok(Policy::Fail),
            _ => Err(format!("{s:?} is not one of continue, block, fail")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Connected,
    CatchingUp,
    Disconnected,
}

impl LinkState {
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connected => "connected",
            LinkState::CatchingUp => "catching-up",
            LinkState::Disconnected => "disconnected",
        }
    }
}

/// One connection (or in-process target) and the claim it made.
pub struct Session {
    pub rpc: Arc<dyn Rpc>,
    pub claim: Claim,
}

struct Inner {
    state: LinkState,
    since: SystemTime,
    session: Option<Arc<Session>>,
    /// A lost session whose in-flight operations have not all settled yet.
    draining: Option<Arc<Session>>,
    /// The claim of the last session that was accepted, to judge the next one by.
    last_claim: Option<Claim>,
    last_error: Option<String>,
    /// Reconnects that succeeded.
    reconnects: u64,
    /// Failed attempts in a row (connects or catch-ups), for the backoff.
    failures: u32,
    /// Marks covered by the last completed catch-up (see `Link::after_caught_up`).
    caught_up: u64,
    /// Replies held under `Policy::Block`, each with the mark it waits for.
    held: Vec<(u64, Held)>,
    /// Set at stop: nothing is held any more.
    released: bool,
}

/// A reply to the kernel that waits for a catch-up.
pub type Held = Box<dyn FnOnce() + Send>;

/// What `status` shows of a link; the names are the JSON keys of `mirrorfs status --json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub target: String,
    /// One of "connected", "catching-up", "disconnected" (`LinkState::name`).
    pub state: String,
    /// When the state began, RFC 3339 in UTC.
    pub since: String,
    pub forwarded_ops: u64,
    /// Content bytes forwarded.
    pub forwarded_bytes: u64,
    pub wait_p50_ms: f64,
    pub wait_p99_ms: f64,
    /// Regions still to catch up (ancestors included).
    pub behind_paths: usize,
    pub reconnects: u64,
    pub repairs: u64,
    pub last_error: Option<String>,
}

/// `t` as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// How long each forwarded operation waited for the target, over the last minute.
#[derive(Default)]
struct Waits {
    recent: VecDeque<(Instant, Duration)>,
}

const WAIT_WINDOW: Duration = Duration::from_secs(60);
const WAIT_KEEP: usize = 1 << 16;

impl Waits {
    fn add(&mut self, d: Duration) {
        let now = Instant::now();
        while self.recent.len() >= WAIT_KEEP
            || self
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WAIT_WINDOW)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, d));
    }

    fn percentiles(&self) -> (f64, f64) {
        let now = Instant::now();
        let mut v: Vec<Duration> = self
            .recent
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WAIT_WINDOW)
            .map(|(_, d)| *d)
            .collect();
        if v.is_empty() {
            return (0.0, 0.0);
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
        (at(0.5), at(0.99))
    }
}

pub struct Link {
    connector: Connector,
    policy: Policy,
    /// What the first session's target said of itself: whether it is root, its capabilities.
    info: TargetInfo,
    inner: Mutex<Inner>,
    /// Woken on every state change.
    changed_state: Condvar,
    changed: Mutex<Changed>,
    /// Marks ever made (each unforwarded operation is one).
    marks: AtomicU64,
    waits: Mutex<Waits>,
    forwarded_ops: AtomicU64,
    forwarded_bytes: AtomicU64,
    repairs: AtomicU64,
}

/// Why a session could not be opened or resumed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("claiming the target root: {0}")]
    Claim(String),
    #[error("{0}")]
    Refused(String),
}

fn claim(rpc: &dyn Rpc, known: Option<[u8; 16]>) -> Result<Claim, LinkError> {
    match rpc.call(Request::Claim { known }) {
        Ok(Reply::Claimed(c)) => Ok(c),
        Ok(other) => Err(LinkError::Claim(format!("unexpected answer {other:?}"))),
        Err(e) => Err(LinkError::Claim(e.to_string())),
    }
}

impl Link {
    /// Opens the first session. Failing here is final: the caller gives up with a message
    /// (retrying forever starts only after a successful start).
    pub fn open(connector: Connector, policy: Policy) -> Result<Link, LinkError> {
        let rpc = connector.connect()?;
        let c = claim(rpc.as_ref(), None)?;
        let info = rpc.target_info();
        Ok(Link {
            connector,
            policy,
            info,
            inner: Mutex::new(Inner {
                state: LinkState::Connected,
                since: SystemTime::now(),
                session: Some(Arc::new(Session { rpc, claim: c.clone() })),
                draining: None,
                last_claim: Some(c),
                last_error: None,
                reconnects: 0,
                failures: 0,
                caught_up: 0,
                held: Vec::new(),
                released: false,
            }),
            changed_state: Condvar::new(),
            changed: Mutex::new(Changed::default()),
            marks: AtomicU64::new(0),
            waits: Mutex::new(Waits::default()),
            forwarded_ops: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        self.connector.endpoint()
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn info(&self) -> &TargetInfo {
        &self.info
    }

    pub fn state(&self) -> LinkState {
        self.inner.lock().state
    }

    /// The session to forward through, when connected.
    pub fn forwarding(&self) -> Option<Arc<Session>> {
        let i = self.inner.lock();
        match i.state {
            LinkState::Connected => i.session.clone(),
            _ => None,
        }
    }

    /// The current session, whatever the state (the catch-up works through it).
    pub fn session(&self) -> Option<Arc<Session>> {
        self.inner.lock().session.clone()
    }

    /// Keeps the regions of `reqs` for the catch-up; returns the mark's number.
    pub fn mark(&self, changes: &[Change]) -> u64 {
        self.changed.lock().add_changes(changes);
        self.marks.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn mark_regions(&self, regions: Vec<(RelPath, Depth)>) -> u64 {
        {
            let mut c = self.changed.lock();
            for (p, d) in regions {
                c.add(p, d);
            }
        }
        self.marks.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn mark_scope(&self, s: Scope) -> u64 {
        self.changed.lock().merge(s);
        self.marks.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The changed paths, taken for a catch-up (put back with `mark_scope` if it fails), and
    /// the number of the last mark they include.
    pub fn take_changed(&self) -> (Scope, u64) {
        let mut c = self.changed.lock();
        let upto = self.marks.load(Ordering::Relaxed);
        (c.take(), upto)
    }

    /// How many regions wait for a catch-up, and whether they span the whole tree.
    pub fn behind(&self) -> (usize, bool) {
        let c = self.changed.lock();
        (c.len(), c.is_full())
    }

    pub fn note_forwarded(&self, ops: u64, bytes: u64, waited: Duration) {
        self.forwarded_ops.fetch_add(ops, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.waits.lock().add(waited);
    }

    pub fn note_repair(&self) {
        self.repairs.fetch_add(1, Ordering::Relaxed);
    }

    fn set_state(&self, i: &mut Inner, s: LinkState) {
        if i.state != s {
            log::info!("target {}: {} -> {}", self.endpoint(), i.state.name(), s.name());
            i.state = s;
            i.since = SystemTime::now();
        }
        self.changed_state.notify_all();
    }

    /// The session broke (connection closed, no progress within the time limit, fenced by a
    /// newer session): forwarding stops and the link reconnects. Only the first report of a
    /// session's loss counts.
    pub fn lost(&self, s: &Arc<Session>, why: &str) {
        let mut i = self.inner.lock();
        if !i.session.as_ref().is_some_and(|c| Arc::ptr_eq(c, s)) {
            return;
        }
        log::error!(
            "target {} lost ({why}); changes go on at the source and are caught up once it is back",
            self.endpoint()
        );
        s.rpc.abandon(why);
        i.draining = i.session.take();
        i.last_error = Some(format!("target {}: {why}", self.endpoint()));
        self.set_state(&mut i, LinkState::Disconnected);
    }

    /// The target refused a change, or a catch-up left paths behind: forwarding stops until a
    /// catch-up succeeds. Returns true when the link was connected until now.
    pub fn fell_behind(&self, why: &str) -> bool {
        let mut i = self.inner.lock();
        i.last_error = Some(why.to_string());
        if i.state == LinkState::Connected {
            self.set_state(&mut i, LinkState::CatchingUp);
            return true;
        }
        false
    }

    /// A catch-up that covered every mark up to `upto` succeeded: forwarding resumes. The
    /// caller holds the order lock, so no change can slip between the catch-up and this.
    pub fn caught_up(&self, upto: u64) {
        let ready = {
            let mut i = self.inner.lock();
            if i.session.is_none() {
                return;
            }
            i.failures = 0;
            i.caught_up = i.caught_up.max(upto);
            i.last_error = None;
            self.set_state(&mut i, LinkState::Connected);
            let covered = i.caught_up;
            let (ready, waiting) = std::mem::take(&mut i.held)
                .into_iter()
                .partition(|(n, _)| *n <= covered);
            i.held = waiting;
            ready
        };
        for (_, send) in ready {
            send();
        }
    }

    /// A catch-up attempt failed (with the session still up): counts toward the backoff.
    pub fn catch_up_failed(&self, why: &str) {
        let mut i = self.inner.lock();
        i.failures += 1;
        i.last_error = Some(why.to_string());
        self.changed_state.notify_all();
    }

    /// With `Policy::Block`: runs `send` once a catch-up has covered mark `n` (at once if one
    /// has, or if the link was released), on the thread that completed it.
    pub fn after_caught_up(&self, n: u64, send: Held) {
        {
            let mut i = self.inner.lock();
            if i.caught_up < n && !i.released {
                i.held.push((n, send));
                return;
            }
        }
        send();
    }

    /// How many replies wait for a catch-up.
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }

    /// At stop: every held reply is sent now, and none is held again.
    pub fn release_held(&self) {
        let held = {
            let mut i = self.inner.lock();
            i.released = true;
            std::mem::take(&mut i.held)
        };
        for (_, send) in held {
            send();
        }
    }

    /// Sleeps until the state may have changed (or `max` passed).
    pub fn wait_change(&self, max: Duration) {
        let mut i = self.inner.lock();
        self.changed_state.wait_for(&mut i, max);
    }

    pub fn wake(&self) {
        self.changed_state.notify_all();
    }

    /// How long to wait before the next attempt: about 100 ms, doubling, up to 5 s.
    pub fn backoff(&self) -> Duration {
        let f = self.inner.lock().failures.min(6);
        Duration::from_millis(100 << f).min(Duration::from_secs(5))
    }

    /// Waits until every operation still in flight on the lost session has settled (each marks
    /// its own paths first), so the catch-up sees them all.
    pub fn drain_lost(&self, stop: &dyn Fn() -> bool) {
        loop {
            let busy = {
                let mut i = self.inner.lock();
                match &i.draining {
                    Some(s) if Arc::strong_count(s) > 1 => true,
                    _ => {
                        i.draining = None;
                        false
                    }
                }
            };
            if !busy || stop() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Tries to open a new session and decides how to resume it. On success the link is
    /// `CatchingUp` through the new session, with the whole tree marked when the target cannot
    /// be trusted to be the one it left.
    pub fn reconnect(&self) -> Result<(), LinkError> {
        let known = self.inner.lock().last_claim.as_ref().and_then(|c| c.generation);
        let attempt = (|| {
            let rpc = self.connector.connect()?;
            let c = claim(rpc.as_ref(), known)?;
            Ok::<_, LinkError>((rpc, c))
        })();
        let (rpc, c) = match attempt {
            Ok(x) => x,
            Err(e) => {
                let mut i = self.inner.lock();
                i.failures += 1;
                i.last_error = Some(format!("target {}: {e}", self.endpoint()));
                return Err(e);
            }
        };
        let mut i = self.inner.lock();
        let decision = match &i.last_claim {
            Some(last) => session::resume(last, &c),
            None => Resume::Whole("no earlier session".into()),
        };
        match decision {
            Resume::Refuse(why) => {
                i.failures += 1;
                let msg = format!("target {}: {why}", self.endpoint());
                if i.last_error.as_deref() != Some(&msg) {
                    log::error!("{msg}");
                }
                i.last_error = Some(msg.clone());
                drop(i);
                drop(rpc);
                return Err(LinkError::Refused(msg));
            }
            Resume::Whole(why) => {
                log::warn!(
                    "target {} is back, but {why}: reconciling the whole tree",
                    self.endpoint()
                );
                self.changed.lock().merge(Scope::full());
            }
            Resume::Changed => {
                let (n, full) = self.behind();
                log::info!(
                    "target {} is back: catching up on {}",
                    self.endpoint(),
                    if full {
                        "the whole tree".to_string()
                    } else {
                        format!("{n} changed regions")
                    }
                );
            }
        }
        i.reconnects += 1;
        i.last_claim = Some(c.clone());
        i.session = Some(Arc::new(Session { rpc, claim: c }));
        self.set_state(&mut i, LinkState::CatchingUp);
        Ok(())
    }

    /// The session must still be alive: a connection whose reader saw it close is lost even
    /// when nothing is being forwarded (status would say "connected" otherwise).
    /// A local target's directory must still be the one the session opened: a removable disk
    /// unmounted leaves its mountpoint behind, a directory may be swapped for another. The
    /// recovery thread checks about once a second; a change ends the session, and the next
    /// claim decides (an empty mountpoint is refused, another directory reconciled whole).
    pub fn check_identity(&self) {
        let Some(s) = self.forwarding() else { return };
        if let Some(why) = s.rpc.dead() {
            self.lost(&s, &why);
            return;
        }
        let Endpoint::Local(dir) = self.endpoint() else { return };
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(dir) {
            Ok(m) if (m.dev(), m.ino()) == (s.claim.dev, s.claim.ino) => {}
            Ok(_) => self.lost(
                &s,
                &format!(
                    "{} is no longer the directory this session opened (a disk unmounted, a directory replaced)",
                    dir.display()
                ),
            ),
            Err(e) => self.lost(&s, &format!("{}: {e}", dir.display())),
        }
    }

    /// Closes the current session (at the end).
    pub fn close(&self) {
        let mut i = self.inner.lock();
        i.session = None;
        i.draining = None;
    }

    pub fn status(&self) -> LinkStatus {
        let (p50, p99) = self.waits.lock().percentiles();
        let (behind, _) = self.behind();
        let i = self.inner.lock();
        LinkStatus {
            target: self.endpoint().to_string(),
            state: i.state.name().into(),
            since: rfc3339(i.since),
            forwarded_ops: self.forwarded_ops.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            wait_p50_ms: p50,
            wait_p99_ms: p99,
            behind_paths: behind,
            reconnects: i.reconnects,
            repairs: self.repairs.load(Ordering::Relaxed),
            last_error: i.last_error.clone(),
        }
    }
}

/// True for an answer that means the session is gone rather than that the target refused.
pub fn is_loss(e: &RpcError) -> bool {
    match e {
        RpcError::Remote(e) => session::is_fenced(e),
        RpcError::Disconnected(_) | RpcError::Timeout(_) => true,
    }
}
