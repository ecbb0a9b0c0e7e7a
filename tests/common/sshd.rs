//! A real `sshd` on a loopback port for the tests, with keys made for the test: a host key, a
//! client key it authorizes, a known_hosts file that knows the host key, and an ssh_config that
//! names the host `mirror-test`. Dropping it kills sshd and deletes everything, even when the
//! test failed.

use super::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const HOST: &str = "mirror-test";

pub struct Sshd {
    _daemon: ChildGuard,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "mirrorfs-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen {}", path.display());
}

impl Sshd {
    /// Starts sshd, or says why it cannot (and, where tests are required, fails).
    pub fn start(test: &str) -> Option<Sshd> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() || Command::new("ssh").arg("-V").output().is_err() {
            super::mnt::skip(
                test,
                "openssh-server or the ssh client is not installed (test.sh installs them)",
            );
            return None;
        }
        let dir = tempfile::Builder::new().prefix("mirrorfs-sshd.").tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("id_ed25519"));
        keygen(&d.join("other_key"));
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys")).unwrap();
        // sshd's privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = super::free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile none\nStrictModes no\nUsePAM no\n\
                 PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nLogLevel ERROR\nMaxStartups 50\n",
                d = d.display()
            ),
        )
        .unwrap();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {host_pub}")).unwrap();
        std::fs::write(d.join("empty_known_hosts"), "").unwrap();
        // The host as another key knew it: what a changed host key looks like.
        let other_pub = std::fs::read_to_string(d.join("other_key.pub")).unwrap();
        std::fs::write(d.join("changed_known_hosts"), format!("[127.0.0.1]:{port} {other_pub}")).unwrap();
        let config = |name: &str, key: &str, known: &str| {
            std::fs::write(
                d.join(name),
                format!(
                    "Host {HOST}\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d}/{key}\n\
                     \x20 IdentitiesOnly yes\n  UserKnownHostsFile {d}/{known}\n  GlobalKnownHostsFile /dev/null\n\
                     \x20 StrictHostKeyChecking yes\n  LogLevel ERROR\n",
                    d = d.display()
                ),
            )
            .unwrap()
        };
        config("ssh_config", "id_ed25519", "known_hosts");
        config("ssh_config_wrong_key", "other_key", "known_hosts");
        config("ssh_config_unknown_host", "id_ed25519", "empty_known_hosts");
        config("ssh_config_changed_host", "id_ed25519", "changed_known_hosts");
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let daemon = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not come up on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Sshd {
            _daemon: daemon,
            dir,
            port,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `--ssh` value that reaches `mirror-test` with config file `config`.
    pub fn ssh_cmd(&self, config: &str) -> String {
        format!("ssh -F {}", self.path(config).display())
    }

    /// `--ssh` and `--remote-mirrorfs` for the good config.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--ssh".into(),
            self.ssh_cmd("ssh_config"),
            "--remote-mirrorfs".into(),
            super::bin().into(),
        ]
    }
}
