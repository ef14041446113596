//! `credbroker lease issue|renew|revoke|lookup`: what a service does.

use std::process::ExitCode;

use crate::cli::{grpc_error, CliResult};
use crate::client::ClientOpts;
use crate::pb;

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
        /// Lifetime, e.g. 10m (default: the role's default_ttl)
        #[arg(long)]
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
        /// default_ttl); never past the lease's hard limit
        #[arg(long)]
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

fn ttl_seconds(ttl: Option<humantime::Duration>) -> i64 {
    ttl.map(|d| d.as_secs() as i64).unwrap_or(0)
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
            let lease = c
                .issue_lease(pb::IssueLeaseRequest {
                    role,
                    ttl_seconds: ttl_seconds(ttl),
                })
                .await
                .map_err(|s| grpc_error("issue", &client, s))?
                .into_inner();
            print!("{}", render(&lease, format));
        }
        Command::Renew {
            lease_id,
            ttl,
            client,
        } => {
            let mut c = client.broker()?;
            let lease = c
                .renew_lease(pb::RenewLeaseRequest {
                    lease_id,
                    ttl_seconds: ttl_seconds(ttl),
                })
                .await
                .map_err(|s| grpc_error("renew", &client, s))?
                .into_inner();
            print!("{}", render(&lease, Format::Json));
        }
        Command::Revoke {
            lease_id,
            handover,
            client,
        } => {
            let mut c = client.broker()?;
            let r = c
                .revoke_lease(pb::RevokeLeaseRequest { lease_id, handover })
                .await
                .map_err(|s| grpc_error("revoke", &client, s))?
                .into_inner();
            if r.state == pb::LeaseState::Draining as i32 {
                println!("draining {}", r.lease_id);
            } else {
                println!("revoked {}", r.lease_id);
            }
        }
        Command::Lookup { lease_id, client } => {
            let mut c = client.broker()?;
            let lease = c
                .lookup_lease(pb::LookupLeaseRequest { lease_id })
                .await
                .map_err(|s| grpc_error("lookup", &client, s))?
                .into_inner();
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
            if l.kind == "mysql" {
                format!(
                    "MYSQL_HOST={}\nMYSQL_TCP_PORT={}\nMYSQL_USER={}\nMYSQL_PWD={}\nMYSQL_DATABASE={}\nDATABASE_URL={}\n",
                    l.host, l.port, l.username, l.password, l.database_name, l.dsn
                )
            } else {
                format!(
                    "PGHOST={}\nPGPORT={}\nPGUSER={}\nPGPASSWORD={}\nPGDATABASE={}\nDATABASE_URL={}\n",
                    l.host, l.port, l.username, l.password, l.database_name, l.dsn
                )
            }
        }
    }
}
