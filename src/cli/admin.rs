//! `credbroker admin leases|revoke|rotate-root|lock|unlock|locks|
//! static-roles|rotate`: the DBA's console.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use crate::cli::lease::{rfc3339, state_name};
use crate::cli::{answered, grpc_error, CliResult, Failure};
use credbroker::client::ClientOpts;
use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Pending,
    Active,
    Draining,
    Failing,
    Revoked,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// List leases (live ones unless --state says otherwise)
    Leases {
        /// Only leases of this role (a `[roles.NAME]` of the config)
        #[arg(long)]
        role: Option<String>,
        /// Only leases on this database (a `[databases.NAME]` of the config)
        #[arg(long)]
        database: Option<String>,
        /// Caller identity with its kind: spiffe://TD/PATH, dns:NAME or cn:NAME
        #[arg(long)]
        identity: Option<String>,
        /// Only leases in this state (repeat for several; default: the
        /// live ones — pending, active, failing)
        #[arg(long, value_enum)]
        state: Vec<StateArg>,
        /// Only leases expiring within this long, e.g. 10m
        #[arg(long)]
        expiring_within: Option<humantime::Duration>,
        /// Output: a table for people, or JSON for scripts
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Static roles: current user, last and next rotation
    StaticRoles {
        /// Output: a table for people, or JSON for scripts
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Rotate a static role's password now
    Rotate {
        /// The static role (a `[static_roles.NAME]` of the config)
        #[arg(long)]
        static_role: String,
        /// Recovery: abandon a pending rotation that cannot be finished
        /// (e.g. sealed under a sealing key the broker no longer has) and
        /// rotate afresh under the broker's current key
        #[arg(long)]
        abandon_pending: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Revoke one lease, or all leases of a role, database or identity; or
    /// (incident) both users of a static role
    Revoke {
        /// Incident: replace both users' passwords of this static role and
        /// end their sessions; the next reader gets a new credential
        #[arg(long, conflicts_with_all = ["lease_id", "role", "database", "identity", "all", "force"])]
        static_role: Option<String>,
        /// The lease to revoke (l_…, as `lease issue` or `admin leases` shows it)
        lease_id: Option<String>,
        /// Revoke every live lease of this role
        #[arg(long, conflicts_with_all = ["lease_id", "database", "identity", "all"])]
        role: Option<String>,
        /// Revoke every live lease on this database
        #[arg(long, conflicts_with_all = ["lease_id", "identity", "all"])]
        database: Option<String>,
        /// Caller identity with its kind: spiffe://TD/PATH, dns:NAME or cn:NAME
        #[arg(long, conflicts_with_all = ["lease_id", "all"])]
        identity: Option<String>,
        /// Revoke every live lease this broker holds
        #[arg(long, conflicts_with = "lease_id")]
        all: bool,
        /// Do not ask for confirmation of a bulk revoke
        #[arg(long, short)]
        yes: bool,
        /// Mark leases revoked even if dropping the user fails
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Refuse everything an identity pattern, a role, a static role or a
    /// database could obtain (leases, renewals, static passwords, Vault
    /// tokens, watches) on every door and replica, at once; with --revoke
    /// also end its live leases (a static role: replace its passwords)
    // One target, whichever: clap then names all four when none is given.
    #[command(group(
        clap::ArgGroup::new("target")
            .required(true)
            .multiple(false)
            .args(["identity", "role", "static_role", "database"])
    ))]
    Lock {
        /// Lock an identity pattern (the same glob as a role's `allowed`),
        /// e.g. spiffe://credbroker.dev/ns/demo/app
        #[arg(long)]
        identity: Option<String>,
        /// Lock a role (a `[roles.NAME]` of the config): no one leases or
        /// renews it
        #[arg(long)]
        role: Option<String>,
        /// Lock a static role (a `[static_roles.NAME]` of the config): no
        /// one reads its password
        #[arg(long)]
        static_role: Option<String>,
        /// Lock a database (a `[databases.NAME]` of the config): every
        /// role on it
        #[arg(long)]
        database: Option<String>,
        /// Lift the lock on its own after this long, e.g. 30m (default: until unlocked)
        #[arg(long = "for")]
        duration: Option<humantime::Duration>,
        /// Told to every refused caller and written to the audit log
        #[arg(long, default_value = "")]
        reason: String,
        /// Also revoke every live lease the lock matches, sessions included
        #[arg(long)]
        revoke: bool,
        /// Do not ask for confirmation of --revoke
        #[arg(long, short)]
        yes: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Lift a lock
    Unlock {
        /// The lock to lift (k_…, as `admin lock` or `admin locks` shows it)
        lock_id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List the locks in force
    Locks {
        /// Output: a table for people, or JSON for scripts
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Give the broker's admin account on a database a new random password
    /// that only the broker knows
    RotateRoot {
        /// The database (a `[databases.NAME]` of the config) whose admin
        /// password to replace
        #[arg(long)]
        database: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// An identity as typed, in the canonical form leases are stored under.
/// Checked here as well as by the broker, so a bare name fails before the
/// confirmation prompt, with a hint at what to write.
fn identity_arg(i: &str) -> Result<String, Failure> {
    credbroker::identity::Identity::parse(i)
        .map(|id| id.as_str().to_string())
        .map_err(|e| Failure::Usage(anyhow::anyhow!("--identity: {e}")))
}

fn to_pb_state(s: StateArg) -> i32 {
    (match s {
        StateArg::Pending => pb::LeaseState::Pending,
        StateArg::Active => pb::LeaseState::Active,
        StateArg::Draining => pb::LeaseState::Draining,
        StateArg::Failing => pb::LeaseState::Failing,
        StateArg::Revoked => pb::LeaseState::Revoked,
    }) as i32
}

pub async fn run(cmd: Command) -> CliResult {
    match cmd {
        Command::Leases {
            role,
            database,
            identity,
            state,
            expiring_within,
            format,
            client,
        } => {
            let reply = answered(
                &client,
                "list leases",
                client.admin()?.list_leases(pb::ListLeasesRequest {
                    role: role.unwrap_or_default(),
                    database: database.unwrap_or_default(),
                    identity: identity
                        .as_deref()
                        .map(identity_arg)
                        .transpose()?
                        .unwrap_or_default(),
                    states: state.into_iter().map(to_pb_state).collect(),
                    expiring_within_seconds: expiring_within
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0),
                    limit: 0,
                }),
            )
            .await?;
            print_listing(
                format,
                || leases_json(&reply.leases),
                || leases_table(&reply.leases),
            )
        }
        Command::StaticRoles { format, client } => {
            let reply = answered(
                &client,
                "static roles",
                client
                    .admin()?
                    .list_static_roles(pb::ListStaticRolesRequest {}),
            )
            .await?;
            print_listing(
                format,
                || statics_json(&reply.static_roles),
                || statics_table(&reply.static_roles),
            )
        }
        Command::Rotate {
            static_role,
            abandon_pending,
            client,
        } => {
            let mut c = client.admin()?;
            let req = pb::StaticRoleRequest { static_role };
            let s = if abandon_pending {
                c.recover_static_role(req).await
            } else {
                c.rotate_static_role(req).await
            }
            .map_err(|s| grpc_error("rotate", &client, s))?
            .into_inner();
            println!(
                "rotated static role {:?}{}: current user {} (generation {}), next rotation {}",
                s.static_role,
                if abandon_pending {
                    " afresh (any pending rotation abandoned)"
                } else {
                    ""
                },
                s.current_user,
                s.generation,
                rfc3339(&s.next_rotation_at)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke {
            static_role: Some(static_role),
            yes,
            client,
            ..
        } => {
            let what =
                format!("both users of static role {static_role:?} (their sessions end now)");
            if !yes && !confirm(&what)? {
                eprintln!("nothing revoked");
                return Ok(ExitCode::FAILURE);
            }
            let s = answered(
                &client,
                "revoke",
                client
                    .admin()?
                    .revoke_static_role(pb::StaticRoleRequest { static_role }),
            )
            .await?;
            println!(
                "revoked static role {:?}: every old password refused, sessions ended; new credential for {} (generation {})",
                s.static_role, s.current_user, s.generation
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke {
            lease_id,
            role,
            database,
            identity,
            all,
            yes,
            force,
            client,
            static_role: None,
        } => {
            let (selector, what) = match (lease_id, role, database, identity, all) {
                (Some(id), ..) => (Selector::LeaseId(id.clone()), format!("lease {id}")),
                (_, Some(r), ..) => (
                    Selector::Role(r.clone()),
                    format!("every live lease of role {r:?}"),
                ),
                (_, _, Some(d), ..) => (
                    Selector::Database(d.clone()),
                    format!("every live lease on database {d:?}"),
                ),
                (_, _, _, Some(i), _) => {
                    let i = identity_arg(&i)?;
                    (
                        Selector::Identity(i.clone()),
                        format!("every live lease held by {i:?}"),
                    )
                }
                (.., true) => (Selector::All(true), "EVERY live lease".to_string()),
                _ => {
                    return Err(crate::cli::Failure::Usage(anyhow::anyhow!(
                        "name what to revoke: LEASE_ID, --role, --database, --identity or --all"
                    )))
                }
            };
            let bulk = !matches!(selector, Selector::LeaseId(_));
            let mut c = client.admin()?;
            if bulk && !yes {
                // Counted only when someone is there to read it (confirm
                // refuses a script without --yes).
                let what = if std::io::stdin().is_terminal() {
                    format!("{what} ({})", live_count(&mut c, &client, &selector).await?)
                } else {
                    what
                };
                if !confirm(&what)? {
                    eprintln!("nothing revoked");
                    return Ok(ExitCode::FAILURE);
                }
            }
            let reply = answered(
                &client,
                "revoke",
                c.revoke_leases(pb::RevokeLeasesRequest {
                    selector: Some(selector),
                    force,
                }),
            )
            .await?;
            println!("revoked {} lease(s)", reply.revoked);
            Ok(failures_shown(&reply.failures))
        }
        Command::Lock {
            identity,
            role,
            static_role,
            database,
            duration,
            reason,
            revoke,
            yes,
            client,
        } => {
            use pb::lock_request::Target;
            let (target, what) = match (identity, role, static_role, database) {
                (Some(i), ..) => (Target::Identity(i.clone()), format!("identity {i:?}")),
                (_, Some(r), ..) => (Target::Role(r.clone()), format!("role {r:?}")),
                (_, _, Some(s), _) => (
                    Target::StaticRole(s.clone()),
                    format!("static role {s:?} (both users' passwords replaced)"),
                ),
                (.., Some(d)) => (Target::Database(d.clone()), format!("database {d:?}")),
                _ => {
                    return Err(anyhow::anyhow!(credbroker::Error::Config(
                        "name what to lock: --identity, --role, --static-role or --database".into()
                    ))
                    .into())
                }
            };
            if revoke && !yes && !confirm(&format!("every live lease of {what}"))? {
                eprintln!("nothing locked");
                return Ok(ExitCode::FAILURE);
            }
            let reply = answered(
                &client,
                "lock",
                client.admin()?.lock(pb::LockRequest {
                    target: Some(target),
                    duration_seconds: duration.map(|d| d.as_secs().max(1) as i64).unwrap_or(0),
                    reason,
                    revoke,
                }),
            )
            .await?;
            let lock = reply.lock.unwrap_or_default();
            println!(
                "locked {what} as {} {}",
                lock.lock_id,
                until(&lock.expires_at)
            );
            if revoke {
                println!("revoked {} lease(s)", reply.revoked);
            }
            Ok(failures_shown(&reply.failures))
        }
        Command::Unlock { lock_id, client } => {
            let reply = answered(
                &client,
                "unlock",
                client.admin()?.unlock(pb::UnlockRequest { lock_id }),
            )
            .await?;
            let lock = reply.lock.unwrap_or_default();
            println!("unlocked {} {} ({})", lock.kind, lock.value, lock.lock_id);
            Ok(ExitCode::SUCCESS)
        }
        Command::Locks { format, client } => {
            let reply = answered(
                &client,
                "list locks",
                client.admin()?.list_locks(pb::ListLocksRequest {}),
            )
            .await?;
            print_listing(
                format,
                || locks_json(&reply.locks),
                || locks_table(&reply.locks),
            )
        }
        Command::RotateRoot { database, client } => {
            let reply = answered(
                &client,
                "rotate-root",
                client
                    .admin()?
                    .rotate_root(pb::RotateRootRequest { database }),
            )
            .await?;
            println!(
                "rotated the admin password of database {:?} at {}",
                reply.database,
                rfc3339(&reply.rotated_at)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the leases a revoke (or a lock's) could not end; success only
/// when there are none.
fn failures_shown(failures: &[pb::RevokeFailure]) -> ExitCode {
    for f in failures {
        println!("FAILED {}: {}", f.lease_id, f.error);
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// How many live leases a bulk revoke would end, for its prompt: "3 now"
/// (the broker's listing, so a lease issued meanwhile is revoked too).
async fn live_count(
    c: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    client: &ClientOpts,
    selector: &Selector,
) -> Result<String, Failure> {
    let mut req = pb::ListLeasesRequest::default();
    match selector {
        Selector::Role(r) => req.role = r.clone(),
        Selector::Database(d) => req.database = d.clone(),
        Selector::Identity(i) => req.identity = i.clone(),
        _ => {}
    }
    let n = answered(client, "list leases", c.list_leases(req))
        .await?
        .leases
        .len();
    Ok(format!("{n} now"))
}

/// Asks on the terminal. Without one (a script), refuse: bulk revocation
/// from a script must say `--yes`.
fn confirm(what: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to revoke {what} without confirmation; pass --yes");
    }
    eprint!("Revoke {what}? Live sessions will be cut. [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

fn until(expires_at: &Option<prost_types::Timestamp>) -> String {
    match expires_at {
        Some(_) => format!("until {}", rfc3339(expires_at)),
        None => "until unlocked".into(),
    }
}

/// A listing as the `--format` asked: JSON for scripts, a table for people.
fn print_listing(
    format: ListFormat,
    json: impl FnOnce() -> serde_json::Value,
    table: impl FnOnce() -> String,
) -> CliResult {
    match format {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&json())?),
        ListFormat::Table => print!("{}", table()),
    }
    Ok(ExitCode::SUCCESS)
}

fn locks_json(locks: &[pb::LockInfo]) -> serde_json::Value {
    locks
        .iter()
        .map(|l| {
            serde_json::json!({
                "lock_id": l.lock_id,
                "kind": l.kind,
                "value": l.value,
                "reason": l.reason,
                "created_by": l.created_by,
                "created_at": rfc3339(&l.created_at),
                "expires_at": l.expires_at.as_ref().map(|_| rfc3339(&l.expires_at)),
            })
        })
        .collect()
}

fn locks_table(locks: &[pb::LockInfo]) -> String {
    let header = ["LOCK", "TARGET", "BY", "CREATED", "EXPIRES", "REASON"];
    let rows: Vec<[String; 6]> = locks
        .iter()
        .map(|l| {
            [
                l.lock_id.clone(),
                format!("{} {}", l.kind, l.value),
                l.created_by.clone(),
                rfc3339(&l.created_at),
                if l.expires_at.is_some() {
                    rfc3339(&l.expires_at)
                } else {
                    "never".into()
                },
                l.reason.clone(),
            ]
        })
        .collect();
    table(&header, &rows, &format!("{} lock(s)\n", rows.len()))
}

fn leases_json(leases: &[pb::LeaseSummary]) -> serde_json::Value {
    leases
        .iter()
        .map(|l| {
            serde_json::json!({
                "lease_id": l.lease_id,
                "identity": l.identity,
                "role": l.role,
                "database": l.database,
                "username": l.username,
                "state": state_name(l.state),
                "issued_at": rfc3339(&l.issued_at),
                "expires_at": rfc3339(&l.expires_at),
                "max_expires_at": rfc3339(&l.max_expires_at),
                "revoke_attempts": l.revoke_attempts,
                "last_error": l.last_error,
                "grant_id": l.grant_id,
            })
        })
        .collect()
}

fn leases_table(leases: &[pb::LeaseSummary]) -> String {
    let header = [
        "LEASE", "IDENTITY", "ROLE", "DATABASE", "USERNAME", "ISSUED", "EXPIRES", "STATE",
    ];
    let rows: Vec<[String; 8]> = leases
        .iter()
        .map(|l| {
            let mut state = state_name(l.state).to_string();
            if !l.last_error.is_empty() {
                state = format!("{state} ({} tries: {})", l.revoke_attempts, l.last_error);
            }
            // A person's lease under a just-in-time access grant says which.
            if !l.grant_id.is_empty() {
                state = format!("{state} (grant {})", l.grant_id);
            }
            [
                l.lease_id.clone(),
                l.identity.clone(),
                l.role.clone(),
                l.database.clone(),
                l.username.clone(),
                rfc3339(&l.issued_at),
                rfc3339(&l.expires_at),
                state,
            ]
        })
        .collect();
    table(&header, &rows, &format!("{} lease(s)\n", rows.len()))
}

/// Left-aligned columns, two spaces apart, then `footer`.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]], footer: &str) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out.push_str(footer);
    out
}

fn statics_json(list: &[pb::StaticRoleInfo]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(|s| {
                serde_json::json!({
                    "static_role": s.static_role,
                    "database": s.database,
                    "users": s.users,
                    "current_user": s.current_user,
                    "generation": s.generation,
                    "rotated_at": rfc3339(&s.rotated_at),
                    "next_rotation_at": rfc3339(&s.next_rotation_at),
                    "valid_until": rfc3339(&s.valid_until),
                    "previous_user": s.previous_user,
                    "previous_retire_at": rfc3339(&s.previous_retire_at),
                    "pending": s.pending,
                    "last_error": s.last_error,
                })
            })
            .collect(),
    )
}

fn statics_table(list: &[pb::StaticRoleInfo]) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:<16} {:>4} {:<24} {:<24} {}\n",
        "STATIC ROLE", "DATABASE", "CURRENT USER", "GEN", "ROTATED AT", "NEXT ROTATION", "NOTE"
    );
    for s in list {
        let note = if !s.last_error.is_empty() {
            format!("last error: {}", s.last_error)
        } else if s.pending {
            "rotation being finished".to_string()
        } else if !s.previous_user.is_empty() {
            format!(
                "{} valid until {}",
                s.previous_user,
                rfc3339(&s.previous_retire_at)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{:<20} {:<12} {:<16} {:>4} {:<24} {:<24} {}\n",
            s.static_role,
            s.database,
            if s.current_user.is_empty() {
                "-"
            } else {
                &s.current_user
            },
            s.generation,
            rfc3339(&s.rotated_at),
            rfc3339(&s.next_rotation_at),
            note
        ));
    }
    out
}
