//! Targets on "another machine" reached over a real `sshd` on a loopback port (keys, known_hosts
//! and an ssh_config made for the test): sync and mount with `ssh://` and rsync's short form, a
//! killed ssh session caught up without a remount, and each failure a person can act on.

mod common;

use common::mnt::{converge, Mount, Opts};
use common::sshd::{Sshd, HOST};
use common::{assert_same_tree, bin, rich_tree};
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mirrorfs_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run mirrorfs")
}

fn run(args: &[&str]) -> Output {
    mirrorfs_env(args, &[])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The processes whose parent is `pid`, as (pid, state, command name).
fn children(pid: u32) -> Vec<(u32, char, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let (state, ppid) = (
            rest[0].chars().next().unwrap_or('?'),
            rest[1].parse::<u32>().unwrap_or(0),
        );
        if ppid == pid {
            out.push((stat[..open].trim().parse().unwrap_or(0), state, comm));
        }
    }
    out
}

#[test]
fn sync_over_ssh_with_a_url_and_with_rsyncs_short_form() {
    let Some(sshd) = Sshd::start("sync_over_ssh_with_a_url_and_with_rsyncs_short_form") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("far/data dir"));
    fs::create_dir(&src).unwrap();
    fs::create_dir_all(&dst).unwrap();
    rich_tree(&src);
    let mut a = vec!["sync", src.to_str().unwrap(), "--target"];
    let url = format!("ssh://{HOST}{}", dst.display());
    a.push(&url);
    let extra = sshd.args();
    a.extend(extra.iter().map(String::as_str));
    let o = run(&a);
    assert!(o.status.success(), "sync over ssh://: {}", stderr(&o));
    assert_same_tree(&src, &dst);

    // The short form, with ssh chosen through MIRRORFS_SSH; nothing changed, so nothing is sent.
    fs::write(src.join("added"), b"after the first sync").unwrap();
    let short = format!("{HOST}:{}", dst.display());
    let ssh = sshd.ssh_cmd("ssh_config");
    let o = mirrorfs_env(
        &[
            "sync",
            src.to_str().unwrap(),
            "--target",
            &short,
            "--remote-mirrorfs",
            bin(),
        ],
        &[("MIRRORFS_SSH", &ssh)],
    );
    assert!(o.status.success(), "sync over HOST:PATH: {}", stderr(&o));
    assert_same_tree(&src, &dst);
    let o = mirrorfs_env(
        &[
            "verify",
            src.to_str().unwrap(),
            "--target",
            &short,
            "--remote-mirrorfs",
            bin(),
        ],
        &[("MIRRORFS_SSH", &ssh)],
    );
    assert!(
        o.status.success(),
        "verify over ssh finds no difference: {}",
        stderr(&o)
    );
}

