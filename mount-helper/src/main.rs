//! `mount-mirrorfs`, installed as `/sbin/mount.mirrorfs`: the helper mount(8) calls for `mount -t mirrorfs`
//! (Cargo binary names cannot hold a dot, so the install step renames it). The FUSE mount it will
//! start arrives with the mount issue; until then it says so plainly and fails.

fn main() {
    eprintln!("mount.mirrorfs: the FUSE mount is not built yet; use `mirrorfs sync` or `mirrorfs serve`");
    std::process::exit(32);
}
