//! A far side without root: `serve` runs as the unprivileged user `tests` (through setpriv, as
//! a backup account would). It mirrors everything it can; owners and device nodes it cannot
//! make are counted once, are not failures and not differences, and a mount over it reaches
//! `connected` and exits 0.

mod common;

use common::mnt::{Mount, Opts};
use common::{bin, rich_tree, tree_diff_unprivileged, ChildGuard};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "tests";

/// A mount of a source filled with `rich_tree`, over the target at `target` (served by the
/// test); its `dst` is `dst`, what that target serves.
fn mount_over(name: &str, target: &str, dst: &Path) -> Option<Mount> {
    let opts = Opts {
        target: Some(target),
        before: Some(&|src: &Path| rich_tree(src)),
        ..Opts::default()
    };
    let mut m = Mount::with(name, opts)?;
    let _ = fs::remove_dir(&m.dst);
    m.dst = dst.to_path_buf();
    Some(m)
}

/// `mirrorfs sync --fake-super FROM --target TO` as root: a restore from a fake-super tree.
fn restore(from: &Path, to: &Path) {
    let out = Command::new(bin())
        .arg("sync")
        .arg(from)
        .arg("--target")
        .arg(to)
        .args(["--fake-super", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `mirrorfs serve DIR --listen unix:SOCK` as the user `tests`.
fn serve_unprivileged(test: &str, dir: &Path, sock: &Path) -> Option<(ChildGuard, (u32, u32))> {
    serve_unprivileged_with(test, dir, sock, &[])
}

fn serve_unprivileged_with(test: &str, dir: &Path, sock: &Path, extra: &[&str]) -> Option<(ChildGuard, (u32, u32))> {
    let Some(owner) = common::user_ids(USER) else {
        common::mnt::skip(test, "there is no user `tests` (test.sh makes it)");
        return None;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        common::mnt::skip(test, "setpriv (util-linux) is missing");
        return None;
    }
    std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1)).unwrap();
    std::os::unix::fs::chown(sock.parent().unwrap(), Some(owner.0), Some(owner.1)).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid", USER, "--regid", USER, "--clear-groups", "--"])
        .arg(common::bin_for_all())
        .arg("serve")
        .arg(dir)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv");
    let g = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "serve as {USER} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((g, owner))
}

/// A temp dir the unprivileged user can pass through.
fn open_tempdir() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
    t
}

#[test]
fn sync_to_a_target_without_root_mirrors_what_it_can_and_counts_the_rest() {
    let name = "sync_to_a_target_without_root_mirrors_what_it_can_and_counts_the_rest";
    let tmp = open_tempdir();
    let (src, dst, run) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("run"));
    for d in [&src, &dst, &run] {
        fs::create_dir(d).unwrap();
    }
    rich_tree(&src);
    let sock = run.join("t.sock");
    let Some((_server, owner)) = serve_unprivileged(name, &dst, &sock) else {
        return;
    };
    let target = format!("unix:{}", sock.display());
    let out = Command::new(bin())
        .args(["sync"])
        .arg(&src)
        .args(["--target", &target])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a target without root is not a failure: {err}");
    // Said once, with counts, not once per file.
    assert_eq!(err.matches("not mirrored").count(), 1, "{err}");
    assert!(err.contains("device nodes") && err.contains("the owners of"), "{err}");
    assert!(!err.contains("Operation not permitted"), "no per-file refusals: {err}");
    let d = tree_diff_unprivileged(&src, &dst, owner);
    assert!(
        d.is_empty(),
        "the target differs beyond owners and devices:\n{}",
        d.join("\n")
    );
    // Set-ID bits survive: the files belong to the serving user, who may set them.
    let mode = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("setuid"), 0o4755);
    assert_eq!(mode("setgid"), 0o2750);

    // verify lists no difference (and says what is not mirrored), and a second sync sends nothing.
    let out = Command::new(bin())
        .arg("verify")
        .arg(&src)
        .args(["--target", &target])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "verify: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("0 differences") && err.contains("not mirrored"), "{err}");
    let out = common::sync(&src, &target, &[]);
    assert_eq!(common::field(&out, "operations"), 0, "{out}");
}

#[test]
fn a_mount_over_a_target_without_root_stays_connected() {
    let name = "a_mount_over_a_target_without_root_stays_connected";
    if !common::mnt::fuse_ready(name) {
        return;
    }
    let far = open_tempdir();
    let (dst, run) = (far.path().join("dst"), far.path().join("run"));
    fs::create_dir(&dst).unwrap();
    fs::create_dir(&run).unwrap();
    let sock = run.join("t.sock");
    let Some((_server, owner)) = serve_unprivileged(name, &dst, &sock) else {
        return;
    };
    let target = format!("unix:{}", sock.display());
    let Some(mut m) = mount_over(name, &target, &dst) else {
        return;
    };
    // Through the mount: a device node, a chown, a setgid directory, ordinary files.
    let mk = common::sh_ok;
    mk(&format!("mknod '{}' c 1 5", m.p("zero").display()));
    mk(&format!("chown 4321:8765 '{}'", m.p("owned").display()));
    fs::create_dir(m.p("shared")).unwrap();
    fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    fs::write(m.p("shared/doc"), b"written through the mount").unwrap();
    let st = m.wait_status("connected", Duration::from_secs(10));
    assert_eq!(st.link.repairs, 0, "no refusal, no repair: {st:?}");
    assert!(st.link.last_error.is_none(), "{st:?}");
    let d = tree_diff_unprivileged(&m.src, &dst, owner);
    assert!(d.is_empty(), "while mounted:\n{}", d.join("\n"));
    let log = m.log_text();
    assert_eq!(
        log.matches("not mirrored").count(),
        1,
        "said once, at the start:\n{log}"
    );
    let st = m.unmount();
    assert!(st.success(), "the daemon exits 0: {st}\n{}", m.log_text());
    let d = tree_diff_unprivileged(&m.src, &dst, owner);
    assert!(d.is_empty(), "after unmount:\n{}", d.join("\n"));
}

