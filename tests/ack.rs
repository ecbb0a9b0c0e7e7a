//! End-to-end tests of `mirrorfs mount --ack=fsync`: writes return from the kernel's page cache,
//! and `fsync` and `close` return only once the target has the file's data and mtime. Each
//! scenario runs a real mount over a real `serve` process and ends by comparing the whole target
//! tree with the source. The default's promise (every write on the target when it returns) is
//! `every_write_is_on_the_target_when_it_returns` in tests/mount.rs.

mod common;

use common::mnt::{Mount, Opts, Resume};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ACK_FSYNC: &[&str] = &["--ack", "fsync", "--timeout", "30"];

/// Without forking: a forked child closes the test's open files when it execs, and with the
/// writeback cache every close waits for the target.
fn signal(sig: i32, pid: &str) {
    mirrorfs::sys::send_signal(pid.parse().unwrap(), sig).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u64 * 131 + seed as u64) as u8).collect()
}

/// The target's copy of `name` has `want` as its content, and the size and mtime the mount
/// shows for it.
fn on_target(m: &Mount, name: &str, want: &[u8], when: &str) {
    let got = fs::read(m.dst.join(name)).unwrap();
    assert!(
        got == want,
        "{when}: the target's {name} is not what was written ({} bytes, {} expected); log:\n{}",
        got.len(),
        want.len(),
        m.log_text()
    );
    let (s, t) = (
        fs::metadata(m.p(name)).unwrap(),
        fs::metadata(m.dst.join(name)).unwrap(),
    );
    assert_eq!(
        (s.mtime(), s.mtime_nsec()),
        (t.mtime(), t.mtime_nsec()),
        "{when}: the mtime of {name}"
    );
}

#[test]
fn writes_return_from_the_page_cache_and_fsync_and_close_wait_for_the_target() {
    let test = "writes_return_from_the_page_cache_and_fsync_and_close_wait_for_the_target";
    let opts = Opts {
        extra: ACK_FSYNC,
        ..Opts::default()
    };
    let Some(m) = Mount::with(test, opts) else { return };
    let (_, st) = m.status();
    assert_eq!(
        st.expect("listed").ack.as_deref(),
        Some("fsync"),
        "status names the promise"
    );
    fs::write(m.p("synced"), b"before").unwrap();
    fs::write(m.p("closed"), b"before").unwrap();
    assert_eq!(fs::read(m.dst.join("closed")).unwrap(), b"before", "a close waits");
    let synced = OpenOptions::new().write(true).open(m.p("synced")).unwrap();
    let closed = OpenOptions::new().write(true).open(m.p("closed")).unwrap();
    let mut want = Vec::new();

    let server = m.server.as_ref().unwrap().0.id().to_string();
    signal(libc::SIGSTOP, &server);
    let resume = Resume(server.clone());
    // 2 MiB each, in 64 KiB writes and small unaligned ones, while the target cannot answer.
    let t = Instant::now();
    for f in [&synced, &closed] {
        let data = pattern(2 << 20, 7);
        for (i, chunk) in data.chunks(65536).enumerate() {
            f.write_all_at(chunk, (i * 65536) as u64).unwrap();
        }
        f.write_all_at(b"unaligned", 4097).unwrap();
        want = data;
        want[4097..4106].copy_from_slice(b"unaligned");
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "writes waited {took:?} for a stopped target: they should return from the page cache"
    );
    // Nothing else may ask the daemon anything now: the kernel may have begun writing the pages
    // back already, and those writes occupy the daemon's threads until the target answers.

    // fsync and close must wait for the stopped target.
    let fsync = std::thread::spawn(move || {
        synced.sync_all().unwrap();
        synced
    });
    let close = std::thread::spawn(move || drop(closed));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!fsync.is_finished(), "fsync returned while the target was stopped");
    assert!(!close.is_finished(), "close returned while the target was stopped");
    signal(libc::SIGCONT, &server);
    drop(resume);
    let synced = fsync.join().unwrap();
    on_target(&m, "synced", &want, "right after fsync returned");
    close.join().unwrap();
    on_target(&m, "closed", &want, "right after close returned");

    // An fdatasync, and more writes after it.
    synced.write_all_at(b"tail", 2 << 20).unwrap();
    synced.sync_data().unwrap();
    want.extend_from_slice(b"tail");
    let got = fs::read(m.dst.join("synced")).unwrap();
    assert!(got == want, "right after fdatasync returned: {} bytes", got.len());
    drop(synced);
    on_target(&m, "synced", &want, "right after the last close");
    m.finish();
}

