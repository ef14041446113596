//! `credbroker sidecar`: keeps a credential file fresh for an application
//! that only knows how to read a connection string.
//!
//! One loop, one lease at a time plus the ones being drained:
//! issue → write the file atomically (0600) → notify the application →
//! renew at about two thirds of the remaining lease → before the hard limit
//! issue a *new* lease, write, notify, and revoke the old one only after a
//! grace period, so a connection pool can drain. When the broker is
//! unreachable the current file stays while its credential is valid;
//! retries use jittered backoff. The sidecar gives up (an error, so a
//! non-zero exit) only after it has held no valid credential for
//! `give_up_after`. On shutdown it removes the file and revokes its leases.
//!
//! [`schedule`] holds the timing as pure functions, [`render`] the file
//! formats, [`notify`] the `--exec` / `--signal` hooks, [`connect`] the
//! broker connection (reloaded when the certificate files change).
//!
//! **Invariant:** the password is in the file and nowhere else: not in a
//! log line, an error, a hook's environment or `Debug` output.

pub mod api;
pub mod connect;
pub mod credential;
pub mod notify;
pub mod render;
pub mod schedule;
pub mod static_loop;
#[cfg(test)]
mod timeline;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tonic::transport::Channel;

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::pb;
use api::{classify, CallError, EventStream, LeaseApi};
pub use credential::Credential;
use credential::{rfc3339, time};
use notify::Notify;
use render::Format;
use schedule::{delta, Backoff};

/// Longest a single broker call may take before it counts as a failure:
/// a hung broker must not hold renewals past the lease's expiry.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub type BrokerClient = pb::broker_client::BrokerClient<Channel>;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub role: String,
    pub out: PathBuf,
    pub format: Format,
    pub notify: Notify,
    /// Requested lifetime for issue and renew; `None` is the role's default.
    pub ttl: Option<Duration>,
    /// Write one credential and exit, leaving the lease to expire on its own
    /// (init containers).
    pub once: bool,
    /// Leave the file in place on shutdown.
    pub keep: bool,
    /// How long an old lease outlives its replacement.
    pub grace: Duration,
    /// How long the sidecar may hold no valid credential (at start, or after
    /// the current one expired during an outage) before it exits with an
    /// error.
    pub give_up_after: Duration,
}

/// A replaced lease waiting for its revocation.
#[derive(Debug)]
struct Draining {
    lease_id: String,
    /// On our clock.
    expires_at: DateTime<Utc>,
    revoke_at: DateTime<Utc>,
    attempts: u32,
}

/// Runs the sidecar until `shutdown` resolves (then cleans up and returns
/// `Ok`), or until it can no longer keep a valid credential (`Err`).
pub async fn run(
    opts: Options,
    client: connect::Connector,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    run_with(opts, client, Clock::System, shutdown).await
}

