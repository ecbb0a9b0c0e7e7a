//! `mount-mirrorfs`, installed as `/sbin/mount.mirrorfs` (Cargo binary names cannot hold a dot):
//! the helper mount(8) runs for `mount -t mirrorfs SRC DIR -o target=…` and for /etc/fstab lines
//! of type `mirrorfs`. It follows mount(8)'s calling convention,
//! `mount.mirrorfs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`, turns the options into a
//! `mirrorfs mount` command line and runs it (which returns once the mount is live).
//!
//! mirrorfs options: `target=` (required), `token_file=`, `ssh=`, `remote_mirrorfs=`, `remote_option=`, `timeout=`,
//! `on_disconnect=`, `ack=`, `log_file=`, `threads=`, `no_passthrough`, `allow_mass_delete`, `no_watch`.
//! A value with commas is written in double quotes; fstab writes a space as `\040`. Generic options mount(8) or fstab add (`rw`,
//! `defaults`, `auto`, `noauto`, `user`, `nofail`, `_netdev`, `x-*`, …) are ignored; anything else
//! is an error, unless `-s` (sloppy) was given.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// What mount(8) asked for.
#[derive(Debug, Default, PartialEq)]
struct Call {
    spec: String,
    dir: String,
    options: Vec<String>,
    sloppy: bool,
    fake: bool,
    verbose: bool,
}

fn parse_call(args: &[String]) -> Result<Call, String> {
    let mut c = Call::default();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        match a.as_str() {
            "-o" | "-t" | "-N" => {
                let v = args.get(i + 1).ok_or_else(|| format!("{a} needs a value"))?;
                if a == "-o" {
                    c.options.extend(split_options(v)?);
                }
                i += 2;
                continue;
            }
            s if s.starts_with('-') && s.len() > 1 && !s.starts_with("--") => {
                for f in s[1..].chars() {
                    match f {
                        's' => c.sloppy = true,
                        'f' => c.fake = true,
                        'v' => c.verbose = true,
                        'n' | 'r' | 'w' => {}
                        _ => return Err(format!("unknown flag -{f}")),
                    }
                }
            }
            _ => pos.push(a.clone()),
        }
        i += 1;
    }
    match pos.as_slice() {
        [spec, dir] => {
            c.spec = spec.clone();
            c.dir = dir.clone();
            Ok(c)
        }
        _ => Err("usage: mount.mirrorfs SRC DIR [-sfnv] [-o target=DIR|unix:PATH|tcp:HOST:PORT|HOST:PATH,...]".into()),
    }
}

/// Splits mount options at commas, except inside double quotes, which are removed
/// (libmount's rule): `ssh="ssh -F /etc/m/ssh_config",target=backup:/srv/m`.
fn split_options(v: &str) -> Result<Vec<String>, String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in v.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err(format!("an unclosed \" in the options {v:?}"));
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// Options mount(8) and fstab pass that mean nothing to mirrorfs.
fn generic(o: &str) -> bool {
    const GENERIC: &[&str] = &[
        "rw",
        "defaults",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "nofail",
        "_netdev",
        "relatime",
        "noatime",
        "atime",
        "strictatime",
        "dev",
        "suid",
        "exec",
        "async",
        "loop",
    ];
    GENERIC.contains(&o) || o.starts_with("x-") || o.starts_with("comment=")
}

/// The `mirrorfs` arguments for a call.
fn mirrorfs_args(c: &Call) -> Result<Vec<String>, String> {
    let mut args = vec!["mount".to_string(), c.spec.clone()];
    if c.dir != c.spec {
        args.push(c.dir.clone());
    }
    let mut target = None;
    for o in &c.options {
        let (k, v) = match o.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (o.as_str(), None),
        };
        let flag = |name: &str| -> Result<Vec<String>, String> {
            let v = v
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("option {k} needs a value ({k}=…)"))?;
            Ok(vec![format!("--{name}"), v.to_string()])
        };
        match k {
            "target" => target = Some(flag("target")?),
            "token_file" => args.extend(flag("token-file")?),
            "ssh" => args.extend(flag("ssh")?),
            "remote_mirrorfs" => args.extend(flag("remote-mirrorfs")?),
            "remote_option" => {
                let v = v.filter(|v| !v.is_empty()).ok_or("option remote_option needs a value")?;
                args.push(format!("--remote-option={v}"));
            }
            "timeout" => args.extend(flag("timeout")?),
            "on_disconnect" => args.extend(flag("on-disconnect")?),
            "ack" => args.extend(flag("ack")?),
            "log_file" => args.extend(flag("log-file")?),
            "threads" => args.extend(flag("threads")?),
            "no_passthrough" => args.push("--no-passthrough".into()),
            "allow_mass_delete" => args.push("--allow-mass-delete".into()),
            "no_watch" => args.push("--no-watch".into()),
            "ro" => return Err("mirrorfs mounts are read-write; drop the ro option".into()),
            _ if generic(o) => {}
            _ if c.sloppy => {}
            _ => return Err(format!("unknown option {o:?} (mirrorfs options: target=, token_file=, ssh=, remote_mirrorfs=, remote_option=, timeout=, on_disconnect=, ack=, log_file=, threads=, no_passthrough, allow_mass_delete, no_watch)")),
        }
    }
    let target = target
        .ok_or("the target option is required: -o target=DIR|unix:PATH|tcp:HOST:PORT|ssh://HOST/PATH|HOST:PATH")?;
    args.extend(target);
    args.push("--quiet".into());
    Ok(args)
}

