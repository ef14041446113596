//! The decisions of the access lifecycle, as pure functions of a policy,
//! a request, a caller and a time: what `Access` asks before it writes
//! anything, so each refusal changes nothing. Tested here without a store.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::access::MAX_REASON_LEN;
use crate::config::{AccessPolicy, ReasonRule};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::policy::any_matches;
use crate::store::{AccessRequest, AccessState};

use super::NewRequest;

/// How long a grant lasts when the request names no duration: an hour,
/// or the policy's longest if shorter.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(3600);

/// The shortest grant: below it a lease would hardly connect.
pub const MIN_DURATION: Duration = Duration::from_secs(10);

/// A request checked against `policy`: the roles it covers, who asks (a
/// requester, or a break-glass identity for `break_glass`), the reason,
/// the duration. Returns the grant's duration.
pub fn check_request(
    policy: &AccessPolicy,
    who: &Identity,
    roles: &[String],
    reason: &str,
    duration: Option<Duration>,
    break_glass: bool,
) -> Result<Duration> {
    if roles.is_empty() {
        return Err(Error::invalid("name at least one role (--role)"));
    }
    for r in roles {
        if !policy.roles.iter().any(|p| p == r) {
            return Err(Error::denied(format!(
                "access policy {:?} does not cover role {r:?} (it grants {})",
                policy.name,
                policy.roles.join(", ")
            )));
        }
    }
    if break_glass {
        if !any_matches(&policy.break_glass, who) {
            return Err(Error::denied(format!(
                "identity {:?} may not break glass under access policy {:?}",
                who.as_str(),
                policy.name
            )));
        }
    } else if !any_matches(&policy.requesters, who) {
        return Err(Error::denied(format!(
            "identity {:?} may not request access under policy {:?}",
            who.as_str(),
            policy.name
        )));
    }
    check_reason(reason, policy.reason == ReasonRule::Required || break_glass)?;
    let d = duration.unwrap_or(DEFAULT_DURATION.min(policy.max_duration));
    if d < MIN_DURATION {
        return Err(Error::invalid(format!(
            "a grant lasts at least {} (--for)",
            humantime::format_duration(MIN_DURATION)
        )));
    }
    if d > policy.max_duration {
        return Err(Error::invalid(format!(
            "{} is longer than access policy {:?} allows ({})",
            humantime::format_duration(d),
            policy.name,
            humantime::format_duration(policy.max_duration)
        )));
    }
    Ok(d)
}

