//! `[access.NAME]`: just-in-time access policies for people (`access`).
//! Which roles a policy grants, who may ask, who may approve and how many
//! of them must, how long a grant may last, whether a reason is required,
//! how long an undecided request waits, who may break glass, and where
//! its events are posted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use super::{cfg_err, duration_or, identity_pattern, parse_duration, valid_key, RoleConfig};
use crate::error::Result;
use crate::policy::IdentityPattern;

/// Longest reason a request may carry (bytes): a ticket and a sentence,
/// not a document — it goes into every audit record and notification.
pub const MAX_REASON_LEN: usize = 500;

/// Longest grant any policy may allow: a person's access is for an
/// incident or a migration, never a standing credential again.
pub const MAX_GRANT: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long an undecided request waits unless `pending_for` says.
pub const DEFAULT_PENDING_FOR: Duration = Duration::from_secs(3600);

/// Whether a request must say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonRule {
    Required,
    Optional,
}

/// One validated `[access.NAME]`.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub name: String,
    /// Roles (`[roles.*]`) a grant of this policy covers.
    pub roles: Vec<String>,
    /// Who may request (people's certificates).
    pub requesters: Vec<IdentityPattern>,
    /// Who may approve or deny; a requester never approves its own.
    pub approvers: Vec<IdentityPattern>,
    /// Distinct approvals a request needs.
    pub approvals: u32,
    pub max_duration: Duration,
    pub reason: ReasonRule,
    /// An undecided request expires after this.
    pub pending_for: Duration,
    /// Who may grant themselves access at once (always notified, marked
    /// in the audit).
    pub break_glass: Vec<IdentityPattern>,
    /// Where the policy's events are posted (the webhook notifier).
    pub notify: Option<url::Url>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    roles: Vec<String>,
    #[serde(default)]
    requesters: Vec<String>,
    #[serde(default)]
    approvers: Vec<String>,
    approvals: Option<u32>,
    max_duration: String,
    reason: Option<String>,
    pending_for: Option<String>,
    #[serde(default)]
    break_glass: Vec<String>,
    notify: Option<String>,
}

fn patterns(key: &str, list: &[String]) -> Result<Vec<IdentityPattern>> {
    list.iter().map(|p| identity_pattern(key, p)).collect()
}