/// The `mirrorfs` binary: $MIRRORFS_BIN, else beside this helper (symlinks resolved), else PATH.
fn mirrorfs_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("MIRRORFS_BIN") {
        return PathBuf::from(b);
    }
    if let Ok(me) = std::env::current_exe().and_then(std::fs::canonicalize) {
        if let Some(dir) = me.parent() {
            let sib = dir.join("mirrorfs");
            if sib.exists() {
                return sib;
            }
        }
    }
    for dir in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        let p = Path::new(dir).join("mirrorfs");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("mirrorfs")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a: OsString| a.to_string_lossy().into_owned())
        .collect();
    let call = match parse_call(&args).and_then(|c| mirrorfs_args(&c).map(|a| (c, a))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mount.mirrorfs: {e}");
            // mount(8)'s "usage or syntax error".
            return ExitCode::from(1);
        }
    };
    let (c, margs) = call;
    let bin = mirrorfs_bin();
    if c.verbose || c.fake {
        eprintln!("mount.mirrorfs: {} {}", bin.display(), margs.join(" "));
    }
    if c.fake {
        return ExitCode::SUCCESS;
    }
    match Command::new(&bin).args(&margs).status() {
        Ok(st) if st.success() => ExitCode::SUCCESS,
        Ok(st) => {
            eprintln!("mount.mirrorfs: mirrorfs mount failed ({st})");
            // mount(8)'s "mount failure".
            ExitCode::from(32)
        }
        Err(e) => {
            eprintln!("mount.mirrorfs: cannot run {}: {e}", bin.display());
            ExitCode::from(32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn calls_translate_to_mirrorfs_arguments() {
        let cases: &[(&[&str], Result<&[&str], &str>)] = &[
            (
                &["/s", "/s", "-o", "rw,target=/b,nofail"],
                Ok(&["mount", "/s", "--target", "/b", "--quiet"]),
            ),
            (
                &["/s", "/m", "-o", "target=unix:/run/t.sock,timeout=5,ack=fsync", "-v"],
                Ok(&[
                    "mount",
                    "/s",
                    "/m",
                    "--timeout",
                    "5",
                    "--ack",
                    "fsync",
                    "--target",
                    "unix:/run/t.sock",
                    "--quiet",
                ]),
            ),
            (
                &[
                    "/s",
                    "/m",
                    "-o",
                    "no_passthrough,target=/b,x-systemd.after=net,no_watch",
                ],
                Ok(&[
                    "mount",
                    "/s",
                    "/m",
                    "--no-passthrough",
                    "--no-watch",
                    "--target",
                    "/b",
                    "--quiet",
                ]),
            ),
            (
                &[
                    "/s",
                    "/s",
                    "-o",
                    "target=backup:/srv/m,ssh=\"ssh -F /etc/m/cfg -o Ciphers=aes128-ctr,aes256-ctr\",remote_mirrorfs=/opt/mirrorfs,remote_option=--fake-super",
                ],
                Ok(&[
                    "mount",
                    "/s",
                    "--ssh",
                    "ssh -F /etc/m/cfg -o Ciphers=aes128-ctr,aes256-ctr",
                    "--remote-mirrorfs",
                    "/opt/mirrorfs",
                    "--remote-option=--fake-super",
                    "--target",
                    "backup:/srv/m",
                    "--quiet",
                ]),
            ),
            (&["/s", "/m", "-o", "target=h:/m,ssh=\"ssh"], Err("unclosed")),
            (&["/s", "/m", "-o", "rw"], Err("target option is required")),
            (&["/s", "/m", "-o", "target=/b,colour=red"], Err("unknown option")),
            (
                &["/s", "/m", "-s", "-o", "target=/b,colour=red"],
                Ok(&["mount", "/s", "/m", "--target", "/b", "--quiet"]),
            ),
            (&["/s", "/m", "-o", "target="], Err("needs a value")),
            (&["/s", "/m", "-o", "target=/b,ro"], Err("read-write")),
            (&["/s"], Err("usage")),
        ];
        for (args, want) in cases {
            let got = parse_call(&v(args)).and_then(|c| mirrorfs_args(&c));
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, v(w), "{args:?}"),
                (Err(w), Err(g)) => assert!(g.contains(w), "{args:?}: {g}"),
                (w, g) => panic!("{args:?}: wanted {w:?}, got {g:?}"),
            }
        }
    }
}
