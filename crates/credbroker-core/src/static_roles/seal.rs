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
//!
//! Each sealed value names the key that sealed it (`v2.<key id>.<…>`), so
//! a value sealed under another key — the key file replaced, or replicas
//! with different keys — is recognised as exactly that (a
//! `FailedPrecondition` naming both key ids and the fix), not as damage.
//! The key id is the first 64 bits of HMAC-SHA256(key, a fixed label). It
//! reveals nothing of the key: HMAC is a pseudo-random function keyed by
//! the secret, so its output is indistinguishable from random to anyone
//! without the key, and it differs from every AEAD output (another
//! algorithm, a label no nonce or ciphertext uses). All it allows is
//! testing a guess of the whole 256-bit key, which is as hopeless as
//! testing it against a sealed value already is. 64 bits make two keys'
//! ids collide by chance with probability 2^-64.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::SecretSource;
use crate::error::{Error, Result};
use crate::lease::Password;

/// Prefix of a sealed value without a key id (sealed before key ids).
const VERSION_1: &str = "v1.";
/// Prefix of a sealed value: `v2.<key id>.<base64 of nonce ‖ ciphertext>`.
const VERSION: &str = "v2.";
/// What the key id is the HMAC of.
const KEY_ID_LABEL: &[u8] = b"credbroker sealing key id v1";

/// The sealing key. `Debug` shows its key id only.
pub struct Sealer {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(key id {}, <key redacted>)", self.id)
    }
}

/// The key id written in a sealed value; `None` for a `v1` value (sealed
/// before key ids) or one that is not a sealed value at all.
pub fn key_id_of(sealed: &str) -> Option<&str> {
    let (id, _) = sealed.strip_prefix(VERSION)?.split_once('.')?;
    Some(id)
}

