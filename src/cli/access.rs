//! `credbroker access request|list|show|approve|deny|revoke|break-glass`:
//! just-in-time database access for people. Once granted, the requester
//! uses the ordinary `credbroker lease issue --role R` (e.g. `--format env`
//! for `psql`/`mysql`), until the grant ends.

use std::process::ExitCode;

use crate::cli::lease::rfc3339;
use crate::cli::{answered, secs, CliResult};
use credbroker::client::ClientOpts;
use credbroker::pb;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Ask for access to role(s); approvers are notified
    Request {
        /// Why: a ticket and a sentence (required by most policies)
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        ask: Ask,
    },
    /// Grant yourself access at once, without approval (break-glass
    /// identities only; always notified and marked in the audit)
    BreakGlass {
        /// Why: required for break-glass
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        ask: Ask,
    },
    /// Requests you may see: your own; approvers see their policies'
    List {
        /// Only requests waiting for a decision
        #[arg(long)]
        pending: bool,
        #[command(flatten)]
        out: Out,
    },
    /// One request
    Show {
        /// The request (ar_…)
        request_id: String,
        #[command(flatten)]
        out: Out,
    },
    /// Approve a request (approvers only; never your own)
    Approve {
        request_id: String,
        #[command(flatten)]
        out: Out,
    },
    /// Deny a request (approvers only)
    Deny {
        request_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        out: Out,
    },
    /// End a grant now (every lease under it revoked, sessions cut), or
    /// withdraw a pending request
    Revoke {
        request_id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        out: Out,
    },
}

/// What a request and a break-glass grant both name.
#[derive(clap::Args)]
pub struct Ask {
    /// A role to access (repeat for several, all under one policy)
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// How long the grant lasts, e.g. 1h (default: an hour, or the
    /// policy's longest if shorter)
    #[arg(long = "for")]
    duration: Option<humantime::Duration>,
    /// The `[access.NAME]` policy to ask under (default: the first that
    /// covers the roles and lets you ask)
    #[arg(long)]
    policy: Option<String>,
    #[command(flatten)]
    out: Out,
}

/// Which broker every `access` command asks, and how it prints.
#[derive(clap::Args)]
pub struct Out {
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[command(flatten)]
    client: ClientOpts,
}

/// One request as JSON.
pub fn json(r: &pb::AccessRequestInfo) -> serde_json::Value {
    serde_json::json!({
        "request_id": r.request_id,
        "policy": r.policy,
        "roles": r.roles,
        "requester": r.requester,
        "reason": r.reason,
        "duration_seconds": r.duration_seconds,
        "state": r.state,
        "break_glass": r.break_glass,
        "created_at": rfc3339(&r.created_at),
        "pending_until": rfc3339(&r.pending_until),
        "approvals": r.approvals.iter().map(|a| serde_json::json!({
            "identity": a.identity, "at": rfc3339(&a.at)})).collect::<Vec<_>>(),
        "approvals_needed": r.approvals_needed,
        "denied_by": r.denied_by,
        "deny_reason": r.deny_reason,
        "granted_at": rfc3339(&r.granted_at),
        "until": rfc3339(&r.until),
        "ended_at": rfc3339(&r.ended_at),
        "ended_by": r.ended_by,
        "end_reason": r.end_reason,
    })
}

/// One request for a person: what it is, where it stands, what to do next.
pub fn text(r: &pb::AccessRequestInfo) -> String {
    let mut s = format!(
        "{}  {}  roles {}  policy {}\n  requester  {}\n  reason     {}\n",
        r.request_id,
        r.state,
        r.roles.join(","),
        r.policy,
        r.requester,
        if r.reason.is_empty() { "-" } else { &r.reason },
    );
    let approvers: Vec<&str> = r.approvals.iter().map(|a| a.identity.as_str()).collect();
    s.push_str(&format!(
        "  approvals  {}/{}{}\n",
        r.approvals.len(),
        r.approvals_needed,
        if approvers.is_empty() {
            String::new()
        } else {
            format!(" ({})", approvers.join(", "))
        }
    ));
    match r.state.as_str() {
        "pending" => s.push_str(&format!(
            "  waiting    until {} for approval (credbroker access approve {})\n",
            rfc3339(&r.pending_until),
            r.request_id
        )),
        "granted" => {
            s.push_str(&format!(
                "  granted    {} until {}{}\n",
                rfc3339(&r.granted_at),
                rfc3339(&r.until),
                if r.break_glass { " (break-glass)" } else { "" }
            ));
            for role in &r.roles {
                s.push_str(&format!(
                    "  use        credbroker lease issue --role {role} --format env\n"
                ));
            }
        }
        "denied" => s.push_str(&format!(
            "  denied by  {}: {}\n",
            r.denied_by,
            if r.deny_reason.is_empty() {
                "-"
            } else {
                &r.deny_reason
            }
        )),
        _ => s.push_str(&format!(
            "  ended      {}{}{}\n",
            rfc3339(&r.ended_at),
            if r.ended_by.is_empty() {
                String::new()
            } else {
                format!(" by {}", r.ended_by)
            },
            if r.end_reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.end_reason)
            }
        )),
    }
    s
}

/// Prints the request a call answered.
fn print(r: &pb::AccessRequestInfo, format: Format) -> CliResult {
    match format {
        Format::Text => print!("{}", text(r)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json(r)).unwrap_or_default()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(cmd: Command) -> CliResult {
    match cmd {
        Command::Request { reason, ask } => request(reason, ask, false).await,
        Command::BreakGlass { reason, ask } => request(reason, ask, true).await,
        Command::List { pending, out } => {
            let mut c = out.client.access()?;
            let call = c.list(pb::ListAccessRequest { pending });
            let reply = answered(&out.client, "access list", call).await?;
            match out.format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::Value::Array(
                        reply.requests.iter().map(json).collect()
                    ))
                    .unwrap_or_default()
                ),
                Format::Text => {
                    for r in &reply.requests {
                        print!("{}", text(r));
                    }
                    println!("{} request(s)", reply.requests.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { request_id, out } => {
            let mut c = out.client.access()?;
            let call = c.get(pb::AccessRequestId { request_id });
            print(
                &answered(&out.client, "access show", call).await?,
                out.format,
            )
        }
        Command::Approve { request_id, out } => {
            let mut c = out.client.access()?;
            let call = c.approve(pb::AccessRequestId { request_id });
            print(
                &answered(&out.client, "access approve", call).await?,
                out.format,
            )
        }
        Command::Deny {
            request_id,
            reason,
            out,
        } => {
            let mut c = out.client.access()?;
            let call = c.deny(pb::DenyAccessRequest { request_id, reason });
            print(
                &answered(&out.client, "access deny", call).await?,
                out.format,
            )
        }
        Command::Revoke {
            request_id,
            reason,
            out,
        } => {
            let mut c = out.client.access()?;
            let call = c.revoke(pb::RevokeAccessRequest { request_id, reason });
            print(
                &answered(&out.client, "access revoke", call).await?,
                out.format,
            )
        }
    }
}

async fn request(reason: String, ask: Ask, break_glass: bool) -> CliResult {
    let what = if break_glass {
        "access break-glass"
    } else {
        "access request"
    };
    let Ask {
        roles,
        duration,
        policy,
        out,
    } = ask;
    let mut c = out.client.access()?;
    let call = c.request(pb::AccessRequestRequest {
        roles,
        policy: policy.unwrap_or_default(),
        reason,
        duration_seconds: secs(duration),
        break_glass,
    });
    print(&answered(&out.client, what, call).await?, out.format)
}
