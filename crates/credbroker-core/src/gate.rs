//! The gate: every request, whatever door it came through, is decided here
//! before any handler runs (invariant 9). A door — gRPC `Broker`, `Admin`
//! and `Access`, the Vault API, the console — turns its request into an [`Ask`]
//! (peer address, identity, action, what it acts on) and calls [`admit`];
//! it keeps only its wire format and its status codes.
//!
//! The decision is taken in one fixed order, each step a [`Control`]:
//!
//! 1. **identity** — the certificate yields one identity of a known kind;
//! 2. **network** — `admin_networks` whenever the caller acts as an admin
//!    (on anything not its own, whatever the door), a role's
//!    `allowed_networks` for a holder who obtains or extends a lease;
//! 3. **lock** — identity, role, static-role and database locks, for
//!    everything a lock's subject could obtain: a lease, a renewal, a
//!    static password, a Vault token, a watch stream, an admin call;
//! 4. **policy** — `allowed` of the role or static role, ownership of the
//!    lease, `admins`;
//! 5. **quota** — per-identity shares that must be taken atomically with
//!    the write they guard (the lease cap, the issue rate, the token cap,
//!    the connection shares) are enforced where that write happens, and
//!    refuse with `ResourceExhausted`, audited like the rest;
//! 6. **audit** — one record per decision, allowed or denied, naming the
//!    door (`via`). A refusal is recorded here and the handler never runs;
//!    an admitted request is recorded by its handler (which knows the
//!    outcome) or, for actions whose handler writes nothing (lookups,
//!    listings, page views), here.
//!
//! The broker's own calls keep their checks too (in-process callers, the
//! tests, the sidecar's library use): the gate adds what a door alone
//! cannot see — the caller's network, the admin acting through a holder's
//! door, locks on every kind of thing a lock names.

use std::net::IpAddr;

use crate::audit::{Event, Outcome};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, LeaseId};
use crate::lock::Subject;
use crate::policy::any_matches;

/// The ways into the broker. Every one calls [`admit`] first; the matrix
/// test (`tests/it/gate/matrix.rs`) runs every control on every door in this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    /// gRPC `credbroker.v1.Broker`: holders (issue, renew, revoke, lookup,
    /// static reads, watch).
    GrpcBroker,
    /// gRPC `credbroker.v1.Admin`.
    GrpcAdmin,
    /// The Vault-compatible HTTP API (`[vault_api]`).
    VaultApi,
    /// The web console (`[console]`).
    Console,
    /// gRPC `credbroker.v1.Access`: people's just-in-time access requests,
    /// approvals and grants (`access`). Its callers are people, not
    /// admins: no `admin_networks`, identity locks on everything that
    /// asks for or grants access; who may request or approve is the
    /// policy's (`[access.NAME]`), decided by `access` once the request
    /// is read.
    GrpcAccess,
}

impl Door {
    pub const ALL: [Door; 5] = [
        Door::GrpcBroker,
        Door::GrpcAdmin,
        Door::VaultApi,
        Door::Console,
        Door::GrpcAccess,
    ];

    /// What audit records of this door say in `via`.
    pub fn as_str(self) -> &'static str {
        match self {
            Door::GrpcBroker => "grpc_broker",
            Door::GrpcAdmin => "grpc_admin",
            Door::VaultApi => "vault_api",
            Door::Console => "console",
            Door::GrpcAccess => "grpc_access",
        }
    }
}

/// The gate's steps, in the order they are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Control {
    Identity,
    Network,
    Lock,
    Policy,
    Quota,
}

impl Control {
    pub const ALL: [Control; 5] = [
        Control::Identity,
        Control::Network,
        Control::Lock,
        Control::Policy,
        Control::Quota,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Control::Identity => "identity",
            Control::Network => "network",
            Control::Lock => "lock",
            Control::Policy => "policy",
            Control::Quota => "quota",
        }
    }
}

/// What a request does with a thing it names: locks refuse only what
/// would obtain something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Look at it: nothing obtained, so no lock applies.
    Read,
    /// Obtain it or more of it (a renewal, a token, a watch stream):
    /// every lock on what it names applies.
    Obtain,
    /// Give it up (revoke a lease or a token): never locked out.
    GiveUp,
}

