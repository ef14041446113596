//! Vault tokens: made at `auth/cert/login`, bound to the identity *and*
//! the client certificate that logged in, stored only as a SHA-256 (a
//! copy of the store, a log line or an audit record logs no one in), and
//! checked on every request that carries one.

use std::fmt;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use rand::Rng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::params::Body;
use crate::audit::{Event, Outcome};
use crate::broker::Broker;
use crate::config::VaultApiConfig;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::truncate_ms;
use crate::server::https::Peer;
use crate::store::VaultToken;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
/// 32 characters of 62: 190 bits, beyond guessing.
const SECRET_LEN: usize = 32;
/// Vault's prefix for service tokens; some tools check for it.
const PREFIX: &str = "hvs.";
/// Longest header value taken for a token: anything longer is not ours.
const MAX_TOKEN_LEN: usize = 256;

/// A token as the client holds it. Zeroized when dropped; `Debug` never
/// shows it.
pub struct Token(Zeroizing<String>);

impl Token {
    pub fn generate() -> Self {
        Token(Zeroizing::new(format!("{PREFIX}{}", random(SECRET_LEN))))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps: lowercase hex SHA-256.
    pub fn hash(&self) -> String {
        hash(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new accessor: names a token in audit records and lease links.
pub fn accessor() -> String {
    random(24)
}

/// The caller of one request: its identity from the certificate, and the
/// stored token it presented, checked.
pub struct Session {
    pub identity: Identity,
    pub token: VaultToken,
}

/// The caller's identity from its certificate; a certificate that yields
/// none is refused and audited as the gRPC layer does.
pub fn identity(broker: &Broker, peer: &Peer, action: &'static str) -> Result<Identity> {
    peer.identity
        .clone()
        .map_err(|why| broker.refuse_unauthenticated(Some(peer.addr.ip()), action, why))
}

/// The token a request carries: `X-Vault-Token`, or `Authorization:
/// Bearer`, as Vault accepts.
pub fn presented(headers: &HeaderMap) -> Option<Zeroizing<String>> {
    let raw = headers.get("x-vault-token").or_else(|| {
        headers
            .get(axum::http::header::AUTHORIZATION)
            .filter(|v| v.as_bytes().starts_with(b"Bearer "))
    })?;
    let text = raw.to_str().ok()?;
    let text = text.strip_prefix("Bearer ").unwrap_or(text).trim();
    (!text.is_empty() && text.len() <= MAX_TOKEN_LEN).then(|| Zeroizing::new(text.to_string()))
}

/// Actions whose token may come from the verified-token cache
/// (`token_cache.rs`): those that obtain nothing (look-ups, giving a lease
/// or the token up) and those whose store write checks the token again in
/// the same step — `issue` (the lease is linked to its token as it
/// activates, and `activate_linked` refuses a gone token) and
/// `vault_token_renew` (its update finds no row of a gone token). So a
/// cached entry that outlived its token's revoke on another replica (the
/// relay's event not there yet) obtains nothing the store would refuse.
/// A static password (`static_read`) and a lease renewal (`renew`) read
/// the token from the store.
const CACHED: &[&str] = &[
    "issue",
    "revoke",
    "lookup",
    "vault_token_lookup",
    "vault_mounts",
    "vault_token_renew",
    "vault_token_revoke",
];

/// Checks the request's token against the store: it exists, has not
/// expired, and was made for this identity over this very certificate —
/// a token copied to another client (even one with the same identity but
/// another certificate) is refused. Refusals are audited under the
/// caller's identity with the token's accessor when there is one.
/// `cache` (`[vault_api] token_cache`) lets the actions in [`CACHED`] take
/// the token from the verified-token cache.
pub async fn authenticate(
    broker: &Broker,
    peer: &Peer,
    headers: &HeaderMap,
    action: &'static str,
    cache: bool,
) -> Result<Session> {
    let who = identity(broker, peer, action)?;
    let refuse = |detail: &str, accessor: Option<&str>| {
        let err = Error::denied(detail.to_string());
        let mut e = Event::new(who.as_str(), action);
        e.outcome = Some(Outcome::Denied);
        e.detail = Some(match accessor {
            Some(a) => format!("{err}; accessor={a}"),
            None => err.to_string(),
        });
        if let Err(ae) = broker.audit().append_relaxed(e) {
            tracing::error!(error = %crate::error::chain(&ae), "audit write failed");
        }
        broker.metrics().request_failed(action, &err);
        err
    };
    let Some(token) = presented(headers) else {
        return Err(refuse(
            "no token: log in at auth/cert/login and send X-Vault-Token",
            None,
        ));
    };
    // A store that cannot answer refuses too, and is audited as an error.
    let tokens = broker.tokens();
    let stored = if cache && CACHED.contains(&action) {
        tokens.lookup_cached(&hash(&token)).await
    } else {
        tokens.lookup(&hash(&token)).await
    }
    .map_err(|e| broker.refuse(who.as_str(), action, e))?;
    let Some(stored) = stored else {
        return Err(refuse("invalid token", None));
    };
    if stored.expires_at <= Utc::now() {
        return Err(refuse("token expired", Some(&stored.accessor)));
    }
    if stored.cert_sha256 != peer.cert_fingerprint() || stored.identity != who.as_str() {
        return Err(refuse(
            "token was issued to another client certificate",
            Some(&stored.accessor),
        ));
    }
    Ok(Session {
        identity: who,
        token: stored,
    })
}

/// What `auth/cert/login` audits under.
pub const LOGIN: &str = "vault_login";

/// Longest `name` a login may carry (Vault's cert role name).
const MAX_NAME_LEN: usize = 64;

/// A token made by [`login`]: the secret for the caller, its stored form,
/// and the `name` the login carried.
pub struct Login {
    pub token: Token,
    pub stored: VaultToken,
    pub name: String,
}

/// `auth/cert/login` for `who` (the caller's certificate, already
/// checked): a new token bound to the identity and this certificate,
/// stored under the identity's cap (`max_tokens_per_identity`; the
/// tokens nearest their expiry are evicted to make room, see
/// `TokenStore::insert_vault_token` for why evict rather than refuse).
/// Exactly one audit record either way: `ok` naming the new accessor and
/// any evicted ones, or the refusal (bad input, the store away).
pub async fn login(
    broker: &Broker,
    peer: &Peer,
    who: &Identity,
    body: &[u8],
    config: &VaultApiConfig,
) -> Result<Login> {
    let refuse = |err: Error| broker.refuse(who.as_str(), LOGIN, err);
    let name = Body::parse(body)
        .and_then(|b| b.string("name"))
        .map_err(refuse)?
        .unwrap_or_default();
    if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(refuse(Error::invalid(format!(
            "name must be at most {MAX_NAME_LEN} printable characters"
        ))));
    }
    let ttl = config.token_ttl;
    let now = truncate_ms(Utc::now());
    let token = Token::generate();
    let stored = VaultToken {
        hash: token.hash(),
        accessor: accessor(),
        identity: who.as_str().to_string(),
        cert_sha256: peer.cert_fingerprint(),
        issued_at: now,
        expires_at: now
            + chrono::Duration::from_std(ttl).map_err(|e| refuse(Error::internal(e)))?,
    };
    let cap = config.max_tokens_per_identity;
    let evicted = broker.tokens().create(&stored, cap).await.map_err(refuse)?;
    let mut e = Event::new(who.as_str(), LOGIN);
    e.outcome = Some(Outcome::Ok);
    let mut detail = format!("accessor={}; ttl={}s", stored.accessor, ttl.as_secs());
    if !evicted.is_empty() {
        detail.push_str(&format!(
            "; evicted={} (max_tokens_per_identity={cap})",
            evicted.join(",")
        ));
    }
    e.detail = Some(detail);
    if let Err(err) = broker.audit().append(e) {
        // An unaudited token must not be handed out. The evictions stand
        // (they only shortened tokens of this identity): say so here.
        let _ = broker.tokens().discard(&stored.hash).await;
        if !evicted.is_empty() {
            tracing::error!(identity = %who, evicted = %evicted.join(","), "vault tokens evicted while the audit log failed");
        }
        return Err(err);
    }
    Ok(Login {
        token,
        stored,
        name,
    })
}

/// Seconds from `now` to `t`, never negative.
pub fn ttl_secs(t: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    (t - now).num_seconds().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_hashed_and_never_shown() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("hvs.") && a.expose().len() == 36);
        assert_eq!(a.hash().len(), 64);
        assert!(!a.hash().contains(&a.expose()[4..]));
        assert_eq!(format!("{a:?}"), "Token(<redacted>)");
    }

    #[test]
    fn a_token_is_taken_from_either_vault_header() {
        let mut h = HeaderMap::new();
        assert!(presented(&h).is_none());
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert!(presented(&h).is_none(), "only Bearer");
        h.insert("authorization", "Bearer hvs.abc".parse().unwrap());
        assert_eq!(presented(&h).unwrap().as_str(), "hvs.abc");
        h.insert("x-vault-token", "hvs.def".parse().unwrap());
        assert_eq!(
            presented(&h).unwrap().as_str(),
            "hvs.def",
            "X-Vault-Token first"
        );
        h.insert("x-vault-token", "x".repeat(300).parse().unwrap());
        assert!(presented(&h).is_none(), "overlong");
    }
}
