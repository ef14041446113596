//! The Vault API's tokens, owned by the broker so the API never writes
//! the store itself: a login's token under its identity's cap, the lookup
//! every request makes, renew, revoke with the leases the token created,
//! and an issue whose lease is linked to its token in the same store step
//! that makes it active — so revoking a token reaches every lease it
//! handed out, whatever fails in between.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::{Broker, IssuedLease};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::LeaseState;
use crate::store::VaultToken;
use crate::token_cache::TokenGone;

/// The broker's token calls: [`Broker::tokens`].
pub struct Tokens<'b> {
    broker: &'b Broker,
}

impl Broker {
    pub fn tokens(&self) -> Tokens<'_> {
        Tokens { broker: self }
    }
}

impl Tokens<'_> {
    /// Stores a login's `token`, keeping its identity at `cap` tokens or
    /// fewer by evicting those nearest their expiry; their accessors come
    /// back, for the audit record (see `TokenStore::insert_vault_token`
    /// for why evict rather than refuse).
    pub async fn create(&self, token: &VaultToken, cap: u32) -> Result<Vec<String>> {
        let evicted = self.broker.store.insert_vault_token(token, cap).await?;
        // After the store said so: a read racing it cannot cache them back.
        self.broker.token_cache.forget_all(&evicted);
        Ok(evicted)
    }

    /// Takes back a token that was never handed out (its login could not
    /// be audited); false when it was gone already.
    pub async fn discard(&self, hash: &str) -> Result<bool> {
        self.broker.store.delete_vault_token(hash).await
    }

    /// The token whose SHA-256 is `hash`, expired or not (the caller
    /// refuses an expired one with its reason), from the store.
    pub async fn lookup(&self, hash: &str) -> Result<Option<VaultToken>> {
        self.broker.store.vault_token(hash).await
    }

    /// [`Self::lookup`] through the verified-token cache (`token_cache.rs`):
    /// a live entry answers without the store; a miss reads the store and
    /// caches what it found, unless a forget raced the read. Only for
    /// requests whose own store write checks the token again or that
    /// obtain nothing (see `vault_api::token::authenticate`).
    pub async fn lookup_cached(&self, hash: &str) -> Result<Option<VaultToken>> {
        let cache = &self.broker.token_cache;
        if let Some(t) = cache.get(hash) {
            return Ok(Some(t));
        }
        let ticket = cache.ticket();
        let stored = self.broker.store.vault_token(hash).await?;
        if let Some(t) = &stored {
            if t.expires_at > Utc::now() {
                cache.insert(ticket, t);
            }
        }
        Ok(stored)
    }

    /// Moves a token's expiry; false when it was evicted or revoked since
    /// the request's token was checked. Every replica's cached copy is
    /// forgotten (its expiry is old), so the next request reads the store.
    pub async fn renew(&self, token: &VaultToken, expires_at: DateTime<Utc>) -> Result<bool> {
        let renewed = self
            .broker
            .store
            .set_vault_token_expiry(&token.hash, expires_at)
            .await?;
        self.forget(token);
        Ok(renewed)
    }

    fn forget(&self, token: &VaultToken) {
        self.broker.token_cache.forget(TokenGone {
            accessor: token.accessor.clone(),
            relayed: false,
        });
    }

    /// Revokes every live lease `token` created, then the token; returns
    /// how many leases it revoked. A lease that cannot be revoked now
    /// (its database away) fails the call and keeps the token, so the
    /// client can try again.
    pub async fn revoke(&self, who: &Identity, token: &VaultToken) -> Result<usize> {
        let store = &self.broker.store;
        let mut revoked = 0;
        for id in &store.vault_token_leases(&token.accessor).await? {
            // A token renewed all day links many leases long since ended:
            // skip those rather than audit an "already revoked" for each.
            match store.get(id).await? {
                Some(l) if l.state != LeaseState::Revoked => {}
                _ => continue,
            }
            match self.broker.revoke(who, id).await {
                Ok(_) => revoked += 1,
                // Pruned since: nothing left to end.
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        store.delete_vault_token(&token.hash).await?;
        // After the delete committed: here at once, on the other replicas
        // as the relay's event reaches them.
        self.forget(token);
        Ok(revoked)
    }

    /// A lease of `role` for `who` (at `peer`), issued through the token
    /// with `accessor`: linked to it as it becomes active, in one store
    /// step. When the token went meanwhile the lease is never active: the
    /// issue fails (a 403: log in again) and its user is dropped, as for
    /// any issue that fails after its user was made.
    pub async fn issue(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        role: &str,
        accessor: &str,
    ) -> Result<IssuedLease> {
        self.broker
            .issue_through(who, peer, role, None, Some(accessor))
            .await
    }
}

#[cfg(test)]
mod tests {
    use crate::error::Error;
    use crate::lease::LeaseState;
    use crate::store::{LeaseFilter, LeaseStore, TokenStore, VaultToken};
    use crate::testkit::{app, role, Kit, APP};

    fn token(n: u8) -> VaultToken {
        crate::testkit::vault_token(n.into(), APP)
    }

    /// An issue through `t` (stored first) whose user exists and whose
    /// CREATE has not answered yet: its task, the gate that lets the
    /// reply go, and the user's name.
    async fn stalled_issue(
        kit: &Kit,
        t: &VaultToken,
    ) -> (
        tokio::task::JoinHandle<crate::error::Result<crate::lease::Lease>>,
        std::sync::Arc<tokio::sync::Semaphore>,
        String,
    ) {
        kit.broker.tokens().create(t, 4).await.unwrap();
        let gate = kit.server.stall_creates();
        let (broker, accessor) = (kit.broker.clone(), t.accessor.clone());
        let issuing = tokio::spawn(async move {
            let tokens = broker.tokens();
            tokens
                .issue(&app(), None, "ro", &accessor)
                .await
                .map(|i| i.lease)
        });
        loop {
            let made = kit.server.calls().iter().find_map(|c| {
                c.strip_prefix("create ")
                    .map(|u| u.split_whitespace().next().unwrap_or(u).to_string())
            });
            match made {
                Some(user) => return (issuing, gate, user),
                None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    }

    /// What a failed issue through `t` must leave: no active lease, no
    /// link. Every lease the kit's store holds, in any state.
    async fn no_active_lease_and_no_link(kit: &Kit, t: &VaultToken) -> Vec<crate::lease::Lease> {
        use LeaseState::*;
        let every = LeaseFilter {
            states: vec![Pending, Active, Failing, Revoked],
            ..Default::default()
        };
        let leases = kit.store.list(&every).await.unwrap();
        assert!(leases.iter().all(|l| l.state != Active), "{leases:?}");
        let links = kit.store.vault_token_leases(&t.accessor).await.unwrap();
        assert!(links.is_empty(), "{links:?}");
        leases
    }

    /// Issued through a token, a lease is active and linked at once; and
    /// revoking the token revokes it.
    #[tokio::test]
    async fn a_lease_issued_through_a_token_is_linked_and_revoked_with_it() {
        let kit = Kit::new("", &role("ro", "main"));
        let tokens = kit.broker.tokens();
        let t = token(1);
        assert!(tokens.create(&t, 4).await.unwrap().is_empty());
        let issued = tokens.issue(&app(), None, "ro", &t.accessor).await.unwrap();
        assert_eq!(issued.lease.state, LeaseState::Active);
        assert_eq!(
            kit.store.vault_token_leases(&t.accessor).await.unwrap(),
            vec![issued.lease.id.clone()]
        );
        assert_eq!(tokens.revoke(&app(), &t).await.unwrap(), 1);
        let l = kit.store.get(&issued.lease.id).await.unwrap().unwrap();
        assert_eq!(l.state, LeaseState::Revoked);
        assert!(kit.broker.tokens().lookup(&t.hash).await.unwrap().is_none());
    }

    /// Read through the cache: a second lookup is a hit; a login that
    /// evicts the token, a renewal and a revoke each forget it, so the
    /// next lookup reads the store (and finds the new expiry, or nothing).
    #[tokio::test]
    async fn a_cached_token_is_forgotten_when_evicted_renewed_or_revoked() {
        let kit = Kit::new("", &role("ro", "main"));
        let (tokens, cache) = (kit.broker.tokens(), kit.broker.token_cache());
        let t = token(4);
        tokens.create(&t, 1).await.unwrap();
        for _ in 0..2 {
            assert_eq!(
                tokens.lookup_cached(&t.hash).await.unwrap(),
                Some(t.clone())
            );
        }
        assert_eq!((cache.stats().misses, cache.stats().hits), (1, 1));

        // Evicted by a login over the cap of one.
        let u = token(5);
        assert_eq!(
            tokens.create(&u, 1).await.unwrap(),
            vec![t.accessor.clone()]
        );
        assert_eq!(tokens.lookup_cached(&t.hash).await.unwrap(), None);

        // Renewed: the next lookup reads the new expiry.
        assert_eq!(
            tokens.lookup_cached(&u.hash).await.unwrap(),
            Some(u.clone())
        );
        let later = u.expires_at + chrono::Duration::minutes(5);
        assert!(tokens.renew(&u, later).await.unwrap());
        let read = tokens.lookup_cached(&u.hash).await.unwrap().unwrap();
        assert_eq!(read.expires_at, later);

        // Revoked: gone from the store and from memory.
        tokens.revoke(&app(), &read).await.unwrap();
        assert_eq!(tokens.lookup_cached(&u.hash).await.unwrap(), None);
        assert!(cache.is_empty());
    }

    /// The token is evicted while the issue runs (between the caller's
    /// token check and the link), and the database goes away before the
    /// failed issue's user can be dropped. Issue then link, two writes,
    /// left an *active* lease no link reached: revoke-self missed it, and
    /// the route's compensating revoke failed with the database. Linked in
    /// the activation's own step, the lease is never active: nothing is
    /// handed out, and the intent stays for the reaper to resolve.
    #[tokio::test]
    async fn a_failed_link_leaves_no_active_lease() {
        let (kit, t) = (Kit::new("", &role("ro", "main")), token(2));
        let (issuing, gate, user) = stalled_issue(&kit, &t).await;
        assert!(kit.store.delete_vault_token(&t.hash).await.unwrap());
        kit.server.set_unavailable(true);
        gate.add_permits(1);
        assert!(
            kit.server.user(&user).is_some(),
            "made before the token went"
        );
        match issuing.await.unwrap() {
            Err(Error::PermissionDenied(m)) => assert!(m.contains("log in again"), "{m}"),
            other => panic!("an issue whose token went meanwhile: {other:?}"),
        }
        let leases = no_active_lease_and_no_link(&kit, &t).await;
        assert_eq!(leases.len(), 1, "{leases:?}");
        assert_ne!(
            leases[0].state,
            LeaseState::Revoked,
            "its user still exists: the intent stays live for the reaper"
        );
    }

    /// The store fails at the step that activates and links: the lease
    /// is not active either, and its user is dropped.
    #[tokio::test]
    async fn a_store_failure_at_the_link_leaves_no_active_lease() {
        let (kit, t) = (Kit::new("", &role("ro", "main")), token(3));
        let (issuing, gate, user) = stalled_issue(&kit, &t).await;
        // The next store call is the activation with its link.
        kit.store.fail_next(1);
        gate.add_permits(1);
        let err = issuing.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        for _ in 0..100 {
            if kit.server.user(&user).is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(kit.server.user(&user).is_none(), "{user} still exists");
        no_active_lease_and_no_link(&kit, &t).await;
    }
}
