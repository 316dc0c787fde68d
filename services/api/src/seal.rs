//! Secrets at rest: sealed with the server key (ChaCha20-Poly1305, random nonce), so the log
//! never carries a usable webhook secret. Sealed form: 12-byte nonce ‖ ciphertext+tag.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// A 32-byte server key.
#[derive(Clone)]
pub struct ServerKey([u8; 32]);

impl ServerKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        ServerKey(bytes)
    }

    pub fn generate() -> Self {
        ServerKey(rand::random())
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.0));
        let nonce: [u8; 12] = rand::random();
        let mut out = nonce.to_vec();
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        out.extend(
            cipher
                .encrypt(Nonce::from_slice(&nonce), plain)
                .unwrap_or_default(),
        );
        out
    }

    /// None if the data was not sealed with this key or was tampered with.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        let (nonce, body) = sealed.split_at(12);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.0));
        cipher.decrypt(Nonce::from_slice(nonce), body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let key = ServerKey::generate();
        let sealed = key.seal(b"s3cret");
        assert_ne!(&sealed[12..], b"s3cret");
        assert_eq!(key.open(&sealed).as_deref(), Some(&b"s3cret"[..]));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(key.open(&bad), None);
        assert_eq!(ServerKey::generate().open(&sealed), None);
    }
}
