//! End-to-end tests of `mirrorfs sync` / `verify` / `serve` on real directories, with real target
//! processes where a server is involved. Every scenario ends by comparing the whole target tree
//! with the source (content, kind, mode, owner, mtime, symlinks, devices, xattrs, hard links).

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    let dst = d.path().join("dst");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    (d, src, dst)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn initial_sync_makes_an_exact_copy() {
    let (_d, src, dst) = dirs();
    rich_tree(&src);
    let out = sync(&src, s(&dst), &[]);
    assert_same_tree(&src, &dst);
    // Holes stay holes: 32 MiB apparent, only a few blocks allocated.
    assert!(
        allocated(&dst.join("sparse")) < 1 << 20,
        "sparse file was filled: {} bytes allocated",
        allocated(&dst.join("sparse"))
    );
    // Only the data of the sparse file crossed the wire, not its 32 MiB.
    assert!(field(&out, "bytes on the wire") < 4 << 20, "{out}");
    let v = mirrorfs(&[
        OsStr::new("verify"),
        src.as_os_str(),
        OsStr::new("--target"),
        dst.as_os_str(),
    ]);
    assert!(
        v.status.success(),
        "verify after sync: {}",
        String::from_utf8_lossy(&v.stdout)
    );
}

#[test]
fn stale_target_becomes_exact_copy() {
    let (_d, src, dst) = dirs();
    rich_tree(&src);
    // A stale target: wrong content, wrong modes, extra files and trees, wrong kinds.
    fs::write(dst.join("plain.txt"), b"old").unwrap();
    fs::create_dir_all(dst.join("extra/tree")).unwrap();
    fs::write(dst.join("extra/tree/f"), b"x").unwrap();
    fs::write(dst.join("dir"), b"a file where a dir belongs").unwrap();
    fs::create_dir_all(dst.join("setuid/inner")).unwrap();
    std::os::unix::fs::symlink("/etc", dst.join("empty")).unwrap();
    sync(&src, s(&dst), &[]);
    assert_same_tree(&src, &dst);
}