impl Sealer {
    /// Reads the key the config names: 32 bytes written as 64 hex digits
    /// or as base64 (e.g. `openssl rand -hex 32`). Errors are `Config`.
    pub fn load(source: &SecretSource) -> Result<Sealer> {
        let text = source.read("sealing_key")?.ok_or_else(|| {
            Error::config("static_roles need sealing_key_file or sealing_key_env")
        })?;
        let t = text.expose().trim();
        // Decoded into one fixed buffer that is wiped on drop: a growing
        // `Vec` would leave copies of the key in the blocks it outgrew.
        let mut buf = Zeroizing::new([0u8; 48]);
        let n = if t.len() == 64 {
            hex::decode_to_slice(t, &mut buf[..32]).map_err(|_| bad_key())?;
            32
        } else {
            B64.decode_slice(t, &mut buf[..]).map_err(|_| bad_key())?
        };
        Sealer::from_bytes(&buf[..n])
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Sealer> {
        if bytes.len() != 32 {
            return Err(bad_key());
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| bad_key())?;
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes),
            KEY_ID_LABEL,
        );
        Ok(Sealer {
            key: LessSafeKey::new(key),
            id: hex::encode(&mac.as_ref()[..8]),
        })
    }

    /// This key's id (see the module doc): safe to show and to store.
    pub fn key_id(&self) -> &str {
        &self.id
    }

    /// Why `sealed` cannot be opened by this key without trying: it names
    /// another key. `None` when it names this one or none (`v1`).
    pub fn foreign_key(&self, role: &str, sealed: &str) -> Option<Error> {
        key_id_of(sealed)
            .filter(|id| *id != self.id)
            .map(|id| self.mismatch(role, id))
    }

    fn mismatch(&self, role: &str, theirs: &str) -> Error {
        Error::FailedPrecondition(format!(
            "static role {role:?}: its password was sealed under another sealing key (key id {theirs}; this broker's key id is {}): \
             give every replica the same sealing key, or, if the key was replaced on purpose, run \
             `credbroker admin rotate --static-role {role} --abandon-pending` to rotate afresh under this key",
            self.id
        ))
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
        Ok(format!("{VERSION}{}.{}", self.id, B64.encode(out)))
    }

    /// Opens a value [`Sealer::seal`] made for the same role, user and
    /// generation. Any other key, row or tampering is an error that says
    /// so without any of the value: another key (by its id, or a `v1`
    /// value that does not open) is a `FailedPrecondition` with the fix;
    /// a value this key sealed that does not open was damaged or moved
    /// (`Internal`).
    pub fn open(&self, role: &str, user: &str, generation: u64, sealed: &str) -> Result<Password> {
        if let Some(e) = self.foreign_key(role, sealed) {
            return Err(e);
        }
        let legacy = sealed.starts_with(VERSION_1);
        let fail = || {
            if legacy {
                Error::FailedPrecondition(format!(
                    "static role {role:?}: the sealed password of {user} (generation {generation}) does not open with this sealing key \
                     (sealed before key ids were recorded: under another key, or damaged): give every replica the key it was sealed with, \
                     or run `credbroker admin rotate --static-role {role} --abandon-pending` to rotate afresh under this key (id {})",
                    self.id
                ))
            } else {
                Error::internal(format!(
                    "static role {role:?}: the sealed password of {user} (generation {generation}) does not open with this sealing key, \
                     which sealed it: the stored value was damaged or moved"
                ))
            }
        };
        let body = match sealed.strip_prefix(VERSION) {
            Some(rest) => rest.split_once('.').map(|(_, b)| b),
            None => sealed.strip_prefix(VERSION_1),
        };
        let raw = body.and_then(|b| B64.decode(b).ok()).ok_or_else(fail)?;
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
        assert!(!s.contains("pencil") && s.starts_with("v2."), "{s}");
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
        let e = sealer(8).open("orders", "app_a", 3, &s).unwrap_err();
        assert!(
            matches!(e, Error::FailedPrecondition(_)),
            "another key: {e}"
        );
        let mut tampered = s.clone();
        tampered.pop();
        tampered.push(if s.ends_with('A') { 'B' } else { 'A' });
        assert!(sealer(7).open("orders", "app_a", 3, &tampered).is_err());
        // Same input, fresh nonce: two seals never look alike.
        assert_ne!(s, sealer(7).seal("orders", "app_a", 3, &p).unwrap());
    }

    #[test]
    fn a_value_sealed_under_another_key_is_named_as_such_with_both_key_ids_and_the_fix() {
        let (a, b) = (sealer(1), sealer(2));
        assert_eq!(a.key_id().len(), 16);
        assert_ne!(a.key_id(), b.key_id());
        assert_eq!(a.key_id(), sealer(1).key_id(), "the same key, the same id");
        let p = Password::from_secret("pencil-hunter2".into());
        let s = a.seal("orders", "app_a", 1, &p).unwrap();
        assert_eq!(key_id_of(&s), Some(a.key_id()));
        assert!(a.foreign_key("orders", &s).is_none());
        let e = b.open("orders", "app_a", 1, &s).unwrap_err();
        let Error::FailedPrecondition(m) = &e else {
            panic!("{e}")
        };
        for want in [
            "sealed under another sealing key",
            a.key_id(),
            b.key_id(),
            "--abandon-pending",
        ] {
            assert!(m.contains(want), "{m}");
        }
        assert!(!m.contains("pencil"));
        // The id is not the key (nor any part of its hex).
        assert!(!hex::encode([1u8; 32]).contains(a.key_id()));
        // Damage under the right key stays an internal error.
        let mut tampered = s.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        let e = a.open("orders", "app_a", 1, &tampered).unwrap_err();
        assert!(matches!(e, Error::Internal(..)), "{e}");
        // A value sealed before key ids (v1) still opens with its key, and
        // with another key fails as a key problem, not a 500.
        let v1 = format!("v1.{}", s.rsplit_once('.').unwrap().1);
        assert_eq!(
            a.open("orders", "app_a", 1, &v1).unwrap().expose(),
            "pencil-hunter2"
        );
        let e = b.open("orders", "app_a", 1, &v1).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
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
        assert_eq!(
            format!("{a:?}"),
            format!("Sealer(key id {}, <key redacted>)", a.key_id())
        );
        let short = dir.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        let e = Sealer::load(&SecretSource::File(short)).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        let e = Sealer::load(&SecretSource::File(dir.path().join("missing"))).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    }
}
