//! The sidecar's whole timeline on paused time against a fake broker: the
//! fast tier's proof of the schedule (renew, rotate before the hard limit,
//! revoke after grace, outages, refusals). The real-broker tests in
//! `tests/it/sidecar/` remain the proof that it works with a database.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::api::LeaseApi;
use super::notify::Notify;
use super::render::Format;
use super::{run_with, Options};
use crate::clock::Clock;
use crate::pb;

#[derive(Debug, Clone)]
struct FakeLease {
    expires: DateTime<Utc>,
    max: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    /// Revoked as a handover (`RevokeLeaseRequest.handover`): drained by
    /// the broker instead of cut.
    handed_over: bool,
}

#[derive(Default)]
struct State {
    leases: BTreeMap<String, FakeLease>,
    issued: Vec<(String, DateTime<Utc>)>,
    renewals: u32,
    unreachable: bool,
    refuse_renew: bool,
    /// Refuse issues as a lock would (PermissionDenied).
    refuse_issue: bool,
    /// Open event streams (`watch`), when the fake offers them.
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<Result<pb::LeaseEvent, tonic::Status>>>,
    offers_watch: bool,
}

/// A broker in memory, on the test's clock: leases of `ttl`, hard limit
/// `max` from issue.
#[derive(Clone)]
struct FakeBroker {
    clock: Clock,
    ttl: i64,
    max: i64,
    state: Arc<Mutex<State>>,
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

impl FakeBroker {
    fn new(clock: Clock, ttl: i64, max: i64) -> Self {
        FakeBroker {
            clock,
            ttl,
            max,
            state: Arc::default(),
        }
    }

    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap())
    }

    fn reply(id: &str, l: &FakeLease, issued: DateTime<Utc>) -> pb::Lease {
        pb::Lease {
            lease_id: id.to_string(),
            kind: "postgres".into(),
            username: format!("u{id}"),
            password: format!("pw-{id}-0123456789"),
            dsn: format!("postgresql://u{id}:pw-{id}-0123456789@db:5432/app"),
            host: "db".into(),
            port: 5432,
            database_name: "app".into(),
            issued_at: ts(issued),
            expires_at: ts(l.expires),
            max_expires_at: ts(l.max),
            renewable: l.expires < l.max,
            ..Default::default()
        }
    }

    /// The state, unless the broker is unreachable (as a connection
    /// failure says).
    fn reach(&self) -> Result<std::sync::MutexGuard<'_, State>, tonic::Status> {
        let s = self.state.lock().unwrap();
        if s.unreachable {
            return Err(tonic::Status::unavailable("tcp connect error"));
        }
        Ok(s)
    }

    /// The TTL a request asks for, or the broker's own.
    fn ttl_of(&self, asked: i64) -> i64 {
        if asked > 0 {
            asked
        } else {
            self.ttl
        }
    }

    /// The lease that is valid now and not revoked, if the file holds one.
    fn valid(&self, id: &str) -> bool {
        let now = self.clock.now();
        self.state
            .lock()
            .unwrap()
            .leases
            .get(id)
            .is_some_and(|l| l.revoked_at.is_none() && l.expires > now)
    }
}

#[async_trait]
impl LeaseApi for FakeBroker {
    async fn issue(&self, req: pb::IssueLeaseRequest) -> Result<pb::Lease, tonic::Status> {
        let mut s = self.reach()?;
        if s.refuse_issue {
            return Err(tonic::Status::permission_denied(
                "locked by an admin (k_x, identity a): leaked",
            ));
        }
        let now = self.clock.now();
        let ttl = self.ttl_of(req.ttl_seconds);
        let id = format!("l{}", s.issued.len());
        let l = FakeLease {
            expires: now + chrono::Duration::seconds(ttl.min(self.max)),
            max: now + chrono::Duration::seconds(self.max),
            revoked_at: None,
            handed_over: false,
        };
        let reply = Self::reply(&id, &l, now);
        s.issued.push((id.clone(), now));
        s.leases.insert(id, l);
        Ok(reply)
    }

    async fn renew(&self, req: pb::RenewLeaseRequest) -> Result<pb::Lease, tonic::Status> {
        let mut s = self.reach()?;
        if s.refuse_renew {
            return Err(tonic::Status::permission_denied(
                "identity may no longer lease role",
            ));
        }
        let now = self.clock.now();
        let ttl = self.ttl_of(req.ttl_seconds);
        let issued = s
            .issued
            .iter()
            .find(|(i, _)| *i == req.lease_id)
            .map(|(_, t)| *t)
            .unwrap_or(now);
        let Some(l) = s.leases.get_mut(&req.lease_id) else {
            return Err(tonic::Status::not_found("no lease"));
        };
        if l.revoked_at.is_some() || l.expires <= now {
            return Err(tonic::Status::failed_precondition("not active"));
        }
        l.expires = (now + chrono::Duration::seconds(ttl)).min(l.max);
        let reply = Self::reply(&req.lease_id, l, issued);
        s.renewals += 1;
        Ok(reply)
    }

