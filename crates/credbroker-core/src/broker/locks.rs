//! The broker's side of admin locks (`crate::lock` has the types): set,
//! lift and list them, and `check_locks`, which issue and renew run against
//! the store on every call so a lock set on any replica holds at once.

use std::time::Duration;

use super::{truncate_text, Broker, BulkOutcome, Mode};
use crate::audit::{Event, Outcome};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, Reason};
use crate::lock::{Lock, LockId, LockTarget, NewLock};
use crate::store::LeaseFilter;
use crate::watch::{LeaseEvent, LockEvent};

impl Broker {
    /// Locks `target` out: from now on issue and renew refuse whatever it
    /// matches, on every replica. With `revoke`, every live lease it
    /// matches is then revoked in the same call, sessions included — after
    /// the lock is stored, so nothing issued meanwhile escapes (see the
    /// second check in `issue_inner`).
    pub async fn admin_lock(
        &self,
        who: &Identity,
        target: LockTarget,
        duration: Option<Duration>,
        reason: String,
        revoke: bool,
    ) -> Result<(Lock, Option<BulkOutcome>)> {
        self.require_admin(who, "lock")?;
        let mut event = Event::new(who.as_str(), "lock");
        event.detail = Some(truncate_text(&format!("{target}")));
        let checked = self.check_lock_request(who, &target, duration, &reason);
        if let Err(e) = checked {
            return Err(self.refused("lock", event, e));
        }
        let new = NewLock {
            id: LockId::generate(),
            target,
            reason,
            created_by: who.as_str().to_string(),
            duration,
        };
        let lock = match self.store.insert_lock(&new).await {
            Ok(l) => l,
            Err(e) => {
                return Err(self.refused("lock", event, e));
            }
        };
        if let LockTarget::Identity(p) = &lock.target {
            // The gate reads the locks on every request and refuses these
            // tokens anyway; no entry of a locked identity stays warm.
            self.token_cache
                .forget_identities(|id| p.matches(&Identity::from_trusted(id.to_string())));
        }
        event.outcome = Some(Outcome::Ok);
        event.detail = Some(lock_detail(&lock, revoke));
        self.audit_event(event)?;
        tracing::warn!(lock_id = %lock.id, target = %lock.target, reason = %lock.reason, "lock set");
        if !revoke {
            // Watchers learn at once that their leases can no longer be
            // renewed; the credentials stay valid until they expire.
            match self.leases_matching_lock(&lock).await {
                Ok(leases) => {
                    for l in &leases {
                        self.watch.publish(LeaseEvent::locked(l, &lock));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "cannot tell watchers about the lock")
                }
            }
            self.announce_lock(who, &lock, true);
            return Ok((lock, None));
        }
        if let LockTarget::StaticRole(name) = &lock.target {
            // The incident: the password already read must stop working
            // too — both users' passwords replaced, their sessions ended.
            let replaced = self.revoke_static(who, name).await;
            self.announce_lock(who, &lock, true);
            replaced?;
            return Ok((lock, Some(BulkOutcome::default())));
        }
        let out = self.revoke_locked(who, &lock).await;
        self.announce_lock(who, &lock, true);
        Ok((lock, Some(out?)))
    }

    /// Publishes a lock placed or lifted, after the lock's own lease events
    /// (locked, or revoked with `--revoke`): watchers here and — through
    /// the relay, in the same order — on every other replica hear of it,
    /// and a placed identity lock ends the locked identities' open streams
    /// with its refusal on every replica. Refusing requests needs no event:
    /// every replica reads the locks from the store on every call.
    fn announce_lock(&self, who: &Identity, lock: &Lock, placed: bool) {
        let ended = self
            .watch
            .publish_lock(LockEvent::new(placed, lock, who.as_str()));
        if ended > 0 {
            tracing::info!(lock_id = %lock.id, identities = ended, "lease watches of locked identities ended");
        }
    }

