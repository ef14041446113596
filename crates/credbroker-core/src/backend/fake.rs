//! A database backend for the fast test tier: users in memory, and knobs
//! that make it fail the way real databases do — away, refusing one user,
//! refusing to disable. Several `FakeBackend`s may share one [`FakeServer`],
//! as several `[databases.*]` entries share one PostgreSQL cluster (whose
//! user list is per server). Logic only: the proof that something works
//! with a database is always a test against a real one.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::backend::{
    Backend, Endpoint, NewUser, PoolState, Reassigned, Revokee, Sessions, StaticLogin, StaticUsers,
    UserRef,
};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, Password, Username};

/// What the fake knows of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub valid_until: DateTime<Utc>,
    /// Objects it owns; handed to its owner at revocation.
    pub owns: u64,
    pub login: bool,
}

/// One database server: its users, shared by the backends that reach it.
#[derive(Default)]
pub struct FakeServer {
    users: Mutex<BTreeMap<String, FakeUser>>,
    /// Every statement-like call, in order ("create u", "revoke a,b", …).
    calls: Mutex<Vec<String>>,
    knobs: Mutex<Knobs>,
    /// Static users: the password they accept (in the clear: a fake),
    /// until when, and how many times their sessions were ended.
    statics: Mutex<BTreeMap<String, FakeStatic>>,
    /// Open sessions by user. Revocation ends them all, a drain pass the
    /// ones idle long enough.
    sessions: Mutex<BTreeMap<String, Vec<FakeSession>>>,
}

/// An open session: busy (in a query) or idle since `since` (tokio's
/// clock, so paused-time tests can let it settle).
#[derive(Debug, Clone, Copy)]
struct FakeSession {
    id: i64,
    busy: bool,
    since: tokio::time::Instant,
}

/// A static user as the fake knows it.
#[derive(Debug, Clone, Default)]
pub struct FakeStatic {
    pub password: Option<String>,
    pub valid_until: Option<DateTime<Utc>>,
    pub login: bool,
    pub sessions_ended: u32,
}

#[derive(Default)]
struct Knobs {
    unavailable: bool,
    /// Revocations of a batch holding one of these fail (Internal).
    refuse: HashSet<String>,
    refuse_disable: bool,
    /// Runs once, at the start of the next revocation.
    before_revoke: Option<Box<dyn FnOnce() + Send>>,
    /// Runs once, after the next static password is set (a crash there).
    after_static_set: Option<Box<dyn FnOnce() + Send>>,
    /// While set, each revocation waits for a permit (a slow database).
    revoke_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// While set, each create makes its user, then waits for a permit
    /// before answering (a reply that is slow to come).
    create_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// While set, each create waits for a permit *before* it makes its
    /// user (an issue between its intent and its CREATE).
    before_create_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// While set, each revocation waits for a permit after it dropped what
    /// existed and before it answers (a reply that is slow to come).
    after_revoke_gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl FakeServer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_unavailable(&self, yes: bool) {
        self.knobs.lock().unwrap().unavailable = yes;
    }

    /// Makes every revocation that includes `username` fail.
    pub fn refuse_revoke(&self, username: &str) {
        self.knobs
            .lock()
            .unwrap()
            .refuse
            .insert(username.to_string());
    }

    /// Undoes `refuse_revoke`: the database drops `username` again.
    pub fn accept_revoke(&self, username: &str) {
        self.knobs.lock().unwrap().refuse.remove(username);
    }

    pub fn refuse_disable(&self, yes: bool) {
        self.knobs.lock().unwrap().refuse_disable = yes;
    }

    /// Runs `f` when the next revocation starts (e.g. to steal a claim).
    pub fn before_next_revoke(&self, f: impl FnOnce() + Send + 'static) {
        self.knobs.lock().unwrap().before_revoke = Some(Box::new(f));
    }

