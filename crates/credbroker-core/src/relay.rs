//! Lease events across replicas, through the PostgreSQL store: what one
//! replica publishes to its [`WatchHub`] (renewed, revoked, locked; locks
//! placed and lifted) is written to the store and announced with `NOTIFY`;
//! every other replica `LISTEN`s, reads the new rows and publishes them to
//! its own hub. So a sidecar watching its lease through replica A hears of
//! a revoke made through replica B at once, not at its next renewal; and a
//! lock placed on A ends the locked identity's streams on B too
//! ([`WatchHub::publish_lock`]).
//!
//! The same rows carry the Vault API's token events (`token_gone`: a
//! token revoked, evicted or renewed through one replica, named by its
//! accessor), which the others apply to their verified-token cache
//! (`token_cache.rs`) — so a token revoked through B stops being answered
//! from A's memory as soon as the row reaches A.
//!
//! Rows, not only notifications: a notification says "look", the row is
//! the event. A replica whose `LISTEN` connection dropped reconnects and
//! reads every row after the last it saw, so it catches up instead of
//! skipping; it also looks every few seconds, and rereads the last
//! [`LATE`] of rows, because a row with a lower `seq` can commit after a
//! higher one was read. Rows older than [`KEEP`] are deleted.
//!
//! Catch-up, not resync: a missed notification costs nothing but time,
//! since the rows are what is read; watchers get every event a lost
//! connection hid from them, each once, in order — no "resync" marker is
//! needed. Only a replica away for longer than [`KEEP`] loses events.
//!
//! The table is PostgreSQL store migration 11 (`credbroker_lease_events`;
//! the migrations run before the relay starts). It holds no secret (lease
//! ids, identities, lock targets, reasons). The relay's two connections
//! name themselves [`LISTENER`] and [`SENDER`] in `application_name`, so
//! an operator (or a test) can tell them apart in `pg_stat_activity`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::config::SecretSource;
use crate::dbtls;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::lease::LeaseId;
use crate::lock::{Lock, LockId, LockTarget};
use crate::token_cache::{TokenCache, TokenGone};
use crate::watch::{EventKind, LeaseEvent, LockEvent, Note, WatchHub};

/// One row of the event table, as this broker reads it: a note for the
/// watch hub (a lease's change or a lock's), or a Vault token gone.
// One value per row read, moved once into the hub: boxing the larger
// variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Relayed {
    Note(Note),
    Token(TokenGone),
}

/// The `NOTIFY` channel, and the table (store migration 11).
const CHANNEL: &str = "credbroker_lease_events";
/// `application_name` of the connection that `LISTEN`s and reads.
pub const LISTENER: &str = "credbroker-events-listen";
/// `application_name` of the connection that writes this replica's events.
pub const SENDER: &str = "credbroker-events-send";
/// How far back every read looks again for rows committed late.
const LATE: Duration = Duration::from_secs(10);
/// How long rows are kept: a replica away longer misses events (and says so).
const KEEP: Duration = Duration::from_secs(3600);
/// A read every this often even without a notification.
const POLL: Duration = Duration::from_secs(5);
/// Where the relay connects: the store's connection string, checked.
#[derive(Clone)]
struct Target {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
}

impl Target {
    /// The same target under another `application_name`.
    fn named(&self, name: &str) -> Target {
        let mut t = self.clone();
        t.config.application_name(name);
        t
    }
}