impl RawAccess {
    pub(super) fn validate(
        self,
        name: String,
        roles: &BTreeMap<String, RoleConfig>,
    ) -> Result<AccessPolicy> {
        let what = |k: &str| format!("access.{name}.{k}");
        if !valid_key(&name) {
            return Err(cfg_err(format!(
                "access.{name:?}: a policy name is 1-64 characters of [A-Za-z0-9._-]"
            )));
        }
        if self.roles.is_empty() {
            return Err(cfg_err(format!(
                "{}: empty; list the [roles.*] this policy grants",
                what("roles")
            )));
        }
        let mut seen = BTreeSet::new();
        for r in &self.roles {
            if !roles.contains_key(r) {
                return Err(cfg_err(format!(
                    "{}: unknown role {r:?} (no [roles.{r}])",
                    what("roles")
                )));
            }
            if !seen.insert(r) {
                return Err(cfg_err(format!("{}: {r:?} listed twice", what("roles"))));
            }
        }
        let requesters = patterns(&what("requesters"), &self.requesters)?;
        let approvers = patterns(&what("approvers"), &self.approvers)?;
        let break_glass = patterns(&what("break_glass"), &self.break_glass)?;
        if requesters.is_empty() && break_glass.is_empty() {
            return Err(cfg_err(format!(
                "{}: empty, and no break_glass either, so nobody could use this policy",
                what("requesters")
            )));
        }
        let approvals = self.approvals.unwrap_or(1);
        if !requesters.is_empty() {
            if approvals == 0 {
                return Err(cfg_err(format!(
                    "{} = 0: a request would grant itself; use break_glass for access without \
                     approval (it is always notified and marked in the audit)",
                    what("approvals")
                )));
            }
            if approvers.is_empty() {
                return Err(cfg_err(format!(
                    "{}: empty, so no request could ever be approved; list who may approve",
                    what("approvers")
                )));
            }
            // Patterns without a wildcard name one identity each: when all
            // are such, they bound how many distinct approvers exist.
            let literal = approvers.iter().all(|p| !p.as_str().contains('*'));
            let distinct: BTreeSet<&str> = approvers.iter().map(|p| p.as_str()).collect();
            if literal && approvals as usize > distinct.len() {
                return Err(cfg_err(format!(
                    "{} = {approvals}, but only {} approver(s) are listed (and a requester never \
                     approves its own request): no request could ever be granted",
                    what("approvals"),
                    distinct.len()
                )));
            }
        }
        let max_duration = parse_duration(&what("max_duration"), &self.max_duration)?;
        if max_duration.is_zero() || max_duration > MAX_GRANT {
            return Err(cfg_err(format!(
                "{}: must be more than 0 and at most {}",
                what("max_duration"),
                humantime::format_duration(MAX_GRANT)
            )));
        }
        let reason = match self.reason.as_deref() {
            None | Some("required") => ReasonRule::Required,
            Some("optional") => ReasonRule::Optional,
            Some(other) => {
                return Err(cfg_err(format!(
                    "{}: {other:?}; use \"required\" or \"optional\"",
                    what("reason")
                )))
            }
        };
        let pending_for = duration_or(
            &what("pending_for"),
            self.pending_for.as_deref(),
            DEFAULT_PENDING_FOR,
        )?;
        if pending_for.is_zero() || pending_for > MAX_GRANT {
            return Err(cfg_err(format!(
                "{}: must be more than 0 and at most {}",
                what("pending_for"),
                humantime::format_duration(MAX_GRANT)
            )));
        }
        let notify = self
            .notify
            .map(|u| {
                let url = url::Url::parse(&u)
                    .map_err(|e| cfg_err(format!("{}: {u:?} is not a URL: {e}", what("notify"))))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(cfg_err(format!(
                        "{}: {u:?}: an http:// or https:// URL with a host",
                        what("notify")
                    )));
                }
                Ok(url)
            })
            .transpose()?;
        Ok(AccessPolicy {
            name,
            roles: self.roles,
            requesters,
            approvers,
            approvals,
            max_duration,
            reason,
            pending_for,
            break_glass,
            notify,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
[databases.orders]
kind = "postgres"
admin_url = "postgres://admin@127.0.0.1:5432/orders"
[roles.orders-ro]
database = "orders"
default_ttl = "15m"
max_ttl = "1h"
allowed = ["spiffe://example.org/svc/*"]
grants = ["GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}"]
"#;

    fn parse(access: &str) -> crate::error::Result<Config> {
        Config::parse(&format!("{BASE}\n{access}"), std::path::Path::new("/tmp"))
    }

    fn err(access: &str) -> String {
        parse(access).unwrap_err().to_string()
    }

    #[test]
    fn a_full_policy_parses() {
        let c = parse(
            r#"
[access.orders-incident]
roles = ["orders-ro"]
requesters = ["spiffe://example.org/user/*"]
approvers = ["spiffe://example.org/user/dba-*"]
approvals = 2
max_duration = "4h"
reason = "required"
pending_for = "30m"
break_glass = ["spiffe://example.org/user/oncall-*"]
notify = "https://chat.example.org/hooks/credbroker"
"#,
        )
        .unwrap();
        let p = &c.access["orders-incident"];
        assert_eq!(p.approvals, 2);
        assert_eq!(p.max_duration.as_secs(), 4 * 3600);
        assert_eq!(p.pending_for.as_secs(), 30 * 60);
        assert_eq!(p.reason, super::ReasonRule::Required);
        assert_eq!(
            p.notify.as_ref().unwrap().host_str(),
            Some("chat.example.org")
        );
        assert_eq!(p.break_glass.len(), 1);
    }

    #[test]
    fn bad_policies_are_refused_saying_what_to_fix() {
        let cases = [
            (
                r#"roles = ["nope"]"#,
                "access.p.roles: unknown role \"nope\"",
            ),
            (r#"roles = []"#, "access.p.roles: empty"),
            (
                r#"roles = ["orders-ro"]
approvals = 3
approvers = ["spiffe://example.org/user/a", "spiffe://example.org/user/b"]"#,
                "only 2 approver(s) are listed",
            ),
            (
                r#"roles = ["orders-ro"]
approvals = 0"#,
                "use break_glass",
            ),
            (
                r#"roles = ["orders-ro"]
approvers = []"#,
                "access.p.approvers: empty",
            ),
            (
                r#"roles = ["orders-ro"]
reason = "sometimes""#,
                "use \"required\" or \"optional\"",
            ),
            (
                r#"roles = ["orders-ro"]
notify = "ftp://x.example.org/""#,
                "access.p.notify",
            ),
            (
                r#"roles = ["orders-ro"]
approvers = ["dba-*"]"#,
                "access.p.approvers",
            ),
        ];
        for (body, want) in cases {
            let mut text = format!("[access.p]\nmax_duration = \"1h\"\n{body}\n");
            if !body.contains("approvers") {
                text.push_str("approvers = [\"spiffe://example.org/user/dba-*\"]\n");
            }
            if !body.contains("requesters") {
                text.push_str("requesters = [\"spiffe://example.org/user/*\"]\n");
            }
            let e = err(&text);
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = err("[access.p]\nroles = [\"orders-ro\"]\nrequesters = [\"spiffe://example.org/user/*\"]\napprovers = [\"spiffe://example.org/user/dba-*\"]\nmax_duration = \"30d\"\n");
        assert!(e.contains("access.p.max_duration"), "{e}");
        let e = err("[access.p]\nroles = [\"orders-ro\"]\nmax_duration = \"1h\"\n");
        assert!(e.contains("nobody could use this policy"), "{e}");
    }

    #[test]
    fn break_glass_only_needs_no_approvers() {
        let c = parse(
            r#"
[access.glass]
roles = ["orders-ro"]
break_glass = ["spiffe://example.org/user/oncall-*"]
max_duration = "1h"
"#,
        )
        .unwrap();
        assert!(c.access["glass"].requesters.is_empty());
    }
}
