//! `RelPath`: a validated path relative to a mirrored root. It is checked once, when it is built
//! or decoded from the wire: never absolute, no `.` or `..` component, no empty component, no NUL.
//! Names are raw bytes, so non-UTF-8 names survive. The empty path is the root itself. Paths order
//! component by component, so a sorted list is a pre-order walk: a directory comes before its
//! children, and all of a directory's descendants come before its next sibling.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::fmt;
use std::path::Path;

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("absolute path {0:?} where a relative one is required")]
    Absolute(String),
    #[error("path {0:?} has a `.` or `..` component")]
    DotComponent(String),
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("name {0:?} is not a single path component")]
    NotAName(String),
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl RelPath {
    /// The root of the mirrored tree.
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    /// Validates `bytes` as a relative path.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<RelPath, PathError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Ok(RelPath(bytes));
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(show(&bytes)));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(show(&bytes)));
        }
        for c in bytes.split(|b| *b == b'/') {
            if c.is_empty() {
                return Err(PathError::EmptyComponent(show(&bytes)));
            }
            if c == b"." || c == b".." {
                return Err(PathError::DotComponent(show(&bytes)));
            }
        }
        Ok(RelPath(bytes))
    }

    pub fn from_path(p: &Path) -> Result<RelPath, PathError> {
        use std::os::unix::ffi::OsStrExt;
        RelPath::new(p.as_os_str().as_bytes())
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(crate::sys::os(&self.0))
    }

    /// Appends one name; the name must be a single valid component.
    pub fn join(&self, name: &[u8]) -> Result<RelPath, PathError> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
            return Err(PathError::NotAName(show(name)));
        }
        let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
        v.extend_from_slice(&self.0);
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        Ok(RelPath(v))
    }

    /// Joins another relative path below this one.
    pub fn join_rel(&self, other: &RelPath) -> RelPath {
        if self.is_root() {
            return other.clone();
        }
        if other.is_root() {
            return self.clone();
        }
        let mut v = self.0.clone();
        v.push(b'/');
        v.extend_from_slice(&other.0);
        RelPath(v)
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => RelPath(self.0[..i].to_vec()),
            None => RelPath::root(),
        })
    }

    /// The last component; empty for the root.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Splits into (parent directory, last name). The root has no last name.
    pub fn split(&self) -> Option<(&[u8], &[u8])> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => (&self.0[..i], &self.0[i + 1..]),
            None => (&[][..], &self.0[..]),
        })
    }

    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.0.split(|b| *b == b'/').filter(|c| !c.is_empty())
    }

    /// True when `self` is `other` or lies beneath it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        if other.is_root() {
            return true;
        }
        self.0.starts_with(&other.0) && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    pub fn depth(&self) -> usize {
        self.components().count()
    }
}

impl Ord for RelPath {
    /// Component-wise order, computed on the bytes: at the first byte that differs, `/` (the end
    /// of a component) sorts before everything, which is exactly comparing component lists.
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&self.0, &other.0);
        match first_difference(a, b) {
            Some(i) => {
                let key = |c: u8| if c == b'/' { 0 } else { c };
                key(a[i]).cmp(&key(b[i]))
            }
            None => a.len().cmp(&b.len()),
        }
    }
}

/// The first index where `a` and `b` differ, comparing eight bytes at a time.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        if a[i..i + 8] != b[i..i + 8] {
            break;
        }
        i += 8;
    }
    (i..n).find(|&j| a[j] != b[j])
}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", show(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            return f.write_str(".");
        }
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: serde_bytes_compat::ByteBuf = Deserialize::deserialize(d)?;
        RelPath::new(v.0).map_err(serde::de::Error::custom)
    }
}

/// Deserialises a byte string without an extra crate.
pub(crate) mod serde_bytes_compat {
    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
    use std::fmt;

    pub struct ByteBuf(pub Vec<u8>);

    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a byte string")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ByteBuf, A::Error> {
                    let mut v = Vec::new();
                    while let Some(b) = seq.next_element()? {
                        v.push(b);
                    }
                    Ok(ByteBuf(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        let cases: &[(&[u8], bool)] = &[
            (b"", true),
            (b"a", true),
            (b"a/b c/-d", true),
            (b"a\nb", true),
            (b"\xff\xfe", true),
            (b"/etc", false),
            (b"..", false),
            (b"a/../b", false),
            (b"./a", false),
            (b"a//b", false),
            (b"a/", false),
            (b"a\0b", false),
        ];
        for (p, ok) in cases {
            assert_eq!(
                RelPath::new(p.to_vec()).is_ok(),
                *ok,
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn preorder_sort() {
        let mut v: Vec<RelPath> = ["a b", "a/b", "a", "a/b/c", "a.x", "b"]
            .iter()
            .map(|s| RelPath::new(*s).unwrap())
            .collect();
        v.sort();
        let s: Vec<String> = v.iter().map(|p| p.to_string()).collect();
        assert_eq!(s, ["a", "a/b", "a/b/c", "a b", "a.x", "b"]);
    }

    #[test]
    fn byte_order_matches_component_order() {
        let names = [
            "a", "a/b", "a b", "a/b/c", "a.x", "a/\x01", "a\x01", "ab", "a/ab", "b", "a/b c", "a/b/c/d",
        ];
        for x in names {
            for y in names {
                let (px, py) = (RelPath::new(x).unwrap(), RelPath::new(y).unwrap());
                assert_eq!(px.cmp(&py), px.components().cmp(py.components()), "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn parent_name_join() {
        let p = RelPath::new("x/y/z").unwrap();
        assert_eq!(p.parent().unwrap().to_string(), "x/y");
        assert_eq!(p.file_name(), b"z");
        assert_eq!(RelPath::new("x").unwrap().parent(), Some(RelPath::root()));
        assert!(RelPath::root().parent().is_none());
        assert!(p.join(b"..").is_err());
        assert!(p.join(b"a/b").is_err());
        assert!(p.starts_with(&RelPath::new("x/y").unwrap()));
        assert!(!RelPath::new("x/yy").unwrap().starts_with(&RelPath::new("x/y").unwrap()));
    }

    #[test]
    fn wire_decode_validates() {
        let cfg = bincode::config::standard();
        let bad = bincode::serde::encode_to_vec(serde_bytes_compat_bytes(b"../x"), cfg).unwrap();
        let r: Result<(RelPath, usize), _> = bincode::serde::decode_from_slice(&bad, cfg);
        assert!(r.is_err());
        let good = bincode::serde::encode_to_vec(RelPath::new("a/b").unwrap(), cfg).unwrap();
        let (p, _): (RelPath, usize) = bincode::serde::decode_from_slice(&good, cfg).unwrap();
        assert_eq!(p.to_string(), "a/b");
    }

    struct Raw(&'static [u8]);
    impl Serialize for Raw {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    fn serde_bytes_compat_bytes(b: &'static [u8]) -> Raw {
        Raw(b)
    }
}