/// Starts relaying between this replica's `hub` and the store at `url`
/// (a PostgreSQL store; SQLite has one broker and nothing to relay) until
/// `stop`. Reads where the event table ends first, so a store that cannot
/// be read (or was not migrated) stops start-up.
pub async fn start(
    url: &str,
    password: &SecretSource,
    hub: Arc<WatchHub>,
    tokens: Arc<TokenCache>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let parsed =
        crate::connstr::parse(url).map_err(|e| Error::config(format!("store.url: {e}")))?;
    let (tls, ssl_mode) = dbtls::postgres_connector(&parsed.tls)
        .map_err(|e| Error::config(format!("store.url: {e}")))?;
    let mut config = parsed.config;
    config
        .ssl_mode(ssl_mode)
        .application_name("credbroker-events")
        .connect_timeout(Duration::from_secs(5))
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(3))
        .keepalives_retries(3);
    if let Some(p) = password.read("store.password")? {
        config.password(p.expose());
    }
    let target = Target { config, tls };
    let client = connect(&target.named(SENDER), None).await?;
    let start: i64 = client
        .query_one(&format!("SELECT coalesce(max(seq), 0) FROM {CHANNEL}"), &[])
        .await
        .map_err(|e| unavailable("read the last event", e))?
        .get(0);
    let origin = format!("{:016x}", rand::random::<u64>());
    drop(client);
    let outbound = tokio::spawn(send(
        target.named(SENDER),
        hub.clone(),
        tokens.tap(),
        origin.clone(),
        stop.clone(),
    ));
    Ok(tokio::spawn(async move {
        receive(target.named(LISTENER), hub, tokens, origin, start, stop).await;
        let _ = outbound.await;
    }))
}

fn unavailable(what: &str, e: tokio_postgres::Error) -> Error {
    Error::unavailable_from(format!("lease events: {what}: {e}"), e)
}

/// A connection whose notifications (if `notify` is given) go to it.
async fn connect(
    target: &Target,
    notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> Result<tokio_postgres::Client> {
    let (client, mut conn) = target
        .config
        .connect(target.tls.clone())
        .await
        .map_err(|e| unavailable("connect", e))?;
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let (AsyncMessage::Notification(_), Some(tx)) = (m, &notify) {
                let _ = tx.send(());
            }
        }
        // Dropping `notify` here tells the listener its connection is gone.
    });
    Ok(client)
}

/// Writes this replica's own events (not relayed ones) to the store,
/// each with its `NOTIFY` in one statement; prunes old rows now and then.
async fn send(
    target: Target,
    hub: Arc<WatchHub>,
    mut gone: tokio::sync::broadcast::Receiver<TokenGone>,
    origin: String,
    stop: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = hub.tap();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut pruned = Instant::now();
    loop {
        let text = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => match e {
                Ok(e) if e.relayed() => continue,
                Ok(e) => encode(&e),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "lease events: too many to relay; other replicas' watchers learn of these at their next renewal");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
            t = gone.recv() => match t {
                Ok(t) if t.relayed => continue,
                Ok(t) => encode_token(&t),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "token events: too many to relay; other replicas answer those tokens from memory for at most the cache's age bound");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        // One reconnect per event at most: an event that cannot be written
        // is dropped with a warning (its watchers fall back to renewal).
        for attempt in 0..2 {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = connect(&target, None).await.ok();
            }
            let Some(c) = &client else { continue };
            let sql = format!(
                "WITH e AS (INSERT INTO {CHANNEL} (origin, event) VALUES ($1, $2::text::jsonb) RETURNING seq) \
                 SELECT pg_notify('{CHANNEL}', seq::text) FROM e"
            );
            match c.execute(&sql, &[&origin, &text]).await {
                Ok(_) => break,
                Err(e) if attempt == 1 => {
                    tracing::warn!(error = %e, "lease events: cannot relay an event to the other replicas");
                }
                Err(_) => client = None,
            }
        }
        if pruned.elapsed() > Duration::from_secs(60) {
            pruned = Instant::now();
            if let Some(c) = &client {
                let _ = c
                    .execute(
                        &format!("DELETE FROM {CHANNEL} WHERE at < clock_timestamp() - $1::float8 * interval '1 second'"),
                        &[&KEEP.as_secs_f64()],
                    )
                    .await;
            }
        }
    }
}

