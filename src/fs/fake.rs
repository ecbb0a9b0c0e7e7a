//! The `--fake-super` record (rsync's name and format): a target without root keeps what it
//! cannot apply, the owner, the full mode (file type and set-ID bits) and the device number,
//! in the xattr `user.mirrorfs.stat` as `"<mode octal> <major>,<minor> <uid>:<gid>"`. Linux
//! allows no user xattrs on symlinks and special files, so those are stored as rsync stores
//! them: a regular file holding the link target (or nothing), with the record. Reading such a
//! tree with the same option (`sync --fake-super`) gives the recorded metadata back, which is
//! how a backup made this way is restored. Pure: `LocalFs` does the I/O.

use super::{Kind, Meta};

/// Under mirrorfs's own prefix, so scans and the wire never show it as a user xattr.
pub const XATTR: &[u8] = b"user.mirrorfs.stat";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// File type bits and permission bits, as `st_mode`.
    pub mode: u32,
    pub rdev: u64,
    pub uid: u32,
    pub gid: u32,
}

impl Record {
    /// What the real entry shows (for an entry without a record yet).
    pub fn of(m: &Meta) -> Record {
        Record {
            mode: m.kind.type_bits() | m.perm,
            rdev: m.rdev,
            uid: m.uid,
            gid: m.gid,
        }
    }

    pub fn kind(&self) -> Kind {
        Kind::from_mode(self.mode)
    }

    pub fn parse(v: &[u8]) -> Option<Record> {
        let s = std::str::from_utf8(v).ok()?;
        let mut f = s.split(' ');
        let mode = u32::from_str_radix(f.next()?, 8).ok()?;
        let (major, minor) = f.next()?.split_once(',')?;
        let (uid, gid) = f.next()?.split_once(':')?;
        if f.next().is_some() || mode & libc::S_IFMT == 0 {
            return None;
        }
        Some(Record {
            mode,
            rdev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{:o} {},{} {}:{}",
            self.mode,
            libc::major(self.rdev),
            libc::minor(self.rdev),
            self.uid,
            self.gid
        )
        .into_bytes()
    }

    /// The metadata the entry stands for; `m` is the real one (a regular file or directory).
    pub fn apply(&self, m: &mut Meta) {
        let kind = self.kind();
        if stored_as_file(kind) {
            m.nlink = 1;
            if kind != Kind::Symlink {
                m.size = 0;
                m.blocks = 0;
            }
        }
        m.kind = kind;
        m.perm = self.mode & 0o7777;
        m.uid = self.uid;
        m.gid = self.gid;
        m.rdev = if kind.is_device() { self.rdev } else { 0 };
    }

    /// The permission bits the real entry gets: its owner can always read and write it (and
    /// enter a directory), set-ID bits live only in the record, and a stand-in file is private.
    pub fn real_perm(&self) -> u32 {
        match self.kind() {
            Kind::Dir => (self.mode & 0o777) | 0o700,
            Kind::File => (self.mode & 0o777) | 0o600,
            _ => 0o600,
        }
    }
}

/// Kinds kept as a regular file holding the link target or nothing.
pub fn stored_as_file(kind: Kind) -> bool {
    kind == Kind::Symlink || kind.is_special()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_ignored() {
        let cases = [
            (
                Record {
                    mode: libc::S_IFREG | 0o4755,
                    rdev: 0,
                    uid: 0,
                    gid: 0,
                },
                "104755 0,0 0:0",
            ),
            (
                Record {
                    mode: libc::S_IFCHR | 0o666,
                    rdev: libc::makedev(1, 3),
                    uid: 0,
                    gid: 5,
                },
                "20666 1,3 0:5",
            ),
            (
                Record {
                    mode: libc::S_IFLNK | 0o777,
                    rdev: 0,
                    uid: 1234,
                    gid: 5678,
                },
                "120777 0,0 1234:5678",
            ),
        ];
        for (r, text) in cases {
            assert_eq!(String::from_utf8(r.encode()).unwrap(), text);
            assert_eq!(Record::parse(text.as_bytes()), Some(r));
        }
        for bad in [
            "",
            "644 0,0 0:0",
            "100644 0,0",
            "100644 0 0:0",
            "x 0,0 0:0",
            "100644 0,0 0:0 extra",
            "\u{ff}",
        ] {
            assert_eq!(Record::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn real_permissions_keep_the_entry_usable_and_private() {
        let r = |mode| {
            Record {
                mode,
                rdev: 0,
                uid: 0,
                gid: 0,
            }
            .real_perm()
        };
        assert_eq!(r(libc::S_IFREG | 0o4000), 0o600);
        assert_eq!(r(libc::S_IFREG | 0o6755), 0o755);
        assert_eq!(r(libc::S_IFDIR | 0o2750), 0o750);
        assert_eq!(r(libc::S_IFDIR | 0o000), 0o700);
        assert_eq!(r(libc::S_IFBLK | 0o660), 0o600);
    }
}