/// Writes that are still in the page cache when the file is renamed, unlinked or linked land
/// where the file is when they are written back: a renamed file's data follows it, an unlinked
/// file's data never reaches the target.
#[test]
fn cached_writes_follow_renames_and_never_land_in_removed_files() {
    let opts = Opts {
        extra: ACK_FSYNC,
        ..Opts::default()
    };
    let Some(m) = Mount::with("cached_writes_follow_renames_and_never_land_in_removed_files", opts) else {
        return;
    };
    fs::create_dir(m.p("d")).unwrap();
    let mut moved = File::create(m.p("d/old")).unwrap();
    moved.write_all(&pattern(300_000, 1)).unwrap();
    fs::rename(m.p("d/old"), m.p("new")).unwrap();
    moved.write_all(b"after the rename").unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    drop(moved);
    let mut want = pattern(300_000, 1);
    want.extend_from_slice(b"after the rename");
    on_target(&m, "new", &want, "a renamed file at close");
    assert!(!m.dst.join("d").exists());

    let mut gone = File::create(m.p("gone")).unwrap();
    gone.write_all(&pattern(100_000, 2)).unwrap();
    fs::remove_file(m.p("gone")).unwrap();
    fs::write(m.p("gone"), b"the new file").unwrap();
    gone.write_all(b"more").unwrap();
    drop(gone);
    assert_eq!(fs::read(m.dst.join("gone")).unwrap(), b"the new file");

    let mut linked = File::create(m.p("a")).unwrap();
    linked.write_all(b"one").unwrap();
    fs::hard_link(m.p("a"), m.p("b")).unwrap();
    linked.write_all(b" two").unwrap();
    drop(linked);
    assert_eq!(fs::read(m.dst.join("b")).unwrap(), b"one two");
    m.finish();
}

/// A real workload under --ack=fsync: a tree extracted with tar (which sets every mtime after
/// writing), files rewritten, appended, truncated and written through a shared mmap; the target
/// must equal the source in everything, mtimes included.
#[test]
fn a_workload_mirrors_exactly() {
    let opts = Opts {
        extra: ACK_FSYNC,
        ..Opts::default()
    };
    let Some(m) = Mount::with("a_workload_mirrors_exactly", opts) else {
        return;
    };
    let tar = m.tmp.path().join("tree.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .args(["-C", "/usr/include", "linux", "asm-generic"])
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    // Rewritten in place, appended, truncated, extended with a hole.
    let f = OpenOptions::new().write(true).open(m.p("linux/fs.h")).unwrap();
    f.write_all_at(b"/* rewritten */", 10).unwrap();
    f.set_len(5000).unwrap();
    f.write_all_at(b"past a hole", 3 << 20).unwrap();
    drop(f);
    let mut a = OpenOptions::new().append(true).open(m.p("linux/types.h")).unwrap();
    for i in 0..100 {
        writeln!(a, "/* line {i} */").unwrap();
    }
    drop(a);
    fs::write(m.p("mapped"), vec![b'.'; 1 << 20]).unwrap();
    let py = format!(
        "import mmap\nf=open('{}','r+b')\nm=mmap.mmap(f.fileno(),0)\nm[100:105]=b'HELLO'\nm.flush()\nm[900000:900005]=b'WORLD'\nm.close()\nf.close()\n",
        m.p("mapped").display()
    );
    assert!(Command::new("python3").arg("-c").arg(&py).status().unwrap().success());
    let d = fs::read(m.dst.join("mapped")).unwrap();
    assert_eq!((&d[100..105], &d[900000..900005]), (&b"HELLO"[..], &b"WORLD"[..]));
    // Everything was closed: the target has it all before the unmount.
    let diff = common::tree_diff(&m.src, &m.dst);
    assert!(diff.is_empty(), "before unmount:\n{}", diff.join("\n"));
    m.finish();
}

/// The mode is refused clearly when misspelled.
#[test]
fn an_unknown_ack_mode_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("s"), tmp.path().join("d"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    let out = Command::new(common::bin())
        .arg("mount")
        .arg(&src)
        .arg("--target")
        .arg(&dst)
        .args(["--ack", "never", "--foreground"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"never\" is not one of syscall, fsync"), "{err}");
    assert!(!common::mnt::mounted(Path::new(&src)));
}
