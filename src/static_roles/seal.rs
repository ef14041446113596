//! Sealing static-role passwords for the store.
//!
//! Every replica must be able to read the current password between
//! rotations, so it is kept in the store — sealed: ChaCha20-Poly1305
//! (ring, the tree's one crypto provider) under a key that lives in a file
//! or an environment variable, never in the store. The associated data
//! binds the static role, the user and the generation, so a sealed value
//! copied to another row, user or generation fails to open instead of
//! serving the wrong password. Nonces are 96 random bits per seal: a key
//! seals a few values per rotation period, far below the birthday bound.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::SecretSource;
use crate::error::{Error, Result};
use crate::lease::Password;

/// Prefix of a sealed value: the format's version.
const VERSION: &str = "v1.";

/// The sealing key. `Debug` shows nothing of it.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key redacted>)")
    }
}

impl Sealer {
    /// Reads the key the config names: 32 bytes written as 64 hex digits
    /// or as base64 (e.g. `openssl rand -hex 32`). Errors are `Config`.
    pub fn load(source: &SecretSource) -> Result<Sealer> {
        let text = source.read("sealing_key")?.ok_or_else(|| {
            Error::config("static_roles need sealing_key_file or sealing_key_env")
        })?;
        let t = text.expose().trim();
        let bytes = Zeroizing::new(if t.len() == 64 {
            hex::decode(t).map_err(|_| bad_key())?
        } else {
            B64.decode(t).map_err(|_| bad_key())?
        });
        Sealer::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Sealer> {
        if bytes.len() != 32 {
            return Err(bad_key());
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| bad_key())?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
        })
    }

    /// Seals `password` for (`role`, `user`, `generation`).
    pub fn seal(
        &self,
        role: &str,
        user: &str,
        generation: u64,
        password: &Password,
    ) -> Result<String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::internal("no randomness for a nonce"))?;
        let mut buf = Zeroizing::new(password.expose().as_bytes().to_vec());
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(role, user, generation)),
                &mut *buf,
            )
            .map_err(|_| Error::internal("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{VERSION}{}", B64.encode(out)))
    }

    /// Opens a value [`Sealer::seal`] made for the same role, user and
    /// generation. Any other key, row or tampering is an error that says
    /// so without any of the value.
    pub fn open(&self, role: &str, user: &str, generation: u64, sealed: &str) -> Result<Password> {
        let fail = || {
            Error::internal(format!(
                "static role {role:?}: the sealed password of {user} (generation {generation}) does not open with this sealing key"
            ))
        };
        let raw = sealed
            .strip_prefix(VERSION)
            .and_then(|b| B64.decode(b).ok())
            .ok_or_else(fail)?;
        if raw.len() < NONCE_LEN {
            return Err(fail());
        }
        let (nonce, ct) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(role, user, generation)), &mut buf)
            .map_err(|_| fail())?;
        let text = std::str::from_utf8(plain).map_err(|_| fail())?;
        Ok(Password::from_secret(text.to_string()))
    }
}

fn aad(role: &str, user: &str, generation: u64) -> Vec<u8> {
    format!("credbroker static-role v1\0{role}\0{user}\0{generation}").into_bytes()
}

fn bad_key() -> Error {
    Error::Config(
        "sealing key: expected 32 bytes as 64 hex digits or base64 (e.g. `openssl rand -hex 32`)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(b: u8) -> Sealer {
        Sealer::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn a_sealed_password_opens_only_for_its_role_user_generation_and_key() {
        let p = Password::from_secret("pencil-hunter2".into());
        let s = sealer(7).seal("orders", "app_a", 3, &p).unwrap();
        assert!(!s.contains("pencil") && s.starts_with("v1."), "{s}");
        assert_eq!(
            sealer(7).open("orders", "app_a", 3, &s).unwrap().expose(),
            "pencil-hunter2"
        );
        for (role, user, generation) in [
            ("other", "app_a", 3),
            ("orders", "app_b", 3),
            ("orders", "app_a", 4),
        ] {
            let e = sealer(7)
                .open(role, user, generation, &s)
                .unwrap_err()
                .to_string();
            assert!(e.contains("does not open") && !e.contains("pencil"), "{e}");
        }
        assert!(
            sealer(8).open("orders", "app_a", 3, &s).is_err(),
            "another key"
        );
        let mut tampered = s.clone();
        tampered.pop();
        tampered.push(if s.ends_with('A') { 'B' } else { 'A' });
        assert!(sealer(7).open("orders", "app_a", 3, &tampered).is_err());
        // Same input, fresh nonce: two seals never look alike.
        assert_ne!(s, sealer(7).seal("orders", "app_a", 3, &p).unwrap());
    }

    #[test]
    fn keys_load_from_hex_or_base64_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let hex_file = dir.path().join("hex");
        std::fs::write(&hex_file, format!("{}\n", "ab".repeat(32))).unwrap();
        let b64_file = dir.path().join("b64");
        std::fs::write(&b64_file, B64.encode([0xab; 32])).unwrap();
        let a = Sealer::load(&SecretSource::File(hex_file)).unwrap();
        let b = Sealer::load(&SecretSource::File(b64_file)).unwrap();
        let p = Password::generate();
        let s = a.seal("r", "u", 1, &p).unwrap();
        assert_eq!(b.open("r", "u", 1, &s).unwrap().expose(), p.expose());
        assert_eq!(format!("{a:?}"), "Sealer(<key redacted>)");
        let short = dir.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        let e = Sealer::load(&SecretSource::File(short)).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        let e = Sealer::load(&SecretSource::File(dir.path().join("missing"))).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }
}