#[test]
fn verify_lists_differences_and_exits_1() {
    let (_d, src, dst) = dirs();
    fs::write(src.join("a"), b"1").unwrap();
    fs::write(src.join("b"), b"2").unwrap();
    sync(&src, s(&dst), &["-q"]);
    fs::write(dst.join("a"), b"9").unwrap();
    set_mtime(
        &dst.join("a"),
        fs::metadata(src.join("a")).unwrap().mtime(),
        fs::metadata(src.join("a")).unwrap().mtime_nsec() as u32,
    );
    fs::set_permissions(dst.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dst.join("c"), b"extra").unwrap();
    let out = mirrorfs(&[
        OsStr::new("verify"),
        src.as_os_str(),
        OsStr::new("--target"),
        dst.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("content differs: a"), "{text}");
    assert!(text.contains("metadata differs: b (mode 0644 vs 0600"), "{text}");
    assert!(text.contains("only on target: c"), "{text}");
}

#[test]
fn unchanged_files_are_not_touched() {
    let (_d, src, dst) = dirs();
    rich_tree(&src);
    sync(&src, s(&dst), &[]);
    let before: Vec<(u64, i64, i64)> = walk_stats(&dst);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let out = sync(&src, s(&dst), &[]);
    assert_eq!(field(&out, "operations"), 0, "{out}");
    assert_eq!(field(&out, "files sent"), 0, "{out}");
    assert_eq!(before, walk_stats(&dst), "an unchanged entry's inode or ctime moved");
    assert_same_tree(&src, &dst);
}

/// (inode, ctime sec, ctime nsec) of every entry, in a stable order.
fn walk_stats(root: &Path) -> Vec<(u64, i64, i64)> {
    let mut out = Vec::new();
    let mut paths = common::all_paths(root);
    paths.sort();
    for p in paths {
        let m = fs::symlink_metadata(&p).unwrap();
        out.push((m.ino(), m.ctime(), m.ctime_nsec()));
    }
    out
}

#[test]
fn metadata_only_change_sends_no_content() {
    let (_d, src, dst) = dirs();
    fs::write(src.join("f"), vec![1u8; 1 << 20]).unwrap();
    fs::write(src.join("g"), b"g").unwrap();
    sync(&src, s(&dst), &["-q"]);
    let ino = fs::metadata(dst.join("f")).unwrap().ino();
    fs::set_permissions(src.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(src.join("f"), Some(77), Some(88)).unwrap();
    set_mtime(&src.join("g"), 1_500_000_000, 5);
    let out = sync(&src, s(&dst), &[]);
    assert_eq!(field(&out, "files sent"), 0, "{out}");
    assert!(field(&out, "bytes on the wire") < 4096, "{out}");
    assert_eq!(
        fs::metadata(dst.join("f")).unwrap().ino(),
        ino,
        "file was rewritten for a metadata change"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn small_change_in_large_file_travels_as_delta() {
    let (_d, src, dst) = dirs();
    let size = 48usize << 20;
    let mut data: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    fs::write(src.join("big"), &data).unwrap();
    sync(&src, s(&dst), &["-q"]);
    // Change 64 KiB in the middle and append a little.
    for b in &mut data[size / 2..size / 2 + 65536] {
        *b = !*b;
    }
    data.extend_from_slice(b"appended");
    fs::write(src.join("big"), &data).unwrap();
    let out = sync(&src, s(&dst), &[]);
    assert_eq!(field(&out, "as deltas"), 1, "{out}");
    let wire = field(&out, "bytes on the wire");
    assert!(
        wire < (size as u64) / 50,
        "delta sent {wire} bytes for a {size}-byte file with 64 KiB changed"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn checksum_mode_finds_same_size_same_mtime_changes() {
    let (_d, src, dst) = dirs();
    fs::write(src.join("f"), b"abcdef").unwrap();
    sync(&src, s(&dst), &["-q"]);
    let m = fs::metadata(src.join("f")).unwrap();
    fs::write(dst.join("f"), b"ABCDEF").unwrap();
    set_mtime(&dst.join("f"), m.mtime(), m.mtime_nsec() as u32);
    sync(&src, s(&dst), &["-q"]);
    assert_eq!(
        fs::read(dst.join("f")).unwrap(),
        b"ABCDEF",
        "plain sync should trust size and mtime"
    );
    sync(&src, s(&dst), &["-q", "--checksum"]);
    assert_same_tree(&src, &dst);
}

#[test]
fn file_dir_and_symlink_conflicts_resolve_to_the_source() {
    let (d, src, dst) = dirs();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), b"must survive").unwrap();
    // Source: dirs where the target has files, files where it has dirs, at depth.
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::write(src.join("a/b/c/f"), b"1").unwrap();
    fs::create_dir_all(src.join("x/y")).unwrap();
    fs::write(src.join("x/y/z"), b"file where target has a dir").unwrap();
    fs::create_dir_all(src.join("viaLink/inner")).unwrap();
    fs::write(src.join("viaLink/inner/f"), b"2").unwrap();
    fs::create_dir_all(dst.join("a")).unwrap();
    fs::write(dst.join("a/b"), b"file where source has dir").unwrap();
    fs::create_dir_all(dst.join("x/y/z/deep")).unwrap();
    fs::write(dst.join("x/y/z/deep/f"), b"old").unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("viaLink")).unwrap();
    sync(&src, s(&dst), &["-q"]);
    assert_same_tree(&src, &dst);
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "something was written through the symlink"
    );
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"must survive");
}

#[test]
fn deletes_what_the_source_lacks_but_refuses_to_empty_from_an_empty_source() {
    let (_d, src, dst) = dirs();
    fs::write(src.join("keep"), b"k").unwrap();
    fs::create_dir_all(dst.join("gone/deep")).unwrap();
    fs::write(dst.join("gone/deep/f"), b"x").unwrap();
    fs::write(dst.join("stale"), b"x").unwrap();
    sync(&src, s(&dst), &["-q"]);
    assert_same_tree(&src, &dst);

    fs::remove_file(src.join("keep")).unwrap();
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        dst.as_os_str(),
        OsStr::new("-q"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-mass-delete"), "{err}");
    assert!(dst.join("keep").exists(), "target was emptied despite the safety halt");
    sync(&src, s(&dst), &["-q", "--allow-mass-delete"]);
    assert_same_tree(&src, &dst);
}

#[test]
fn a_missing_target_directory_is_made_like_rsync_does() {
    let (d, src, _dst) = dirs();
    rich_tree(&src);
    let new = d.path().join("new");
    let out = sync(&src, s(&new), &[]);
    assert!(out.contains("created directory"), "{out}");
    assert_same_tree(&src, &new);
    // Only the last component: a missing parent is an error, and nothing is made.
    let deep = d.path().join("no/such");
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        deep.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.path().join("no").exists());
}

#[test]
fn sync_into_itself_is_refused() {
    let (_d, src, _dst) = dirs();
    fs::create_dir(src.join("inner")).unwrap();
    let inner = src.join("inner");
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        inner.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the source"));
    let out = mirrorfs(&[
        OsStr::new("sync"),
        inner.as_os_str(),
        OsStr::new("--target"),
        src.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the target"));
}

#[test]
fn bad_inputs_get_clear_errors() {
    let (d, src, _dst) = dirs();
    let missing = d.path().join("missing");
    let file = d.path().join("file");
    fs::write(&file, b"").unwrap();
    let cases: Vec<(Vec<&OsStr>, &str)> = vec![
        (
            vec![
                OsStr::new("sync"),
                missing.as_os_str(),
                OsStr::new("--target"),
                OsStr::new("/tmp"),
            ],
            "No such file",
        ),
        (
            vec![
                OsStr::new("sync"),
                file.as_os_str(),
                OsStr::new("--target"),
                OsStr::new("/tmp"),
            ],
            "not a directory",
        ),
        (
            vec![
                OsStr::new("sync"),
                src.as_os_str(),
                OsStr::new("--target"),
                OsStr::new("tcp:nohost"),
            ],
            "HOST:PORT",
        ),
        (
            vec![
                OsStr::new("sync"),
                src.as_os_str(),
                OsStr::new("--target"),
                OsStr::new("unix:"),
            ],
            "socket path",
        ),
        (
            vec![
                OsStr::new("serve"),
                missing.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new("unix:/tmp/x.sock"),
            ],
            "No such file",
        ),
        (
            vec![OsStr::new("serve"), file.as_os_str(), OsStr::new("--stdio")],
            "not a directory",
        ),
        (
            vec![
                OsStr::new("serve"),
                src.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new("tcp:0.0.0.0:0"),
            ],
            "--token-file",
        ),
        (
            vec![
                OsStr::new("serve"),
                src.as_os_str(),
                OsStr::new("--listen"),
                OsStr::new("http://x"),
            ],
            "unix:PATH or tcp:HOST:PORT",
        ),
    ];
    for (args, want) in cases {
        let out = mirrorfs(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
}

#[test]
fn quiet_prints_nothing_and_a_terminal_gets_progress() {
    let (_d, src, dst) = dirs();
    fs::write(src.join("f"), vec![0u8; 1 << 20]).unwrap();
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        dst.as_os_str(),
        OsStr::new("-q"),
    ]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty() && out.stdout.is_empty(),
        "quiet mode printed: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Under a pseudo-terminal (script(1)) the summary and the bar's byte counts appear.
    let dst2 = dst.parent().unwrap().join("dst2");
    fs::create_dir(&dst2).unwrap();
    let cmd = format!("{} sync '{}' --target '{}'", bin(), src.display(), dst2.display());
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("synced in"), "{text}");
    assert_same_tree(&src, &dst2);
}

#[test]
fn serve_over_unix_and_tcp_with_token() {
    let (d, src, dst) = dirs();
    rich_tree(&src);
    let sock = d.path().join("t.sock");
    let sock_arg = format!("unix:{}", sock.display());
    {
        let _server = serve(&dst, &sock_arg, &[]);
        sync(&src, &sock_arg, &["-q"]);
        assert_same_tree(&src, &dst);
        // Over a connection even small files travel as deltas: many files appended to at once,
        // their signatures asked for ahead, their deltas pipelined.
        fs::create_dir(src.join("many")).unwrap();
        for i in 0..100 {
            fs::write(src.join(format!("many/{i}")), vec![b'a' + (i % 26) as u8; 8 << 10]).unwrap();
        }
        sync(&src, &sock_arg, &["-q"]);
        for i in 0..100 {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(src.join(format!("many/{i}")))
                .unwrap();
            std::io::Write::write_all(&mut f, format!("appended {i}\n").as_bytes()).unwrap();
        }
        let out = sync(&src, &sock_arg, &[]);
        assert!(out.contains("100 files sent (100 as deltas)"), "{out}");
        assert!(field(&out, "bytes on the wire") < 100 * (4 << 10), "{out}");
        assert_same_tree(&src, &dst);
    }
    // TCP on loopback with a token; a wrong token is refused and changes nothing.
    let token = d.path().join("token");
    fs::write(&token, "correct horse battery staple 123\n").unwrap();
    let wrong = d.path().join("wrong");
    fs::write(&wrong, "incorrect horse battery staple 9\n").unwrap();
    let dst2 = d.path().join("dst2");
    fs::create_dir(&dst2).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = serve(&dst2, &format!("tcp:{addr}"), &["--token-file", s(&token)]);
    let target = format!("tcp:{addr}");
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(&target),
        OsStr::new("--token-file"),
        wrong.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mirrorfs(&[
        OsStr::new("sync"),
        src.as_os_str(),
        OsStr::new("--target"),
        OsStr::new(&target),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires a token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_dir(&dst2).unwrap().count(), 0);
    sync(&src, &target, &["-q", "--token-file", s(&token)]);
    assert_same_tree(&src, &dst2);
}

#[test]
fn killed_target_leaves_no_half_written_file_and_the_next_sync_finishes() {
    let (d, src, dst) = dirs();
    let sock = d.path().join("t.sock");
    let sock_arg = format!("unix:{}", sock.display());
    fs::write(dst.join("big"), b"old version").unwrap();
    let size = 256usize << 20;
    let f = fs::File::create(src.join("big")).unwrap();
    f.set_len(size as u64).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..(size >> 20) {
        f.write_all_at(&vec![(i % 251) as u8 + 1; 1 << 20], (i as u64) << 20)
            .unwrap();
    }
    drop(f);
    let mut server = serve(&dst, &sock_arg, &[]);
    let mut client = std::process::Command::new(bin())
        .args(["sync", s(&src), "--target", &sock_arg, "-q"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the staged temporary file to appear and grow, then kill the target hard.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tmp = fs::read_dir(&dst)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(".mirrorfs-tmp."));
        if tmp.is_some_and(|t| t.metadata().map(|m| m.len() > 16 << 20).unwrap_or(false)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no temporary file appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let status = client.wait().unwrap();
    assert!(!status.success(), "sync should fail when its target dies");
    assert_eq!(
        fs::read(dst.join("big")).unwrap(),
        b"old version",
        "the real name holds a half-written file"
    );
    let _server = serve(&dst, &sock_arg, &[]);
    sync(&src, &sock_arg, &["-q"]);
    assert_same_tree(&src, &dst);
}
