//! `credbroker lease issue|renew|revoke|lookup`: what a service does.

use std::process::ExitCode;

use crate::cli::{answered, secs, CliResult};
use credbroker::client::ClientOpts;
use credbroker::pb;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Json,
    Dsn,
    Env,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Lease a credential for a role
    Issue {
        /// The role to lease (a `[roles.NAME]` of the broker's config)
        #[arg(long)]
        role: String,
        /// Lifetime, e.g. 10m, at most the role's max_ttl (default: the
        /// role's default_ttl; 0s is refused, not read as the default)
        #[arg(long, value_parser = positive_ttl)]
        ttl: Option<humantime::Duration>,
        /// Output: json (every field), dsn (one connection URI) or env
        /// (PGHOST=… or MYSQL_HOST=… lines, for `set -a; . FILE`)
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Extend a lease (never past its hard limit)
    Renew {
        /// The lease to renew (l_…, as `lease issue` printed it)
        lease_id: String,
        /// New lifetime from now, e.g. 10m (default: the role's
        /// default_ttl); more than the role's max_ttl or past the lease's
        /// hard limit is capped, with a warning
        #[arg(long, value_parser = positive_ttl)]
        ttl: Option<humantime::Duration>,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// End a lease now: sessions cut, user dropped
    Revoke {
        /// The lease to end (l_…, as `lease issue` printed it)
        lease_id: String,
        /// A routine handover of a lease you have replaced: new logins are
        /// refused at once, its sessions end as they go idle and busy ones
        /// at the drain deadline (`drain_deadline`), so a connection pool
        /// fails no query. Without it every session ends at once.
        #[arg(long)]
        handover: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show a lease (without password)
    Lookup {
        /// The lease to show (l_…, as `lease issue` printed it)
        lease_id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// `--ttl`: a duration of at least a second. On the wire 0 means "the
/// role's default", so a typed `0s` would silently become 15m or so.
fn positive_ttl(s: &str) -> Result<humantime::Duration, String> {
    let d: humantime::Duration = s.parse().map_err(|e| format!("{e}"))?;
    if d.as_secs() < 1 {
        return Err(
            "a lease lives at least 1s; leave --ttl out for the role's default_ttl".to_string(),
        );
    }
    Ok(d)
}

/// What `lease renew` says when the broker granted less than `--ttl`
/// asked (capped at the role's max_ttl or the lease's hard limit, as the
/// Vault API does), so a capped renewal is never mistaken for the asked one.
fn renewal_warning(
    asked: Option<humantime::Duration>,
    lease: &pb::Lease,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let asked = asked?;
    let expires = chrono::DateTime::from_timestamp(lease.expires_at.as_ref()?.seconds, 0)?;
    let granted = (expires - now).to_std().unwrap_or_default();
    // A second or two goes to the round trip and the broker's truncation.
    if granted + std::time::Duration::from_secs(2) >= *asked {
        return None;
    }
    let by = if lease.expires_at == lease.max_expires_at {
        format!(
            "the role's max_ttl, counted from issue (this lease's hard limit, {})",
            rfc3339(&lease.max_expires_at)
        )
    } else {
        "the role's max_ttl".to_string()
    };
    Some(format!(
        "warning: renewed until {} ({} from now), not the {asked} asked for: capped by {by}",
        rfc3339(&lease.expires_at),
        humantime::format_duration(std::time::Duration::from_secs(granted.as_secs()))
    ))
}

pub async fn run(cmd: Command) -> CliResult {
    match cmd {
        Command::Issue {
            role,
            ttl,
            format,
            client,
        } => {
            let mut c = client.broker()?;
            let call = c.issue_lease(pb::IssueLeaseRequest {
                role,
                ttl_seconds: secs(ttl),
            });
            let lease = answered(&client, "issue", call).await?;
            print!("{}", render(&lease, format));
        }
        Command::Renew {
            lease_id,
            ttl,
            client,
        } => {
            let mut c = client.broker()?;
            let asked_at = chrono::Utc::now();
            let call = c.renew_lease(pb::RenewLeaseRequest {
                lease_id,
                ttl_seconds: secs(ttl),
            });
            let lease = answered(&client, "renew", call).await?;
            if let Some(w) = renewal_warning(ttl, &lease, asked_at) {
                eprintln!("{w}");
            }
            print!("{}", render(&lease, Format::Json));
        }
        Command::Revoke {
            lease_id,
            handover,
            client,
        } => {
            let mut c = client.broker()?;
            let call = c.revoke_lease(pb::RevokeLeaseRequest { lease_id, handover });
            let r = answered(&client, "revoke", call).await?;
            if r.state == pb::LeaseState::Draining as i32 {
                println!("draining {}", r.lease_id);
            } else {
                println!("revoked {}", r.lease_id);
            }
        }
        Command::Lookup { lease_id, client } => {
            let mut c = client.broker()?;
            let call = c.lookup_lease(pb::LookupLeaseRequest { lease_id });
            let lease = answered(&client, "lookup", call).await?;
            print!("{}", render(&lease, Format::Json));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

pub fn state_name(state: i32) -> &'static str {
    match pb::LeaseState::try_from(state).unwrap_or(pb::LeaseState::Unspecified) {
        pb::LeaseState::Pending => "pending",
        pb::LeaseState::Active => "active",
        pb::LeaseState::Draining => "draining",
        pb::LeaseState::Failing => "failing",
        pb::LeaseState::Revoked => "revoked",
        pb::LeaseState::Unspecified => "unknown",
    }
}

/// Renders a lease reply for stdout. The password appears only here, and
/// only when the reply carries one (issue).
pub fn render(l: &pb::Lease, format: Format) -> String {
    match format {
        Format::Json => {
            let mut v = serde_json::json!({
                "lease_id": l.lease_id,
                "role": l.role,
                "database": l.database,
                "kind": l.kind,
                "identity": l.identity,
                "state": state_name(l.state),
                "username": l.username,
                "password": l.password,
                "dsn": l.dsn,
                "host": l.host,
                "port": l.port,
                "database_name": l.database_name,
                "issued_at": rfc3339(&l.issued_at),
                "expires_at": rfc3339(&l.expires_at),
                "max_expires_at": rfc3339(&l.max_expires_at),
                "renewable": l.renewable,
            });
            // Renew and lookup carry no password: no `"password": ""`
            // that reads like an empty one.
            if l.password.is_empty() {
                if let Some(o) = v.as_object_mut() {
                    o.remove("password");
                }
            }
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Format::Dsn => format!("{}\n", l.dsn),
        Format::Env => {
            let keys = credbroker::sidecar::render::client_env_keys(l.kind == "mysql");
            let port = l.port.to_string();
            let expires = rfc3339(&l.expires_at);
            let values: [&str; 5] = [
                l.host.as_str(),
                &port,
                &l.username,
                &l.password,
                &l.database_name,
            ];
            let mut out = String::new();
            // The lease id and expiry: what a shell needs to renew and
            // revoke the lease it sourced.
            let all = keys.iter().zip(values).chain([
                (&"DATABASE_URL", l.dsn.as_str()),
                (&"CREDBROKER_LEASE_ID", l.lease_id.as_str()),
                (&"CREDBROKER_LEASE_EXPIRES_AT", expires.as_str()),
            ]);
            for (k, v) in all {
                // Quoted where a shell would read a character (a DSN's `&`).
                credbroker::sidecar::render::env_line(&mut out, k, v);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: chrono::DateTime<chrono::Utc>) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        })
    }

    fn lease(
        expires: chrono::DateTime<chrono::Utc>,
        max: chrono::DateTime<chrono::Utc>,
    ) -> pb::Lease {
        pb::Lease {
            lease_id: "l_abc".into(),
            kind: "postgres".into(),
            host: "db.internal".into(),
            port: 5432,
            username: "cb_ro_x".into(),
            password: "p&w'd".into(),
            database_name: "orders".into(),
            dsn: "postgres://cb_ro_x@db.internal:5432/orders?sslmode=require&x=y".into(),
            expires_at: at(expires),
            max_expires_at: at(max),
            ..Default::default()
        }
    }

    /// `--format env` names the lease and its expiry, and quotes what a
    /// shell would read (a DSN's `&`, a quote in a password).
    #[test]
    fn env_format_carries_the_lease_id_and_expiry_and_sources_safely() {
        let now = chrono::Utc::now();
        let env = render(&lease(now, now), Format::Env);
        assert!(env.contains("CREDBROKER_LEASE_ID=l_abc\n"), "{env}");
        assert!(
            env.contains(&format!(
                "CREDBROKER_LEASE_EXPIRES_AT={}\n",
                rfc3339(&at(now))
            )),
            "{env}"
        );
        assert!(env.contains("PGPASSWORD='p&w'\\''d'\n"), "{env}");
        assert!(env.contains("DATABASE_URL='postgres://"), "{env}");
    }

    /// A renewal granted less than asked says so, and by what.
    #[test]
    fn a_capped_renewal_is_named_and_a_full_one_is_not() {
        let now = chrono::Utc::now();
        let hour = chrono::Duration::hours(1);
        let two_h: humantime::Duration = "2h".parse().unwrap();
        let capped = renewal_warning(Some(two_h), &lease(now + hour, now + hour), now).unwrap();
        assert!(
            capped.starts_with("warning: renewed until ")
                && capped.contains(
                    "not the 2h asked for: capped by the role's max_ttl, counted from issue"
                ),
            "{capped}"
        );
        let hard = now + chrono::Duration::hours(5);
        let by_role = renewal_warning(Some(two_h), &lease(now + hour, hard), now).unwrap();
        assert!(
            by_role.ends_with("capped by the role's max_ttl"),
            "{by_role}"
        );
        let full = lease(now + chrono::Duration::hours(2), hard);
        assert_eq!(renewal_warning(Some(two_h), &full, now), None);
        assert_eq!(renewal_warning(None, &lease(now + hour, hard), now), None);
        assert!(positive_ttl("0s").unwrap_err().contains("at least 1s"));
        assert_eq!(positive_ttl("90s").unwrap().as_secs(), 90);
    }
}
