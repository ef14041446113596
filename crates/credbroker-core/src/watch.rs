//! Lease events for `Broker.WatchLeases`: renewed, revoked (by whom, why),
//! locked — published by the broker and the revocation engine the moment
//! they happen, so a sidecar replaces a revoked credential at once instead
//! of at its next renewal.
//!
//! One in-process broadcast channel. With several replicas sharing a
//! PostgreSQL store, `relay.rs` carries each replica's events to the
//! others (`NOTIFY` and an event table in the store), so a subscriber sees
//! what every replica did. Locks placed and lifted travel the same way
//! ([`LockEvent`]): a lock on an identity ends that identity's streams on
//! every replica, wherever it was placed ([`WatchHub::publish_lock`]).
//!
//! Bounded: at most [`MAX_PER_IDENTITY`] streams per identity and
//! [`MAX_TOTAL`] in all, so a leaked certificate cannot pin the broker's
//! memory with streams; a subscriber too slow for [`BUFFER`] events is cut
//! off (it resubscribes and re-reads what it needs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::{Lease, LeaseId, Reason};
use crate::lock::{Lock, LockTarget};

/// Streams one identity may hold open: a sidecar needs one, a few
/// replicas of a service behind one certificate a few more.
pub const MAX_PER_IDENTITY: usize = 16;
/// Streams in all.
pub const MAX_TOTAL: usize = 4096;
/// Events buffered per subscriber before it counts as lagging.
pub const BUFFER: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Renewed,
    Revoked,
    Locked,
}

/// One lease's change. Never carries a secret.
#[derive(Debug, Clone)]
pub struct LeaseEvent {
    pub kind: EventKind,
    pub lease_id: LeaseId,
    pub identity: String,
    pub role: String,
    pub database: String,
    /// Renewed: the new expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// Who did it (revoked, locked).
    pub actor: String,
    /// Revoked: "requested", "admin", "expired", "locked"…; locked: the
    /// lock's reason.
    pub reason: String,
    pub lock_id: Option<String>,
    pub at: DateTime<Utc>,
    /// Made on another replica and relayed here through the store
    /// (`relay.rs`), so not relayed again.
    pub relayed: bool,
}

impl LeaseEvent {
    fn of(kind: EventKind, l: &Lease, actor: &str, reason: String) -> Self {
        LeaseEvent {
            kind,
            lease_id: l.id.clone(),
            identity: l.identity.clone(),
            role: l.role.clone(),
            database: l.database.clone(),
            expires_at: None,
            actor: actor.to_string(),
            reason,
            lock_id: None,
            at: Utc::now(),
            relayed: false,
        }
    }

    pub fn renewed(l: &Lease, actor: &str) -> Self {
        let mut e = Self::of(EventKind::Renewed, l, actor, String::new());
        e.expires_at = Some(l.expires_at);
        e
    }

    pub fn revoked(l: &Lease, actor: &str, reason: Reason) -> Self {
        Self::of(EventKind::Revoked, l, actor, reason.label().to_string())
    }

    pub fn locked(l: &Lease, lock: &Lock) -> Self {
        let mut e = Self::of(EventKind::Locked, l, &lock.created_by, lock.reason.clone());
        e.lock_id = Some(lock.id.to_string());
        e
    }
}

/// A lock placed or lifted (an expiry lifts a lock silently: nothing is
/// published when one runs out). Never carries a secret.
#[derive(Debug, Clone)]
pub struct LockEvent {
    /// Placed (true) or lifted.
    pub placed: bool,
    pub lock: Lock,
    /// Who placed or lifted it.
    pub actor: String,
    pub at: DateTime<Utc>,
    /// Made on another replica and relayed here (`relay.rs`).
    pub relayed: bool,
}

impl LockEvent {
    pub fn new(placed: bool, lock: &Lock, actor: &str) -> Self {
        LockEvent {
            placed,
            lock: lock.clone(),
            actor: actor.to_string(),
            at: Utc::now(),
            relayed: false,
        }
    }
}

/// What the hub carries: a lease's change or a lock's.
#[derive(Debug, Clone)]
pub enum Note {
    Lease(LeaseEvent),
    Lock(LockEvent),
}

impl Note {
    /// Relayed from another replica (so not relayed again).
    pub fn relayed(&self) -> bool {
        match self {
            Note::Lease(e) => e.relayed,
            Note::Lock(e) => e.relayed,
        }
    }
}

/// Which events a stream gets.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only leases of this identity (a caller watching its own).
    pub identity: Option<String>,
    pub role: Option<String>,
    pub database: Option<String>,
}

