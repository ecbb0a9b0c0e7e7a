//! A target host of its own for the tests: a network namespace joined to this one by a veth
//! pair, whose link can be taken down and up (a real network cut). Dropping it deletes the
//! namespace and the links, even when the test failed.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

fn ip(args: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("ip {args}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub struct NetNs {
    pub name: String,
    /// The host's end of the veth pair.
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl NetNs {
    /// A namespace reachable at `ns_ip`; `None` (with the reason) where iproute2 or the
    /// privilege is missing.
    pub fn new() -> Result<NetNs, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 200) * 8 + n;
        let (a, b) = (id / 250 % 250, id % 250);
        let name = format!("mfs{}-{n}", std::process::id());
        let ns = NetNs {
            host_if: format!("mfh{}x{n}", std::process::id() % 100_000),
            host_ip: format!("10.{}.{}.1", 200 + a % 50, b),
            ns_ip: format!("10.{}.{}.2", 200 + a % 50, b),
            name,
        };
        let peer = format!("{}p", ns.host_if);
        let steps = [
            format!("netns add {}", ns.name),
            format!("link add {} type veth peer name {peer}", ns.host_if),
            format!("link set {peer} netns {}", ns.name),
            format!("addr add {}/30 dev {}", ns.host_ip, ns.host_if),
            format!("link set {} up", ns.host_if),
            format!("-n {} addr add {}/30 dev {peer}", ns.name, ns.ns_ip),
            format!("-n {} link set {peer} up", ns.name),
            format!("-n {} link set lo up", ns.name),
        ];
        for s in &steps {
            if !ip(s) {
                return Err(format!("ip {s} failed"));
            }
        }
        Ok(ns)
    }

    /// Takes the link down (`up` false) or up again.
    pub fn set_link(&self, up: bool) {
        assert!(ip(&format!(
            "link set {} {}",
            self.host_if,
            if up { "up" } else { "down" }
        )));
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        ip(&format!("link del {} 2>/dev/null", self.host_if));
        ip(&format!("netns del {} 2>/dev/null", self.name));
    }
}