    /// A semaphore with no permit, put in the knob `slot`: whatever waits
    /// on that knob waits until the test adds permits.
    fn closed_gate(
        &self,
        slot: fn(&mut Knobs) -> &mut Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        *slot(&mut self.knobs.lock().unwrap()) = Some(gate.clone());
        gate
    }

    /// From now on each revocation waits for one permit of the returned
    /// semaphore (it starts with none): a database that is slow to answer.
    pub fn gate_revokes(&self) -> Arc<tokio::sync::Semaphore> {
        self.closed_gate(|k| &mut k.revoke_gate)
    }

    /// From now on each create makes its user, then waits for one permit
    /// of the returned semaphore (it starts with none) before answering.
    pub fn stall_creates(&self) -> Arc<tokio::sync::Semaphore> {
        self.closed_gate(|k| &mut k.create_gate)
    }

    /// From now on each create waits for one permit of the returned
    /// semaphore (it starts with none) before it makes its user.
    pub fn stall_before_create(&self) -> Arc<tokio::sync::Semaphore> {
        self.closed_gate(|k| &mut k.before_create_gate)
    }

    /// From now on each revocation, once done, waits for one permit of
    /// the returned semaphore (it starts with none) before it answers.
    pub fn stall_after_revoke(&self) -> Arc<tokio::sync::Semaphore> {
        self.closed_gate(|k| &mut k.after_revoke_gate)
    }

    /// Runs `f` right after the next static password is set.
    pub fn after_next_static_set(&self, f: impl FnOnce() + Send + 'static) {
        self.knobs.lock().unwrap().after_static_set = Some(Box::new(f));
    }

    /// Adds a user the broker did not make (an orphan, a DBA's account).
    pub fn add_user(&self, name: &str, owns: u64) {
        self.users.lock().unwrap().insert(
            name.to_string(),
            FakeUser {
                valid_until: Utc::now() + chrono::Duration::hours(1),
                owns,
                login: true,
            },
        );
    }

    pub fn user(&self, name: &str) -> Option<FakeUser> {
        self.users.lock().unwrap().get(name).cloned()
    }

    /// Gives a user objects, as a lease that ran DDL would.
    pub fn give_objects(&self, name: &str, n: u64) {
        if let Some(u) = self.users.lock().unwrap().get_mut(name) {
            u.owns += n;
        }
    }

    /// Adds a static user a DBA made (unable to log in until rotated).
    pub fn add_static_user(&self, name: &str) {
        self.statics
            .lock()
            .unwrap()
            .insert(name.to_string(), FakeStatic::default());
    }

    pub fn static_user(&self, name: &str) -> Option<FakeStatic> {
        self.statics.lock().unwrap().get(name).cloned()
    }

    /// Whether `name` logs in with `password` at `at`, as the database
    /// would decide (its own expiry included).
    pub fn static_logs_in(&self, name: &str, password: &str, at: DateTime<Utc>) -> bool {
        self.static_user(name).is_some_and(|u| {
            u.login
                && u.password.as_deref() == Some(password)
                && u.valid_until.is_some_and(|v| at < v)
        })
    }

    /// Opens a session as `user`, busy (in a query) or idle; its id.
    pub fn open_session(&self, user: &str, busy: bool) -> i64 {
        let mut all = self.sessions.lock().unwrap();
        let id = all.values().map(Vec::len).sum::<usize>() as i64 + 1;
        all.entry(user.to_string()).or_default().push(FakeSession {
            id,
            busy,
            since: tokio::time::Instant::now(),
        });
        id
    }

    /// A session's query ends (`busy = false`) or starts: either way its
    /// idle time starts over.
    pub fn set_session_busy(&self, id: i64, busy: bool) {
        for s in self.sessions.lock().unwrap().values_mut().flatten() {
            if s.id == id {
                s.busy = busy;
                s.since = tokio::time::Instant::now();
            }
        }
    }