/// Listens, reads the rows other replicas wrote after `last`, publishes
/// them here as relayed; reconnects with backoff and catches up.
async fn receive(
    target: Target,
    hub: Arc<WatchHub>,
    tokens: Arc<TokenCache>,
    origin: String,
    mut last: i64,
    stop: CancellationToken,
) {
    // Rows published recently, by seq: reread within LATE, never twice.
    let mut seen: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
        let client = match connect(&target, Some(tx)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "lease events: cannot listen; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .is_err()
        {
            continue;
        }
        backoff = Duration::from_millis(100);
        // Listening before reading: nothing committed in between is missed.
        loop {
            match read(&client, &origin, last, &mut seen).await {
                Ok(events) => {
                    for (seq, e) in events {
                        last = last.max(seq);
                        match e {
                            Relayed::Note(Note::Lease(e)) => {
                                if e.kind == EventKind::Locked {
                                    // Its locked identity's tokens: the
                                    // gate refuses them anyway (it reads
                                    // the locks from the store).
                                    tokens.forget_identities(|i| i == e.identity);
                                }
                                hub.publish(e);
                            }
                            Relayed::Note(Note::Lock(e)) => {
                                if let (true, LockTarget::Identity(p)) = (e.placed, &e.lock.target)
                                {
                                    tokens.forget_identities(|i| {
                                        p.matches(&Identity::from_trusted(i.to_string()))
                                    });
                                }
                                let ended = hub.publish_lock(e);
                                if ended > 0 {
                                    tracing::info!(identities = ended, "lease watches of an identity locked on another replica ended");
                                }
                            }
                            Relayed::Token(t) => tokens.forget(t),
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease events: read failed; reconnecting");
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                n = notified.recv() => if n.is_none() { break },
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// Rows after `last`, and rows of the last [`LATE`] not yet seen, from
/// other replicas, in order.
async fn read(
    client: &tokio_postgres::Client,
    origin: &str,
    last: i64,
    seen: &mut BTreeMap<i64, Instant>,
) -> std::result::Result<Vec<(i64, Relayed)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT seq, event::text FROM {CHANNEL} \
                 WHERE (seq > $1 OR at > clock_timestamp() - $3::float8 * interval '1 second') \
                   AND origin <> $2 ORDER BY seq LIMIT 10000"
            ),
            &[&last, &origin, &LATE.as_secs_f64()],
        )
        .await?;
    let now = Instant::now();
    seen.retain(|_, at| now.duration_since(*at) < LATE * 3);
    let mut out = Vec::new();
    for row in rows {
        let seq: i64 = row.get(0);
        if seen.insert(seq, now).is_some() {
            continue;
        }
        let text: String = row.get(1);
        match decode(&text) {
            Some(e) => out.push((seq, e)),
            None => tracing::warn!(seq, "lease events: a row this broker cannot read; skipped"),
        }
    }
    Ok(out)
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Renewed => "renewed",
        EventKind::Revoked => "revoked",
        EventKind::Locked => "locked",
    }
}

/// A lease event as one JSON object (the format of the brokers before lock
/// events, unchanged), or a lock's with `kind` `lock_placed`/`lock_lifted`
/// — which a broker before them skips with a warning.
fn encode(n: &Note) -> String {
    let e = match n {
        Note::Lease(e) => e,
        Note::Lock(e) => {
            return serde_json::json!({
                "kind": if e.placed { "lock_placed" } else { "lock_lifted" },
                "lock_id": e.lock.id.as_str(),
                "target_kind": e.lock.target.kind(),
                "target_value": e.lock.target.value(),
                "reason": e.lock.reason,
                "created_by": e.lock.created_by,
                "created_at": e.lock.created_at.to_rfc3339(),
                "expires_at": e.lock.expires_at.map(|t| t.to_rfc3339()),
                "actor": e.actor,
                "at": e.at.to_rfc3339(),
            })
            .to_string()
        }
    };
    serde_json::json!({
        "kind": kind_name(e.kind),
        "lease_id": e.lease_id.as_str(),
        "identity": e.identity,
        "role": e.role,
        "database": e.database,
        "expires_at": e.expires_at.map(|t| t.to_rfc3339()),
        "actor": e.actor,
        "reason": e.reason,
        "lock_id": e.lock_id,
        "at": e.at.to_rfc3339(),
    })
    .to_string()
}

/// A token event: the accessor only (never the token or its hash).
fn encode_token(t: &TokenGone) -> String {
    serde_json::json!({
        "kind": TOKEN_GONE,
        "accessor": t.accessor,
        "at": Utc::now().to_rfc3339(),
    })
    .to_string()
}

const TOKEN_GONE: &str = "token_gone";

fn decode(text: &str) -> Option<Relayed> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let time = |k: &str| {
        s(k).and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let kind = match s("kind")?.as_str() {
        "renewed" => EventKind::Renewed,
        "revoked" => EventKind::Revoked,
        "locked" => EventKind::Locked,
        lock @ ("lock_placed" | "lock_lifted") => {
            let lock_id = s("lock_id")?;
            // Checked like caller text: a row is another broker's output,
            // not this one's, and a malformed one is skipped.
            LockId::parse(&lock_id).ok()?;
            let target = LockTarget::from_parts(&s("target_kind")?, &s("target_value")?).ok()?;
            return Some(Relayed::Note(Note::Lock(LockEvent {
                placed: lock == "lock_placed",
                lock: Lock {
                    id: LockId::from_store(lock_id),
                    target,
                    reason: s("reason")?,
                    created_by: s("created_by")?,
                    created_at: time("created_at")?,
                    expires_at: time("expires_at"),
                },
                actor: s("actor")?,
                at: time("at")?,
                relayed: true,
            })));
        }
        TOKEN_GONE => {
            return Some(Relayed::Token(TokenGone {
                accessor: s("accessor").filter(|a| !a.is_empty())?,
                relayed: true,
            }))
        }
        _ => return None,
    };
    Some(Relayed::Note(Note::Lease(LeaseEvent {
        kind,
        lease_id: LeaseId::parse(&s("lease_id")?).ok()?,
        identity: s("identity")?,
        role: s("role")?,
        database: s("database")?,
        expires_at: time("expires_at"),
        actor: s("actor")?,
        reason: s("reason")?,
        lock_id: s("lock_id"),
        at: time("at")?,
        relayed: true,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_written_and_marked_relayed() {
        let e = LeaseEvent {
            kind: EventKind::Revoked,
            lease_id: LeaseId::generate(),
            identity: "spiffe://td/app".into(),
            role: "ro".into(),
            database: "main".into(),
            expires_at: Some(Utc::now()),
            actor: "admin".into(),
            reason: "admin".into(),
            lock_id: None,
            at: Utc::now(),
            relayed: false,
        };
        let Some(Relayed::Note(Note::Lease(back))) = decode(&encode(&Note::Lease(e.clone())))
        else {
            panic!("not a lease event");
        };
        assert_eq!(back.lease_id, e.lease_id);
        assert_eq!(back.kind, e.kind);
        assert_eq!(back.identity, e.identity);
        assert_eq!(
            back.expires_at.map(|t| t.timestamp_millis()),
            e.expires_at.map(|t| t.timestamp_millis())
        );
        assert!(back.relayed);
        assert!(decode("{\"kind\":\"exploded\"}").is_none());
    }

    #[test]
    fn a_lock_event_reads_back_as_written_and_a_malformed_one_is_skipped() {
        let lock = crate::testkit::shop_lock();
        for placed in [true, false] {
            let e = LockEvent::new(placed, &lock, "spiffe://td/dba/oncall");
            let text = encode(&Note::Lock(e));
            let Some(Relayed::Note(Note::Lock(back))) = decode(&text) else {
                panic!("not a lock event: {text}");
            };
            assert_eq!(back.placed, placed);
            assert_eq!(back.lock.id, lock.id);
            assert_eq!(back.lock.target.to_string(), lock.target.to_string());
            assert_eq!(back.lock.reason, "INC-9");
            assert!(back.lock.expires_at.is_none() && back.relayed);
        }
        let good = encode(&Note::Lock(LockEvent::new(true, &lock, "a")));
        for (from, to) in [
            (lock.id.as_str(), "k_'; DROP"),
            ("\"identity\"", "\"table\""),
        ] {
            let bad = good.replace(from, to);
            assert_ne!(bad, good);
            assert!(decode(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_token_event_names_the_accessor_only_and_reads_back_relayed() {
        let t = TokenGone {
            accessor: "acc123".into(),
            relayed: false,
        };
        let text = encode_token(&t);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["accessor", "at", "kind"], "{text}");
        let Some(Relayed::Token(back)) = decode(&text) else {
            panic!("a token event reads back as one: {text}")
        };
        assert_eq!(
            back,
            TokenGone {
                accessor: "acc123".into(),
                relayed: true
            }
        );
        assert!(decode("{\"kind\":\"token_gone\",\"accessor\":\"\"}").is_none());
    }
}