    async fn revoke(&self, req: pb::RevokeLeaseRequest) -> Result<(), tonic::Status> {
        let mut s = self.reach()?;
        let now = self.clock.now();
        if let Some(l) = s.leases.get_mut(&req.lease_id) {
            if l.revoked_at.is_none() {
                l.handed_over = req.handover;
            }
            l.revoked_at.get_or_insert(now);
        }
        Ok(())
    }

    async fn watch(&self) -> Result<super::api::EventStream, tonic::Status> {
        use futures::StreamExt;
        let mut s = self.state.lock().unwrap();
        if !s.offers_watch {
            return Err(tonic::Status::unimplemented("no lease events"));
        }
        if s.unreachable {
            return Err(tonic::Status::unavailable("tcp connect error"));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        s.watchers.push(tx);
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }
}

impl FakeBroker {
    /// An admin revokes `id`: marked revoked, and every watcher told.
    fn admin_revoke(&self, id: &str) {
        let now = self.clock.now();
        let mut s = self.state.lock().unwrap();
        s.leases.get_mut(id).unwrap().revoked_at = Some(now);
        let e = pb::LeaseEvent {
            kind: pb::LeaseEventKind::Revoked as i32,
            lease_id: id.into(),
            actor: "spiffe://x/dba/oncall".into(),
            reason: "admin".into(),
            ..Default::default()
        };
        s.watchers.retain(|w| w.send(Ok(e.clone())).is_ok());
    }

    /// The broker goes away: streams end.
    fn drop_watchers(&self) {
        self.state.lock().unwrap().watchers.clear();
    }
}

fn options(out: &std::path::Path, grace: u64, give_up: u64) -> Options {
    Options {
        role: "ro".into(),
        out: out.to_path_buf(),
        format: Format::Json,
        notify: Notify::None,
        ttl: None,
        once: false,
        keep: false,
        grace: Duration::from_secs(grace),
        give_up_after: Duration::from_secs(give_up),
    }
}

/// A fake broker of leases of `ttl` s with a hard limit of `max` s on
/// the test's clock, and the file the sidecar writes (in a directory the
/// test holds).
fn setup(ttl: i64, max: i64) -> (tempfile::TempDir, std::path::PathBuf, Clock, FakeBroker) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("conn.json");
    let clock = Clock::tokio();
    (dir, out, clock, FakeBroker::new(clock, ttl, max))
}

fn lease_in_file(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).expect("the file is whole JSON");
    v["lease_id"].as_str().map(str::to_string)
}

struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<crate::Result<()>>,
}

fn start(opts: Options, broker: &FakeBroker, clock: Clock) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run_with(opts, broker.clone(), clock, async {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        task,
    }
}

/// Fifteen minutes of leases of 60 s with a 300 s hard limit and 30 s of
/// grace: checked every simulated second, the file always holds a valid
/// credential; each lease is renewed, replaced before its hard limit, and
/// revoked a grace period after its replacement; shutdown revokes all.
#[tokio::test(start_paused = true)]
async fn the_file_always_holds_a_valid_credential_through_rotations() {
    let (_dir, out, clock, broker) = setup(60, 300);
    let mut run = start(options(&out, 30, 60), &broker, clock);
    let mut seen = Vec::new();
    for _ in 0..900 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(id) = lease_in_file(&out) else {
            assert!(seen.is_empty(), "the file vanished after it was written");
            continue;
        };
        assert!(broker.valid(&id), "the file holds {id}, not valid now");
        if seen.last() != Some(&id) {
            seen.push(id);
        }
    }
    {
        let s = broker.state.lock().unwrap();
        assert!(seen.len() >= 4, "rotations: {seen:?}");
        assert!(
            s.renewals >= seen.len() as u32 * 2,
            "renewals: {}",
            s.renewals
        );
        for pair in s.issued.windows(2) {
            let (old, new) = (&pair[0], &pair[1]);
            let l = &s.leases[&old.0];
            assert!(
                new.1 < l.max,
                "{} replaced only after its hard limit",
                old.0
            );
            let revoked = l.revoked_at.expect("replaced lease revoked");
            assert!(l.handed_over, "{} replaced: handed over, to drain", old.0);
            let after = (revoked - new.1).num_seconds();
            assert!(
                (30..=32).contains(&after),
                "{} revoked {after}s after its replacement, grace is 30s",
                old.0
            );
        }
        let live = s.leases.values().filter(|l| l.revoked_at.is_none()).count();
        assert_eq!(live, 1, "only the current lease is unrevoked");
    }
    run.stop.take().unwrap().send(()).unwrap();
    run.task.await.unwrap().unwrap();
    assert!(!out.exists(), "file left behind at shutdown");
    let s = broker.state.lock().unwrap();
    assert!(s.leases.values().all(|l| l.revoked_at.is_some()));
    let current = &s.leases[&s.issued.last().unwrap().0];
    assert!(!current.handed_over, "shutdown revokes at once, no drain");
}