impl Scope {
    pub fn matches(&self, e: &LeaseEvent) -> bool {
        self.identity.as_ref().is_none_or(|i| *i == e.identity)
            && self.role.as_ref().is_none_or(|r| *r == e.role)
            && self.database.as_ref().is_none_or(|d| *d == e.database)
    }

    /// Whether a lock's event goes to this stream: to streams of every
    /// identity (an admin's) whose role/database filter the lock concerns.
    /// Not to a stream of one identity (a caller's own): a lock on that
    /// identity ends the stream with the lock's refusal, which says all the
    /// event would; a role or database lock reaches it as the `Locked`
    /// events of its leases; other identities' locks are none of its
    /// business.
    pub fn matches_lock(&self, e: &LockEvent) -> bool {
        if self.identity.is_some() {
            return false;
        }
        match &e.lock.target {
            LockTarget::Identity(_) | LockTarget::StaticRole(_) => {
                self.role.is_none() && self.database.is_none()
            }
            LockTarget::Role(r) => self.role.as_ref().is_none_or(|x| x == r),
            LockTarget::Database(d) => self.database.as_ref().is_none_or(|x| x == d),
        }
    }

    pub fn matches_note(&self, n: &Note) -> bool {
        match n {
            Note::Lease(e) => self.matches(e),
            Note::Lock(e) => self.matches_lock(e),
        }
    }
}

pub struct WatchHub {
    tx: broadcast::Sender<Arc<Note>>,
    open: Mutex<Open>,
    /// Cancelled when the broker shuts down: every stream ends cleanly,
    /// so graceful shutdown is not held up by watchers.
    closed: CancellationToken,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_identity: HashMap<String, usize>,
    /// Per identity with streams open: cancelled when a lock ends them,
    /// with the refusal they end on.
    ends: HashMap<String, (CancellationToken, Arc<std::sync::OnceLock<String>>)>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        WatchHub {
            tx,
            open: Mutex::new(Open::default()),
            closed: CancellationToken::new(),
        }
    }

    /// Sends to every subscriber; nobody listening is fine.
    pub fn publish(&self, e: LeaseEvent) {
        let _ = self.tx.send(Arc::new(Note::Lease(e)));
    }

    /// Sends a lock's event to every subscriber (and, through the relay's
    /// tap, to the other replicas); a placed identity lock then ends the
    /// open streams of every identity it matches, with the lock's refusal
    /// — after what was queued, this event included. The same call for a
    /// lock placed here and one relayed from another replica, so streams
    /// end on every replica. Returns how many identities had streams.
    pub fn publish_lock(&self, e: LockEvent) -> usize {
        let ended = match (&e.lock.target, e.placed) {
            (LockTarget::Identity(p), true) => Some((p.clone(), e.lock.refusal().caller_message())),
            _ => None,
        };
        let _ = self.tx.send(Arc::new(Note::Lock(e)));
        match ended {
            Some((p, refusal)) => {
                self.end_locked(|id| p.matches(&Identity::from_trusted(id)), &refusal)
            }
            None => 0,
        }
    }

    /// Every event, for the relay to other replicas (`relay.rs`): not a
    /// caller's stream, so not counted against the bounds.
    pub fn tap(&self) -> broadcast::Receiver<Arc<Note>> {
        self.tx.subscribe()
    }

    /// Opens a stream for `identity`, or refuses when the bounds are hit.
    pub fn subscribe(self: &Arc<Self>, identity: &str) -> Result<Subscription> {
        if self.closed.is_cancelled() {
            return Err(Error::unavailable("the broker is shutting down"));
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.by_identity.get(identity).copied().unwrap_or(0);
        if mine >= MAX_PER_IDENTITY {
            return Err(Error::ResourceExhausted(format!(
                "identity has {mine} lease watches open, the most allowed"
            )));
        }
        if open.total >= MAX_TOTAL {
            return Err(Error::ResourceExhausted(
                "the broker has as many lease watches open as it allows; retry later".into(),
            ));
        }
        open.total += 1;
        *open.by_identity.entry(identity.to_string()).or_default() += 1;
        let (ended, why) = open
            .ends
            .entry(identity.to_string())
            .or_insert_with(|| (self.closed.child_token(), Arc::default()))
            .clone();
        Ok(Subscription {
            rx: self.tx.subscribe(),
            hub: self.clone(),
            identity: identity.to_string(),
            ended,
            why,
        })
    }

    /// Ends the open streams of every identity `locked` matches (a lock
    /// covers watches too: a locked identity stops learning about leases
    /// at once, not only at its next subscription). Returns how many
    /// identities had streams. This replica's streams only: other replicas
    /// end theirs when the lock's event reaches them ([`Self::publish_lock`]).
    pub fn end_locked(&self, locked: impl Fn(&str) -> bool, refusal: &str) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let hit: Vec<String> = open.ends.keys().filter(|i| locked(i)).cloned().collect();
        for id in &hit {
            if let Some((token, why)) = open.ends.remove(id) {
                let _ = why.set(refusal.to_string());
                token.cancel();
            }
        }
        hit.len()
    }

    /// Ends every stream (shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }

    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    pub fn open_streams(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One open stream; gives its slot back when dropped.
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Note>>,
    hub: Arc<WatchHub>,
    identity: String,
    /// Cancelled at shutdown (a child of the hub's), or when a lock ends
    /// this identity's streams.
    pub ended: CancellationToken,
    why: Arc<std::sync::OnceLock<String>>,
}

