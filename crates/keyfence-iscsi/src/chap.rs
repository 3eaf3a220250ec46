//! CHAP with MD5 (RFC 1994, as used by RFC 7143 §12.1.3).

use md5::{Digest, Md5};
use rand::RngCore;

/// The only CHAP algorithm implemented: CHAP_A=5 (MD5).
pub const CHAP_MD5: u8 = 5;
/// Length of the challenges we generate.
pub const CHALLENGE_LEN: usize = 16;
/// Longest challenge we accept from a peer (RFC 7143 §12.1.3 caps
/// binary values of CHAP_C at 1024 bytes).
pub const MAX_CHALLENGE_LEN: usize = 1024;
/// Shortest challenge we accept from a peer: the length of the MD5 output.
/// RFC 1994 §2.3 wants a challenge at least as long as the hash output,
/// and RFC 7143 §12.1.3 asks for unpredictable challenges; a 1-byte
/// challenge lets an eavesdropper collect a table of responses to replay.
pub const MIN_CHALLENGE_LEN: usize = 16;

/// Is `c` a challenge we answer: between [`MIN_CHALLENGE_LEN`] and
/// [`MAX_CHALLENGE_LEN`] bytes.
pub fn challenge_acceptable(c: &[u8]) -> bool {
    (MIN_CHALLENGE_LEN..=MAX_CHALLENGE_LEN).contains(&c.len())
}

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
    fn short_and_long_challenges_are_refused() {
        assert!(!challenge_acceptable(&[]));
        assert!(!challenge_acceptable(&[7]));
        assert!(!challenge_acceptable(&[0; 15]));
        assert!(challenge_acceptable(&[0; 16]));
        assert!(challenge_acceptable(&[0; 1024]));
        assert!(!challenge_acceptable(&[0; 1025]));
        // What we generate ourselves passes our own rule.
        assert!(challenge_acceptable(&new_challenge().1));
    }

    #[test]
    fn challenges_differ() {
        let (_, a) = new_challenge();
        let (_, b) = new_challenge();
        assert_ne!(a, b);
    }
}
