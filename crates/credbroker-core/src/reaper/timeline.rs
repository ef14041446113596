//! The reaper's schedule on paused time, against the fake backend and the
//! memory store (`Kit::paused`): expiry, the intent grace, backoff and
//! `failing`, an early wake-up, the orphan sweep's interval. Each deadline
//! is checked on both sides — nothing happens before it, and it has
//! happened one reaper tick after. The proof against real databases is
//! `tests/it/reaper.rs`.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::lease::{Lease, LeaseId, LeaseState};
use crate::store::{LeaseFilter, LeaseStore};
use crate::testkit::{app, role, Kit};

use super::REAPER_IDENTITY;

/// The reaper sleeps 5 ms past the due time it aims for; this is how long
/// after a deadline a test looks for what the reaper should have done.
const TICK: TimeDelta = TimeDelta::milliseconds(10);

/// Just before a deadline: what the reaper must not have done yet.
const JUST_BEFORE: TimeDelta = TimeDelta::milliseconds(1);

/// A running reaper, stopped when dropped.
struct Reaper(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.take().map(|tx| tx.send(()));
    }
}

/// Starts the kit's reaper and lets it finish its start-up (recovery of
/// pending intents, a first pass) before the test goes on.
async fn start(kit: &Kit) -> Reaper {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(super::run(kit.broker.clone(), async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(1)).await;
    Reaper(Some(tx))
}

/// Sleeps (paused: jumps) to `t` on the kit's clock.
async fn sleep_until(kit: &Kit, t: DateTime<Utc>) {
    tokio::time::sleep(kit.broker.clock().until(t)).await;
}

/// The app's lease of role `ro` for `secs` seconds.
async fn issue(kit: &Kit, secs: u64) -> Lease {
    let ttl = Some(Duration::from_secs(secs));
    kit.broker.issue(&app(), "ro", ttl).await.unwrap().lease
}

async fn row(kit: &Kit, id: &LeaseId) -> Lease {
    kit.store.get(id).await.unwrap().unwrap()
}

/// `(action, identity)` of the audit records about `id`.
fn audited(kit: &Kit, id: &LeaseId) -> Vec<(String, String)> {
    kit.audit()
        .into_iter()
        .filter(|r| r.lease_id.as_deref() == Some(id.as_str()))
        .map(|r| (r.action, r.identity))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_lease_is_revoked_at_its_expiry_not_before() {
    let kit = Kit::paused("", &role("ro", "main"));
    let _reaper = start(&kit).await;
    // Longer than the reaper's longest sleep (30 s) and its first sweep
    // (10 s): it wakes on the way and must leave the lease alone; and
    // when it wakes for a neighbour due a second earlier, too.
    let l = issue(&kit, 90).await;
    let name = l.username.as_str();
    let neighbour = issue(&kit, 89).await;

    sleep_until(&kit, neighbour.expires_at + TICK).await;
    assert_eq!(row(&kit, &neighbour.id).await.state, LeaseState::Revoked);
    sleep_until(&kit, l.expires_at - JUST_BEFORE).await;
    assert_eq!(row(&kit, &l.id).await.state, LeaseState::Active);
    assert!(kit.server.user(name).unwrap().login, "revoked early");

    sleep_until(&kit, l.expires_at + TICK).await;
    let r = row(&kit, &l.id).await;
    assert_eq!(
        r.state,
        LeaseState::Revoked,
        "not revoked a tick after expiry"
    );
    let at = r.revoked_at.unwrap();
    assert!(l.expires_at <= at && at <= l.expires_at + TICK, "{at}");
    assert!(kit.server.user(name).is_none());
    assert!(audited(&kit, &l.id).contains(&("reap".into(), REAPER_IDENTITY.into())));
}

/// An issue whose caller hangs up while the database creates the user
/// leaves its intent pending (and the user, maybe, created): the reaper
/// resolves it once `intent_grace` has passed, and not before — an issue
/// still in flight must not lose its user.
#[tokio::test(start_paused = true)]
async fn an_abandoned_intent_is_resolved_after_the_intent_grace() {
    let kit = Kit::paused("[reaper]\nintent_grace = \"45s\"\n", &role("ro", "main"));
    let _reaper = start(&kit).await;
    let _stalled = kit.server.stall_creates();
    let broker = kit.broker.clone();
    let issuing = tokio::spawn(async move { broker.issue(&app(), "ro", None).await });
    tokio::time::sleep(Duration::from_millis(1)).await;
    issuing.abort();
    let pending = LeaseFilter {
        states: vec![LeaseState::Pending],
        ..Default::default()
    };
    let intent = kit.store.list(&pending).await.unwrap().pop().unwrap();
    let name = intent.username.as_str();
    assert!(kit.server.user(name).is_some(), "the create went through");
    assert_eq!(intent.due_at, intent.issued_at + TimeDelta::seconds(45));

    sleep_until(&kit, intent.due_at - JUST_BEFORE).await;
    assert_eq!(row(&kit, &intent.id).await.state, LeaseState::Pending);
    assert!(kit.server.user(name).is_some(), "resolved before the grace");

    sleep_until(&kit, intent.due_at + TICK).await;
    assert_eq!(row(&kit, &intent.id).await.state, LeaseState::Revoked);
    assert!(kit.server.user(name).is_none());
    assert!(audited(&kit, &intent.id).contains(&("resolve_intent".into(), REAPER_IDENTITY.into())));
}

/// A database that refuses to drop a user: the reaper retries on the
/// jittered exponential backoff (1, 2, 4 s … capped at `max_backoff`),
/// never earlier than planned; the lease is `failing` from attempt
/// `failing_after_attempts` on; once the database accepts again, the next
/// retry revokes it.
#[tokio::test(start_paused = true)]
async fn a_refusing_database_is_retried_on_the_backoff_until_it_accepts() {
    let kit = Kit::paused(
        "[reaper]\nfailing_after_attempts = 3\nmax_backoff = \"4s\"\n",
        &role("ro", "main"),
    );
    let _reaper = start(&kit).await;
    let l = issue(&kit, 5).await;
    let name = l.username.as_str();
    kit.server.refuse_revoke(name);

    // Attempt k is due at `due`; it must not run before, must have run a
    // tick after, and schedules attempt k+1 at its backoff: between half
    // and all of min(2^(k-1) s, max_backoff) later.
    let mut due = l.expires_at;
    for attempt in 1..=5u32 {
        sleep_until(&kit, due - JUST_BEFORE).await;
        let before = row(&kit, &l.id).await;
        assert_eq!(
            before.revoke_attempts,
            attempt - 1,
            "attempt {attempt} early"
        );

        sleep_until(&kit, due + TICK).await;
        let after = row(&kit, &l.id).await;
        assert_eq!(after.revoke_attempts, attempt, "attempt {attempt} late");
        let want = if attempt < 3 {
            LeaseState::Active
        } else {
            LeaseState::Failing
        };
        assert_eq!(after.state, want, "after attempt {attempt}");
        assert!(after.last_error.unwrap().contains("refuses to drop"));
        let base = TimeDelta::seconds(1 << (attempt - 1)).min(TimeDelta::seconds(4));
        let wait = after.due_at - due;
        assert!(
            base / 2 <= wait && wait <= base + TICK,
            "attempt {attempt}: next retry {wait} later, backoff base {base}"
        );
        due = after.due_at;
    }
    assert!(!kit.server.user(name).unwrap().login, "login kept");

    kit.server.accept_revoke(name);
    sleep_until(&kit, due - JUST_BEFORE).await;
    assert_eq!(row(&kit, &l.id).await.state, LeaseState::Failing);
    assert!(kit.server.user(name).is_some());
    sleep_until(&kit, due + TICK).await;
    assert_eq!(row(&kit, &l.id).await.state, LeaseState::Revoked);
    assert!(kit.server.user(name).is_none());
}

/// A reaper asleep until a later lease (or its next sweep) is woken by a
/// new, shorter lease, and revokes it at its expiry instead of at its
/// planned wake-up.
#[tokio::test(start_paused = true)]
async fn a_new_short_lease_wakes_the_reaper_early() {
    let kit = Kit::paused("", &role("ro", "main"));
    let _reaper = start(&kit).await;
    let long = issue(&kit, 600).await;
    // The reaper now sleeps until its first sweep (10 s after start).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let short = issue(&kit, 2).await;

    sleep_until(&kit, short.expires_at - JUST_BEFORE).await;
    assert_eq!(row(&kit, &short.id).await.state, LeaseState::Active);
    sleep_until(&kit, short.expires_at + TICK).await;
    assert_eq!(
        row(&kit, &short.id).await.state,
        LeaseState::Revoked,
        "the reaper overslept"
    );
    assert_eq!(row(&kit, &long.id).await.state, LeaseState::Active);
}

/// The orphan sweep runs soon after start (10 s, or the interval if
/// shorter), then every `orphan_sweep_interval`: an orphan is suspected at
/// the first sweep and dropped at the second, not before.
#[tokio::test(start_paused = true)]
async fn orphans_are_dropped_on_the_sweep_interval() {
    let kit = Kit::paused(
        "[reaper]\norphan_sweep_interval = \"60s\"\n",
        &role("ro", "main"),
    );
    let start_at = kit.broker.clock().now();
    let orphan = "k_ro_0123456789abcdef";
    kit.server.add_user(orphan, 0);
    let _reaper = start(&kit).await;
    let second_sweep = start_at + TimeDelta::seconds(70);

    sleep_until(&kit, second_sweep - JUST_BEFORE).await;
    assert!(kit.server.user(orphan).is_some(), "dropped early");
    let lists = kit
        .server
        .calls()
        .iter()
        .filter(|c| c.starts_with("list"))
        .count();
    assert_eq!(lists, 2, "one sweep (two databases) so far");

    sleep_until(&kit, second_sweep + TICK).await;
    assert!(
        kit.server.user(orphan).is_none(),
        "kept after the second sweep"
    );
}