/// A reason: required ones not blank; never longer than
/// [`MAX_REASON_LEN`]; one line of printable text (it goes into audit
/// records, listings and chat messages).
pub fn check_reason(reason: &str, required: bool) -> Result<()> {
    if required && reason.trim().is_empty() {
        return Err(Error::invalid(
            "a reason is required (--reason \"INC-4711: orders stuck\")",
        ));
    }
    if reason.len() > MAX_REASON_LEN {
        return Err(Error::invalid(format!(
            "the reason is {} bytes; at most {MAX_REASON_LEN}",
            reason.len()
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(Error::invalid(
            "the reason must be one line of text, without control characters",
        ));
    }
    Ok(())
}

/// Whether `r` can still be decided at `now`.
fn check_pending(r: &AccessRequest, now: DateTime<Utc>) -> Result<()> {
    if r.state != AccessState::Pending {
        return Err(Error::FailedPrecondition(format!(
            "access request {} is {}, not pending",
            r.id,
            r.state.as_str()
        )));
    }
    if r.pending_until <= now {
        return Err(Error::FailedPrecondition(format!(
            "access request {} expired undecided at {}",
            r.id,
            r.pending_until.to_rfc3339()
        )));
    }
    Ok(())
}

/// Who may decide (approve or deny) `r`: a listed approver, never its
/// requester, while it is pending.
fn check_decider(policy: &AccessPolicy, r: &AccessRequest, who: &Identity) -> Result<()> {
    if who.as_str() == r.requester {
        return Err(Error::denied(
            "a requester never approves or denies its own request",
        ));
    }
    if !any_matches(&policy.approvers, who) {
        return Err(Error::denied(format!(
            "identity {:?} is not an approver of access policy {:?}",
            who.as_str(),
            policy.name
        )));
    }
    Ok(())
}

/// What an approval does: the request with it, and whether that made the
/// grant (approvals reached). Distinct approvers only.
pub fn approve(
    policy: &AccessPolicy,
    r: &AccessRequest,
    who: &Identity,
    now: DateTime<Utc>,
) -> Result<(AccessRequest, bool)> {
    check_pending(r, now)?;
    check_decider(policy, r, who)?;
    if r.approvals.iter().any(|a| a.identity == who.as_str()) {
        return Err(Error::FailedPrecondition(format!(
            "identity {:?} already approved access request {}; it needs {} distinct approvers",
            who.as_str(),
            r.id,
            r.approvals_needed
        )));
    }
    let mut next = r.clone();
    next.approvals.push(crate::store::Approval {
        identity: who.as_str().to_string(),
        at: now,
    });
    let granted = next.approvals.len() as u32 >= next.approvals_needed.max(1);
    if granted {
        grant(&mut next, now)?;
    }
    Ok((next, granted))
}

/// A new request `id` by `who` under `policy` at `now`, for `duration`
/// once granted: pending until the policy's deadline, nothing decided.
pub fn open(
    id: String,
    policy: &AccessPolicy,
    who: &Identity,
    req: &NewRequest,
    duration: Duration,
    now: DateTime<Utc>,
) -> Result<AccessRequest> {
    Ok(AccessRequest {
        id,
        policy: policy.name.clone(),
        roles: req.roles.clone(),
        requester: who.as_str().to_string(),
        reason: req.reason.clone(),
        duration_secs: duration.as_secs(),
        state: AccessState::Pending,
        break_glass: req.break_glass,
        created_at: now,
        pending_until: now
            + chrono::Duration::from_std(policy.pending_for).map_err(Error::internal)?,
        approvals: Vec::new(),
        approvals_needed: policy.approvals,
        denied_by: None,
        deny_reason: None,
        granted_at: None,
        until: None,
        ended_at: None,
        ended_by: None,
        end_reason: None,
        leases_done: true,
        version: 0,
    })
}

/// Makes `r` a grant from `now` for its duration.
pub fn grant(r: &mut AccessRequest, now: DateTime<Utc>) -> Result<()> {
    let d = chrono::Duration::from_std(Duration::from_secs(r.duration_secs))
        .map_err(Error::internal)?;
    r.state = AccessState::Granted;
    r.granted_at = Some(now);
    r.until = Some(now + d);
    Ok(())
}

/// What a denial does.
pub fn deny(
    policy: &AccessPolicy,
    r: &AccessRequest,
    who: &Identity,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<AccessRequest> {
    check_pending(r, now)?;
    check_decider(policy, r, who)?;
    check_reason(reason, false)?;
    let mut next = r.clone();
    next.state = AccessState::Denied;
    next.denied_by = Some(who.as_str().to_string());
    next.deny_reason = Some(reason.to_string());
    Ok(next)
}

/// What a revoke does: a grant ends (its leases then go), a pending
/// request is withdrawn. The requester, an approver of the policy or an
/// admin may. `policy` None: the policy is gone from the config (only
/// the requester and admins may then).
pub fn revoke(
    policy: Option<&AccessPolicy>,
    r: &AccessRequest,
    who: &Identity,
    is_admin: bool,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<AccessRequest> {
    let approver = policy.is_some_and(|p| any_matches(&p.approvers, who));
    if who.as_str() != r.requester && !approver && !is_admin {
        return Err(Error::denied(format!(
            "identity {:?} may not revoke access request {}: only its requester, an approver or an admin",
            who.as_str(),
            r.id
        )));
    }
    check_reason(reason, false)?;
    if !matches!(r.state, AccessState::Pending | AccessState::Granted) {
        return Err(Error::FailedPrecondition(format!(
            "access request {} is {}: nothing to revoke",
            r.id,
            r.state.as_str()
        )));
    }
    let mut next = r.clone();
    // A pending request has no leases: nothing left to do after this.
    next.leases_done = r.state == AccessState::Pending;
    next.state = AccessState::Ended;
    next.ended_at = Some(now);
    next.ended_by = Some(who.as_str().to_string());
    next.end_reason = Some(if reason.is_empty() {
        "revoked".to_string()
    } else {
        reason.to_string()
    });
    Ok(next)
}

/// What the expiry loop does with a due request at `now`: a pending one
/// expires, a grant past its end ends. None: not due (decided meanwhile).
pub fn expire(r: &AccessRequest, now: DateTime<Utc>) -> Option<AccessRequest> {
    let mut next = r.clone();
    match r.state {
        AccessState::Pending if r.pending_until <= now => {
            next.state = AccessState::Expired;
            next.ended_at = Some(now);
            Some(next)
        }
        AccessState::Granted if r.until.is_some_and(|u| u <= now) => {
            next.state = AccessState::Ended;
            next.ended_at = Some(now);
            next.ended_by = Some(super::SYSTEM.to_string());
            next.end_reason = Some("its time ran out".to_string());
            next.leases_done = false;
            Some(next)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AccessPolicy, ReasonRule};
    use crate::error::Error;
    use crate::policy::IdentityPattern;

    const REQUESTER: &str = "spiffe://example.org/user/alice";
    const DBA1: &str = "spiffe://example.org/user/dba-bob";
    const DBA2: &str = "spiffe://example.org/user/dba-carol";

    fn policy() -> AccessPolicy {
        let p = |s: &str| IdentityPattern::new(s).unwrap();
        AccessPolicy {
            name: "orders-incident".into(),
            roles: vec!["orders-ro".into()],
            requesters: vec![p("spiffe://example.org/user/*")],
            approvers: vec![p("spiffe://example.org/user/dba-*")],
            approvals: 2,
            max_duration: Duration::from_secs(4 * 3600),
            reason: ReasonRule::Required,
            pending_for: Duration::from_secs(1800),
            break_glass: vec![p("spiffe://example.org/user/oncall-*")],
            notify: None,
        }
    }

    fn id(s: &str) -> Identity {
        Identity::from_trusted(s.to_string())
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    /// Alice's request for an hour of orders-ro, pending for 30 minutes
    /// from `t0`, wanting two approvals.
    fn pending() -> AccessRequest {
        let ask = NewRequest {
            roles: vec!["orders-ro".into()],
            reason: "INC-4711".into(),
            ..NewRequest::default()
        };
        let hour = Duration::from_secs(3600);
        open(
            "ar_test".into(),
            &policy(),
            &id(REQUESTER),
            &ask,
            hour,
            t0(),
        )
        .unwrap()
    }

    fn kind(e: &Error) -> &'static str {
        match e {
            Error::InvalidArgument(_) => "invalid",
            Error::PermissionDenied(_) => "denied",
            Error::FailedPrecondition(_) => "precondition",
            _ => "other",
        }
    }

    #[test]
    fn bad_requests_are_refused_each_with_its_reason() {
        let p = policy();
        let roles = vec!["orders-ro".to_string()];
        let h = |x: u64| Some(Duration::from_secs(x * 3600));
        let cases: Vec<(Result<Duration>, &str, &str)> = vec![
            (
                check_request(&p, &id(REQUESTER), &roles, "", h(1), false),
                "invalid",
                "a reason is required",
            ),
            (
                check_request(&p, &id(REQUESTER), &roles, "   ", h(1), false),
                "invalid",
                "a reason is required",
            ),
            (
                check_request(&p, &id(REQUESTER), &roles, &"x".repeat(501), h(1), false),
                "invalid",
                "at most 500",
            ),
            (
                check_request(&p, &id(REQUESTER), &roles, "a\nb", h(1), false),
                "invalid",
                "one line",
            ),
            (
                check_request(&p, &id(REQUESTER), &roles, "INC-1", h(5), false),
                "invalid",
                "longer than access policy",
            ),
            (
                check_request(
                    &p,
                    &id(REQUESTER),
                    &["orders-rw".to_string()],
                    "INC-1",
                    h(1),
                    false,
                ),
                "denied",
                "does not cover role \"orders-rw\"",
            ),
            (
                check_request(&p, &id(REQUESTER), &[], "INC-1", h(1), false),
                "invalid",
                "at least one role",
            ),
            (
                check_request(
                    &p,
                    &id("spiffe://example.org/svc/app"),
                    &roles,
                    "INC-1",
                    h(1),
                    false,
                ),
                "denied",
                "may not request",
            ),
            (
                check_request(&p, &id(REQUESTER), &roles, "INC-1", h(1), true),
                "denied",
                "may not break glass",
            ),
            (
                check_request(
                    &p,
                    &id(REQUESTER),
                    &roles,
                    "INC-1",
                    Some(Duration::from_secs(5)),
                    false,
                ),
                "invalid",
                "at least 10s",
            ),
        ];
        for (r, k, text) in cases {
            let e = r.unwrap_err();
            assert_eq!(kind(&e), k, "{e}");
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
        assert_eq!(
            check_request(&p, &id(REQUESTER), &roles, "INC-1", None, false).unwrap(),
            Duration::from_secs(3600)
        );
        // Break glass always needs a reason, whatever the policy says.
        let mut optional = policy();
        optional.reason = ReasonRule::Optional;
        let oncall = id("spiffe://example.org/user/oncall-dan");
        assert!(check_request(&optional, &id(REQUESTER), &roles, "", h(1), false).is_ok());
        assert!(check_request(&optional, &oncall, &roles, "", h(1), true).is_err());
        assert!(check_request(&optional, &oncall, &roles, "INC-9", h(1), true).is_ok());
    }

    #[test]
    fn two_distinct_approvers_grant_and_the_requester_never_counts() {
        let p = policy();
        let r = pending();
        let now = t0() + chrono::Duration::minutes(1);
        let e = approve(&p, &r, &id(REQUESTER), now).unwrap_err();
        assert!(e.to_string().contains("never approves"), "{e}");
        let e = approve(&p, &r, &id("spiffe://example.org/user/eve"), now).unwrap_err();
        assert_eq!(kind(&e), "denied");
        assert!(e.to_string().contains("not an approver"), "{e}");
        let (one, granted) = approve(&p, &r, &id(DBA1), now).unwrap();
        assert!(!granted);
        assert_eq!(one.state, AccessState::Pending);
        let e = approve(&p, &one, &id(DBA1), now).unwrap_err();
        assert!(e.to_string().contains("already approved"), "{e}");
        let (two, granted) = approve(&p, &one, &id(DBA2), now).unwrap();
        assert!(granted);
        assert_eq!(two.state, AccessState::Granted);
        assert_eq!(two.until, Some(now + chrono::Duration::hours(1)));
        assert!(two.covers(REQUESTER, "orders-ro", now));
        assert!(!two.covers(REQUESTER, "orders-rw", now));
        assert!(!two.covers(DBA1, "orders-ro", now));
        assert!(!two.covers(REQUESTER, "orders-ro", now + chrono::Duration::hours(1)));
        // Decided: no more approvals, no denial.
        let e = approve(&p, &two, &id("spiffe://example.org/user/dba-dave"), now).unwrap_err();
        assert!(e.to_string().contains("is granted, not pending"), "{e}");
        assert!(deny(&p, &two, &id(DBA1), "", now).is_err());
    }

    #[test]
    fn an_expired_request_cannot_be_decided_and_the_loop_expires_it() {
        let p = policy();
        let r = pending();
        let late = r.pending_until;
        let e = approve(&p, &r, &id(DBA1), late).unwrap_err();
        assert!(e.to_string().contains("expired undecided"), "{e}");
        let e = deny(&p, &r, &id(DBA1), "no", late).unwrap_err();
        assert_eq!(kind(&e), "precondition");
        assert!(expire(&r, late - chrono::Duration::seconds(1)).is_none());
        let x = expire(&r, late).unwrap();
        assert_eq!(x.state, AccessState::Expired);
        assert_eq!(x.due_at(), None);
    }

    #[test]
    fn a_grant_ends_at_its_time_and_its_leases_stay_due_until_done() {
        let mut g = pending();
        grant(&mut g, t0()).unwrap();
        let end = g.until.unwrap();
        assert_eq!(g.due_at(), Some(end));
        let ended = expire(&g, end).unwrap();
        assert_eq!(ended.state, AccessState::Ended);
        assert!(!ended.leases_done);
        assert_eq!(ended.due_at(), Some(end));
    }

    #[test]
    fn denial_and_revoke_rules() {
        let p = policy();
        let r = pending();
        let now = t0();
        let d = deny(&p, &r, &id(DBA1), "not during the freeze", now).unwrap();
        assert_eq!(d.state, AccessState::Denied);
        assert_eq!(d.denied_by.as_deref(), Some(DBA1));
        assert!(deny(&p, &r, &id(REQUESTER), "", now).is_err());
        // Revoke: requester, approver, admin; nobody else.
        let stranger = id("spiffe://example.org/user/eve");
        assert_eq!(
            kind(&revoke(Some(&p), &r, &stranger, false, "", now).unwrap_err()),
            "denied"
        );
        assert!(revoke(Some(&p), &r, &stranger, true, "", now).is_ok());
        assert!(revoke(None, &r, &id(DBA1), false, "", now).is_err());
        let withdrawn = revoke(Some(&p), &r, &id(REQUESTER), false, "", now).unwrap();
        assert!(withdrawn.leases_done, "a pending request had no leases");
        let mut g = pending();
        grant(&mut g, now).unwrap();
        let ended = revoke(Some(&p), &g, &id(DBA2), false, "done", now).unwrap();
        assert_eq!(ended.state, AccessState::Ended);
        assert!(!ended.leases_done);
        assert_eq!(
            kind(&revoke(Some(&p), &ended, &id(DBA2), false, "", now).unwrap_err()),
            "precondition"
        );
    }
}