/// The broker goes away: the file stays exactly while its credential is
/// valid, is removed at expiry, and the sidecar gives up after
/// `give_up_after` with an error that says why.
#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_file_while_valid_then_removes_it_and_gives_up() {
    let (_dir, out, clock, broker) = setup(60, 300);
    let run = start(options(&out, 10, 45), &broker, clock);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = lease_in_file(&out).expect("first credential written");
    broker.set(|s| s.unreachable = true);
    let expires = broker.state.lock().unwrap().leases[&first].expires;
    let mut removed_at = None;
    while !run.task.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = clock.now();
        match lease_in_file(&out) {
            Some(id) => {
                assert_eq!(id, first);
                assert!(
                    now < expires + chrono::Duration::seconds(1),
                    "expired file kept"
                );
            }
            None => {
                removed_at.get_or_insert(now);
            }
        }
    }
    let removed_at = removed_at.expect("file removed");
    assert!(removed_at >= expires, "file removed while still valid");
    let err = run.task.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("no valid credential"), "{err}");
    let gave_up = (clock.now() - expires).num_seconds();
    assert!(
        (45..=50).contains(&gave_up),
        "gave up {gave_up}s after expiry"
    );
}

/// A renewal the broker refuses (the identity was removed from the role)
/// means a new lease at once, not at the next scheduled step.
#[tokio::test(start_paused = true)]
async fn a_refused_renewal_is_followed_by_a_new_lease_at_once() {
    let (_dir, out, clock, broker) = setup(60, 600);
    let mut run = start(options(&out, 10, 60), &broker, clock);
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.set(|s| s.refuse_renew = true);
    // The first renewal comes at about two thirds of the lease.
    tokio::time::sleep(Duration::from_secs(45)).await;
    {
        let s = broker.state.lock().unwrap();
        assert_eq!(s.issued.len(), 2, "no replacement after the refusal");
        let gap = (s.issued[1].1 - s.issued[0].1).num_seconds();
        assert!((35..=45).contains(&gap), "replacement {gap}s after issue");
    }
    assert_eq!(lease_in_file(&out).as_deref(), Some("l1"));
    run.stop.take().unwrap().send(()).unwrap();
    run.task.await.unwrap().unwrap();
}

/// No broker at start: the first issue is retried with backoff and the
/// sidecar gives up after `give_up_after`, having written nothing.
#[tokio::test(start_paused = true)]
async fn without_a_broker_the_first_issue_is_retried_then_given_up() {
    let (_dir, out, clock, broker) = setup(60, 300);
    broker.set(|s| s.unreachable = true);
    let started = clock.now();
    let run = start(options(&out, 10, 20), &broker, clock);
    let err = run.task.await.unwrap().unwrap_err().to_string();
    let took = (clock.now() - started).num_seconds();
    assert!((20..=26).contains(&took), "gave up after {took}s");
    assert!(err.contains("unreachable"), "{err}");
    assert!(!out.exists());
}

/// With the broker's event stream, an admin's revocation is replaced at
/// once (not at the next renewal, 40 s later), the dead lease is neither
/// drained nor revoked again; a lost stream is reopened while the schedule
/// goes on. When the replacement is refused (a lock), the file goes at
/// once and the sidecar retries on its backoff until `give_up_after`.
#[tokio::test(start_paused = true)]
async fn a_revocation_event_replaces_the_lease_at_once_and_a_lock_removes_the_file() {
    let (_dir, out, clock, broker) = setup(60, 300);
    broker.set(|s| s.offers_watch = true);
    let run = start(options(&out, 30, 20), &broker, clock);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lease_in_file(&out).as_deref(), Some("l0"));
    assert_eq!(broker.state.lock().unwrap().watchers.len(), 1);

    broker.admin_revoke("l0");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        lease_in_file(&out).as_deref(),
        Some("l1"),
        "replaced at once"
    );
    {
        let s = broker.state.lock().unwrap();
        assert_eq!(
            s.renewals, 0,
            "the dead lease was not kept alive for a grace period"
        );
    }

    // The stream is lost: reopened with backoff; the schedule runs anyway.
    broker.drop_watchers();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(broker.state.lock().unwrap().watchers.len(), 1, "reopened");

    // Locked: the revoked credential's file goes at once; retries follow.
    broker.set(|s| s.refuse_issue = true);
    broker.admin_revoke("l1");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!out.exists(), "a revoked credential stays in the file");
    let r = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .expect("gave up within give_up_after")
        .unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no valid credential"), "{e}");
    assert_eq!(broker.state.lock().unwrap().issued.len(), 2);
}
