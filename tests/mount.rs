//! End-to-end tests of `mirrorfs mount`: a real FUSE mount over the source, a real target
//! process, real syscalls. Every scenario ends by unmounting, checking that the daemon exited 0,
//! and comparing the whole target tree with the source (content, kind, mode, owner, mtime,
//! symlink targets, device numbers, xattrs, hard-link groups).

mod common;

use common::mnt::{converge, mounted, scenario, Mount, Opts};
use common::{assert_same_tree, bin, tree_diff};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

/// The names in directory `d`, sorted.
fn sorted_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn dir_fd(p: &Path) -> File {
    File::open(p).unwrap()
}

fn renameat2(dir: &Path, from: &str, to: &str, flags: u32) -> std::io::Result<()> {
    let d = dir_fd(dir);
    let (f, t) = (CString::new(from).unwrap(), CString::new(to).unwrap());
    mirrorfs::sys::renameat2(d.as_fd(), &f, d.as_fd(), &t, flags)
}

#[test]
fn create_with_creat_excl_and_trunc() {
    scenario("create_with_creat_excl_and_trunc", |m| {
        fs::write(m.p("plain"), b"created").unwrap();
        let f = OpenOptions::new().write(true).create_new(true).open(m.p("excl"));
        f.unwrap().write_all(b"exclusive").unwrap();
        let again = OpenOptions::new().write(true).create_new(true).open(m.p("excl"));
        assert_eq!(
            again.unwrap_err().kind(),
            ErrorKind::AlreadyExists,
            "O_EXCL on an existing file"
        );
        fs::write(m.p("trunc"), b"a long first version").unwrap();
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.p("trunc"))
            .unwrap()
            .write_all(b"short")
            .unwrap();
        assert_eq!(fs::read(m.p("trunc")).unwrap(), b"short");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(m.p("mode640"))
            .unwrap();
        drop(f);
        assert_eq!(fs::metadata(m.p("mode640")).unwrap().mode() & 0o777, 0o640);
    });
}

#[test]
fn mkdir_mknod_symlink_link() {
    scenario("mkdir_mknod_symlink_link", |m| {
        fs::create_dir(m.p("d")).unwrap();
        fs::create_dir_all(m.p("d/e/f")).unwrap();
        fs::set_permissions(m.p("d/e"), fs::Permissions::from_mode(0o2775)).unwrap();
        fs::create_dir(m.p("d/e/inherits")).unwrap();
        assert_ne!(
            fs::metadata(m.p("d/e/inherits")).unwrap().mode() & 0o2000,
            0,
            "setgid inherited"
        );
        sh(&format!("mkfifo '{}'", m.p("fifo").display()));
        sh(&format!("mknod '{}' c 1 3", m.p("null").display()));
        sh(&format!("mknod '{}' b 7 201", m.p("blk").display()));
        sh(&format!(
            "python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind(\"{}\")'",
            m.p("sock").display()
        ));
        symlink("d/e", m.p("rel")).unwrap();
        symlink("/nowhere/at/all", m.p("dangling")).unwrap();
        fs::write(m.p("orig"), b"shared").unwrap();
        fs::hard_link(m.p("orig"), m.p("d/second")).unwrap();
        assert_eq!(fs::metadata(m.p("orig")).unwrap().nlink(), 2);
        // Owners of new entries are the caller's.
        sh(&format!("chown 1234:5678 '{}'", m.p("d").display()));
        assert_eq!(fs::read_link(m.p("rel")).unwrap(), Path::new("d/e"));
    });
}

#[test]
fn write_pwrite_and_append() {
    scenario("write_pwrite_and_append", |m| {
        let mut f = File::create(m.p("w")).unwrap();
        f.write_all(&vec![1u8; 3 << 20]).unwrap();
        f.write_all_at(b"patched", 12345).unwrap();
        f.write_all_at(b"far", 10 << 20).unwrap();
        drop(f);
        let mut a = OpenOptions::new().append(true).open(m.p("w")).unwrap();
        a.write_all(b"appended").unwrap();
        let mut b = OpenOptions::new().append(true).open(m.p("w")).unwrap();
        b.write_all(b"+second").unwrap();
        a.write_all(b"+third").unwrap();
        drop((a, b));
        let data = fs::read(m.p("w")).unwrap();
        assert!(data.ends_with(b"farappended+second+third"));
        assert_eq!(data.len(), (10 << 20) + 3 + 8 + 7 + 6);
    });
}

#[test]
fn truncate_and_ftruncate() {
    scenario("truncate_and_ftruncate", |m| {
        fs::write(m.p("t"), vec![9u8; 100_000]).unwrap();
        let f = OpenOptions::new().write(true).open(m.p("t")).unwrap();
        f.set_len(1000).unwrap();
        f.set_len(50_000).unwrap();
        drop(f);
        sh(&format!("truncate -s 7 '{}'", m.p("t").display()));
        assert_eq!(fs::metadata(m.p("t")).unwrap().len(), 7);
        fs::write(m.p("grow"), b"x").unwrap();
        sh(&format!("truncate -s 5M '{}'", m.p("grow").display()));
    });
}

#[test]
fn fallocate_punch_hole_and_keep_size() {
    scenario("fallocate_punch_hole_and_keep_size", |m| {
        fs::write(m.p("fa"), vec![5u8; 1 << 20]).unwrap();
        sh(&format!("fallocate -l 4M '{}'", m.p("fa").display()));
        assert_eq!(fs::metadata(m.p("fa")).unwrap().len(), 4 << 20);
        sh(&format!("fallocate -p -o 65536 -l 131072 '{}'", m.p("fa").display()));
        sh(&format!("fallocate -n -o 0 -l 8M '{}'", m.p("fa").display()));
        assert_eq!(fs::metadata(m.p("fa")).unwrap().len(), 4 << 20, "keep-size");
        let d = fs::read(m.p("fa")).unwrap();
        assert!(d[65536..65536 + 131072].iter().all(|b| *b == 0), "punched");
    });
}

#[test]
fn copy_file_range_between_files() {
    scenario("copy_file_range_between_files", |m| {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(m.p("from"), &data).unwrap();
        let mut a = File::open(m.p("from")).unwrap();
        let mut b = File::create(m.p("to")).unwrap();
        b.write_all(b"head:").unwrap();
        // std::io::copy between two files is copy_file_range(2) on Linux.
        let n = std::io::copy(&mut a, &mut b).unwrap();
        assert_eq!(n, data.len() as u64);
        drop(b);
        assert_eq!(&fs::read(m.p("to")).unwrap()[5..], &data[..]);
    });
}

