//! CSRF tokens bound to one client certificate and identity: the HMAC of
//! the certificate's SHA-256 and the identity under the console's key.
//! A page from another site cannot read the token (the CSP, same-origin
//! rules), and a token taken from one admin's page is worthless with
//! another certificate. No cookie or server-side session is needed.
//!
//! The key: on a shared PostgreSQL store, one for every replica, kept in
//! the store ([`shared`]), so a form served by replica A and posted through
//! a load balancer to replica B is accepted; with SQLite (one broker) a
//! key made at start, and a restart simply asks the admin to reload.

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

/// The key every broker on this store uses (`Store::console_key`), or a
/// key of this process's own where the store is only its own. A store that
/// cannot be read is retried (1 s, doubling to 30 s): a key made up instead
/// would refuse, behind a load balancer, every form another replica served.
pub async fn shared(broker: &crate::broker::Broker) -> CsrfKey {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match broker.store().console_key().await {
            Ok(Some(k)) => return CsrfKey(k),
            Ok(None) => return CsrfKey::random(),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "console: cannot read its key from the store; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
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
