//! Password hashes in the forms MySQL and MariaDB store, computed by the
//! broker: `CREATE USER … AS '<hash>'` puts the hash, never the plaintext,
//! into the statement, so no general log, binary log or slow log on the
//! server can ever show a leased password.

use rand::Rng;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::lease::Password;

/// `mysql_native_password` (MariaDB's default, MySQL 5.7): `*` and the
/// upper-case hex of SHA1(SHA1(password)). What it stores is not enough to
/// log in: a client must prove it knows SHA1(password).
pub fn native_password_hash(password: &Password) -> String {
    let stage1 = Sha1::digest(password.expose().as_bytes());
    let stage2 = Sha1::digest(stage1);
    format!("*{}", hex::encode_upper(stage2))
}

/// Rounds of the SHA-256 crypt behind `caching_sha2_password`, in thousands,
/// as MySQL writes them (`%03X`): 5 is MySQL's default and its minimum.
const CACHING_SHA2_ROUNDS_THOUSANDS: u32 = 5;
/// MySQL's salt length for `caching_sha2_password` (`CRYPT_SALT_LENGTH`).
const CACHING_SHA2_SALT_LEN: usize = 20;

/// `caching_sha2_password` (MySQL 8's default) as `SHOW CREATE USER` prints
/// it: `$A$005$` + 20 salt bytes + 43 characters of SHA-256 crypt. MySQL takes
/// any salt bytes but NUL and `$`; ours are letters and digits, so the hash
/// needs no escaping inside a SQL string literal.
pub fn caching_sha2_hash(password: &Password) -> String {
    const SALT_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let salt: Vec<u8> = (0..CACHING_SHA2_SALT_LEN)
        .map(|_| SALT_ALPHABET[rng.random_range(0..SALT_ALPHABET.len())])
        .collect();
    caching_sha2_hash_with_salt(password.expose().as_bytes(), &salt)
}

fn caching_sha2_hash_with_salt(key: &[u8], salt: &[u8]) -> String {
    let digest = sha256_crypt(key, salt, CACHING_SHA2_ROUNDS_THOUSANDS * 1000);
    let mut out = format!("$A${CACHING_SHA2_ROUNDS_THOUSANDS:03X}$").into_bytes();
    out.extend_from_slice(salt);
    out.extend_from_slice(digest.as_bytes());
    // Salt and digest are ASCII by construction.
    String::from_utf8_lossy(&out).into_owned()
}

const CRYPT_B64: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Ulrich Drepper's SHA-256 crypt (the `$5$` of glibc), returning only the
/// encoded digest. MySQL uses it unchanged except that the salt may be 20
/// bytes instead of 16.
fn sha256_crypt(key: &[u8], salt: &[u8], rounds: u32) -> String {
    let b = Sha256::new()
        .chain_update(key)
        .chain_update(salt)
        .chain_update(key)
        .finalize();
    let mut a = Sha256::new().chain_update(key).chain_update(salt);
    let mut n = key.len();
    while n > 32 {
        a.update(b);
        n -= 32;
    }
    a.update(&b[..n]);
    let mut n = key.len();
    while n > 0 {
        if n & 1 == 1 {
            a.update(b);
        } else {
            a.update(key);
        }
        n >>= 1;
    }
    let mut alt = a.finalize();

    let mut dp = Sha256::new();
    for _ in 0..key.len() {
        dp.update(key);
    }
    let p = repeat_to(&dp.finalize(), key.len());
    let mut ds = Sha256::new();
    for _ in 0..16 + usize::from(alt[0]) {
        ds.update(salt);
    }
    let s = repeat_to(&ds.finalize(), salt.len());

    for i in 0..rounds {
        let mut c = Sha256::new();
        if i & 1 == 1 {
            c.update(&p);
        } else {
            c.update(alt);
        }
        if i % 3 != 0 {
            c.update(&s);
        }
        if i % 7 != 0 {
            c.update(&p);
        }
        if i & 1 == 1 {
            c.update(alt);
        } else {
            c.update(&p);
        }
        alt = c.finalize();
    }

    const ORDER: [(usize, usize, usize); 10] = [
        (0, 10, 20),
        (21, 1, 11),
        (12, 22, 2),
        (3, 13, 23),
        (24, 4, 14),
        (15, 25, 5),
        (6, 16, 26),
        (27, 7, 17),
        (18, 28, 8),
        (9, 19, 29),
    ];
    let mut out = String::with_capacity(43);
    let mut push = |b2: u8, b1: u8, b0: u8, n: usize| {
        let mut w = (u32::from(b2) << 16) | (u32::from(b1) << 8) | u32::from(b0);
        for _ in 0..n {
            out.push(CRYPT_B64[(w & 0x3f) as usize] as char);
            w >>= 6;
        }
    };
    for (x, y, z) in ORDER {
        push(alt[x], alt[y], alt[z], 4);
    }
    push(0, alt[31], alt[30], 3);
    out
}

fn repeat_to(block: &[u8], len: usize) -> Vec<u8> {
    block.iter().copied().cycle().take(len).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_hash_matches_the_servers_password_function() {
        // MariaDB 10.11: SELECT PASSWORD('foobar')
        let p = Password::from_secret("foobar".into());
        assert_eq!(
            native_password_hash(&p),
            "*9B500343BC52E2911172EB52AE5CF4847604C6E5"
        );
    }

    #[test]
    fn sha256_crypt_matches_glibc() {
        // openssl passwd -5 -salt saltstringsaltst 'Hello world!'
        assert_eq!(
            sha256_crypt(b"Hello world!", b"saltstringsaltst", 5000),
            "a5C8Ofk71MUIoKve2QuP9FMl.dwNgseF5tR1LGAL7iB"
        );
        // openssl passwd -5 -salt abc foobar
        assert_eq!(
            sha256_crypt(b"foobar", b"abc", 5000),
            "ybIW39nmgMawGL3LGcb2y7y49OfwQ9gvvUM.ti0QeV4"
        );
    }

    #[test]
    fn caching_sha2_matches_a_mysql_8_hash() {
        // A MySQL 8 `caching_sha2_password` hash of "foobar" with a 20-byte
        // salt of arbitrary bytes (published as a test vector by MySQL
        // protocol re-implementations).
        let stored = hex::decode(
            "24412430303524031A69251C34295C4B35167C7F1E5A7B63091349503974624D34504B5A424679354856336868686F52485A736E4A733368786E427575516C73446469496537",
        )
        .unwrap();
        let salt = &stored[7..27];
        let ours = caching_sha2_hash_with_salt(b"foobar", salt);
        assert_eq!(ours.as_bytes(), &stored[..]);
    }

    #[test]
    fn generated_caching_sha2_hash_has_mysqls_shape() {
        let h = caching_sha2_hash(&Password::generate());
        assert_eq!(h.len(), 7 + CACHING_SHA2_SALT_LEN + 43);
        assert!(h.starts_with("$A$005$"));
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'\\'));
    }
}
