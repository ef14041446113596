//! CSRF tokens bound to one client certificate and identity: the HMAC of
//! the certificate's SHA-256 and the identity under a key made at start.
//! A page from another site cannot read the token (the CSP, same-origin
//! rules), and a token taken from one admin's page is worthless with
//! another certificate. No cookie or server-side session is needed; a
//! restart (new key) simply asks the admin to reload the page.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::identity::Identity;

type HmacSha256 = Hmac<Sha256>;

pub struct CsrfKey([u8; 32]);

impl std::fmt::Debug for CsrfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfKey(<redacted>)")
    }
}

impl CsrfKey {
    pub fn random() -> Self {
        CsrfKey(rand::random())
    }

    fn mac(&self, cert_sha256: &[u8; 32], who: &Identity) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(cert_sha256);
        // The certificate hash has a fixed length, so certificate and
        // identity cannot be shifted into each other.
        mac.update(who.as_str().as_bytes());
        mac
    }

    /// The token for forms served to this certificate and identity.
    pub fn token(&self, cert_sha256: &[u8; 32], who: &Identity) -> String {
        hex::encode(self.mac(cert_sha256, who).finalize().into_bytes())
    }

    /// Whether `token` is this certificate's and identity's, compared in
    /// constant time.
    pub fn verify(&self, cert_sha256: &[u8; 32], who: &Identity, token: &str) -> bool {
        match hex::decode(token) {
            Ok(bytes) => self.mac(cert_sha256, who).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_for_its_certificate_and_identity_only() {
        let key = CsrfKey::random();
        let admin = Identity::parse("spiffe://credbroker.dev/dba/oncall").unwrap();
        let other = Identity::parse("spiffe://credbroker.dev/dba/other").unwrap();
        let (cert, cert2) = ([1u8; 32], [2u8; 32]);
        let t = key.token(&cert, &admin);
        assert!(key.verify(&cert, &admin, &t));
        assert!(!key.verify(&cert2, &admin, &t), "another certificate");
        assert!(!key.verify(&cert, &other, &t), "another identity");
        assert!(
            !CsrfKey::random().verify(&cert, &admin, &t),
            "another process"
        );
        assert!(!key.verify(&cert, &admin, ""));
        assert!(!key.verify(&cert, &admin, "not hex"));
        assert!(!key.verify(&cert, &admin, &t[..t.len() - 2]), "truncated");
        assert_eq!(format!("{key:?}"), "CsrfKey(<redacted>)");
    }
}
