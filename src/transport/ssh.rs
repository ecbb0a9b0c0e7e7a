//! Reaching a target through the system's `ssh`, as rsync and mutagen do: the user's keys, agent,
//! `~/.ssh/config`, ProxyJump and known_hosts then just work. Each session runs
//! `ssh [--ssh options] [mirrorfs's options] [-p PORT] [USER@]HOST '<remote mirrorfs> serve --stdio PATH'`
//! with a socket pair as its standard input and output, so the connection is an ordinary
//! `UnixStream` to the rest of the transport. ssh keeps the first value it sees for an option,
//! so the user's own options (from `--ssh`) come first and win. ssh's standard error is kept
//! (its last lines) to explain a failure in terms a person can act on; the process is reaped
//! when the session ends, so no zombie is left behind.

use super::TransportError;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A target on another machine: `ssh://[user@]host[:port]/path` or `[user@]host:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// Absolute, or relative to the remote home (rsync's short form).
    pub path: String,
}

impl fmt::Display for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        // A port comes only with `ssh://`, whose path is absolute.
        match (self.port, self.path.starts_with('/')) {
            (Some(p), _) => write!(f, "ssh://{user}{host}:{p}{}", self.path),
            (None, true) => write!(f, "ssh://{user}{host}{}", self.path),
            (None, false) => write!(f, "{user}{host}:{}", self.path),
        }
    }
}

type Bad = (&'static str, String);

fn check_host(host: &str, whole: &str) -> Result<(), Bad> {
    if host.is_empty() {
        return Err(("no host", whole.into()));
    }
    // ssh would read `-oProxyCommand=…` as an option.
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(("the host name is not valid", whole.into()));
    }
    Ok(())
}

fn check_user(user: &str, whole: &str) -> Result<(), Bad> {
    if user.is_empty() || user.starts_with('-') || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(("the user name is not valid", whole.into()));
    }
    Ok(())
}

/// Splits `[user@]` off a host part.
fn split_user<'a>(s: &'a str, whole: &str) -> Result<(Option<String>, &'a str), Bad> {
    match s.rsplit_once('@') {
        Some((u, h)) => {
            check_user(u, whole)?;
            Ok((Some(u.to_string()), h))
        }
        None => Ok((None, s)),
    }
}

/// `ssh://[user@]host[:port]/absolute/path`.
pub fn parse_url(s: &str) -> Result<SshTarget, Bad> {
    let rest = s.strip_prefix("ssh://").expect("an ssh:// target");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => return Err(("ssh:// needs an absolute path: ssh://[user@]host[:port]/path", s.into())),
    };
    let (user, hostport) = split_user(authority, s)?;
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or(("an IPv6 host is written [addr]", s.to_string()))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or(("a port follows the host after ':'", s.to_string()))?,
                ),
            ),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    check_host(host, s)?;
    let port = port
        .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0))
        .map(|p| p.ok_or(("the port is not a number from 1 to 65535", s.to_string())))
        .transpose()?;
    Ok(SshTarget {
        user,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// rsync's short form `[user@]host:path`, or `None` when `s` names a local path: it has no
/// colon, or a slash comes before its first colon (`./a:b`, `/mnt/a:b`).
pub fn parse_short(s: &str) -> Option<Result<SshTarget, Bad>> {
    // `[::1]:path` and `user@[::1]:path`: the colon that ends the host follows the bracket.
    let (host_part, path) = if let Some(open) = s.find('[').filter(|i| !s[..*i].contains(['/', ':'])) {
        let close = open + s[open..].find(']')?;
        let path = s[close + 1..].strip_prefix(':')?;
        (&s[..close + 1], path)
    } else {
        let colon = s.find(':')?;
        if s[..colon].contains('/') {
            return None;
        }
        (&s[..colon], &s[colon + 1..])
    };
    Some((|| {
        if path.starts_with(':') {
            return Err((
                "host::module is rsync's daemon syntax, which mirrorfs does not speak",
                s.to_string(),
            ));
        }
        let (user, host) = split_user(host_part, s)?;
        let host = match host.strip_prefix('[') {
            Some(v6) => v6
                .strip_suffix(']')
                .ok_or(("an IPv6 host is written [addr]", s.to_string()))?,
            None => host,
        };
        check_host(host, s)?;
        // `host:~/x` is `x` in the remote home.
        let path = path.strip_prefix("~/").unwrap_or(path);
        let path = if path.is_empty() || path == "~" { "." } else { path };
        Ok(SshTarget {
            user,
            host: host.to_string(),
            port: None,
            path: path.to_string(),
        })
    })())
}

/// How to run ssh: the command and its own options (`--ssh`, `MIRRORFS_SSH`) and the far
/// side's mirrorfs (`--remote-mirrorfs`), a command for the far shell like rsync's
/// `--rsync-path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshOptions {
    pub command: Vec<String>,
    pub remote_mirrorfs: String,
    /// Options for the far `serve`, each quoted for the far shell (`--remote-option`).
    pub remote_options: Vec<String>,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            command: vec!["ssh".into()],
            remote_mirrorfs: "mirrorfs".into(),
            remote_options: Vec::new(),
        }
    }
}