#[test]
fn chmod_and_chown() {
    scenario("chmod_and_chown", |m| {
        fs::write(m.p("f"), b"x").unwrap();
        fs::set_permissions(m.p("f"), fs::Permissions::from_mode(0o4751)).unwrap();
        fs::create_dir(m.p("d")).unwrap();
        fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o1700)).unwrap();
        std::os::unix::fs::chown(m.p("d"), Some(2000), Some(3000)).unwrap();
        fs::write(m.p("g"), b"x").unwrap();
        fs::set_permissions(m.p("g"), fs::Permissions::from_mode(0o6755)).unwrap();
        // chown clears set-ID bits on the source; the target must follow.
        std::os::unix::fs::chown(m.p("g"), Some(7), Some(8)).unwrap();
        symlink("f", m.p("l")).unwrap();
        std::os::unix::fs::lchown(m.p("l"), Some(11), Some(12)).unwrap();
    });
}

#[test]
fn utimensat_now_omit_and_explicit() {
    scenario("utimensat_now_omit_and_explicit", |m| {
        fs::write(m.p("a"), b"x").unwrap();
        fs::write(m.p("b"), b"x").unwrap();
        fs::create_dir(m.p("d")).unwrap();
        symlink("a", m.p("l")).unwrap();
        sh(&format!(
            "touch -d '2001-02-03 04:05:06.123456789' '{}'",
            m.p("a").display()
        ));
        assert_eq!(fs::metadata(m.p("a")).unwrap().mtime_nsec(), 123_456_789);
        // -a: atime NOW, mtime OMIT (mtime must stay as set just above).
        sh(&format!("touch -a '{}'", m.p("a").display()));
        assert_eq!(fs::metadata(m.p("a")).unwrap().mtime_nsec(), 123_456_789);
        // -m: mtime NOW, atime OMIT.
        sh(&format!("touch -m '{}'", m.p("b").display()));
        sh(&format!("touch -h -d '1999-01-01 00:00:00.5' '{}'", m.p("l").display()));
        sh(&format!(
            "touch -d '2010-10-10 10:10:10.000000001' '{}'",
            m.p("d").display()
        ));
    });
}

#[test]
fn setxattr_and_removexattr() {
    scenario("setxattr_and_removexattr", |m| {
        fs::write(m.p("f"), b"x").unwrap();
        fs::create_dir(m.p("d")).unwrap();
        xattr::set(m.p("f"), "user.one", b"1").unwrap();
        xattr::set(m.p("f"), "user.two", &[0u8, 255, 7]).unwrap();
        xattr::set(m.p("d"), "user.dir", b"yes").unwrap();
        xattr::remove(m.p("f"), "user.one").unwrap();
        assert_eq!(xattr::get(m.p("f"), "user.two").unwrap().unwrap(), vec![0u8, 255, 7]);
        assert!(xattr::get(m.p("f"), "user.one").unwrap().is_none());
    });
}

#[test]
fn unlink_and_rmdir() {
    scenario("unlink_and_rmdir", |m| {
        fs::create_dir_all(m.p("a/b/c")).unwrap();
        fs::write(m.p("a/b/c/f"), b"x").unwrap();
        fs::write(m.p("a/keep"), b"k").unwrap();
        fs::remove_file(m.p("a/b/c/f")).unwrap();
        fs::remove_dir(m.p("a/b/c")).unwrap();
        assert_eq!(
            fs::remove_dir(m.p("a")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        fs::remove_dir_all(m.p("a/b")).unwrap();
    });
}

/// A directory too large for one readdir reply is listed in pieces, each from the position the
/// last one ended at (the filesystem's own cookies, not an index into a listing): while other
/// names come and go beside them through the mount, which drops the kernel's kept listing each
/// time, every name that is there throughout is listed exactly once, by plain readdir and by
/// readdirplus (an `ls -l`-like pass makes the kernel ask for that) alike.
#[test]
fn a_large_directory_lists_each_name_once_while_others_come_and_go() {
    use std::sync::atomic::{AtomicBool, Ordering};
    scenario("a_large_directory_lists_each_name_once_while_others_come_and_go", |m| {
        let d = m.p("big");
        fs::create_dir(&d).unwrap();
        for i in 0..3000 {
            fs::write(d.join(format!("keep{i:05}")), b"").unwrap();
        }
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let churn = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut j = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    fs::write(d.join(format!("tmp{j}")), b"").unwrap();
                    if j >= 50 {
                        fs::remove_file(d.join(format!("tmp{}", j - 50))).unwrap();
                    }
                    j += 1;
                }
                j
            })
        };
        for round in 0..16 {
            let mut seen = std::collections::HashMap::<String, usize>::new();
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                if round % 2 == 1 {
                    // Vanished meanwhile is fine; what is listed must be there to stat.
                    let _ = e.metadata();
                }
                let name = e.file_name().into_string().unwrap();
                if name.starts_with("keep") {
                    *seen.entry(name).or_default() += 1;
                }
            }
            let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).map(|(k, _)| k).collect();
            assert!(twice.is_empty(), "round {round}: listed more than once: {twice:?}");
            assert_eq!(seen.len(), 3000, "round {round}: names missing from the listing");
        }
        stop.store(true, Ordering::Relaxed);
        let made = churn.join().unwrap();
        assert!(made > 100, "the churn ran ({made} files)");
    });
}

