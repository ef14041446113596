//! Just-in-time database access for people: a request names roles, a
//! reason and a duration under an `[access.NAME]` policy; N distinct
//! approvers (never the requester) make it a grant; while the grant lives
//! its requester leases the roles through the ordinary lease path
//! (`broker::grants` admits them and ties each lease to the grant, its
//! expiry clamped to the grant's end); when the grant ends — its time, or
//! `access revoke` — every lease under it is revoked through the
//! revocation engine, sessions included. Break-glass identities get a
//! grant at once, always notified and marked in the audit. An undecided
//! request expires.
//!
//! Every step is one compare-and-set on the stored request
//! (`store::access`), so two approvers, two replicas or the expiry loop
//! racing an approval never both win; the loser re-reads and decides
//! again. Every step, and every refusal, is one audit record carrying the
//! request id; refusals change nothing.
//!
//! `rules.rs` holds the decisions (pure), `notify.rs` who hears of them,
//! `expiry.rs` the loop that expires requests and ends grants.

pub mod expiry;
pub mod notify;
pub mod rules;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::audit::{Event, Outcome};
use crate::broker::Broker;
use crate::config::AccessPolicy;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{is_random_id, random_id};
pub use crate::store::{AccessFilter, AccessRequest, AccessState, Approval};
pub use notify::{AccessNotifier, Kind, LogNotifier, WebhookNotifier};

/// The identity the expiry loop acts as in audit records and events.
pub const SYSTEM: &str = "credbroker:system";

/// How many times a step re-reads and retries after losing a
/// compare-and-set to a concurrent write.
const CAS_TRIES: usize = 8;

/// What a person asks for.
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    pub roles: Vec<String>,
    /// The policy to ask under; None: the first (by name) that covers
    /// every role and lets the caller ask.
    pub policy: Option<String>,
    pub reason: String,
    pub duration: Option<Duration>,
    /// Grant at once, without approval (break-glass identities only).
    pub break_glass: bool,
}

/// The access lifecycle, over the broker's store, audit log, config and
/// revocation engine.
pub struct Access {
    broker: Arc<Broker>,
    notifier: Arc<dyn AccessNotifier>,
}

/// A new request id: `ar_` and 26 characters of `[a-z0-9]` (≈ 2^134).
pub fn new_id() -> String {
    random_id("ar_", 26)
}

/// Parses caller text as a request id: the exact shape we make, so an id
/// never carries anything else into the store or a log line.
pub fn parse_id(s: &str) -> Result<String> {
    if is_random_id(s, "ar_", 26) {
        Ok(s.to_string())
    } else {
        Err(Error::invalid("malformed access request id (ar_…)"))
    }
}