    fn check_lock_request(
        &self,
        who: &Identity,
        target: &LockTarget,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<()> {
        crate::lock::check_reason(reason)?;
        if let Some(d) = duration {
            if d < Duration::from_secs(1) || d > crate::lock::MAX_LOCK_DURATION {
                return Err(Error::invalid(
                    "lock duration must be between 1 second and 366 days",
                ));
            }
        }
        // An identity lock holds on every door, admin calls included (the
        // gate): one that matched its own author would lock the admin out
        // of `unlock` too. Another admin locks an admin.
        if let LockTarget::Identity(p) = target {
            if p.matches(who) {
                return Err(Error::invalid(format!(
                    "identity pattern {:?} matches you ({who}): a lock holds on admin calls too, so you could not lift it; ask another admin",
                    p.as_str()
                )));
            }
        }
        // A typo must not look like a lock that holds.
        let config = self.config();
        match target {
            LockTarget::Role(r) if config.role(r).is_none() => {
                Err(Error::NotFound(format!("no role {r:?} is configured")))
            }
            LockTarget::Database(d) if !config.databases.contains_key(d) => {
                Err(Error::NotFound(format!("no database {d:?} is configured")))
            }
            LockTarget::StaticRole(r) if !config.static_roles.contains_key(r) => Err(
                Error::NotFound(format!("no static role {r:?} is configured")),
            ),
            _ => Ok(()),
        }
    }

    /// Every live lease `lock` matches. An identity pattern is matched
    /// against the identities holding live leases, then each is listed on
    /// its own: memory follows the number of callers, not of leases.
    async fn leases_matching_lock(&self, lock: &Lock) -> Result<Vec<Lease>> {
        let filters: Vec<LeaseFilter> = match &lock.target {
            LockTarget::Role(r) => vec![LeaseFilter {
                role: Some(r.clone()),
                ..Default::default()
            }],
            LockTarget::Database(d) => vec![LeaseFilter {
                database: Some(d.clone()),
                ..Default::default()
            }],
            // A static role has no leases; `--revoke` replaces its
            // passwords instead (`admin_lock`).
            LockTarget::StaticRole(_) => vec![],
            LockTarget::Identity(p) => self
                .store
                .live_identities()
                .await?
                .into_iter()
                .filter(|i| p.matches(&Identity::from_trusted(i.clone())))
                .map(|i| LeaseFilter {
                    identity: Some(i),
                    ..Default::default()
                })
                .collect(),
        };
        let mut out = Vec::new();
        for f in &filters {
            out.extend(self.store.list(f).await?);
        }
        Ok(out)
    }

    /// Tells watchers of every lease `lock` matches, and with `revoke` ends
    /// those leases through the revocation engine (Reason::Locked).
    async fn revoke_locked(&self, who: &Identity, lock: &Lock) -> Result<BulkOutcome> {
        let leases = self.leases_matching_lock(lock).await?;
        self.revoke_listed(who, leases, Reason::Locked, Mode::UntilDropped)
            .await
    }

    /// Lifts a lock (expired or not). Audited.
    pub async fn admin_unlock(&self, who: &Identity, id: &LockId) -> Result<Lock> {
        self.require_admin(who, "unlock")?;
        let mut event = Event::new(who.as_str(), "unlock");
        event.detail = Some(id.to_string());
        let result = match self.store.delete_lock(id).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(Error::NotFound(format!("no lock {id}"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(lock) => {
                event.outcome = Some(Outcome::Ok);
                event.detail = Some(lock_detail(&lock, false));
                self.audit_event(event)?;
                tracing::warn!(lock_id = %lock.id, target = %lock.target, "lock lifted");
                self.announce_lock(who, &lock, false);
                Ok(lock)
            }
            Err(e) => Err(self.refused("unlock", event, e)),
        }
    }

    /// The locks in force.
    pub async fn admin_locks(&self, who: &Identity) -> Result<Vec<Lock>> {
        self.require_admin(who, "list_locks")?;
        self.store.active_locks().await
    }

    /// Refuses a lease that an active lock matches. Read from the store on
    /// every call, so a lock written by any replica applies at once.
    pub(crate) async fn check_locks(
        &self,
        identity: &Identity,
        role: &str,
        database: &str,
    ) -> Result<()> {
        let locks = crate::steps::timed("store: read locks", self.store.active_locks()).await?;
        match crate::lock::first_match(&locks, identity, role, database) {
            Some(lock) => Err(lock.refusal()),
            None => Ok(()),
        }
    }
}

/// A lock in an audit record: id, target, expiry and reason.
fn lock_detail(lock: &Lock, revoke: bool) -> String {
    format!(
        "{} {} until {}{}: {}",
        lock.id,
        lock.target,
        lock.expires_at
            .map(|e| e.to_rfc3339())
            .unwrap_or_else(|| "unlocked".into()),
        if revoke { ", revoking its leases" } else { "" },
        lock.reason
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::sync::Arc;

    use super::*;
    use crate::lease::LeaseState;
    use crate::policy::IdentityPattern;
    use crate::store::LeaseStore;
    use crate::testkit::{admin, app, role, Kit, APP};

    const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

    fn kit() -> Kit {
        let two = role("ro", "main").replace(
            &format!("allowed = [\"{APP}\"]"),
            &format!("allowed = [\"{APP}\", \"{OTHER}\"]"),
        ) + &role("ro2", "second");
        Kit::new("", &two)
    }

    fn pattern(p: &str) -> LockTarget {
        LockTarget::Identity(IdentityPattern::new(p).unwrap())
    }

    #[tokio::test]
    async fn an_identity_lock_refuses_issue_and_renew_with_its_reason_until_unlocked() {
        let kit = kit();
        let other = Identity::from_trusted(OTHER);
        let held = kit.broker.issue(&app(), "ro", None).await.unwrap();
        let (lock, revoked) = kit
            .broker
            .admin_lock(
                &admin(),
                pattern("spiffe://credbroker.dev/ns/demo/app"),
                None,
                "INC-7 leaked cert".into(),
                false,
            )
            .await
            .unwrap();
        assert!(revoked.is_none());
        let refused = kit.broker.issue(&app(), "ro", None).await.err().unwrap();
        assert!(matches!(refused, Error::PermissionDenied(_)), "{refused}");
        let text = refused.to_string();
        assert!(
            text.contains("INC-7 leaked cert") && text.contains(lock.id.as_str()),
            "{text}"
        );
        let renew = kit.broker.renew(&app(), &held.lease.id, None).await;
        assert!(
            matches!(renew, Err(Error::PermissionDenied(_))),
            "{renew:?}"
        );
        // Without --revoke the held credential keeps working until expiry.
        assert!(kit.server.user(held.lease.username.as_str()).is_some());
        kit.broker.issue(&other, "ro", None).await.unwrap();

        let denied: Vec<_> = kit
            .audit()
            .into_iter()
            .filter(|r| r.outcome == crate::audit::Outcome::Denied && r.identity == APP)
            .map(|r| (r.action, r.detail.unwrap_or_default()))
            .collect();
        assert_eq!(denied.len(), 2, "{denied:?}");
        assert!(
            denied.iter().all(|(_, d)| d.contains("INC-7")),
            "{denied:?}"
        );
        assert_eq!(
            kit.broker.admin_locks(&admin()).await.unwrap().len(),
            1,
            "listed"
        );

        kit.broker.admin_unlock(&admin(), &lock.id).await.unwrap();
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        kit.broker
            .renew(&app(), &held.lease.id, None)
            .await
            .unwrap();
        let again = kit.broker.admin_unlock(&admin(), &lock.id).await;
        assert!(matches!(again, Err(Error::NotFound(_))), "{again:?}");
        let actions: Vec<String> = kit.audit().into_iter().map(|r| r.action).collect();
        assert!(actions.contains(&"lock".to_string()) && actions.contains(&"unlock".to_string()));
    }

    #[tokio::test]
    async fn lock_with_revoke_ends_every_matching_lease_through_the_engine() {
        let kit = kit();
        let other = Identity::from_trusted(OTHER);
        let mine = [
            kit.broker.issue(&app(), "ro", None).await.unwrap(),
            kit.broker.issue(&app(), "ro2", None).await.unwrap(),
        ];
        let theirs = kit.broker.issue(&other, "ro", None).await.unwrap();
        let (_, out) = kit
            .broker
            .admin_lock(
                &admin(),
                pattern("spiffe://credbroker.dev/ns/demo/a*"),
                Some(Duration::from_secs(60)),
                "leak".into(),
                true,
            )
            .await
            .unwrap();
        let out = out.unwrap();
        assert_eq!(out.revoked.len(), 2, "{out:?}");
        for l in &mine {
            assert!(kit.server.user(l.lease.username.as_str()).is_none());
            let s = kit.store.get(&l.lease.id).await.unwrap().unwrap();
            assert_eq!(s.state, LeaseState::Revoked);
        }
        assert!(kit.server.user(theirs.lease.username.as_str()).is_some());
        let revoked_records = kit
            .audit()
            .into_iter()
            .filter(|r| r.action == "lock_revoke" && r.outcome == crate::audit::Outcome::Ok)
            .count();
        assert_eq!(revoked_records, 2);
    }

    #[tokio::test]
    async fn role_and_database_locks_refuse_only_what_they_name() {
        let kit = kit();
        let (by_role, _) = kit
            .broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                None,
                String::new(),
                false,
            )
            .await
            .unwrap();
        assert!(kit.broker.issue(&app(), "ro", None).await.is_err());
        kit.broker.issue(&app(), "ro2", None).await.unwrap();
        kit.broker
            .admin_unlock(&admin(), &by_role.id)
            .await
            .unwrap();
        kit.broker
            .admin_lock(
                &admin(),
                LockTarget::Database("second".into()),
                None,
                "maintenance".into(),
                false,
            )
            .await
            .unwrap();
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        let e = kit.broker.issue(&app(), "ro2", None).await.err().unwrap();
        assert!(e.to_string().contains("maintenance"), "{e}");

        for bad in [
            LockTarget::Role("nope".into()),
            LockTarget::Database("nope".into()),
        ] {
            let e = kit
                .broker
                .admin_lock(&admin(), bad, None, String::new(), false)
                .await
                .err()
                .unwrap();
            assert!(matches!(e, Error::NotFound(_)), "{e}");
        }
        let e = kit
            .broker
            .admin_lock(
                &app(),
                LockTarget::Role("ro".into()),
                None,
                String::new(),
                true,
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        let e = kit
            .broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                None,
                "a\nb".into(),
                false,
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[tokio::test]
    async fn a_lock_runs_out_on_its_own() {
        let kit = kit();
        kit.broker
            .admin_lock(
                &admin(),
                LockTarget::Role("ro".into()),
                Some(Duration::from_secs(1)),
                String::new(),
                false,
            )
            .await
            .unwrap();
        assert!(kit.broker.issue(&app(), "ro", None).await.is_err());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        kit.broker.issue(&app(), "ro", None).await.unwrap();
        assert!(kit.broker.admin_locks(&admin()).await.unwrap().is_empty());
    }

    /// The race of issue 25: a lock's `--revoke` claims an issue's intent,
    /// finds no user yet (revoking a missing user is done), and only then
    /// does the issue create its user. The interleaving is forced with the
    /// fake's gates: the issue waits before its CREATE, the revocation
    /// waits after its (empty) drop until the issue has tried to activate.
    /// A claimed intent never becomes active: the issue fails, drops what
    /// it made, and no user is left behind a `revoked` row.
    #[tokio::test]
    async fn an_intent_claimed_by_a_lock_revoke_never_becomes_a_working_credential() {
        let kit = Arc::new(kit());
        let before_create = kit.server.stall_before_create();
        let issuing = tokio::spawn({
            let kit = kit.clone();
            async move { kit.broker.issue(&app(), "ro", None).await }
        });
        // The intent is stored, checked against locks again, and its issue
        // waits before the CREATE.
        let pending = loop {
            let live = kit.store.list(&LeaseFilter::default()).await.unwrap();
            let waiting = |l: &Lease| {
                let call = format!("waiting to create {}", l.username);
                kit.server.calls().contains(&call)
            };
            if let Some(l) = live.into_iter().find(|l| waiting(l)) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let after_revoke = kit.server.stall_after_revoke();
        let locking = tokio::spawn({
            let kit = kit.clone();
            async move {
                kit.broker
                    .admin_lock(&admin(), pattern(APP), None, "INC-25".into(), true)
                    .await
            }
        });
        // The lock's revocation ran its drop (nothing to drop yet) and
        // waits to answer, holding its claim.
        let revoke_call = format!("revoke {}", pending.username);
        while !kit.server.calls().contains(&revoke_call) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Now the issue creates its user and tries to activate.
        before_create.add_permits(1);
        let issued = issuing.await.unwrap();
        let Err(err) = issued else {
            panic!("a lease claimed by a lock's --revoke was handed out");
        };
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        // The revocation and the issue's own clean-up both finish.
        after_revoke.add_permits(16);
        let (_, out) = locking.await.unwrap().unwrap();
        assert!(out.unwrap().failed.is_empty());
        let mut gone = false;
        for _ in 0..500 {
            let row = kit.store.get(&pending.id).await.unwrap().unwrap();
            if kit.server.user(pending.username.as_str()).is_none()
                && row.state == LeaseState::Revoked
            {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            gone,
            "user {} exists or its row is live: {:?}",
            pending.username,
            kit.server.calls()
        );
    }
}
