//! CHAP with MD5 (RFC 1994, as used by RFC 7143 §12.1.3).

use md5::{Digest, Md5};
use rand::RngCore;

/// The only CHAP algorithm implemented: CHAP_A=5 (MD5).
pub const CHAP_MD5: u8 = 5;
/// Length of the challenges we generate.
pub const CHALLENGE_LEN: usize = 16;
/// Longest challenge we accept from a peer.
pub const MAX_CHALLENGE_LEN: usize = 1024;

/// A CHAP name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredential {
    pub name: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredential")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ChapCredential {
    pub fn new(name: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        ChapCredential {
            name: name.into(),
            secret: secret.into(),
        }
    }
}

/// MD5(identifier || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Constant-time comparison of a received response with the expected one.
pub fn verify(expected: &[u8; 16], received: &[u8]) -> bool {
    if received.len() != expected.len() {
        return false;
    }
    let mut diff = 0u8;
    for (a, b) in expected.iter().zip(received) {
        diff |= a ^ b;
    }
    diff == 0
}

/// A fresh random identifier and challenge.
pub fn new_challenge() -> (u8, [u8; CHALLENGE_LEN]) {
    let mut rng = rand::thread_rng();
    let mut c = [0u8; CHALLENGE_LEN];
    rng.fill_bytes(&mut c);
    let mut id = [0u8; 1];
    rng.fill_bytes(&mut id);
    (id[0], c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_known_vector() {
        // MD5(0x01 || "secret" || 0x00..0x0f), computed independently.
        let ch: Vec<u8> = (0u8..16).collect();
        let r = response(1, b"secret", &ch);
        assert_eq!(
            crate::keys::encode_hex(&r),
            "0x740e86463bda3a4d7017d6e0fba0699d"
        );
        // MD5("") is the well known d41d8cd98f00b204e9800998ecf8427e;
        // check the hash primitive itself.
        let empty: [u8; 16] = Md5::new().finalize().into();
        assert_eq!(
            crate::keys::encode_hex(&empty),
            "0xd41d8cd98f00b204e9800998ecf8427e"
        );
        assert!(verify(&r, &r));
        let mut bad = r;
        bad[15] ^= 1;
        assert!(!verify(&r, &bad));
        assert!(!verify(&r, &r[..15]));
    }

    #[test]
    fn challenges_differ() {
        let (_, a) = new_challenge();
        let (_, b) = new_challenge();
        assert_ne!(a, b);
    }
}