impl Access {
    pub fn new(broker: Arc<Broker>, notifier: Arc<dyn AccessNotifier>) -> Self {
        Access { broker, notifier }
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    fn notify(&self, kind: Kind, r: &AccessRequest, actor: &str, reason: &str) {
        let policy = self.broker.config().access.get(&r.policy).cloned();
        let at = self.broker.clock().now();
        self.notifier.notify(
            policy.as_ref().and_then(|p| p.notify.as_ref()),
            notify::body(kind, r, actor, reason, at),
        );
    }

    fn event(who: &str, action: &'static str, id: Option<&str>) -> Event {
        let mut e = Event::new(who, action);
        e.request_id = id.map(str::to_string);
        e
    }

    /// Writes an "ok" record; a failed audit write fails the step (the
    /// store write already happened: the caller is told it failed, and
    /// the record of what happened is the store's row).
    fn audit_ok(&self, mut e: Event, detail: String) -> Result<()> {
        e.outcome = Some(Outcome::Ok);
        e.detail = Some(detail);
        self.broker.audit().append(e)
    }

    fn refuse(&self, e: Event, err: Error) -> Error {
        self.broker.refuse_event(e, err)
    }

    /// The policy `req` is made under: the named one, or the first that
    /// covers every role and admits the caller (as a requester, or a
    /// break-glass identity for break-glass).
    fn pick_policy(&self, who: &Identity, req: &NewRequest) -> Result<AccessPolicy> {
        let config = self.broker.config();
        if let Some(name) = &req.policy {
            return config.access.get(name).cloned().ok_or_else(|| {
                Error::NotFound(format!(
                    "no access policy {:?}",
                    crate::broker::truncate_text(name)
                ))
            });
        }
        let covers = |p: &AccessPolicy| req.roles.iter().all(|r| p.roles.contains(r));
        let admits = |p: &AccessPolicy| {
            let list = if req.break_glass {
                &p.break_glass
            } else {
                &p.requesters
            };
            crate::policy::any_matches(list, who)
        };
        let candidates: Vec<&AccessPolicy> = config.access.values().filter(|p| covers(p)).collect();
        if let Some(p) = candidates.iter().find(|p| admits(p)) {
            return Ok((*p).clone());
        }
        // None admits the caller: the first covering policy says why
        // (rules::check_request names the caller); none covering at all:
        // say so.
        match candidates.first() {
            Some(p) => Ok((*p).clone()),
            None => Err(Error::denied(format!(
                "no access policy grants role(s) {}",
                req.roles
                    .iter()
                    .map(|r| crate::broker::truncate_text(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// A new request (pending), or with `break_glass` a grant at once.
    /// `peer`: the caller's address; each requested role's
    /// `allowed_networks` applies (a grant could not be used from
    /// elsewhere), as the `Access` door's network control.
    pub async fn request(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        req: NewRequest,
    ) -> Result<AccessRequest> {
        let action = if req.break_glass {
            "access_break_glass"
        } else {
            "access_request"
        };
        let mut e = Self::event(who.as_str(), action, None);
        e.role = req.roles.first().map(|r| crate::broker::truncate_text(r));
        match self.request_inner(who, peer, &req, &mut e).await {
            Ok(r) => Ok(r),
            Err(err) => Err(self.refuse(e, err)),
        }
    }

    async fn request_inner(
        &self,
        who: &Identity,
        peer: Option<IpAddr>,
        req: &NewRequest,
        e: &mut Event,
    ) -> Result<AccessRequest> {
        self.broker.check_identity_lock(who).await?;
        let policy = self.pick_policy(who, req)?;
        let duration = rules::check_request(
            &policy,
            who,
            &req.roles,
            &req.reason,
            req.duration,
            req.break_glass,
        )?;
        let config = self.broker.config();
        for r in &req.roles {
            let role = crate::broker::lookup_role(&config, r)?;
            crate::broker::check_network(role, peer)?;
            // A lock on the role or its database suspends grants on it:
            // asking for one is refused too, saying so.
            self.broker.check_locks(who, r, &role.database).await?;
        }
        let now = crate::lease::truncate_ms(self.broker.clock().now());
        let mut r = rules::open(new_id(), &policy, who, req, duration, now)?;
        if req.break_glass {
            rules::grant(&mut r, now)?;
        }
        e.request_id = Some(r.id.clone());
        self.broker.store().insert_access(&r).await?;
        let detail = format!(
            "policy={} roles={} for={} reason={:?}{}",
            r.policy,
            r.roles.join(","),
            humantime::format_duration(duration),
            r.reason,
            if r.break_glass { " break_glass" } else { "" }
        );
        self.audit_ok(e.clone(), detail)?;
        if req.break_glass {
            self.audit_grant_start(&r, who.as_str())?;
            self.notify(Kind::BreakGlass, &r, who.as_str(), &r.reason);
        } else {
            self.notify(Kind::Requested, &r, who.as_str(), &r.reason);
        }
        Ok(r)
    }

    fn audit_grant_start(&self, r: &AccessRequest, actor: &str) -> Result<()> {
        let mut e = Self::event(actor, "access_grant", Some(&r.id));
        e.role = r.roles.first().cloned();
        let approvers: Vec<&str> = r.approvals.iter().map(|a| a.identity.as_str()).collect();
        self.audit_ok(
            e,
            format!(
                "granted to {} roles={} until {}{}",
                r.requester,
                r.roles.join(","),
                r.until.map(|u| u.to_rfc3339()).unwrap_or_default(),
                if r.break_glass {
                    " break_glass".to_string()
                } else {
                    format!(" approvers={}", approvers.join(","))
                }
            ),
        )
    }

    /// Reads request `id` (NotFound when there is none).
    async fn load(&self, id: &str) -> Result<AccessRequest> {
        self.broker
            .store()
            .get_access(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no access request {id}")))
    }

    fn policy_of(&self, r: &AccessRequest) -> Result<AccessPolicy> {
        self.broker
            .config()
            .access
            .get(&r.policy)
            .cloned()
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "access policy {:?} of request {} is no longer configured",
                    r.policy, r.id
                ))
            })
    }

    /// One step on request `id`, audited as `e`: the request read,
    /// `step` deciding what to store (and what else the caller keeps),
    /// stored by compare-and-set — read and decided again when another
    /// write came first. `locked`: the identity whose lock refuses the
    /// step (None: never refused for a lock). A refusal is audited here;
    /// on success `e` comes back, request id and role set, for the record.
    async fn decide<T>(
        &self,
        mut e: Event,
        id: &str,
        locked: Option<&Identity>,
        what: &str,
        step: impl Fn(&AccessRequest, DateTime<Utc>) -> Result<(AccessRequest, T)>,
    ) -> Result<(AccessRequest, T, Event)> {
        let result = async {
            let id = parse_id(id)?;
            e.request_id = Some(id.clone());
            if let Some(who) = locked {
                self.broker.check_identity_lock(who).await?;
            }
            for _ in 0..CAS_TRIES {
                let r = self.load(&id).await?;
                e.role = r.roles.first().cloned();
                let (mut next, kept) = step(&r, self.broker.clock().now())?;
                if self.broker.store().update_access(&next).await? {
                    next.version += 1;
                    return Ok((next, kept));
                }
            }
            Err(Error::unavailable(format!(
                "the request kept changing under this {what}; try again"
            )))
        }
        .await;
        match result {
            Ok((r, kept)) => Ok((r, kept, e)),
            Err(err) => Err(self.refuse(e, err)),
        }
    }

    /// One approval by `who`. Returns the request as stored after it
    /// (granted once it has its approvals).
    pub async fn approve(&self, who: &Identity, id: &str) -> Result<AccessRequest> {
        let e = Self::event(who.as_str(), "access_approve", None);
        let (r, granted, e) = self
            .decide(e, id, Some(who), "approval", |r, now| {
                rules::approve(&self.policy_of(r)?, r, who, now)
            })
            .await?;
        self.audit_ok(
            e,
            format!(
                "approval {}/{}{}",
                r.approvals.len(),
                r.approvals_needed,
                if granted { "; granted" } else { "" }
            ),
        )?;
        if granted {
            self.audit_grant_start(&r, who.as_str())?;
        }
        self.notify(Kind::Approved, &r, who.as_str(), &r.reason);
        Ok(r)
    }

    /// A denial by `who`: the request is decided, no grant.
    pub async fn deny(&self, who: &Identity, id: &str, reason: &str) -> Result<AccessRequest> {
        let e = Self::event(who.as_str(), "access_deny", None);
        let (r, (), e) = self
            .decide(e, id, Some(who), "denial", |r, now| {
                let next = rules::deny(&self.policy_of(r)?, r, who, reason, now)?;
                Ok((next, ()))
            })
            .await?;
        self.audit_ok(e, format!("denied: {reason:?}"))?;
        self.notify(Kind::Denied, &r, who.as_str(), reason);
        Ok(r)
    }

    /// Ends a grant (its leases revoked, sessions included) or withdraws
    /// a pending request. Never refused for a lock: giving up access is
    /// always allowed.
    pub async fn revoke(&self, who: &Identity, id: &str, reason: &str) -> Result<AccessRequest> {
        let e = Self::event(who.as_str(), "access_revoke", None);
        let is_admin = self.broker.is_admin(who);
        let (r, was, e) = self
            .decide(e, id, None, "revoke", |r, now| {
                let policy = self.broker.config().access.get(&r.policy).cloned();
                let next = rules::revoke(policy.as_ref(), r, who, is_admin, reason, now)?;
                Ok((next, r.state))
            })
            .await?;
        self.audit_ok(
            e,
            format!(
                "{}: {:?}",
                if was == AccessState::Granted {
                    "grant revoked"
                } else {
                    "request withdrawn"
                },
                r.end_reason.clone().unwrap_or_default()
            ),
        )?;
        if was == AccessState::Granted {
            self.end_grant(r, who).await
        } else {
            Ok(r)
        }
    }

    /// After a grant's end is stored: its leases go through the
    /// revocation engine, the end is audited and notified, and the
    /// request marked done with its leases. A failure here leaves it due:
    /// the expiry loop (any replica) finishes it.
    pub(crate) async fn end_grant(
        &self,
        mut r: AccessRequest,
        actor: &Identity,
    ) -> Result<AccessRequest> {
        let out = self.broker.revoke_grant_leases(actor, &r.id).await?;
        let mut e = Self::event(actor.as_str(), "access_grant_end", Some(&r.id));
        e.role = r.roles.first().cloned();
        self.audit_ok(
            e,
            format!(
                "grant ended ({}); {} lease(s) revoked{}",
                r.end_reason.clone().unwrap_or_default(),
                out.revoked.len(),
                if out.failed.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} left to the revocation engine's retries",
                        out.failed.len()
                    )
                }
            ),
        )?;
        self.notify(
            Kind::GrantEnded,
            &r,
            actor.as_str(),
            r.end_reason.as_deref().unwrap_or(""),
        );
        // Leases the engine could not revoke now are its to retry (they
        // are claimed, failing, or due at the grant's end anyway): the
        // grant's part is done.
        for _ in 0..CAS_TRIES {
            let mut done = r.clone();
            done.leases_done = true;
            if self.broker.store().update_access(&done).await? {
                done.version += 1;
                return Ok(done);
            }
            match self.broker.store().get_access(&r.id).await? {
                Some(now) if !now.leases_done => r = now,
                Some(now) => return Ok(now),
                None => break,
            }
        }
        Ok(r)
    }

    /// Requests `who` may see: admins and approvers of any policy see
    /// all; anyone else their own. `pending`: only undecided ones.
    pub async fn list(&self, who: &Identity, pending: bool) -> Result<Vec<AccessRequest>> {
        let config = self.broker.config();
        let sees_all = self.broker.is_admin(who)
            || config
                .access
                .values()
                .any(|p| crate::policy::any_matches(&p.approvers, who));
        let filter = AccessFilter {
            requester: (!sees_all).then(|| who.as_str().to_string()),
            states: if pending {
                vec![AccessState::Pending]
            } else {
                Vec::new()
            },
            limit: None,
        };
        let now = self.broker.clock().now();
        let mut out = self.broker.store().list_access(&filter).await?;
        // An approver sees the requests of policies it approves (and its
        // own); a pending one past its deadline is no longer to decide.
        if sees_all && !self.broker.is_admin(who) {
            out.retain(|r| {
                r.requester == who.as_str()
                    || config
                        .access
                        .get(&r.policy)
                        .is_some_and(|p| crate::policy::any_matches(&p.approvers, who))
            });
        }
        if pending {
            out.retain(|r| r.pending_until > now);
        }
        Ok(out)
    }

    /// One request, if `who` may see it (as `list`).
    pub async fn get(&self, who: &Identity, id: &str) -> Result<AccessRequest> {
        let id = parse_id(id)?;
        let r = self.load(&id).await?;
        let config = self.broker.config();
        let may = r.requester == who.as_str()
            || self.broker.is_admin(who)
            || config
                .access
                .get(&r.policy)
                .is_some_and(|p| crate::policy::any_matches(&p.approvers, who));
        if !may {
            // The same words as a missing one: ids are not to be probed.
            return Err(Error::NotFound(format!("no access request {id}")));
        }
        Ok(r)
    }
}