#[test]
fn rename_plain_over_noreplace_exchange() {
    scenario("rename_plain_over_noreplace_exchange", |m| {
        fs::create_dir_all(m.p("x/y")).unwrap();
        fs::write(m.p("x/y/f"), b"f").unwrap();
        fs::write(m.p("g"), b"g").unwrap();
        fs::write(m.p("victim"), b"v").unwrap();
        fs::create_dir(m.p("emptydir")).unwrap();
        fs::create_dir(m.p("movedir")).unwrap();
        fs::write(m.p("movedir/inside"), b"i").unwrap();
        fs::rename(m.p("x/y/f"), m.p("f2")).unwrap();
        fs::rename(m.p("g"), m.p("victim")).unwrap();
        fs::rename(m.p("movedir"), m.p("emptydir")).unwrap();
        fs::rename(m.p("x"), m.p("emptydir/x")).unwrap();
        fs::write(m.p("n1"), b"1").unwrap();
        fs::write(m.p("n2"), b"2").unwrap();
        let e = renameat2(&m.mnt, "n1", "n2", libc::RENAME_NOREPLACE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        renameat2(&m.mnt, "n1", "n3", libc::RENAME_NOREPLACE).unwrap();
        fs::create_dir(m.p("dx")).unwrap();
        fs::write(m.p("dx/in"), b"in").unwrap();
        renameat2(&m.mnt, "n2", "dx", libc::RENAME_EXCHANGE).unwrap();
        assert_eq!(fs::read(m.p("n2/in")).unwrap(), b"in");
        assert_eq!(fs::read(m.p("dx")).unwrap(), b"2");
        // Writing through a file that was renamed while open lands under its new name.
        let mut f = OpenOptions::new().write(true).open(m.p("n3")).unwrap();
        fs::rename(m.p("n3"), m.p("emptydir/n3moved")).unwrap();
        f.write_all(b"after rename").unwrap();
    });
}

/// The default promise, checked write by write: when `write` returns, the target process has
/// those bytes, the file's size and its mtime. The target is read the moment each write returns,
/// with no watcher that could send anything later.
#[test]
fn every_write_is_on_the_target_when_it_returns() {
    let opts = Opts {
        separate: true,
        extra: &["--no-watch"],
        ..Opts::default()
    };
    let Some(m) = Mount::with("every_write_is_on_the_target_when_it_returns", opts) else {
        return;
    };
    let (_, st) = m.status();
    assert_eq!(
        st.expect("listed").ack.as_deref(),
        Some("syscall"),
        "status names the promise"
    );
    let f = OpenOptions::new().write(true).create_new(true).open(m.p("f")).unwrap();
    // Small and unaligned writes, page writes, and 1 MiB aligned ones (the target's O_DIRECT
    // path), at offsets that extend the file, overwrite it, and leave holes.
    let writes: Vec<(u64, usize)> = (0..48u64)
        .map(|i| match i % 4 {
            0 => (i * 7919, 100 + i as usize),
            1 => (i * 4096, 4096),
            2 => ((i % 6) << 20, 1 << 20),
            _ => ((8 << 20) + i * 65536, 65536 + 3),
        })
        .collect();
    let target = m.dst.join("f");
    for (n, (off, len)) in writes.into_iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j as u64 * 31 + n as u64) as u8).collect();
        f.write_all_at(&data, off).unwrap();
        let mut there = vec![0u8; len];
        File::open(&target).unwrap().read_exact_at(&mut there, off).unwrap();
        assert!(
            there == data,
            "write {n} ({len} bytes at {off}) is not on the target when it returned"
        );
        let (s, t) = (fs::metadata(m.src.join("f")).unwrap(), fs::metadata(&target).unwrap());
        assert_eq!(s.len(), t.len(), "write {n}: size");
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (t.mtime(), t.mtime_nsec()),
            "write {n}: mtime"
        );
    }
    drop(f);
    m.finish();
}

#[test]
fn fsync_and_fdatasync() {
    scenario("fsync_and_fdatasync", |m| {
        let mut f = File::create(m.p("durable")).unwrap();
        f.write_all(b"must be on disk").unwrap();
        f.sync_all().unwrap();
        f.write_all(b" and more").unwrap();
        f.sync_data().unwrap();
        File::open(&m.mnt).unwrap().sync_all().unwrap();
        // Acknowledged means applied: the target has it before unmount.
        assert_eq!(fs::read(m.dst.join("durable")).unwrap(), b"must be on disk and more");
    });
}

#[test]
fn unlinked_open_file_keeps_working_and_cannot_touch_the_target() {
    scenario("unlinked_open_file_keeps_working_and_cannot_touch_the_target", |m| {
        fs::write(m.p("other"), b"other file").unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.p("tmp"))
            .unwrap();
        f.write_all(b"before").unwrap();
        fs::remove_file(m.p("tmp")).unwrap();
        // A new file under the same name must not receive the old file's writes.
        fs::write(m.p("tmp"), b"new file").unwrap();
        f.write_all(b" after unlink").unwrap();
        f.set_len(100).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = Vec::new();
        f.read_to_end(&mut s).unwrap();
        assert!(s.starts_with(b"before after unlink"));
        drop(f);
        assert_eq!(fs::read(m.dst.join("tmp")).unwrap(), b"new file");
    });
}

#[test]
fn shared_writable_mmap_reaches_the_target() {
    scenario("shared_writable_mmap_reaches_the_target", |m| {
        fs::write(m.p("mapped"), vec![b'.'; 1 << 20]).unwrap();
        let py = format!(
            "import mmap,os\nf=open('{}','r+b')\nm=mmap.mmap(f.fileno(),0)\nm[100:105]=b'HELLO'\nm[900000:900005]=b'WORLD'\nm.flush()\nm[5000:5003]=b'END'\nm.close()\nf.close()\n",
            m.p("mapped").display()
        );
        let st = Command::new("python3").arg("-c").arg(&py).status().unwrap();
        assert!(st.success());
        let d = fs::read(m.p("mapped")).unwrap();
        assert_eq!(&d[100..105], b"HELLO");
        assert_eq!(&d[5000..5003], b"END");
    });
}

#[test]
fn failed_operations_forward_nothing() {
    scenario("failed_operations_forward_nothing", |m| {
        fs::create_dir(m.p("d")).unwrap();
        fs::write(m.p("d/f"), b"x").unwrap();
        let (_, before) = m.status();
        let before = before.expect("the mount is listed");
        assert!(fs::create_dir(m.p("d")).is_err());
        assert!(fs::remove_dir(m.p("d")).is_err());
        assert!(fs::remove_file(m.p("missing")).is_err());
        assert!(fs::rename(m.p("missing"), m.p("d/x")).is_err());
        assert!(fs::hard_link(m.p("d"), m.p("dirlink")).is_err());
        // As an unprivileged user: refused by the kernel's permission checks.
        fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o755)).unwrap();
        let st = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "touch"])
            .arg(m.p("d/nobody"))
            .status()
            .unwrap();
        assert!(!st.success(), "nobody may not write into a 0755 root-owned dir");
        assert!(!m.dst.join("d/nobody").exists());
        let (code, after) = m.status();
        let after = after.unwrap();
        assert_eq!(code, 0);
        // The chmod above is the one operation that succeeded: one request.
        assert_eq!(
            after.link.forwarded_ops,
            before.link.forwarded_ops + 1,
            "only the chmod was forwarded: {before:?} -> {after:?}"
        );
        assert_eq!(after.link.repairs, before.link.repairs, "no repair ran");
        assert_eq!(after.link.behind_paths, 0);
    });
}

#[test]
fn target_refusal_is_repaired_from_the_source() {
    scenario("target_refusal_is_repaired_from_the_source", |m| {
        fs::create_dir(m.p("d")).unwrap();
        fs::write(m.p("d/f"), b"original").unwrap();
        // Someone breaks the target behind our back: the next forwarded write fails there.
        fs::remove_dir_all(m.dst.join("d")).unwrap();
        let mut f = OpenOptions::new().append(true).open(m.p("d/f")).unwrap();
        f.write_all(b" appended").unwrap();
        drop(f);
        assert_eq!(
            fs::read(m.dst.join("d/f")).unwrap_or_else(|e| panic!("target d/f: {e}\n{}", m.log_text())),
            b"original appended",
            "repaired before the syscall returned"
        );
        assert!(m.log_text().contains("repairing the target"), "log:\n{}", m.log_text());
    });
}