/// `run` against any broker API and clock (the fast tier's fakes).
pub async fn run_with<A: LeaseApi>(
    opts: Options,
    api: A,
    clock: Clock,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut s = Sidecar {
        opts,
        api,
        clock,
        backoff: Backoff::default(),
        current: None,
        draining: Vec::new(),
        next_try: clock.now(),
        must_rotate: false,
        file_removed: false,
        current_revoked: false,
        last_error: String::new(),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let first = match race(s.first_credential(), shutdown.as_mut()).await {
        Raced::Done(r) => r?,
        Raced::Shutdown(Some(Ok(c))) => {
            // Issued just as the signal came: not written, so only revoke.
            s.current = Some(c);
            s.cleanup().await;
            return Ok(());
        }
        Raced::Shutdown(_) => return Ok(()),
    };
    if let Err(e) = s.install_first(first).await {
        s.cleanup().await;
        return Err(e);
    }
    if s.opts.once {
        return Ok(());
    }
    let mut watch = Watch::default();
    loop {
        if watch.due(s.clock.now()) {
            match race(watch.open(&s.api, s.clock.now()), shutdown.as_mut()).await {
                Raced::Done(()) => {}
                Raced::Shutdown(_) => break,
            }
        }
        let wake = watch.wake(s.wake_at());
        tokio::select! {
            _ = tokio::time::sleep(s.clock.until(wake)) => {}
            ev = watch.next() => match ev {
                Some(Ok(e)) => {
                    if !s.on_event(e) {
                        continue;
                    }
                }
                Some(Err(st)) => {
                    watch.lost(s.clock.now(), &crate::client::describe(&st));
                    continue;
                }
                None => {
                    watch.lost(s.clock.now(), "the broker ended the stream");
                    continue;
                }
            },
            _ = &mut shutdown => break,
        }
        match race(s.tick(), shutdown.as_mut()).await {
            Raced::Done(Ok(())) => {}
            Raced::Done(Err(e)) => {
                s.cleanup().await;
                return Err(e);
            }
            Raced::Shutdown(_) => break,
        }
    }
    tracing::info!("shutting down: removing the file and revoking leases");
    s.cleanup().await;
    Ok(())
}

/// The broker's event stream, when it has one: a revocation of our lease
/// is acted on at once. Without the stream (never offered, or down) the
/// schedule alone keeps the file fresh, as before; it is reopened with
/// backoff.
#[derive(Default)]
struct Watch {
    stream: Option<EventStream>,
    /// When to try opening it again; None: now.
    retry_at: Option<DateTime<Utc>>,
    failures: u32,
    /// The broker does not offer events: do not ask again.
    unsupported: bool,
}

/// First and longest wait before reopening a lost event stream.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(500);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(15);

impl Watch {
    fn due(&self, now: DateTime<Utc>) -> bool {
        self.stream.is_none() && !self.unsupported && self.retry_at.is_none_or(|t| now >= t)
    }

    fn wake(&self, wake: DateTime<Utc>) -> DateTime<Utc> {
        match (self.stream.is_none() && !self.unsupported, self.retry_at) {
            (true, Some(t)) => wake.min(t),
            _ => wake,
        }
    }

    async fn open<A: LeaseApi>(&mut self, api: &A, now: DateTime<Utc>) {
        match tokio::time::timeout(CALL_TIMEOUT, api.watch()).await {
            Ok(Ok(stream)) => {
                tracing::info!("watching lease events: a revocation is acted on at once");
                self.stream = Some(stream);
                self.failures = 0;
                self.retry_at = None;
            }
            Ok(Err(st)) if st.code() == tonic::Code::Unimplemented => {
                tracing::info!("the broker offers no lease events; keeping to the schedule");
                self.unsupported = true;
            }
            Ok(Err(st)) => self.lost(now, &crate::client::describe(&st)),
            Err(_) => self.lost(now, "no answer"),
        }
    }

    fn lost(&mut self, now: DateTime<Utc>, why: &str) {
        let was_open = self.stream.take().is_some();
        let delay =
            (WATCH_RETRY_MIN * 2u32.saturating_pow(self.failures.min(8))).min(WATCH_RETRY_MAX);
        self.failures += 1;
        self.retry_at = Some(now + delta(delay));
        if was_open {
            tracing::warn!(error = %why, "lease event stream lost; keeping to the schedule meanwhile");
        } else {
            tracing::debug!(error = %why, retry_in_ms = delay.as_millis() as u64, "cannot watch lease events yet");
        }
    }

    /// The next event; never resolves while there is no stream.
    async fn next(&mut self) -> Option<std::result::Result<pb::LeaseEvent, tonic::Status>> {
        use futures::StreamExt;
        match self.stream.as_mut() {
            Some(s) => s.next().await,
            None => std::future::pending().await,
        }
    }
}

/// How long a step already under way (a rotation, say) may still run once
/// shutdown is asked for: long enough for a lease issued in flight to be
/// recorded and so revoked, short enough not to hold a pod's termination.
const STEP_GRACE_ON_SHUTDOWN: Duration = Duration::from_secs(3);

enum Raced<T> {
    Done(T),
    /// Shutdown came first; the step's result if it finished in its grace.
    Shutdown(Option<T>),
}

async fn race<T, S: Future<Output = ()>>(
    step: impl Future<Output = T>,
    mut shutdown: std::pin::Pin<&mut S>,
) -> Raced<T> {
    let mut step = std::pin::pin!(step);
    tokio::select! {
        r = &mut step => Raced::Done(r),
        _ = shutdown.as_mut() => Raced::Shutdown(
            tokio::time::timeout(STEP_GRACE_ON_SHUTDOWN, step).await.ok()
        ),
    }
}

struct Sidecar<A> {
    opts: Options,
    api: A,
    clock: Clock,
    backoff: Backoff,
    current: Option<Credential>,
    draining: Vec<Draining>,
    /// When the current lease is next renewed or rotated (or retried).
    next_try: DateTime<Utc>,
    /// The broker refused a renewal: only a new lease helps.
    must_rotate: bool,
    /// The current credential expired and its file was removed.
    file_removed: bool,
    /// The broker told us the current lease was revoked: it is dead, so a
    /// replacement neither drains nor revokes it.
    current_revoked: bool,
    last_error: String,
}

impl<A: LeaseApi> Sidecar<A> {
    fn ttl_seconds(&self) -> i64 {
        self.opts
            .ttl
            .map(|d| d.as_secs().max(1) as i64)
            .unwrap_or(0)
    }

    async fn call<T>(
        &self,
        f: impl Future<Output = std::result::Result<T, tonic::Status>>,
    ) -> std::result::Result<T, CallError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(s)) => Err(classify(s)),
            Err(_) => Err(CallError::Transient(format!(
                "no answer within {}s",
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn issue(&mut self) -> std::result::Result<Credential, CallError> {
        let req = pb::IssueLeaseRequest {
            role: self.opts.role.clone(),
            ttl_seconds: self.ttl_seconds(),
        };
        let sent_at = self.clock.now();
        let lease = self.call(self.api.issue(req)).await?;
        let cred = Credential::from_reply(lease, sent_at)
            .map_err(|e| CallError::Refused(tonic::Code::Internal, e.to_string()))?;
        tracing::info!(
            lease_id = %cred.lease_id,
            username = %cred.username,
            expires_at = %rfc3339(cred.expires_at),
            max_expires_at = %rfc3339(cred.max_expires_at),
            "lease issued"
        );
        if cred.clock_offset.abs() > TimeDelta::seconds(2) {
            tracing::warn!(
                offset_ms = cred.clock_offset.num_milliseconds(),
                "this clock and the broker's differ; scheduling corrects for it"
            );
        }
        Ok(cred)
    }

    async fn renew(
        &self,
        lease_id: &str,
        ttl_seconds: i64,
    ) -> std::result::Result<pb::Lease, CallError> {
        let req = pb::RenewLeaseRequest {
            lease_id: lease_id.to_string(),
            ttl_seconds,
        };
        self.call(self.api.renew(req)).await
    }

    async fn revoke(&self, lease_id: &str) -> std::result::Result<(), CallError> {
        let req = pb::RevokeLeaseRequest {
            lease_id: lease_id.to_string(),
            handover: false,
        };
        self.call(self.api.revoke(req)).await
    }

    /// The revoke that ends a handover: the broker drains the replaced
    /// credential (new logins refused, sessions ended as they go idle,
    /// busy ones until its drain deadline) instead of cutting its sessions.
    async fn hand_over(&self, lease_id: &str) -> std::result::Result<(), CallError> {
        let req = pb::RevokeLeaseRequest {
            lease_id: lease_id.to_string(),
            handover: true,
        };
        self.call(self.api.revoke(req)).await
    }

    /// The first lease, retried with backoff while the broker is
    /// unreachable; a refusal (unknown role, not allowed, bad ttl) ends the
    /// sidecar at once: retrying would not change the answer.
    async fn first_credential(&mut self) -> Result<Credential> {
        let started = self.clock.now();
        loop {
            self.api.refresh();
            match self.issue().await {
                Ok(c) => {
                    self.backoff.reset();
                    return Ok(c);
                }
                Err(CallError::Refused(_, msg)) => {
                    return Err(Error::FailedPrecondition(format!(
                        "the broker refused a lease for role {:?}: {msg}",
                        self.opts.role
                    )))
                }
                Err(CallError::Transient(msg)) => {
                    let waited = (self.clock.now() - started).to_std().unwrap_or_default();
                    if waited >= self.opts.give_up_after {
                        return Err(Error::unavailable(format!(
                            "no valid credential for role {:?}: the broker has been unreachable \
                             for {}s (last error: {msg})",
                            self.opts.role,
                            waited.as_secs()
                        )));
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(
                        error = %msg,
                        attempt = self.backoff.failures(),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot issue the first lease; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn write(&self, c: &Credential) -> Result<()> {
        let text = self.opts.format.render(c);
        crate::fsutil::write_secret_file(&self.opts.out, text.as_bytes()).map_err(|e| {
            Error::unavailable(format!("cannot write {}: {e}", self.opts.out.display()))
        })?;
        tracing::info!(
            path = %self.opts.out.display(),
            lease_id = %c.lease_id,
            "credential written"
        );
        Ok(())
    }

    async fn install_first(&mut self, c: Credential) -> Result<()> {
        if let Err(e) = self.write(&c) {
            if self.revoke(&c.lease_id).await.is_err() {
                tracing::warn!(lease_id = %c.lease_id, "could not revoke the unused lease; it expires on its own");
            }
            return Err(e);
        }
        let hook = self.opts.notify.fire(&c, &self.opts.out);
        if self.opts.once {
            if let Some(h) = hook {
                let _ = h.await;
            }
            tracing::info!(
                lease_id = %c.lease_id,
                expires_at = %rfc3339(c.expires_at),
                "--once: leaving the lease to expire on its own"
            );
            return Ok(());
        }
        self.next_try = schedule::next_step(&c.times(), self.clock.now(), self.opts.grace).at();
        self.current = Some(c);
        Ok(())
    }

    fn current(&self) -> &Credential {
        self.current
            .as_ref()
            .expect("a credential is held after start")
    }

    fn wake_at(&self) -> DateTime<Utc> {
        let cur = self.current();
        let mut wake = self.next_try;
        for d in &self.draining {
            wake = wake.min(d.revoke_at);
        }
        let expires_at = cur.times().expires_at;
        if self.file_removed {
            wake.min(expires_at + delta(self.opts.give_up_after))
        } else {
            wake.min(expires_at)
        }
    }

    /// Acts on a lease event; true when the loop must act now.
    fn on_event(&mut self, e: pb::LeaseEvent) -> bool {
        use pb::LeaseEventKind as K;
        let kind = K::try_from(e.kind).unwrap_or(K::Unspecified);
        if let Some(i) = self.draining.iter().position(|d| d.lease_id == e.lease_id) {
            if kind == K::Revoked {
                tracing::info!(lease_id = %e.lease_id, actor = %e.actor, reason = %e.reason, "old lease revoked by the broker");
                self.draining.remove(i);
            }
            return false;
        }
        if self.current.as_ref().map(|c| c.lease_id.as_str()) != Some(e.lease_id.as_str()) {
            return false;
        }
        match kind {
            K::Revoked if !self.current_revoked => {
                tracing::warn!(
                    lease_id = %e.lease_id,
                    actor = %e.actor,
                    reason = %e.reason,
                    "the current lease was revoked; replacing it now"
                );
                let now = self.clock.now();
                let cur = self.current.as_mut().expect("held");
                // Dead from now on: should no replacement come, the file
                // goes at the next step and `give_up_after` counts from now.
                cur.expires_at = cur.expires_at.min(now - cur.clock_offset);
                cur.renewable = false;
                self.current_revoked = true;
                self.must_rotate = true;
                self.next_try = now;
                self.backoff.reset();
                true
            }
            K::Locked => {
                tracing::warn!(
                    lease_id = %e.lease_id,
                    lock_id = %e.lock_id,
                    reason = %e.reason,
                    "an admin lock refuses renewing the current lease; it stays valid until it expires"
                );
                false
            }
            _ => false,
        }
    }

    async fn tick(&mut self) -> Result<()> {
        self.api.refresh();
        self.revoke_due().await;
        let now = self.clock.now();
        if now >= self.next_try {
            let times = self.current().times();
            let rotate = self.must_rotate
                || now >= schedule::rotate_at(&times, self.opts.grace)
                || now >= times.expires_at;
            if rotate {
                self.rotate().await;
            } else {
                self.renew_current().await;
            }
        }
        self.check_expiry()
    }

    async fn renew_current(&mut self) {
        let id = self.current().lease_id.clone();
        match self.renew(&id, self.ttl_seconds()).await {
            Ok(l) => {
                let now = self.clock.now();
                self.backoff.reset();
                let cur = self.current.as_mut().expect("held");
                if let Some(e) = time(&l.expires_at) {
                    cur.expires_at = e;
                }
                cur.renewable = l.renewable;
                tracing::info!(
                    lease_id = %cur.lease_id,
                    expires_at = %rfc3339(cur.expires_at),
                    "lease renewed"
                );
                self.next_try = schedule::next_step(&cur.times(), now, self.opts.grace).at();
            }
            Err(CallError::Refused(code, msg)) => {
                tracing::warn!(lease_id = %id, ?code, error = %msg, "renewal refused; issuing a new lease");
                self.must_rotate = true;
                self.next_try = self.clock.now();
            }
            Err(CallError::Transient(msg)) => self.retry_later("renew", msg),
        }
    }

    fn retry_later(&mut self, what: &str, msg: String) {
        let delay = self.backoff.next_delay();
        let cur = self.current();
        tracing::warn!(
            action = what,
            error = %msg,
            attempt = self.backoff.failures(),
            retry_in_ms = delay.as_millis() as u64,
            current_valid_until = %rfc3339(cur.expires_at),
            "broker call failed; keeping the current file"
        );
        self.last_error = msg;
        self.next_try = self.clock.now() + delta(delay);
    }

    async fn rotate(&mut self) {
        tracing::info!(
            lease_id = %self.current().lease_id,
            hard_limit = %rfc3339(self.current().max_expires_at),
            "issuing a replacement lease"
        );
        let new = match self.issue().await {
            Ok(c) => c,
            Err(e) => {
                if let CallError::Refused(code, msg) = &e {
                    tracing::error!(?code, error = %msg, "the broker refused a new lease");
                }
                self.extend_current().await;
                self.retry_later("issue", e.text().to_string());
                return;
            }
        };
        if let Err(e) = self.write(&new) {
            tracing::error!(error = %e, "keeping the current credential");
            let _ = self.revoke(&new.lease_id).await;
            self.retry_later("write", e.to_string());
            return;
        }
        let now = self.clock.now();
        let hook = self.opts.notify.fire(&new, &self.opts.out);
        drop(hook);
        self.backoff.reset();
        self.must_rotate = false;
        self.file_removed = false;
        self.next_try = schedule::next_step(&new.times(), now, self.opts.grace).at();
        let old = self.current.replace(new).expect("held");
        if std::mem::take(&mut self.current_revoked) {
            tracing::info!(
                old_lease_id = %old.lease_id,
                new_lease_id = %self.current().lease_id,
                "revoked credential replaced"
            );
            return;
        }
        let mut old_times = old.times();
        let revoke_at = schedule::revoke_at(&old_times, now, self.opts.grace);
        // Keep the old credential valid through the grace period, so
        // connections it opens while the application switches still work.
        if old_times.expires_at > now && old_times.expires_at < revoke_at {
            let secs = ((revoke_at - now).num_milliseconds() + 999) / 1000;
            let secs = secs.max(1);
            match self.renew(&old.lease_id, secs).await {
                Ok(l) => {
                    let e = time(&l.expires_at).unwrap_or(old.expires_at);
                    old_times.expires_at = old.local(e);
                    tracing::info!(
                        lease_id = %old.lease_id,
                        expires_at = %rfc3339(e),
                        "old lease kept valid through the grace period"
                    );
                }
                Err(e) => tracing::warn!(
                    lease_id = %old.lease_id,
                    error = %e.text(),
                    "could not extend the old lease; it may end before the grace period"
                ),
            }
        }
        tracing::info!(
            old_lease_id = %old.lease_id,
            new_lease_id = %self.current().lease_id,
            revoke_old_at = %rfc3339(revoke_at),
            "credential rotated"
        );
        self.draining.push(Draining {
            lease_id: old.lease_id.clone(),
            expires_at: old_times.expires_at,
            revoke_at,
            attempts: 0,
        });
    }

    /// While a replacement cannot be had, stretch the current lease as far
    /// as its hard limit allows.
    async fn extend_current(&mut self) {
        let cur = self.current();
        let now = self.clock.now();
        if cur.times().expires_at <= now || cur.expires_at >= cur.max_expires_at || !cur.renewable {
            return;
        }
        let id = cur.lease_id.clone();
        if let Ok(l) = self.renew(&id, self.ttl_seconds()).await {
            let cur = self.current.as_mut().expect("held");
            if let Some(e) = time(&l.expires_at) {
                cur.expires_at = e;
            }
            tracing::info!(lease_id = %id, expires_at = %rfc3339(cur.expires_at), "lease renewed");
        }
    }

    async fn revoke_due(&mut self) {
        let now = self.clock.now();
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.draining)
            .into_iter()
            .partition(|d| d.revoke_at <= now);
        self.draining = rest;
        for mut d in due {
            match self.hand_over(&d.lease_id).await {
                Ok(()) => {
                    tracing::info!(lease_id = %d.lease_id, "old lease handed over: it drains, then is revoked")
                }
                Err(CallError::Refused(code, msg)) => {
                    // Typically already revoked or expired and reaped.
                    tracing::info!(lease_id = %d.lease_id, ?code, error = %msg, "old lease not revoked by us")
                }
                Err(CallError::Transient(msg)) => {
                    if d.expires_at <= self.clock.now() {
                        tracing::info!(
                            lease_id = %d.lease_id,
                            error = %msg,
                            "old lease expired before it could be revoked; the broker's reaper drops it"
                        );
                    } else {
                        d.revoke_at = self.clock.now() + delta(Backoff::ceiling(d.attempts));
                        d.attempts += 1;
                        tracing::warn!(lease_id = %d.lease_id, error = %msg, "cannot revoke the old lease yet");
                        self.draining.push(d);
                    }
                }
            }
        }
    }

    /// Keeps the file only while its credential is valid; gives up after
    /// `give_up_after` without one.
    fn check_expiry(&mut self) -> Result<()> {
        let now = self.clock.now();
        let (lease_id, expires_at) = {
            let cur = self.current();
            (cur.lease_id.clone(), cur.times().expires_at)
        };
        if now < expires_at {
            return Ok(());
        }
        if !self.file_removed {
            tracing::error!(
                %lease_id,
                expired_at = %rfc3339(expires_at),
                path = %self.opts.out.display(),
                last_error = %self.last_error,
                "the credential expired and no replacement could be obtained; removing the file"
            );
            remove_file(&self.opts.out);
            self.file_removed = true;
        }
        if now >= expires_at + delta(self.opts.give_up_after) {
            return Err(Error::unavailable(format!(
                "no valid credential for role {:?} since {} and none could be obtained for {}s \
                 (last error: {})",
                self.opts.role,
                rfc3339(expires_at),
                self.opts.give_up_after.as_secs(),
                self.last_error
            )));
        }
        Ok(())
    }

    /// Removes the file (unless `--keep`) and revokes every lease held, all
    /// at once and each within the call timeout.
    async fn cleanup(&mut self) {
        if !self.opts.keep {
            remove_file(&self.opts.out);
        }
        let ids: Vec<String> = self
            .current
            .iter()
            .map(|c| c.lease_id.clone())
            .chain(self.draining.iter().map(|d| d.lease_id.clone()))
            .collect();
        let results = futures::future::join_all(ids.iter().map(|id| self.revoke(id))).await;
        for (id, r) in ids.iter().zip(results) {
            match r {
                Ok(()) => tracing::info!(lease_id = %id, "lease revoked"),
                Err(e) => tracing::warn!(
                    lease_id = %id,
                    error = %e.text(),
                    "could not revoke the lease; it expires on its own"
                ),
            }
        }
        self.current = None;
        self.draining.clear();
    }
}

fn remove_file(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "file removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove the file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_lets_a_step_under_way_finish_briefly() {
        let quick = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            7
        };
        let mut now = std::pin::pin!(async {});
        assert!(matches!(
            race(quick, now.as_mut()).await,
            Raced::Shutdown(Some(7))
        ));
        let stuck = tokio::time::sleep(Duration::from_secs(600));
        let mut now = std::pin::pin!(async {});
        assert!(matches!(
            race(stuck, now.as_mut()).await,
            Raced::Shutdown(None)
        ));
        let never = std::pin::pin!(std::future::pending::<()>());
        assert!(matches!(race(async { 1 }, never).await, Raced::Done(1)));
    }
}
