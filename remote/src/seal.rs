//! How a plaintext becomes an object and back: zstd, then
//! XChaCha20-Poly1305 under the data key with a random 192-bit nonce.
//!
//! An object is `FORMAT (1 byte) | nonce (24) | ciphertext | tag (16)`.
//! The associated data binds the ciphertext to the object's role and name
//! (`chunk <name>`, `manifest <id>`, `keycheck`), so an object copied
//! under another name fails to open rather than being taken for it.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::keys::Keys;

const FORMAT: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// zstd's default: about 3x faster than level 9 on a send stream for a
/// few percent of size.
const ZSTD_LEVEL: i32 = 3;

/// Why an object did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Too short or an unknown format byte.
    Framing,
    /// The AEAD tag did not verify: changed bytes, another name, or
    /// another key.
    Decrypt,
    /// Decrypted, but not a zstd frame of the expected size.
    Decompress,
}

impl OpenError {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            OpenError::Framing => "it is truncated or not a hull object",
            OpenError::Decrypt => "it does not decrypt (changed bytes, or another key)",
            OpenError::Decompress => "it decrypts but does not decompress to its recorded size",
        }
    }
}

fn cipher(keys: &Keys) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new((&keys.data).into())
}

/// Compresses and encrypts `plaintext` for an object whose role and name
/// are `aad`.
pub(crate) fn seal(keys: &Keys, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    // Compressing into a Vec cannot fail but for allocation, which aborts.
    let compressed = zstd::bulk::compress(plaintext, ZSTD_LEVEL).unwrap_or_else(|_| {
        // zstd reports errors only for bad parameters; the level is fixed.
        unreachable!("zstd rejected level {ZSTD_LEVEL}")
    });
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the OS random number generator failed");
    let ciphertext = cipher(keys)
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &compressed,
                aad,
            },
        )
        .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encrypts any length hull writes"));
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

/// Decrypts and decompresses an object; `max_len` bounds the plaintext
/// (a chunk's recorded length, or a manifest's cap).
pub(crate) fn open(
    keys: &Keys,
    aad: &[u8],
    object: &[u8],
    max_len: usize,
) -> Result<Vec<u8>, OpenError> {
    if object.len() < 1 + NONCE_LEN + TAG_LEN || object[0] != FORMAT {
        return Err(OpenError::Framing);
    }
    let (nonce, ciphertext) = object[1..].split_at(NONCE_LEN);
    let compressed = cipher(keys)
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| OpenError::Decrypt)?;
    zstd::bulk::decompress(&compressed, max_len).map_err(|_| OpenError::Decompress)
}

pub(crate) fn chunk_aad(name: &str) -> Vec<u8> {
    format!("hull-remote chunk {name}").into_bytes()
}

pub(crate) fn manifest_aad(id: &str) -> Vec<u8> {
    format!("hull-remote manifest {id}").into_bytes()
}

pub(crate) const KEYCHECK_AAD: &[u8] = b"hull-remote keycheck";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_opens_only_with_its_key_and_name() {
        let keys = Keys::generate();
        let data = b"hello hello hello hello".repeat(100);
        let sealed = seal(&keys, b"chunk a", &data);
        assert_eq!(open(&keys, b"chunk a", &sealed, data.len()).unwrap(), data);
        assert_eq!(
            open(&keys, b"chunk b", &sealed, data.len()),
            Err(OpenError::Decrypt)
        );
        assert_eq!(
            open(&Keys::generate(), b"chunk a", &sealed, data.len()),
            Err(OpenError::Decrypt)
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            open(&keys, b"chunk a", &flipped, data.len()),
            Err(OpenError::Decrypt)
        );
        assert_eq!(
            open(&keys, b"chunk a", &sealed[..10], data.len()),
            Err(OpenError::Framing)
        );
        // A plaintext larger than the caller allows is refused.
        assert_eq!(
            open(&keys, b"chunk a", &sealed, data.len() - 1),
            Err(OpenError::Decompress)
        );
        // Two seals of the same plaintext differ (random nonces).
        assert_ne!(seal(&keys, b"chunk a", &data), sealed);
    }
}
