//! Random tokens and their comparison, for secrets the process makes itself (session
//! cookies, CSRF tokens, webhook secrets).

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `n` random bytes as hex, from the OS-seeded thread RNG (a CSPRNG).
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill(&mut bytes[..]);
    hex::encode(bytes)
}

/// Equal strings in time that depends only on their lengths' hashes, not on where they
/// differ: both sides are hashed first, so the comparison is of fixed-size digests.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    x.ct_eq(&y).into()
}

/// The SHA-256 of `s` as hex (how session tokens are stored).
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}
