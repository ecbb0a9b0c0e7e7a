//! Conformance and real workloads inside a mount: pjdfstest (POSIX semantics), fsx (one file
//! hammered with reads, writes, truncates and mmap), and a tarball extraction followed by git.
//! Each ends with the whole target compared with the source.

mod common;

use common::mnt::{scenario, Mount, Opts};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A conformance tool from `cargo install`; test.sh installs them. Missing is a failure where
/// MIRRORFS_REQUIRE_FUSE=1 (CI), a stated skip elsewhere.
fn tool(name: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin").join(name)),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin").join(name)),
    ];
    if let Some(p) = candidates.into_iter().flatten().find(|p| p.exists()) {
        return Some(p);
    }
    if let Ok(out) = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output() {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() {
            return Some(PathBuf::from(s));
        }
    }
    common::mnt::skip(
        name,
        &format!("{name} is not installed (./test.sh installs it with cargo install)"),
    );
    None
}

/// pjdfstest in a directory inside `m`: no test may fail, and at least 380 must pass.
fn pjdfstest(pjd: &Path, m: &Mount) {
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/pjdfstest.toml");
    let work = m.p("pjd");
    std::fs::create_dir(&work).unwrap();
    let out = Command::new(pjd)
        .arg("-c")
        .arg(&cfg)
        .arg("-p")
        .arg(&work)
        .current_dir(&work)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| panic!("no summary:\n{text}"));
    let failed: Vec<&str> = text.lines().filter(|l| l.trim_end().ends_with("FAILED")).collect();
    assert!(summary.contains(" 0 failed"), "{summary}\n{}", failed.join("\n"));
    let passed: u32 = summary
        .split(" passed")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(passed >= 380, "{summary}");
    eprintln!("pjdfstest: {summary}");
}

#[test]
fn pjdfstest_passes_inside_the_mount() {
    let Some(pjd) = tool("pjdfstest") else { return };
    scenario("pjdfstest_passes_inside_the_mount", |m| pjdfstest(&pjd, m));
}

/// With the writeback cache the kernel keeps sizes and times itself: POSIX's rules for them
/// (a write updates mtime and ctime, a truncation too, …) must hold all the same.
#[test]
fn pjdfstest_passes_with_ack_fsync() {
    let Some(pjd) = tool("pjdfstest") else { return };
    let opts = Opts {
        extra: &["--ack", "fsync"],
        ..Opts::default()
    };
    let Some(m) = Mount::with("pjdfstest_passes_with_ack_fsync", opts) else {
        return;
    };
    pjdfstest(&pjd, &m);
    m.finish();
}

/// fsx on one file per seed inside `m`.
fn fsx(fsx: &Path, m: &Mount, seeds: &[u32]) {
    for seed in seeds {
        let file = m.p(&format!("fsx-{seed}"));
        let out = Command::new(fsx)
            .args(["-N", "20000", "-S", &seed.to_string(), "-P"])
            .arg(m.tmp.path())
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("A-OK"),
            "fsx seed {seed}:\n{text}"
        );
    }
}

#[test]
fn fsx_with_several_seeds() {
    let Some(tool) = tool("fsx") else { return };
    scenario("fsx_with_several_seeds", |m| fsx(&tool, m, &[1, 7, 42]));
}

/// With the kernel's writeback cache on (`--ack=fsync`), pages reach the daemon at writeback,
/// mtimes come from the kernel, and a write-only open may be read from.
#[test]
fn fsx_with_ack_fsync() {
    let Some(tool) = tool("fsx") else { return };
    let opts = Opts {
        extra: &["--ack", "fsync"],
        ..Opts::default()
    };
    let Some(m) = Mount::with("fsx_with_ack_fsync", opts) else {
        return;
    };
    fsx(&tool, &m, &[3, 42]);
    m.finish();
}

#[test]
fn tarball_then_git_init_commit_gc() {
    if Command::new("git").arg("--version").output().is_err() {
        panic!("git is needed (./test.sh installs it)");
    }
    let Some(mut m) = Mount::new("tarball_then_git_init_commit_gc") else {
        return;
    };
    let tar = m.tmp.path().join("tree.tar");
    // A real tree of a few thousand small files: the system's C headers.
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .args(["-C", "/usr/include", "."])
        .status()
        .unwrap();
    assert!(st.success());
    let repo = m.p("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&repo)
        .status()
        .unwrap();
    assert!(st.success());
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "headers"]);
    std::fs::write(repo.join("stdio.h"), b"changed\n").unwrap();
    std::fs::remove_dir_all(repo.join("linux")).ok();
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "second"]);
    git(&["gc", "-q", "--aggressive"]);
    let dst_repo = m.dst.join("repo");
    m.finish_ref();
    let out = Command::new("git")
        .args(["fsck", "--full"])
        .current_dir(&dst_repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git fsck on the target: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
