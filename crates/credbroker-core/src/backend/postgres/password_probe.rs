//! Does the server check passwords at all? Shared by `credbroker check`
//! (a finding) and the backend's preflight (a cached warning the console
//! and `serve` show): a `trust` line in `pg_hba.conf` — common in
//! containers — lets any password in, and then a leased password and its
//! `VALID UNTIL` mean nothing there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_identifier;

use super::Cause;

/// What the probe learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PasswordCheck {
    /// A wrong password was refused, as it should be.
    Enforced,
    /// A wrong password was let in (`trust`).
    NotEnforced,
    /// The probe role could not be created (the database's own words).
    Unknown(String),
}

/// Logs in with a wrong password as a throwaway login role (not
/// broker-shaped, so no sweep takes it for a lease; valid for five minutes
/// at most, dropped at once) from where `cfg` connects. `client` is an
/// admin connection with CREATEROLE; `cfg` needs no password.
pub(super) async fn password_check(
    client: &tokio_postgres::Client,
    cfg: &tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
) -> PasswordCheck {
    let name = format!("credbroker_check_{:016x}", rand::random::<u64>());
    let ident = escape_identifier(&name);
    let until = (chrono::Utc::now() + chrono::Duration::minutes(5))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let password = hex::encode(rand::random::<[u8; 24]>());
    let create = format!(
        "CREATE ROLE {ident} LOGIN PASSWORD '{password}' VALID UNTIL '{until}' CONNECTION LIMIT 1"
    );
    if let Err(e) = client.batch_execute(&create).await {
        return PasswordCheck::Unknown(Cause::of(&e).detail);
    }
    let mut probe = cfg.clone();
    probe
        .user(&name)
        .password(hex::encode(rand::random::<[u8; 24]>()))
        .application_name("credbroker check probe");
    let admitted = match probe.connect(tls).await {
        Ok((c, conn)) => {
            drop(c);
            drop(conn);
            true
        }
        Err(_) => false,
    };
    // Its session (if any) ends before the role goes; VALID UNTIL bounds
    // the role should the DROP fail.
    let _ = client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&name],
        )
        .await;
    let _ = client
        .batch_execute(&format!("DROP ROLE IF EXISTS {ident}"))
        .await;
    if admitted {
        PasswordCheck::NotEnforced
    } else {
        PasswordCheck::Enforced
    }
}

/// How long the backend reuses a verdict: the console asks preflight every
/// few seconds, and a role created per refresh would be churn for nothing.
pub(super) const REPROBE_AFTER: Duration = Duration::from_secs(10 * 60);

/// The backend's last verdict, and a lock so one probe runs at a time.
#[derive(Default)]
pub(super) struct CachedCheck {
    last: std::sync::Mutex<Option<(Instant, PasswordCheck)>>,
    running: tokio::sync::Mutex<()>,
}

impl CachedCheck {
    fn fresh(&self) -> Option<PasswordCheck> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < REPROBE_AFTER)
            .map(|(_, v)| v.clone())
    }

    /// The cached verdict, or a new probe on `client`. The probe runs in a
    /// task of its own: a caller that gives up (the console's short
    /// timeout) must not stop it between creating its role and dropping
    /// it. `None` only if that task failed.
    pub(super) async fn get(
        self: &Arc<Self>,
        client: deadpool_postgres::Object,
        cfg: tokio_postgres::Config,
        tls: tokio_postgres_rustls::MakeRustlsConnect,
    ) -> Option<PasswordCheck> {
        if let Some(v) = self.fresh() {
            return Some(v);
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _one = this.running.lock().await;
            if let Some(v) = this.fresh() {
                return v;
            }
            let v = password_check(&client, &cfg, tls).await;
            *this.last.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), v.clone()));
            v
        })
        .await
        .ok()
    }
}