#[test]
fn a_mount_over_ssh_survives_a_killed_session() {
    let name = "a_mount_over_ssh_survives_a_killed_session";
    let Some(sshd) = Sshd::start(name) else { return };
    let far = tempfile::tempdir().unwrap();
    let target = format!("ssh://{HOST}{}", far.path().display());
    let ssh = sshd.ssh_cmd("ssh_config");
    let extra = ["--timeout", "3", "--ssh", &ssh, "--remote-mirrorfs", bin()];
    let opts = Opts {
        target: Some(&target),
        extra: &extra,
        ..Opts::default()
    };
    let Some(mut m) = Mount::with(name, opts) else { return };
    let _ = fs::remove_dir(&m.dst);
    m.dst = far.path().to_path_buf();
    let daemon = m.daemon.as_ref().unwrap().id();
    for i in 0..20 {
        fs::write(m.p(&format!("f{i}")), format!("before the cut {i}")).unwrap();
    }
    converge(&m, "over ssh");
    let ssh_children = |d: u32| children(d).into_iter().filter(|c| c.2 == "ssh").collect::<Vec<_>>();
    let first = ssh_children(daemon);
    assert_eq!(first.len(), 1, "one ssh per session: {first:?}");

    // The session dies under a workload.
    let writer = {
        let dir = m.p("during");
        fs::create_dir(&dir).unwrap();
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            for i in 0..200 {
                let t = Instant::now();
                fs::write(
                    dir.join(format!("w{}", i % 30)),
                    format!("round {i}\n").repeat(i % 50 + 1),
                )
                .unwrap();
                slowest = slowest.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            slowest
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    kill_9(first[0].0);
    let slowest = writer.join().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "a write waited {slowest:?} (--timeout 3)"
    );
    let st = m.wait_status("connected", Duration::from_secs(20));
    assert!(st.link.reconnects >= 1, "a fresh ssh session was made: {st:?}");
    converge(&m, "after the killed session, still mounted");
    let now = ssh_children(daemon);
    assert_eq!(now.len(), 1, "one live ssh, the old one reaped: {now:?}");
    assert_ne!(now[0].0, first[0].0, "a new ssh process");
    assert!(
        children(daemon).iter().all(|c| c.1 != 'Z'),
        "no zombie children: {:?}",
        children(daemon)
    );
    m.finish();
}

/// SIGKILL to a process, through kill(1).
fn kill_9(pid: u32) {
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 {pid}");
}

fn sync_fails(src: &Path, target: &str, extra: &[&str]) -> String {
    let mut a = vec!["sync", src.to_str().unwrap(), "--target", target, "--timeout", "5"];
    a.extend_from_slice(extra);
    let o = run(&a);
    assert!(!o.status.success(), "sync {target} {extra:?} succeeded");
    assert_eq!(o.status.code(), Some(2), "an error exits 2: {}", stderr(&o));
    stderr(&o)
}

#[test]
fn each_ssh_failure_says_what_to_do() {
    let Some(sshd) = Sshd::start("each_ssh_failure_says_what_to_do") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let far = tmp.path().join("far");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&far).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let target = format!("ssh://{HOST}{}", far.display());
    let with = |config: &str| sshd.ssh_cmd(config);

    let good = with("ssh_config");
    let e = sync_fails(
        &src,
        &target,
        &["--ssh", &with("ssh_config_wrong_key"), "--remote-mirrorfs", bin()],
    );
    assert!(
        e.contains("authentication to mirror-test failed") && e.contains("ssh said: "),
        "{e}"
    );
    assert!(e.contains("Permission denied"), "ssh's own line: {e}");

    let e = sync_fails(
        &src,
        &target,
        &["--ssh", &with("ssh_config_unknown_host"), "--remote-mirrorfs", bin()],
    );
    assert!(e.contains("host key of mirror-test"), "{e}");
    assert!(
        e.contains("Host key verification failed"),
        "ssh's own line, no silent acceptance: {e}"
    );

    let changed = with("ssh_config_changed_host");
    let e = sync_fails(&src, &target, &["--ssh", &changed, "--remote-mirrorfs", bin()]);
    assert!(e.contains("host key of mirror-test has changed"), "{e}");
    assert!(e.contains("ssh said: "), "ssh's own line: {e}");

    let e = sync_fails(
        &src,
        &target,
        &["--ssh", &good, "--remote-mirrorfs", "/nonexistent/mirrorfs"],
    );
    assert!(
        e.contains("/nonexistent/mirrorfs is not found on mirror-test: install it there, or pass --remote-mirrorfs"),
        "{e}"
    );

    let missing = format!("ssh://{HOST}{}/no/such/dir", tmp.path().display());
    let e = sync_fails(&src, &missing, &["--ssh", &good, "--remote-mirrorfs", bin()]);
    assert!(e.contains("the far side refused") && e.contains("no/such/dir"), "{e}");

    // A far binary of another protocol version: a script that answers with version 99.
    let fake = tmp.path().join("old-mirrorfs");
    fs::write(
        &fake,
        "#!/bin/sh\nprintf '\\015\\000\\000\\000MIRRORFS\\143\\000\\000\\000\\000'\ncat >/dev/null\n",
    )
    .unwrap();
    Command::new("chmod").arg("755").arg(&fake).status().unwrap();
    let e = sync_fails(
        &src,
        &target,
        &["--ssh", &good, "--remote-mirrorfs", fake.to_str().unwrap()],
    );
    assert!(
        e.contains("speaks protocol version 99") && e.contains("version 5"),
        "{e}"
    );
    assert!(e.contains(fake.to_str().unwrap()), "names the far binary: {e}");

    // Nothing listens on this port.
    let closed = format!("ssh://127.0.0.1:{}{}", common::free_port(), far.display());
    let e = sync_fails(&src, &closed, &["--ssh", &good, "--remote-mirrorfs", bin()]);
    assert!(
        e.contains("127.0.0.1 is unreachable") && e.contains("Connection refused"),
        "{e}"
    );

    // rsync's short form is remote: no local directory named after it appears.
    let cwd = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .current_dir(cwd.path())
        .args([
            "sync",
            src.to_str().unwrap(),
            "--target",
            "backup.invalid:mirror",
            "--timeout",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("backup.invalid is unreachable"), "{}", stderr(&o));
    assert_eq!(fs::read_dir(cwd.path()).unwrap().count(), 0, "nothing made locally");
    // A colon after a slash stays local (rsync's rule).
    let o = Command::new(bin())
        .current_dir(cwd.path())
        .args(["sync", src.to_str().unwrap(), "--target", "./a:b", "-q"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_tree(&src, &cwd.path().join("a:b"));
    assert!(
        far.read_dir().unwrap().next().is_none(),
        "the failed attempts wrote nothing"
    );
}

/// The far account of the non-root tests: a user with a shell (test.sh makes it).
const FAR_USER: &str = "mirrorfs-far";

#[test]
fn a_far_side_without_root_over_ssh_with_and_without_fake_super() {
    let name = "a_far_side_without_root_over_ssh_with_and_without_fake_super";
    let Some(sshd) = Sshd::start(name) else { return };
    let Some(owner) = common::user_ids(FAR_USER) else {
        common::mnt::skip(name, &format!("there is no user {FAR_USER} (test.sh makes it)"));
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (src, plain, fake) = (
        tmp.path().join("src"),
        tmp.path().join("plain"),
        tmp.path().join("fake"),
    );
    fs::create_dir(&src).unwrap();
    rich_tree(&src);
    for d in [&plain, &fake] {
        fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(owner.0), Some(owner.1)).unwrap();
    }
    let ssh = sshd.ssh_cmd("ssh_config");
    let to = |d: &Path| format!("ssh://{FAR_USER}@{HOST}{}", d.display());

    // Without --fake-super: what the account cannot hold is counted once, and is no failure.
    let o = run(&[
        "sync",
        src.to_str().unwrap(),
        "--target",
        &to(&plain),
        "--ssh",
        &ssh,
        "--remote-mirrorfs",
        common::bin_for_all(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("not mirrored").count(), 1, "{err}");
    let d = common::tree_diff_unprivileged(&src, &plain, owner);
    assert!(d.is_empty(), "{}", d.join("\n"));

    // With it (passed to the far serve by --remote-option), everything is kept, and a restore
    // gives back the source exactly.
    let o = run(&[
        "sync",
        src.to_str().unwrap(),
        "--target",
        &to(&fake),
        "--ssh",
        &ssh,
        "--remote-mirrorfs",
        common::bin_for_all(),
        "--remote-option=--fake-super",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("not mirrored"), "{err}");
    let restore = tmp.path().join("restore");
    let o = run(&[
        "sync",
        "--fake-super",
        fake.to_str().unwrap(),
        "--target",
        restore.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_tree(&src, &restore);
}