impl SshOptions {
    /// `ssh` (or `cmd`, split into words as a shell would, quotes and backslashes included)
    /// and the far mirrorfs (default: `mirrorfs` on the far PATH).
    pub fn new(cmd: Option<&str>, remote: Option<&str>) -> Result<SshOptions, String> {
        let mut o = SshOptions::default();
        if let Some(c) = cmd {
            o.command = split_words(c).map_err(|e| format!("--ssh {c:?}: {e}"))?;
            if o.command.is_empty() {
                return Err("--ssh is empty".into());
            }
        }
        if let Some(r) = remote {
            if r.trim().is_empty() {
                return Err("--remote-mirrorfs is empty".into());
            }
            o.remote_mirrorfs = r.to_string();
        }
        Ok(o)
    }
}

/// Splits a command line into words: whitespace separates, '…' and "…" quote, \ escapes.
pub fn split_words(s: &str) -> Result<Vec<String>, &'static str> {
    let (mut words, mut cur, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("an unclosed ' quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c)
                            }
                            None => return Err("an unclosed \" quote"),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("an unclosed \" quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.push(chars.next().ok_or("a trailing backslash")?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Quotes `s` for a POSIX shell (the far side's, which runs the remote command).
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line for one session (pure, so it is tested with tables).
pub fn argv(t: &SshTarget, o: &SshOptions, timeout: Option<Duration>) -> Vec<String> {
    let mut a = o.command.clone();
    a.extend(["-o".into(), "BatchMode=yes".into()]);
    if let Some(t) = timeout {
        let secs = t.as_secs_f64().ceil().max(1.0) as u64;
        // A dead link is noticed within about --timeout: three missed probes.
        let interval = secs.div_ceil(3).max(1);
        a.extend(["-o".into(), format!("ConnectTimeout={secs}")]);
        a.extend(["-o".into(), format!("ServerAliveInterval={interval}")]);
        a.extend(["-o".into(), "ServerAliveCountMax=3".into()]);
    }
    if let Some(p) = t.port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if let Some(u) = &t.user {
        a.extend(["-l".into(), u.clone()]);
    }
    a.push(t.host.clone());
    let mut remote = format!("{} serve --stdio", o.remote_mirrorfs);
    for opt in &o.remote_options {
        remote.push(' ');
        remote.push_str(&quote(opt));
    }
    remote.push_str(" -- ");
    remote.push_str(&quote(&t.path));
    a.push(remote);
    a
}

/// A running ssh: the child and the last lines of its standard error.
pub struct SshProcess {
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// Lines of ssh's standard error kept to explain a failure.
const KEPT_LINES: usize = 20;

/// Starts ssh for `t`; returns our end of its standard input and output.
pub fn spawn(
    t: &SshTarget,
    o: &SshOptions,
    timeout: Option<Duration>,
) -> Result<(UnixStream, SshProcess), TransportError> {
    let argv = argv(t, o, timeout);
    let (ours, theirs) = UnixStream::pair().map_err(|e| TransportError::io("socketpair", e))?;
    let theirs_out = theirs.try_clone().map_err(|e| TransportError::io("socketpair", e))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::from(OwnedFd::from(theirs_out)))
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C meant for mirrorfs does not cut the link while
        // mirrorfs finishes its work; mirrorfs ends ssh itself.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        TransportError::Io(format!(
            "could not run {:?}: {e} (is ssh installed? --ssh names another command)",
            argv[0]
        ))
    })?;
    let stderr = Arc::new(Mutex::new(VecDeque::new()));
    let pipe = child.stderr.take().expect("piped");
    let kept = stderr.clone();
    let reader = std::thread::Builder::new()
        .name("ssh-stderr".into())
        .spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                log::debug!("ssh: {line}");
                let mut k = kept.lock();
                if k.len() == KEPT_LINES {
                    k.pop_front();
                }
                k.push_back(line);
            }
        })
        .map_err(|e| TransportError::io("spawn ssh stderr reader", e))?;
    Ok((
        ours,
        SshProcess {
            child,
            stderr,
            reader: Some(reader),
        },
    ))
}