    /// The ids of `user`'s open sessions.
    pub fn session_ids(&self, user: &str) -> Vec<i64> {
        let all = self.sessions.lock().unwrap();
        all.get(user)
            .map(|v| v.iter().map(|s| s.id).collect())
            .unwrap_or_default()
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Whether the fake database would answer, without recording a call
    /// (scrapes must not show in the tests' call lists).
    pub fn answers(&self) -> Result<()> {
        if self.knobs.lock().unwrap().unavailable {
            return Err(Error::unavailable("fake database is unreachable"));
        }
        Ok(())
    }

    fn call(&self, what: String) -> Result<()> {
        self.calls.lock().unwrap().push(what);
        if self.knobs.lock().unwrap().unavailable {
            return Err(Error::unavailable("fake database is unreachable"));
        }
        Ok(())
    }
}

pub struct FakeBackend {
    name: String,
    server: Arc<FakeServer>,
    endpoint: Endpoint,
}

impl FakeBackend {
    /// Changes an existing user, as an `ALTER` would; fails for one gone.
    fn alter(&self, user: &UserRef, f: impl FnOnce(&mut FakeUser)) -> Result<()> {
        match self
            .server
            .users
            .lock()
            .unwrap()
            .get_mut(user.username.as_str())
        {
            Some(u) => {
                f(u);
                Ok(())
            }
            None => Err(Error::FailedPrecondition("user no longer exists".into())),
        }
    }