/// What a request acts on.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A new lease on this role.
    Role(&'a str),
    /// An existing lease, loaded by the gate (the caller's own, or any for
    /// an admin — who then acts as one).
    Lease(&'a LeaseId, Use),
    /// A static role's current credential.
    StaticRole(&'a str),
    /// Something of the caller's own: a Vault token, a watch of its own
    /// leases.
    Own(Use),
    /// An admin call: listings, bulk revokes, locks, rotations, the
    /// console, a watch of other identities' leases.
    Admin,
}

/// One request as a door presents it to the gate.
pub struct Ask<'a> {
    pub door: Door,
    /// The TCP peer's address; None for a caller without one, which every
    /// network restriction refuses.
    pub peer: Option<IpAddr>,
    /// The identity the certificate yields, or why it yields none
    /// (`Unauthenticated`, as `Identity::from_cert_der` says it).
    pub identity: std::result::Result<&'a Identity, &'a Error>,
    /// The audit action name.
    pub action: &'static str,
    pub target: Target<'a>,
}

/// An admitted request.
#[derive(Debug)]
pub struct Pass {
    pub identity: Identity,
    /// The caller acts as an admin: on something not its own, or an admin
    /// call. Such a caller passed `admin_networks`.
    pub as_admin: bool,
    /// The lease a `Target::Lease` named, as the gate read it.
    pub lease: Option<Lease>,
}

/// Actions whose handler writes no audit record of its own: the gate
/// writes their "ok" record when it admits them.
const AUDITED_HERE: &[&str] = &[
    "lookup",
    "admin_list",
    "list_locks",
    "static_roles",
    "watch",
    "vault_token_lookup",
    "vault_mounts",
    "console_view",
    "access_list",
    "access_get",
];

/// Decides `ask` (see the module doc for the order). A refusal is audited
/// here, once, and comes back as the error the door turns into its own
/// status; nothing has changed anywhere.
pub async fn admit(broker: &Broker, ask: Ask<'_>) -> Result<Pass> {
    let door = ask.door;
    let who = match ask.identity {
        Ok(who) => who.clone(),
        Err(why) => {
            // A certificate without identity is refused as unauthenticated,
            // whatever its reader called it; the same words either way.
            let err = match why {
                Error::Unauthenticated(_) => why.clone(),
                other => Error::Unauthenticated(other.caller_message()),
            };
            return Err(crate::audit::in_via(Some(door.as_str()), || {
                broker.refuse_unauthenticated(ask.peer, ask.action, err)
            }));
        }
    };
    let mut event = Event::new(who.as_str(), ask.action);
    match decide(broker, &ask, &who, &mut event).await {
        Ok(pass) => {
            if AUDITED_HERE.contains(&ask.action) {
                event.outcome = Some(Outcome::Ok);
                // Reads change nothing: not worth an fsync each (the next
                // durable record carries them to disk; the chain is one).
                crate::audit::in_via(Some(door.as_str()), || broker.audit().append_relaxed(event))?;
            }
            Ok(pass)
        }
        Err(err) => Err(crate::audit::in_via(Some(door.as_str()), || {
            broker.refuse_event(event, err)
        })),
    }
}

async fn decide(broker: &Broker, ask: &Ask<'_>, who: &Identity, event: &mut Event) -> Result<Pass> {
    let config = broker.config();
    let is_admin = broker.is_admin(who);
    // The lease a request names, read once: whose it is decides whether
    // the caller acts as a holder or as an admin.
    let lease = match ask.target {
        Target::Lease(id, _) => {
            event.lease_id = Some(id.to_string());
            let lease = broker
                .store()
                .get(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no lease {id}")))?;
            event.role = Some(lease.role.clone());
            event.database = Some(lease.database.clone());
            Some(lease)
        }
        _ => None,
    };
    let others_lease = lease.as_ref().is_some_and(|l| l.identity != who.as_str());
    let as_admin = matches!(ask.target, Target::Admin) || others_lease;

    // 2. Networks.
    if as_admin {
        crate::broker::check_admin_network(&config, ask.peer)?;
    }
    let role_of_request = match (ask.target, &lease) {
        (Target::Role(r), _) => config.role(r),
        (Target::Lease(_, Use::Obtain), Some(l)) if !others_lease => config.role(&l.role),
        _ => None,
    };
    if let Some(role) = role_of_request {
        crate::broker::check_network(role, ask.peer)?;
    }

    // 3. Locks: on what the request would obtain.
    let static_role = match ask.target {
        Target::StaticRole(s) => {
            event.role = Some(crate::broker::truncate_text(s));
            config.static_roles.get(s)
        }
        _ => None,
    };
    if let Some(s) = static_role {
        event.database = Some(s.database.clone());
    }
    let mut subjects: Vec<Subject<'_>> = Vec::new();
    let lease_identity;
    match (ask.target, &lease) {
        (Target::Role(r), _) => {
            event.role = Some(crate::broker::truncate_text(r));
            let database = config.role(r).map(|x| x.database.as_str());
            event.database = database.map(str::to_string);
            subjects.push(Subject {
                identity: Some(who),
                role: Some(r),
                static_role: None,
                database,
            });
        }
        (Target::Lease(_, Use::Obtain), Some(l)) => {
            lease_identity = Identity::from_trusted(l.identity.clone());
            subjects.push(Subject {
                identity: Some(&lease_identity),
                role: Some(&l.role),
                static_role: None,
                database: Some(&l.database),
            });
            if others_lease {
                subjects.push(Subject::identity(who));
            }
        }
        (Target::Lease(..), _) => {
            // Reading or ending a lease obtains nothing; an admin doing it
            // for another identity is still an admin call.
            if others_lease {
                subjects.push(Subject::identity(who));
            }
        }
        (Target::StaticRole(s), _) => subjects.push(Subject {
            identity: Some(who),
            role: None,
            static_role: Some(s),
            database: static_role.map(|x| x.database.as_str()),
        }),
        (Target::Own(Use::Obtain), _) | (Target::Admin, _) => subjects.push(Subject::identity(who)),
        (Target::Own(_), _) => {}
    }
    if !subjects.is_empty() {
        let locks = broker.store().active_locks().await?;
        for s in &subjects {
            if let Some(lock) = crate::lock::first_match_subject(&locks, s) {
                return Err(lock.refusal());
            }
        }
    }

    // 4. Policy.
    match (ask.target, &lease) {
        (Target::Role(r), _) => {
            // Bad names are InvalidArgument (empty, overlong), unknown ones
            // NotFound, exactly as the broker says.
            let role = crate::broker::lookup_role(&config, r)?;
            // Outside `allowed`, a live access grant on the role admits
            // its requester (`access`); the broker ties the lease to it.
            if !any_matches(&role.allowed, who) && broker.grant_covering(who, r).await?.is_none() {
                return Err(crate::broker::not_allowed(who, r));
            }
        }
        (Target::Lease(id, _), Some(_)) if others_lease && !is_admin => {
            return Err(Error::denied(format!(
                "lease {id} belongs to another identity"
            )));
        }
        (Target::StaticRole(s), _) => {
            let role = crate::broker::lookup_static(&config, s)?;
            if !any_matches(&role.allowed, who) {
                return Err(Error::denied(format!(
                    "identity may not read static role {s:?}"
                )));
            }
        }
        (Target::Admin, _) if !is_admin => {
            return Err(Error::denied("identity is not an admin"));
        }
        _ => {}
    }
    Ok(Pass {
        identity: who.clone(),
        as_admin,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `all` stands at the place `index` (an exhaustive match)
    /// gives it.
    fn in_declaration_order<T: std::fmt::Debug>(all: &[T], index: impl Fn(&T) -> usize) {
        for (i, v) in all.iter().enumerate() {
            assert_eq!(i, index(v), "{v:?}");
        }
    }

    /// `ALL` lists every variant, in declaration order: a variant added
    /// without its place in `ALL` (and so without its matrix row) fails here.
    #[test]
    fn all_lists_every_door_and_control() {
        in_declaration_order(&Door::ALL, |d| match d {
            Door::GrpcBroker => 0,
            Door::GrpcAdmin => 1,
            Door::VaultApi => 2,
            Door::Console => 3,
            Door::GrpcAccess => 4,
        });
        in_declaration_order(&Control::ALL, |c| match c {
            Control::Identity => 0,
            Control::Network => 1,
            Control::Lock => 2,
            Control::Policy => 3,
            Control::Quota => 4,
        });
    }
}