impl SshProcess {
    /// Waits up to `grace` for ssh to exit by itself, then ends it; reaps it either way.
    fn end(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => break,
            }
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// At the end of a session: ssh has seen its input close; it is given a moment to say
    /// goodbye to the far side, then ended.
    pub fn finish(mut self) {
        self.end(Duration::from_secs(1));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    /// Turns a failed start into a message a person can act on, with ssh's own last line.
    pub fn explain(mut self, t: &SshTarget, o: &SshOptions, e: TransportError) -> TransportError {
        let status = self.end(Duration::from_secs(2));
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines: Vec<String> = self.stderr.lock().iter().cloned().collect();
        TransportError::Ssh(explain(t, o, status.and_then(|s| s.code()), &lines, &e))
    }
}

/// The message for a session that failed to start (pure, tested with tables).
pub fn explain(t: &SshTarget, o: &SshOptions, code: Option<i32>, stderr: &[String], e: &TransportError) -> String {
    let all = stderr.join("\n");
    let has = |s: &str| all.contains(s);
    let host = &t.host;
    let remote = &o.remote_mirrorfs;
    let what = if let TransportError::VersionMismatch { ours, theirs } = e {
        format!(
            "{remote} on {host} speaks protocol version {theirs}, this mirrorfs speaks version {ours}: \
             install the same mirrorfs there, or pass --remote-mirrorfs"
        )
    } else if has("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        format!("the host key of {host} has changed; ssh refused to connect (check known_hosts)")
    } else if has("Host key verification failed") || has("No ED25519 host key is known") || has("host key is known") {
        format!("the host key of {host} is not known (or has changed); ssh refused to connect: add it to known_hosts first, for example by running ssh {host} once")
    } else if has("Permission denied") || has("Too many authentication failures") {
        format!("authentication to {host} failed")
    } else if has("Could not resolve hostname")
        || has("Connection refused")
        || has("Connection timed out")
        || has("No route to host")
        || has("Network is unreachable")
        || has("Operation timed out")
        || has("connect to host")
    {
        format!("{host} is unreachable")
    } else if code == Some(127) || has("command not found") || has(&format!("{remote}: not found")) {
        format!("{remote} is not found on {host}: install it there, or pass --remote-mirrorfs")
    } else if code == Some(126) {
        format!("{remote} on {host} cannot be run (is it executable?)")
    } else if let Some(far) = stderr.iter().rev().find(|l| l.starts_with("mirrorfs: error: ")) {
        format!("the far side refused: {}", far.trim_start_matches("mirrorfs: error: "))
    } else {
        format!("the far side did not start a mirrorfs session ({e})")
    };
    match stderr.iter().rev().find(|l| !l.trim().is_empty()) {
        Some(last) => format!("{what}\n  ssh said: {last}"),
        None => match code {
            Some(c) => format!("{what} (ssh exited with status {c})"),
            None => what,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> SshTarget {
        SshTarget {
            user: user.map(str::to_string),
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn urls() {
        let ok = [
            ("ssh://h/p", t(None, "h", None, "/p")),
            ("ssh://u@h:2222/a/b", t(Some("u"), "h", Some(2222), "/a/b")),
            ("ssh://[::1]/x", t(None, "::1", None, "/x")),
            ("ssh://u@[fe80::1]:22/x y", t(Some("u"), "fe80::1", Some(22), "/x y")),
        ];
        for (s, want) in ok {
            assert_eq!(parse_url(s).unwrap(), want, "{s}");
        }
        for bad in [
            "ssh://h",
            "ssh:///p",
            "ssh://h:0/p",
            "ssh://h:x/p",
            "ssh://-oProxyCommand=x/p",
            "ssh://[::1/p",
            "ssh://@h/p",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn short_forms() {
        let ok = [
            ("backup:mirror", t(None, "backup", None, "mirror")),
            ("u@backup:/srv/m", t(Some("u"), "backup", None, "/srv/m")),
            ("backup:", t(None, "backup", None, ".")),
            ("backup:~/m", t(None, "backup", None, "m")),
            ("[::1]:m", t(None, "::1", None, "m")),
            ("u@[::1]:/m", t(Some("u"), "::1", None, "/m")),
        ];
        for (s, want) in ok {
            assert_eq!(parse_short(s).unwrap().unwrap(), want, "{s}");
        }
        // Local paths.
        for local in ["plain", "./a:b", "/mnt/a:b", "dir/x:y", "../up:x"] {
            assert!(parse_short(local).is_none(), "{local} taken for a remote");
        }
        for bad in ["-oProxyCommand=x:p", ":p", "host::module", "u @h:p"] {
            assert!(matches!(parse_short(bad), Some(Err(_))), "{bad} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["ssh://u@h:2222/a", "ssh://h/a", "u@h:rel", "[::1]:rel", "ssh://[::1]/x"] {
            let parsed = if s.starts_with("ssh://") {
                parse_url(s).unwrap()
            } else {
                parse_short(s).unwrap().unwrap()
            };
            assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn words_and_quotes() {
        let cases: [(&str, &[&str]); 5] = [
            ("ssh", &["ssh"]),
            ("ssh -F ./cfg -i key", &["ssh", "-F", "./cfg", "-i", "key"]),
            (
                "ssh -o 'ProxyCommand nc %h %p'",
                &["ssh", "-o", "ProxyCommand nc %h %p"],
            ),
            (r#"ssh -i "my key" a\ b"#, &["ssh", "-i", "my key", "a b"]),
            ("  ssh   -v  ", &["ssh", "-v"]),
        ];
        for (s, want) in cases {
            assert_eq!(split_words(s).unwrap(), want, "{s}");
        }
        assert!(split_words("ssh 'open").is_err());
        assert_eq!(quote("/srv/data"), "/srv/data");
        assert_eq!(quote("it's here"), r"'it'\''s here'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn command_lines() {
        let mut o = SshOptions::new(Some("ssh -F cfg -o ConnectTimeout=9"), Some("/opt/mirrorfs")).unwrap();
        o.remote_options = vec!["--fake-super".into()];
        let a = argv(
            &t(Some("u"), "h", Some(2222), "/srv/my data"),
            &o,
            Some(Duration::from_secs(30)),
        );
        assert_eq!(
            a,
            [
                "ssh",
                "-F",
                "cfg",
                "-o",
                "ConnectTimeout=9",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=30",
                "-o",
                "ServerAliveInterval=10",
                "-o",
                "ServerAliveCountMax=3",
                "-p",
                "2222",
                "-l",
                "u",
                "h",
                "/opt/mirrorfs serve --stdio --fake-super -- '/srv/my data'",
            ]
        );
        // The user's ConnectTimeout comes first, so ssh keeps it.
        let first = a.iter().position(|x| x.starts_with("ConnectTimeout")).unwrap();
        assert_eq!(a[first], "ConnectTimeout=9");
    }

    #[test]
    fn failures_are_explained() {
        let target = t(None, "backup", None, "m");
        let o = SshOptions::default();
        let closed = TransportError::Protocol("during handshake: connection closed".into());
        let cases: [(Option<i32>, &str, &str); 7] = [
            (
                Some(255),
                "root@backup: Permission denied (publickey).",
                "authentication to backup failed",
            ),
            (
                Some(255),
                "ssh: connect to host backup port 22: Connection refused",
                "backup is unreachable",
            ),
            (
                Some(255),
                "ssh: Could not resolve hostname backup: Name or service not known",
                "backup is unreachable",
            ),
            (
                Some(255),
                "Host key verification failed.",
                "host key of backup is not known",
            ),
            (
                Some(127),
                "bash: line 1: mirrorfs: command not found",
                "mirrorfs is not found on backup",
            ),
            (
                Some(2),
                "mirrorfs: error: target directory m: No such file or directory (os error 2)",
                "the far side refused: target directory m: No such file",
            ),
            (Some(0), "", "did not start a mirrorfs session"),
        ];
        for (code, line, want) in cases {
            let lines: Vec<String> = if line.is_empty() { vec![] } else { vec![line.into()] };
            let m = explain(&target, &o, code, &lines, &closed);
            assert!(m.contains(want), "{line:?}: {m}");
            if !line.is_empty() {
                assert!(
                    m.contains(&format!("ssh said: {line}")),
                    "ssh's own line is attached: {m}"
                );
            }
        }
        let v = TransportError::VersionMismatch { ours: 5, theirs: 4 };
        let m = explain(&target, &o, None, &[], &v);
        assert!(
            m.contains("version 4") && m.contains("version 5") && m.contains("mirrorfs on backup"),
            "{m}"
        );
    }
}
