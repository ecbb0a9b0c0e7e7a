//! `ReplicatorTarget::handle_request` on a scratch root that holds a symlink to a directory
//! outside it: the input is a stream of `(id, Request)` frames, applied in order. Nothing may
//! panic, and nothing outside the root may change (checked after every input). The root is
//! made afresh for every input, so each finding reproduces from its input alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mirrorfs::fs::{FileSystem, LocalFs};
use mirrorfs::protocol::{self, Request};
use mirrorfs::{RelPath, ReplicatorTarget};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

struct Scratch {
    root: PathBuf,
    outside: PathBuf,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    let s = S.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("mirrorfs-fuzz-{}", std::process::id()));
        let (root, outside) = (base.join("root"), base.join("outside"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("x"), b"outside").unwrap();
        Scratch { root, outside }
    });
    // A fresh root: what an earlier input left (a huge sparse file, say) cannot carry over.
    let _ = std::fs::remove_dir_all(&s.root);
    std::fs::create_dir_all(s.root.join("d")).unwrap();
    std::fs::write(s.root.join("a"), b"a").unwrap();
    std::os::unix::fs::symlink(&s.outside, s.root.join("link")).unwrap();
    s
}

/// The outside directory as it was made: its names, and x's content and mode.
fn outside_intact(s: &Scratch) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mut names: Vec<_> = std::fs::read_dir(&s.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let x = std::fs::symlink_metadata(s.outside.join("x")).unwrap();
    names == ["sub", "x"]
        && std::fs::read(s.outside.join("x")).unwrap() == b"outside"
        && x.permissions().mode() & 0o7777 == 0o644
        && std::fs::read_dir(s.outside.join("sub")).unwrap().count() == 0
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    let fs: Arc<dyn FileSystem> = Arc::new(LocalFs::new(&s.root).unwrap());
    let mut t = ReplicatorTarget::new(fs, RelPath::root());
    let mut r = data;
    while let Ok(payload) = protocol::read_payload(&mut r) {
        if let Ok((_, req)) = protocol::decode::<(u64, Request)>(&payload) {
            let _ = t.handle_request(req);
        }
    }
    assert!(outside_intact(s), "a request changed something outside the root");
});
