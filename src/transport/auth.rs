//! Token authentication for TCP: a mutual keyed-hash challenge. Both sides derive a key from the
//! token file with BLAKE3's key derivation; each proves knowledge of it by hashing the other's
//! fresh nonce. The token itself never crosses the wire.

use std::io::{self, Read};
use std::path::Path;

pub type Key = [u8; 32];

/// Reads the token file (surrounding whitespace ignored) and derives the key.
pub fn load_key(path: &Path) -> io::Result<Key> {
    let raw = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read token file {}: {e}", path.display())))?;
    let token = raw.trim_ascii();
    if token.len() < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "token file {} holds {} bytes; use at least 16 random bytes",
                path.display(),
                token.len()
            ),
        ));
    }
    Ok(blake3::derive_key("mirrorfs 2026 token authentication v1", token))
}

pub fn nonce() -> io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The proof one side gives: keyed hash over a role label and both nonces.
pub fn proof(key: &Key, role: &[u8], first: &[u8; 32], second: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(first);
    h.update(second);
    *h.finalize().as_bytes()
}

/// Constant-time comparison.
pub fn verify(expected: &[u8; 32], got: &[u8; 32]) -> bool {
    blake3::Hash::from(*expected) == blake3::Hash::from(*got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_key_role_and_nonces() {
        let k1 = blake3::derive_key("x", b"one");
        let k2 = blake3::derive_key("x", b"two");
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let p = proof(&k1, b"client", &a, &b);
        assert!(verify(&p, &proof(&k1, b"client", &a, &b)));
        assert!(!verify(&p, &proof(&k2, b"client", &a, &b)));
        assert!(!verify(&p, &proof(&k1, b"server", &a, &b)));
        assert!(!verify(&p, &proof(&k1, b"client", &b, &a)));
    }
}