    pub fn new(name: &str, server: Arc<FakeServer>) -> Self {
        FakeBackend {
            name: name.to_string(),
            server,
            endpoint: Endpoint {
                host: "fake".into(),
                port: 1,
                database: name.to_string(),
            },
        }
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Postgres
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn create_user(&self, user: &NewUser<'_>) -> Result<()> {
        let before = self.server.knobs.lock().unwrap().before_create_gate.clone();
        if let Some(g) = before {
            self.server
                .call(format!("waiting to create {}", user.username))?;
            g.acquire().await.expect("gate open").forget();
        }
        self.server.call(format!("create {}", user.username))?;
        self.server.users.lock().unwrap().insert(
            user.username.to_string(),
            FakeUser {
                valid_until: user.valid_until,
                owns: 0,
                login: true,
            },
        );
        let gate = self.server.knobs.lock().unwrap().create_gate.clone();
        if let Some(g) = gate {
            g.acquire().await.expect("gate open").forget();
        }
        Ok(())
    }

    async fn extend(&self, user: &UserRef, valid_until: DateTime<Utc>) -> Result<()> {
        self.server.call(format!("extend {}", user.username))?;
        self.alter(user, |u| u.valid_until = valid_until)
    }

    async fn revoke(&self, users: &[Revokee]) -> Result<Vec<Reassigned>> {
        let hook = self.server.knobs.lock().unwrap().before_revoke.take();
        if let Some(f) = hook {
            f();
        }
        let names: Vec<&str> = users.iter().map(|r| r.user.username.as_str()).collect();
        self.server.call(format!("revoke {}", names.join(",")))?;
        let gate = self.server.knobs.lock().unwrap().revoke_gate.clone();
        if let Some(g) = gate {
            g.acquire().await.expect("gate open").forget();
        }
        let moved = {
            let mut all = self.server.users.lock().unwrap();
            // Login goes first, whatever happens next (as NOLOGIN commits on
            // its own in the real backend).
            for n in &names {
                if let Some(u) = all.get_mut(*n) {
                    u.login = false;
                }
            }
            let refuse = self.server.knobs.lock().unwrap().refuse.clone();
            if let Some(bad) = names.iter().find(|n| refuse.contains(**n)) {
                return Err(Error::internal(format!(
                    "fake database refuses to drop {bad}"
                )));
            }
            let mut moved = Vec::new();
            for n in &names {
                self.server.sessions.lock().unwrap().remove(*n);
            }
            for r in users {
                if let Some(u) = all.remove(r.user.username.as_str()) {
                    if u.owns > 0 {
                        moved.push(Reassigned {
                            username: r.user.username.clone(),
                            objects: u.owns,
                            to: r.owner.clone().unwrap_or_else(|| "fake_admin".into()),
                        });
                    }
                }
            }
            moved
        };
        let after = self.server.knobs.lock().unwrap().after_revoke_gate.clone();
        if let Some(g) = after {
            g.acquire().await.expect("gate open").forget();
        }
        Ok(moved)
    }

    async fn disable(&self, users: &[UserRef]) -> Result<()> {
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        self.server.call(format!("disable {}", names.join(",")))?;
        if self.server.knobs.lock().unwrap().refuse_disable {
            return Err(Error::Internal(
                "fake database cannot confirm the lock".into(),
            ));
        }
        for n in names {
            if let Some(u) = self.server.users.lock().unwrap().get_mut(n) {
                u.login = false;
            }
        }
        Ok(())
    }

    async fn drain_begin(&self, user: &UserRef, until: DateTime<Utc>) -> Result<()> {
        self.server.call(format!("drain {}", user.username))?;
        self.alter(user, |u| {
            u.login = false;
            u.valid_until = until;
        })
    }

    async fn end_idle_sessions(
        &self,
        user: &str,
        _host: &str,
        settled: std::time::Duration,
    ) -> Result<Sessions> {
        self.server.call(format!("end_idle {user}"))?;
        let mut all = self.server.sessions.lock().unwrap();
        let mut out = Sessions::default();
        if let Some(v) = all.get_mut(user) {
            let ends = |s: &FakeSession| !s.busy && s.since.elapsed() >= settled;
            out.ended_idle = v.iter().filter(|s| ends(s)).map(|s| s.id).collect();
            v.retain(|s| !ends(s));
            out.busy = v.len() as u32;
        }
        Ok(out)
    }

    async fn list_broker_users(&self, prefix: &str) -> Result<Vec<UserRef>> {
        self.server.call(format!("list {prefix}"))?;
        Ok(self
            .server
            .users
            .lock()
            .unwrap()
            .keys()
            .filter(|n| Username::is_broker_made(prefix, n))
            .map(|n| UserRef {
                username: Username::from_store(n.clone()),
                host: String::new(),
            })
            .collect())
    }

    async fn rotate_root(&self) -> Result<()> {
        self.server.call("rotate_root".into())
    }

    async fn preflight(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn ping(&self) -> Result<()> {
        self.server.answers()
    }

    fn pool_state(&self) -> PoolState {
        PoolState::default()
    }

    async fn static_create(&self, spec: &StaticUsers<'_>) -> Result<()> {
        self.server
            .call(format!("static_create {}", spec.users.join(",")))?;
        let mut all = self.server.statics.lock().unwrap();
        for u in spec.users {
            all.entry(u.clone()).or_default();
        }
        Ok(())
    }

    async fn static_set_password(&self, login: &StaticLogin<'_>) -> Result<()> {
        self.server.call(format!("static_set {}", login.user))?;
        match self.server.statics.lock().unwrap().get_mut(login.user) {
            Some(u) => {
                u.password = Some(login.password.expose().to_string());
                u.valid_until = Some(login.valid_until);
                u.login = true;
            }
            None => {
                return Err(Error::internal(format!(
                    "fake database: role {:?} does not exist",
                    login.user
                )))
            }
        }
        let hook = self.server.knobs.lock().unwrap().after_static_set.take();
        if let Some(f) = hook {
            f();
        }
        Ok(())
    }

    async fn static_retire(&self, user: &str, _host: &str, end_sessions: bool) -> Result<()> {
        self.server.call(format!("static_retire {user}"))?;
        if let Some(u) = self.server.statics.lock().unwrap().get_mut(user) {
            u.password = None;
            u.login = false;
            if end_sessions {
                u.sessions_ended += 1;
                self.server.sessions.lock().unwrap().remove(user);
            }
        }
        Ok(())
    }

    fn dsn(&self, username: &Username, password: Option<&Password>) -> String {
        match password {
            Some(p) => format!("fake://{username}:{}@fake/{}", p.expose(), self.name),
            None => format!("fake://{username}@fake/{}", self.name),
        }
    }
}