#[test]
fn concurrent_writers_on_overlapping_files() {
    scenario("concurrent_writers_on_overlapping_files", |m| {
        for i in 0..4 {
            fs::write(m.p(&format!("shared{i}")), vec![0u8; 1 << 20]).unwrap();
        }
        let stop = Instant::now() + Duration::from_secs(3);
        std::thread::scope(|s| {
            for w in 0..8u64 {
                let mnt = m.mnt.clone();
                s.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < stop {
                        let file = mnt.join(format!("shared{}", (w + n) % 4));
                        let f = OpenOptions::new().write(true).open(&file).unwrap();
                        let off = (n * 7919 + w * 104_729) % (1 << 20);
                        f.write_all_at(&vec![(w * 31 + n) as u8; 4096 + (n as usize % 5000)], off)
                            .unwrap();
                        if n % 50 == 0 {
                            f.set_len((1 << 20) + (w * 1000)).unwrap();
                        }
                        let own = mnt.join(format!("own{w}"));
                        fs::write(&own, format!("{w}:{n}")).unwrap();
                        if n % 7 == 0 {
                            let _ = fs::rename(&own, mnt.join(format!("renamed{}", n % 3)));
                        }
                        n += 1;
                    }
                });
            }
        });
    });
}

#[test]
fn three_ways_to_stop_all_exit_zero() {
    for how in ["umount", "mirrorfs-umount", "SIGTERM", "SIGINT"] {
        let Some(mut m) = Mount::new("three_ways_to_stop_all_exit_zero") else {
            return;
        };
        fs::write(m.p("file"), how).unwrap();
        fs::create_dir(m.p("dir")).unwrap();
        let pid = m.daemon.as_ref().unwrap().id().to_string();
        match how {
            "umount" => assert!(Command::new("umount").arg(&m.mnt).status().unwrap().success()),
            "mirrorfs-umount" => assert!(Command::new(bin())
                .arg("umount")
                .arg(&m.mnt)
                .status()
                .unwrap()
                .success()),
            sig => assert!(Command::new("kill")
                .args(["-s", &sig[3..], &pid])
                .status()
                .unwrap()
                .success()),
        }
        let st = m.wait_daemon();
        assert!(st.success(), "{how}: daemon exited {st}:\n{}", m.log_text());
        assert!(!mounted(&m.mnt), "{how}: still mounted");
        assert_eq!(
            fs::read(m.src.join("file")).unwrap(),
            how.as_bytes(),
            "{how}: source as last seen"
        );
        assert_same_tree(&m.src, &m.dst);
    }
}

#[test]
fn stale_mount_of_a_killed_daemon_is_cleaned_up() {
    let Some(mut m) = Mount::new("stale_mount_of_a_killed_daemon_is_cleaned_up") else {
        return;
    };
    fs::write(m.p("before"), b"b").unwrap();
    let mut d = m.daemon.take().unwrap();
    d.kill().unwrap();
    d.wait().unwrap();
    let e = fs::metadata(&m.mnt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "a stale mount is left");
    m.start(false);
    let log = m.log_text();
    assert!(log.contains("stale mount"), "the new mount says it cleaned up:\n{log}");
    fs::write(m.p("after"), b"a").unwrap();
    m.finish();
}

#[test]
fn a_target_still_away_at_unmount_exits_23_and_the_next_mount_repairs_it() {
    let opts = Opts {
        extra: &["--timeout", "2"],
        ..Opts::default()
    };
    let Some(mut m) = Mount::with(
        "a_target_still_away_at_unmount_exits_23_and_the_next_mount_repairs_it",
        opts,
    ) else {
        return;
    };
    fs::write(m.p("first"), b"replicated").unwrap();
    let server = m.server.as_ref().unwrap().0.id().to_string();
    sh(&format!("kill -STOP {server}"));
    let t = Instant::now();
    fs::write(m.p("while-dead"), vec![1u8; 4 << 20]).unwrap();
    fs::create_dir(m.p("dir-while-dead")).unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(6), "syscalls waited {took:?}");
    assert_eq!(
        fs::read(m.p("while-dead")).unwrap().len(),
        4 << 20,
        "the source keeps its result"
    );
    let st = m.unmount();
    assert_eq!(
        st.code(),
        Some(23),
        "exit 23 says the target is behind:\n{}",
        m.log_text()
    );
    let log = m.log_text();
    assert!(log.contains("lost"), "a clear log line:\n{log}");
    assert!(
        log.contains("is behind") && log.contains("the next mount or sync finishes the job"),
        "the closing line says what is left and what finishes it:\n{log}"
    );
    sh(&format!("kill -CONT {server}"));
    assert!(!tree_diff(&m.src, &m.dst).is_empty());
    // The next startup walk repairs the target.
    m.start(false);
    m.finish();
}

#[test]
fn separate_mountpoint_and_local_target() {
    let opts = Opts {
        separate: true,
        local_target: true,
        before: Some(&|src: &Path| common::rich_tree(src)),
        ..Opts::default()
    };
    let Some(m) = Mount::with("separate_mountpoint_and_local_target", opts) else {
        return;
    };
    assert_same_tree(&m.src, &m.dst);
    fs::write(m.p("dir/new"), b"through a separate mountpoint").unwrap();
    fs::remove_file(m.p("dir/hardlink")).unwrap();
    assert_eq!(
        fs::read(m.src.join("dir/new")).unwrap(),
        b"through a separate mountpoint"
    );
    m.finish();
}

#[test]
fn daemon_mode_returns_once_live_and_logs_to_a_file() {
    if !common::mnt::fuse_ready("daemon_mode_returns_once_live_and_logs_to_a_file") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    fs::write(src.join("pre"), b"existing").unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&src)
        .arg("--target")
        .arg(&dst)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = mirrorfs::fuse::unmount(self.0, true);
        }
    }
    let _g = Unmount(&src);
    assert!(out.status.success(), "{err}");
    // The default log: in a directory only root can enter, made 0600, never in a shared /tmp.
    let log = PathBuf::from(err.split("log: ").nth(1).expect("prints the log path").trim());
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _rm = Remove(log.clone());
    assert!(log.starts_with("/var/log/mirrorfs"), "{}", log.display());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&log).unwrap().permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        fs::metadata("/var/log/mirrorfs").unwrap().permissions().mode() & 0o7777,
        0o700
    );
    assert!(mounted(&src), "live when the command returns");
    fs::write(src.join("via-daemon"), b"d").unwrap();
    let pid: u32 = err
        .split("daemon pid ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let out = Command::new(bin()).arg("umount").arg(&src).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("the target is in sync"),
        "umount reports the daemon's verdict: {said}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "daemon still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("unmounted"), "log: {text}");
    assert_same_tree(&src, &dst);
}