impl Subscription {
    /// Why the stream was ended by a lock; None at shutdown.
    pub fn lock_refusal(&self) -> Option<&str> {
        self.why.get().map(String::as_str)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut open = self.hub.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_identity.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.by_identity.remove(&self.identity);
                open.ends.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_bounded_per_identity_and_give_their_slot_back() {
        let hub = Arc::new(WatchHub::new());
        let subs: Vec<_> = (0..MAX_PER_IDENTITY)
            .map(|_| hub.subscribe("a").unwrap())
            .collect();
        assert!(matches!(
            hub.subscribe("a"),
            Err(Error::ResourceExhausted(_))
        ));
        let other = hub.subscribe("b").unwrap();
        drop(subs);
        assert_eq!(hub.open_streams(), 1);
        hub.subscribe("a").unwrap();
        drop(other);
        hub.close();
        assert!(matches!(hub.subscribe("a"), Err(Error::Unavailable(_))));
    }

    #[test]
    fn a_lock_ends_only_the_matching_identities_streams_and_says_why() {
        let hub = Arc::new(WatchHub::new());
        let a1 = hub.subscribe("a").unwrap();
        let a2 = hub.subscribe("a").unwrap();
        let b = hub.subscribe("b").unwrap();
        assert_eq!(hub.end_locked(|i| i == "a", "locked: INC-1"), 1);
        assert!(a1.ended.is_cancelled() && a2.ended.is_cancelled());
        assert_eq!(a1.lock_refusal(), Some("locked: INC-1"));
        assert!(!b.ended.is_cancelled() && b.lock_refusal().is_none());
        // A stream opened afterwards is not ended by the old lock's call.
        let a3 = hub.subscribe("a").unwrap();
        assert!(!a3.ended.is_cancelled());
        // Shutdown ends every stream, without a lock's refusal.
        hub.close();
        assert!(b.ended.is_cancelled() && b.lock_refusal().is_none());
        drop((a1, a2, a3, b));
        assert_eq!(hub.open_streams(), 0);
    }

    /// The same call for a lock placed here and one relayed from another
    /// replica: the event goes out first, then the locked identity's
    /// streams end with the lock's refusal; a lifted lock ends nothing.
    #[test]
    fn a_lock_event_ends_the_locked_identitys_streams_after_reaching_the_admins() {
        let hub = Arc::new(WatchHub::new());
        let mut admin = hub.subscribe("spiffe://td/dba/oncall").unwrap();
        let app = hub.subscribe("spiffe://td/ns/shop/cart").unwrap();
        let lock = crate::testkit::shop_lock();
        let mut relayed = LockEvent::new(true, &lock, "spiffe://td/dba/oncall");
        relayed.relayed = true;
        assert_eq!(hub.publish_lock(relayed), 1);
        assert!(app.ended.is_cancelled() && !admin.ended.is_cancelled());
        assert!(app.lock_refusal().unwrap().contains("INC-9"));
        let got = admin.rx.try_recv().unwrap();
        let everything = Scope::default();
        let own = Scope {
            identity: Some("spiffe://td/ns/shop/cart".into()),
            ..Scope::default()
        };
        let other_role = Scope {
            role: Some("ro".into()),
            ..Scope::default()
        };
        assert!(everything.matches_note(&got) && got.relayed());
        assert!(!own.matches_note(&got), "the refusal tells the identity");
        assert!(!other_role.matches_note(&got));
        let role_lock = Lock {
            target: LockTarget::Role("ro".into()),
            ..lock.clone()
        };
        let lifted = LockEvent::new(false, &role_lock, "a");
        assert!(other_role.matches_lock(&lifted) && everything.matches_lock(&lifted));
        let again = hub.subscribe("spiffe://td/ns/shop/cart").unwrap();
        assert_eq!(hub.publish_lock(LockEvent::new(false, &lock, "a")), 0);
        assert!(!again.ended.is_cancelled(), "lifting ends nothing");
    }
}