#[test]
fn fake_super_keeps_what_needs_root_and_a_restore_brings_it_back() {
    let name = "fake_super_keeps_what_needs_root_and_a_restore_brings_it_back";
    let tmp = open_tempdir();
    let (src, dst, run) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("run"));
    for d in [&src, &dst, &run] {
        fs::create_dir(d).unwrap();
    }
    rich_tree(&src);
    // A large file too: it travels staged to the target, and by kernel copy in the restore.
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("big"), &big).unwrap();
    std::os::unix::fs::chown(src.join("big"), Some(777), Some(888)).unwrap();
    fs::set_permissions(src.join("big"), fs::Permissions::from_mode(0o6711)).unwrap();
    let sock = run.join("t.sock");
    let Some((_server, owner)) = serve_unprivileged_with(name, &dst, &sock, &["--fake-super"]) else {
        return;
    };
    let target = format!("unix:{}", sock.display());
    let out = common::sync(&src, &target, &[]);
    assert!(
        !out.contains("not mirrored"),
        "a fake-super target keeps everything: {out}"
    );

    // On the target's disk: every entry is the serving user's, a device node is an empty
    // regular file, a symlink a regular file holding its target; the records say the rest.
    let record = |p: &str| {
        String::from_utf8(
            xattr::get(dst.join(p), "user.mirrorfs.stat")
                .unwrap()
                .expect("a record"),
        )
        .unwrap()
    };
    let meta = |p: &str| fs::symlink_metadata(dst.join(p)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta("chardev").is_file() && meta("chardev").len() == 0);
    assert!(
        record("chardev").starts_with("20") && record("chardev").contains(" 1,3 "),
        "{}",
        record("chardev")
    );
    assert!(meta("dangling").is_file());
    assert_eq!(
        fs::read(dst.join("dangling")).unwrap(),
        fs::read_link(src.join("dangling"))
            .unwrap()
            .as_os_str()
            .as_encoded_bytes()
    );
    assert!(
        record("dangling").starts_with("120777") && record("dangling").ends_with(" 42:43"),
        "{}",
        record("dangling")
    );
    assert!(record("owned").ends_with(" 1234:5678"), "{}", record("owned"));
    assert!(record("setuid").starts_with("104755"), "{}", record("setuid"));
    assert_eq!((meta("owned").uid(), meta("owned").gid()), owner);

    // Through the target, the tree is the source's: verify finds nothing, a re-run sends nothing.
    let o = Command::new(bin())
        .arg("verify")
        .arg(&src)
        .args(["--target", &target])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}{err}", String::from_utf8_lossy(&o.stdout));
    assert!(err.contains("0 differences") && !err.contains("not mirrored"), "{err}");
    let out = common::sync(&src, &target, &[]);
    assert_eq!(common::field(&out, "operations"), 0, "{out}");

    // The restore: read the backup with --fake-super, as root, into a fresh directory.
    let restore_dir = tmp.path().join("restore");
    restore(&dst, &restore_dir);
    common::assert_same_tree(&src, &restore_dir);
}

#[test]
fn a_mount_over_a_fake_super_target_keeps_owners_and_devices() {
    let name = "a_mount_over_a_fake_super_target_keeps_owners_and_devices";
    if !common::mnt::fuse_ready(name) {
        return;
    }
    let far = open_tempdir();
    let (dst, run) = (far.path().join("dst"), far.path().join("run"));
    fs::create_dir(&dst).unwrap();
    fs::create_dir(&run).unwrap();
    let sock = run.join("t.sock");
    let Some((_server, _)) = serve_unprivileged_with(name, &dst, &sock, &["--fake-super"]) else {
        return;
    };
    let target = format!("unix:{}", sock.display());
    let Some(mut m) = mount_over(name, &target, &dst) else {
        return;
    };
    let mk = common::sh_ok;
    mk(&format!("mknod '{}' b 7 9", m.p("loop9").display()));
    mk(&format!("chown 4321:8765 '{}'", m.p("owned").display()));
    std::os::unix::fs::symlink("../somewhere", m.p("new-link")).unwrap();
    let st = m.wait_status("connected", Duration::from_secs(10));
    assert_eq!(st.link.repairs, 0, "{st:?}");
    // Seen through the records (a restore reads them so), the target equals the source.
    let restore_dir = far.path().join("restore");
    restore(&dst, &restore_dir);
    common::assert_same_tree(&m.src, &restore_dir);
    let st = m.unmount();
    assert!(st.success(), "{st}\n{}", m.log_text());
}