#[test]
fn mount_unmount_remount_cycles_lose_nothing() {
    let Some(mut m) = Mount::new("mount_unmount_remount_cycles_lose_nothing") else {
        return;
    };
    for i in 0..3 {
        fs::write(m.p(&format!("cycle{i}")), format!("{i}")).unwrap();
        fs::create_dir(m.p(&format!("dir{i}"))).unwrap();
        let st = m.unmount();
        assert!(st.success());
        assert!(!mounted(&m.mnt));
        assert_same_tree(&m.src, &m.dst);
        // A change while unmounted is picked up by the next startup walk.
        fs::write(m.src.join(format!("offline{i}")), b"o").unwrap();
        m.start(false);
    }
    let pid = m.daemon.as_ref().unwrap().id();
    m.finish();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "no daemon left");
}

#[test]
fn invalid_mount_arguments_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["mount", "/nonexistent/src", "--target"])
        .arg(tmp.path())
        .arg("--foreground")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/src"));
    let out = Command::new(bin()).args(["umount"]).arg(tmp.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a mirrorfs mount"));
    let out = Command::new(bin())
        .args(["mount", "x", "--target", "y", "--timeout", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive number"));
}

#[test]
fn mount_t_mirrorfs_and_an_fstab_line_work() {
    if !common::mnt::fuse_ready("mount_t_mirrorfs_and_an_fstab_line_work") {
        return;
    }
    let helper = Path::new("/sbin/mount.mirrorfs");
    if !helper.exists() {
        common::mnt::skip(
            "mount_t_mirrorfs_and_an_fstab_line_work",
            "/sbin/mount.mirrorfs is not installed (./test.sh links it)",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst, mnt) = (tmp.path().join("src"), tmp.path().join("dst"), tmp.path().join("mnt"));
    for d in [&src, &dst, &mnt] {
        fs::create_dir(d).unwrap();
    }
    fs::write(src.join("seed"), b"s").unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = mirrorfs::fuse::unmount(&self.0, true);
        }
    }
    let _g = Unmount(mnt.clone());
    let wait_gone = |p: &Path| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while mounted(p) {
            assert!(Instant::now() < deadline, "still mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // mount -t mirrorfs, at a separate mountpoint.
    let out = Command::new("mount")
        .args(["-t", "mirrorfs"])
        .arg(&src)
        .arg(&mnt)
        .arg("-o")
        .arg(format!("target={}", dst.display()))
        .env("MIRRORFS_BIN", bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t mirrorfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mounted(&mnt));
    fs::write(mnt.join("via-mount-t"), b"1").unwrap();
    assert!(Command::new("umount").arg(&mnt).status().unwrap().success());
    wait_gone(&mnt);
    // An fstab line, mounting the source over itself.
    let fstab = tmp.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} mirrorfs target={},nofail 0 0\n",
            src.display(),
            src.display(),
            dst.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&src)
        .env("MIRRORFS_BIN", bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount from fstab: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _g2 = Unmount(src.clone());
    assert!(mounted(&src));
    fs::write(src.join("via-fstab"), b"2").unwrap();
    assert!(Command::new("umount").arg(&src).status().unwrap().success());
    wait_gone(&src);
    // Let the daemon finish its last log line before comparing.
    std::thread::sleep(Duration::from_millis(200));
    assert_same_tree(&src, &dst);
    // A bad option is refused with mount(8)'s usage status and a clear message.
    let out = Command::new("mount")
        .args(["-t", "mirrorfs"])
        .arg(&src)
        .arg(&mnt)
        .args(["-o", "colour=red"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("target option is required")
            || String::from_utf8_lossy(&out.stderr).contains("unknown option")
    );
}

#[test]
fn inodes_past_the_fd_budget_are_anchored_by_file_handles() {
    let opts = Opts {
        env: &[("MIRRORFS_INODE_FDS", "8")],
        ..Opts::default()
    };
    let Some(m) = Mount::with("inodes_past_the_fd_budget_are_anchored_by_file_handles", opts) else {
        return;
    };
    for d in 0..10 {
        fs::create_dir(m.p(&format!("d{d}"))).unwrap();
        for f in 0..30 {
            fs::write(m.p(&format!("d{d}/f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    // Drop the kernel's caches so every inode is looked up (and anchored) again.
    sh("echo 2 > /proc/sys/vm/drop_caches");
    for d in 0..10 {
        let mut f = OpenOptions::new().append(true).open(m.p(&format!("d{d}/f3"))).unwrap();
        f.write_all(b" more").unwrap();
        fs::set_permissions(m.p(&format!("d{d}/f4")), fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(m.p(&format!("d{d}/f5")), m.p(&format!("d{}/moved{d}", (d + 1) % 10))).unwrap();
        fs::remove_file(m.p(&format!("d{d}/f6"))).unwrap();
        xattr::set(m.p(&format!("d{d}/f7")), "user.k", b"v").unwrap();
    }
    fs::rename(m.p("d0"), m.p("d9/d0")).unwrap();
    fs::write(m.p("d9/d0/f1"), b"rewritten").unwrap();
    m.finish();
}

#[test]
fn a_writer_beside_a_passthrough_reader_works_and_replicates_at_close() {
    scenario(
        "a_writer_beside_a_passthrough_reader_works_and_replicates_at_close",
        |m| {
            fs::write(m.p("log"), b"first line\n").unwrap();
            // A long-lived reader (tail -f) holds a read-only, passthrough open.
            let mut reader = File::open(m.p("log")).unwrap();
            let mut got = String::new();
            reader.read_to_string(&mut got).unwrap();
            let mut w = OpenOptions::new()
                .append(true)
                .open(m.p("log"))
                .expect("a writable open beside a reader");
            w.write_all(b"second line\n").unwrap();
            w.sync_all().unwrap();
            assert_eq!(
                fs::read(m.dst.join("log")).unwrap(),
                b"first line\nsecond line\n",
                "replicated at fsync"
            );
            let forwarded = || m.status().1.expect("listed").link.forwarded_bytes;
            let before = forwarded();
            w.write_all(b"third line\n").unwrap();
            drop(w);
            assert_eq!(
                fs::read(m.dst.join("log")).unwrap(),
                fs::read(m.p("log")).unwrap(),
                "replicated at close"
            );
            let size = fs::metadata(m.p("log")).unwrap().len();
            assert_eq!(
                forwarded() - before,
                size,
                "sent once at close (a flush, then a release), not twice"
            );
            got.clear();
            reader.read_to_string(&mut got).unwrap();
            assert_eq!(got, "second line\nthird line\n", "the reader sees the appends");
            assert!(
                m.log_text().contains("replicates at fsync and close"),
                "the mixed case was taken:\n{}",
                m.log_text()
            );
        },
    );
}

#[test]
fn hard_links_keep_replicating_after_one_name_goes() {
    scenario("hard_links_keep_replicating_after_one_name_goes", |m| {
        fs::write(m.p("a"), b"content").unwrap();
        fs::hard_link(m.p("a"), m.p("b")).unwrap();
        fs::hard_link(m.p("a"), m.p("c")).unwrap();
        let f = OpenOptions::new().write(true).open(m.p("c")).unwrap();
        fs::remove_file(m.p("b")).unwrap();
        fs::remove_file(m.p("c")).unwrap();
        fs::set_permissions(m.p("a"), fs::Permissions::from_mode(0o600)).unwrap();
        // Through an fd opened under a name that is gone: the inode still has the name "a".
        f.write_all_at(b"CHANGED", 0).unwrap();
        f.set_len(5).unwrap();
        drop(f);
        xattr::set(m.p("a"), "user.after", b"1").unwrap();
        assert_eq!(fs::read(m.dst.join("a")).unwrap(), b"CHANG");
    });
}

#[test]
fn a_mountpoint_inside_the_source_is_refused() {
    if !common::mnt::fuse_ready("a_mountpoint_inside_the_source_is_refused") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("src/inner")).unwrap();
    fs::create_dir(tmp.path().join("dst")).unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(tmp.path().join("src"))
        .arg(tmp.path().join("src/inner"))
        .arg("--target")
        .arg(tmp.path().join("dst"))
        .arg("--foreground")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the source"));
    assert!(!mounted(&tmp.path().join("src/inner")));
}

/// With fanotify the watcher is not even told of the mount's own changes, of any kind: they
/// were forwarded as they were made. (With inotify it saw each, and reconciled every burst of
/// them under the mount's order lock.) What others change is still seen: the tests of changes
/// behind the mount run with it.
#[test]
fn the_mounts_own_changes_never_reach_its_watcher() {
    let before = |src: &Path| {
        fs::create_dir_all(src.join("old/sub")).unwrap();
        fs::write(src.join("old/sub/f"), b"from before").unwrap();
    };
    let opts = Opts {
        before: Some(&before),
        ..Opts::default()
    };
    let Some(mut m) = Mount::with("the_mounts_own_changes_never_reach_its_watcher", opts) else {
        return;
    };
    for d in 0..3 {
        fs::create_dir(m.p(&format!("d{d}"))).unwrap();
        for f in 0..50 {
            let p = m.p(&format!("d{d}/f{f}"));
            fs::write(&p, vec![b'x'; 3000]).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
            common::set_mtime(&p, 1_000_000_000 + f as i64, 5);
        }
    }
    std::os::unix::fs::chown(m.p("d0/f0"), Some(1), Some(1)).unwrap();
    xattr::set(m.p("d0/f1"), "user.k", b"v").unwrap();
    symlink("f2", m.p("d0/link")).unwrap();
    fs::hard_link(m.p("d0/f3"), m.p("d1/hard")).unwrap();
    fs::rename(m.p("d0/f4"), m.p("d2/moved")).unwrap();
    fs::rename(m.p("old"), m.p("new")).unwrap();
    fs::write(m.p("new/sub/g"), b"in the moved directory").unwrap();
    OpenOptions::new()
        .append(true)
        .open(m.p("d1/f5"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    fs::remove_file(m.p("d1/f6")).unwrap();
    fs::remove_dir_all(m.p("d2")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let st = m.unmount();
    let log = m.log_text();
    assert!(st.success(), "daemon exited {st}:\n{log}");
    assert!(
        log.contains("with fanotify"),
        "the mount's watcher does not use fanotify here:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("watcher:"))
        .unwrap_or_else(|| panic!("no watcher line:\n{log}"));
    assert_eq!(
        field_before(line, " events"),
        0,
        "the watcher saw the mount's own changes: {line}"
    );
    assert_same_tree(&m.src, &m.dst);
}

/// A directory the mount makes raises no event the watcher sees (it is the mount's own), so the
/// mount watches it itself: what is written into it behind the mount, just after and later,
/// reaches the target.
#[test]
fn what_is_written_behind_the_mount_into_its_own_new_directories_reaches_the_target() {
    let opts = Opts {
        separate: true,
        ..Opts::default()
    };
    let Some(m) = Mount::with(
        "what_is_written_behind_the_mount_into_its_own_new_directories_reaches_the_target",
        opts,
    ) else {
        return;
    };
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    fs::write(m.src.join("a/b/c/at-once"), b"behind, at once").unwrap();
    converge(&m, "a file behind the mount in a directory it made");
    std::thread::sleep(Duration::from_millis(100));
    fs::write(m.src.join("a/b/later"), b"behind, later").unwrap();
    fs::create_dir(m.src.join("a/b/c/d")).unwrap();
    fs::write(m.src.join("a/b/c/d/deeper"), b"behind, deeper").unwrap();
    converge(&m, "more behind the mount");
    assert_eq!(fs::read(m.dst.join("a/b/later")).unwrap(), b"behind, later");
    m.finish();
}

/// With inotify (where fanotify is not offered) the watcher sees the mount's own removals too.
/// Those are echoes: it reconciles none of them, however many (before, `rm -rf` of a tree made
/// it rescan each directory's listing, holding the mount's operations back meanwhile).
#[test]
fn the_mounts_own_removals_make_the_watcher_reconcile_nothing() {
    let before = |src: &Path| {
        for d in 0..4 {
            fs::create_dir_all(src.join(format!("tree/d{d}/sub"))).unwrap();
            for f in 0..150 {
                fs::write(src.join(format!("tree/d{d}/f{f}")), b"x").unwrap();
            }
            fs::write(src.join(format!("tree/d{d}/sub/deep")), b"y").unwrap();
        }
    };
    let opts = Opts {
        before: Some(&before),
        env: &[("MIRRORFS_NO_FANOTIFY", "1")],
        ..Opts::default()
    };
    let Some(mut m) = Mount::with("the_mounts_own_removals_make_the_watcher_reconcile_nothing", opts) else {
        return;
    };
    fs::remove_dir_all(m.p("tree")).unwrap();
    fs::write(m.p("after"), b"made after the removals").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let st = m.unmount();
    let log = m.log_text();
    assert!(st.success(), "daemon exited {st}:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("watcher:"))
        .unwrap_or_else(|| panic!("no watcher line:\n{log}"));
    // The directories the removals were in are looked at themselves, never their listings.
    assert!(
        line.contains(" 0 full rescans") && field_before(line, " listings") == 0,
        "the watcher rescanned listings for the mount's own removals: {line}"
    );
    assert_same_tree(&m.src, &m.dst);
}

/// The number just before `what` in a log line.
fn field_before(line: &str, what: &str) -> u64 {
    let head = &line[..line.find(what).unwrap_or_else(|| panic!("no {what:?} in {line}"))];
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A name the mount removed is an echo to the watcher only while nothing else has been made of
/// it: made again behind the mount (a file, then a directory with a file in it), it reaches the
/// target, and removed again behind the mount, it leaves the target too.
#[test]
fn a_name_the_mount_removed_then_made_and_removed_behind_it_leaves_the_target() {
    removed_then_made_and_removed_behind(
        "a_name_the_mount_removed_then_made_and_removed_behind_it_leaves_the_target",
        &[],
    );
}

/// The same with inotify, which sees the mount's removals and takes them for echoes.
#[test]
fn with_inotify_a_name_the_mount_removed_then_made_and_removed_behind_it_leaves_the_target() {
    removed_then_made_and_removed_behind(
        "with_inotify_a_name_the_mount_removed_then_made_and_removed_behind_it_leaves_the_target",
        &[("MIRRORFS_NO_FANOTIFY", "1")],
    );
}

fn removed_then_made_and_removed_behind(test: &str, env: &[(&str, &str)]) {
    let opts = Opts {
        separate: true,
        env,
        ..Opts::default()
    };
    let Some(m) = Mount::with(test, opts) else {
        return;
    };
    fs::write(m.p("x"), b"through the mount").unwrap();
    fs::create_dir_all(m.p("d/e")).unwrap();
    fs::remove_file(m.p("x")).unwrap();
    fs::remove_dir_all(m.p("d")).unwrap();
    converge(&m, "removals through the mount");
    fs::write(m.src.join("x"), b"behind the mount").unwrap();
    fs::create_dir_all(m.src.join("d/e")).unwrap();
    fs::write(m.src.join("d/e/f"), b"behind, deeper").unwrap();
    converge(&m, "names made again behind the mount");
    assert_eq!(fs::read(m.dst.join("d/e/f")).unwrap(), b"behind, deeper");
    fs::remove_file(m.src.join("x")).unwrap();
    fs::remove_dir_all(m.src.join("d")).unwrap();
    converge(&m, "names removed again behind the mount");
    assert!(
        fs::symlink_metadata(m.dst.join("x")).is_err(),
        "x is still on the target"
    );
    assert!(
        fs::symlink_metadata(m.dst.join("d")).is_err(),
        "d is still on the target"
    );
    // Made and removed behind the mount in one breath: the target never needs it.
    fs::write(m.p("y"), b"through").unwrap();
    fs::remove_file(m.p("y")).unwrap();
    fs::write(m.src.join("y"), b"behind").unwrap();
    fs::remove_file(m.src.join("y")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    converge(&m, "a name made and removed at once");
    m.finish();
}

/// A process whose working directory is the source from before the mount writes beneath the
/// mount's back; the watcher on the backing directory carries it to the target.
#[test]
fn changes_behind_the_mount_reach_the_target() {
    use std::process::Stdio;
    let held = std::cell::RefCell::new(None);
    let before = |src: &Path| {
        let script = "read go; echo behind > behind; mkdir -p deep/er; echo x > deep/er/f; \
                      chmod 600 deep/er/f; mv deep moved; echo more >> behind; ln -s behind link";
        let c = Command::new("sh")
            .args(["-c", script])
            .current_dir(src)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        *held.borrow_mut() = Some(common::ChildGuard(c));
    };
    let opts = Opts {
        before: Some(&before),
        ..Opts::default()
    };
    let Some(m) = Mount::with("changes_behind_the_mount_reach_the_target", opts) else {
        return;
    };
    let mut c = held.borrow_mut().take().unwrap();
    writeln!(c.0.stdin.take().unwrap(), "go").unwrap();
    assert!(c.0.wait().unwrap().success());
    assert_eq!(fs::read(m.p("behind")).unwrap(), b"behind\nmore\n");
    converge(&m, "writes by a process from before the mount");
    m.finish();
}

/// With the mount elsewhere, anyone may write to the source directly; and the mount's own
/// writes, which the watcher sees too, send nothing twice.
#[test]
fn separate_mountpoint_source_written_directly() {
    let opts = Opts {
        separate: true,
        ..Opts::default()
    };
    let Some(mut m) = Mount::with("separate_mountpoint_source_written_directly", opts) else {
        return;
    };
    // Through the mount only: the watcher must find nothing to send.
    for i in 0..20 {
        fs::write(m.p(&format!("own{i}")), vec![b'x'; 10_000]).unwrap();
    }
    fs::create_dir(m.p("owndir")).unwrap();
    fs::rename(m.p("own0"), m.p("owndir/own0")).unwrap();
    // A writer beside a passthrough reader: its writes reach the target at close.
    {
        let _reader = File::open(m.p("own1")).unwrap();
        let mut w = OpenOptions::new().append(true).open(m.p("own1")).unwrap();
        for _ in 0..10 {
            w.write_all(b"appended through the mount\n").unwrap();
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    converge(&m, "the mount's own writes");
    let st = m.unmount();
    assert!(st.success(), "daemon exited {st}:\n{}", m.log_text());
    assert!(
        m.log_text().contains(" 0 files sent"),
        "the watcher sent the mount's own writes again:\n{}",
        m.log_text()
    );
    // Now behind its back, while mounted elsewhere.
    m.start(false);
    fs::write(m.src.join("direct"), b"written to the source directly").unwrap();
    fs::create_dir_all(m.src.join("a/b")).unwrap();
    fs::write(m.src.join("a/b/c"), b"deep").unwrap();
    fs::rename(m.src.join("own5"), m.src.join("a/own5")).unwrap();
    fs::remove_file(m.src.join("own6")).unwrap();
    converge(&m, "direct writes to the source");
    m.finish();
}

#[test]
fn a_log_path_planted_as_a_symlink_is_refused() {
    if !common::mnt::fuse_ready("a_log_path_planted_as_a_symlink_is_refused") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&dst).unwrap();
    let victim = tmp.path().join("root-only");
    fs::write(&victim, b"precious").unwrap();
    let log = tmp.path().join("planted.log");
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    let out = Command::new(bin())
        .arg("mount")
        .arg(&src)
        .args(["--target"])
        .arg(&dst)
        .arg("--log-file")
        .arg(&log)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if mounted(&src) {
        let _ = mirrorfs::fuse::unmount(&src, true);
        panic!("mounted with a planted log: {err}");
    }
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"precious",
        "nothing written through the link"
    );
}

/// The kernel keeps names, attributes, negative entries and listings through the mount for long (see
/// `fuse::cache`), so what changes behind the mount must be dropped from its caches: once the
/// target has a change made behind the mount, the mount shows it too, within a fraction of the
/// one second the kernel was once allowed to keep anything. Each path was looked up (or found
/// missing) through the mount just before.
#[test]
fn changes_behind_the_mount_show_through_it_at_once() {
    let before = |src: &Path| {
        fs::write(src.join("f"), b"hi").unwrap();
        fs::write(src.join("gone"), b"old").unwrap();
        fs::write(src.join("old"), b"moves").unwrap();
        fs::write(src.join("r"), b"becomes a directory").unwrap();
        fs::create_dir_all(src.join("d/sub")).unwrap();
        fs::write(src.join("d/inner"), b"inner").unwrap();
    };
    let opts = Opts {
        separate: true,
        before: Some(&before),
        ..Opts::default()
    };
    let Some(m) = Mount::with("changes_behind_the_mount_show_through_it_at_once", opts) else {
        return;
    };
    let names = [
        "f", "gone", "old", "r", "d", "d/inner", "d/sub", "new", "d/moved", "r/x", "d2",
    ];
    let seen = |root: &Path| -> Vec<String> {
        names
            .iter()
            .map(|n| match fs::symlink_metadata(root.join(n)) {
                Ok(md) => format!(
                    "{n}: {:o} {} bytes, {} links, mtime {}.{}, inode {}",
                    md.mode(),
                    md.len(),
                    md.nlink(),
                    md.mtime(),
                    md.mtime_nsec(),
                    md.ino()
                ),
                Err(e) => format!("{n}: {:?}", e.kind()),
            })
            .collect()
    };
    // Through the mount: every name is in the kernel's caches now, the missing ones as
    // negative entries.
    let first = seen(&m.mnt);
    assert!(first.iter().any(|l| l.starts_with("new: NotFound")), "{first:?}");
    // ... and so is every listing, read through it now.
    assert_eq!(common::mnt::tree_diff_live(&m.src, &m.mnt), Vec::<String>::new());
    // Behind it.
    let s = &m.src;
    fs::set_permissions(s.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(s.join("f"))
        .unwrap()
        .write_all(b" more")
        .unwrap();
    fs::remove_file(s.join("gone")).unwrap();
    fs::write(s.join("new"), b"appeared").unwrap();
    fs::rename(s.join("old"), s.join("d/moved")).unwrap();
    fs::remove_file(s.join("r")).unwrap();
    fs::create_dir(s.join("r")).unwrap();
    fs::write(s.join("r/x"), b"x").unwrap();
    fs::create_dir(s.join("d2")).unwrap();
    // A name the kernel never looked up, only listed in a listing it keeps.
    fs::write(s.join("d/sub/listed"), b"only in a listing").unwrap();
    converge(&m, "changes behind the mount");
    let names = sorted_names;
    let deadline = Instant::now() + Duration::from_millis(400);
    while names(&m.mnt.join("d/sub")) != ["listed"] {
        assert!(Instant::now() < deadline, "the mount still lists d/sub as it was");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_millis(400);
    loop {
        let (now, through) = (seen(s), seen(&m.mnt));
        if now == through && common::mnt::tree_diff_live(s, &m.mnt).is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mount still shows what the source no longer has, after the target has it:\n\
             source:      {now:#?}\nthrough it:  {through:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.finish();
}

/// Without a watcher the kernel keeps listings too (the mount opens no directory), and checks
/// a kept one against the directory's mtime once its attributes are a second old: a name made
/// or removed behind the mount shows in the listing through it within about a second, never
/// later.
#[test]
fn without_a_watcher_a_kept_listing_is_at_most_a_second_behind() {
    let before = |src: &Path| {
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/a"), b"a").unwrap();
    };
    let opts = Opts {
        separate: true,
        before: Some(&before),
        extra: &["--no-watch"],
        ..Opts::default()
    };
    let Some(m) = Mount::with("without_a_watcher_a_kept_listing_is_at_most_a_second_behind", opts) else {
        return;
    };
    let names = sorted_names;
    let through = m.mnt.join("d");
    assert_eq!(names(&through), ["a"]);
    let md = fs::metadata(m.src.join("d")).unwrap();
    let within = |want: &[&str], what: &str| {
        let t = Instant::now();
        while names(&through) != want {
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "{what}: still {:?}",
                names(&through)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    fs::write(m.src.join("d/b"), b"made behind the mount").unwrap();
    within(&["a", "b"], "a name made behind the mount");
    fs::remove_file(m.src.join("d/b")).unwrap();
    within(&["a"], "a name removed behind the mount");
    // Nothing forwarded it: the source directory gets its old mtime back for the comparison.
    let ok = Command::new("touch")
        .arg("-m")
        .arg("-d")
        .arg(format!("@{}.{:09}", md.mtime(), md.mtime_nsec()))
        .arg(m.src.join("d"))
        .status()
        .unwrap();
    assert!(ok.success());
    m.finish();
}

/// A write, append or truncation by someone other than root clears the set-user-ID bit (and
/// the set-group-ID bit where group execute is set), as the kernel would, on the source and on
/// the target, and the mount shows it at once; root's own writes keep them. Under
/// FUSE_HANDLE_KILLPRIV_V2 this is the daemon's job, not the kernel's.
#[test]
fn writes_by_others_clear_set_id_bits_everywhere() {
    scenario("writes_by_others_clear_set_id_bits_everywhere", |m| {
        // The unprivileged writer must reach the mount.
        fs::set_permissions(m.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&m.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        for (name, mode) in [
            ("appended", 0o6777),
            ("truncated", 0o6777),
            ("no-gx", 0o2767),
            ("by-root", 0o6777),
        ] {
            fs::write(m.p(name), b"data").unwrap();
            fs::set_permissions(m.p(name), fs::Permissions::from_mode(mode)).unwrap();
            // Seen through the mount first, so a stale cached mode would show.
            assert_eq!(fs::metadata(m.p(name)).unwrap().mode() & 0o7777, mode);
        }
        let st = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
            .arg("printf x >> appended && truncate -s 1 truncated && printf x >> no-gx")
            .current_dir(&m.mnt)
            .status()
            .unwrap();
        assert!(st.success(), "nobody writes the world-writable files");
        OpenOptions::new()
            .append(true)
            .open(m.p("by-root"))
            .unwrap()
            .write_all(b"x")
            .unwrap();
        for (name, want) in [
            ("appended", 0o777),
            ("truncated", 0o777),
            ("no-gx", 0o2767),
            ("by-root", 0o6777),
        ] {
            let through = fs::metadata(m.p(name)).unwrap().mode() & 0o7777;
            assert_eq!(through, want, "{name} through the mount: {through:o}, want {want:o}");
            let there = fs::metadata(m.dst.join(name)).unwrap().mode() & 0o7777;
            assert_eq!(there, want, "{name} on the target: {there:o}, want {want:o}");
        }
    });
}
