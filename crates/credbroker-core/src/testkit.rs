//! The fast tier's fixture: a real [`Broker`] over the in-memory store and
//! fake backends, so the rules of the lease path, the revocation engine and
//! the sweep are tested in milliseconds. Only the store and the databases
//! are fakes; config, policy, audit chain and metrics are the real ones.
//! [`Kit::paused`] puts broker, revocation engine, reaper and store on
//! tokio's clock, for `#[tokio::test(start_paused = true)]`: the reaper's
//! schedule (expiry, intent grace, backoff) then runs in milliseconds.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::{AuditLog, Record};
use crate::backend::fake::{FakeBackend, FakeServer};
use crate::backend::{Backend, Backends};
use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::{Config, DatabaseConfig, SecretSource};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::store::memory::MemoryStore;

pub const APP: &str = "spiffe://credbroker.dev/ns/demo/app";
pub const ADMIN: &str = "spiffe://credbroker.dev/dba/alice";

pub struct Kit {
    pub broker: Arc<Broker>,
    pub store: Arc<MemoryStore>,
    pub server: Arc<FakeServer>,
    dir: tempfile::TempDir,
}

impl Kit {
    /// A broker with databases `main` and `second` on one fake server, and
    /// `roles` (TOML) appended to a minimal config; `extra` goes before the
    /// first table (e.g. a `[reaper]` section is fine there too).
    pub fn new(extra: &str, roles: &str) -> Kit {
        Self::build(tempfile::tempdir().unwrap(), "", extra, roles)
    }

    /// `new` on tokio's clock, starting now: in a test started paused,
    /// time moves only when every task waits, and then straight to the
    /// next timer, so sleeps cost nothing and every deadline is exact.
    pub fn paused(extra: &str, roles: &str) -> Kit {
        let clock = Clock::tokio();
        Self::build_on(
            tempfile::tempdir().unwrap(),
            "",
            extra,
            roles,
            Arc::new(MemoryStore::with_clock(clock)),
            FakeServer::new(),
            None,
            clock,
        )
    }

    /// `new`, with the audit log at `audit` (e.g. `/dev/full`, where every
    /// write fails) instead of a file in the kit's directory.
    pub fn with_audit_at(extra: &str, roles: &str, audit: Option<&std::path::Path>) -> Kit {
        Self::build_on(
            tempfile::tempdir().unwrap(),
            "",
            extra,
            roles,
            Arc::new(MemoryStore::new()),
            FakeServer::new(),
            audit,
            Clock::System,
        )
    }

    /// A kit whose config also has `statics` (`[static_roles.*]` TOML)
    /// and a sealing key file, on a store and fake server of its own.
    pub fn with_statics(statics: &str) -> Kit {
        Self::with_statics_on(statics, Arc::new(MemoryStore::new()), FakeServer::new())
    }

    /// `with_statics` sharing a store and a fake server with other kits:
    /// replicas of one deployment.
    pub fn with_statics_on(statics: &str, store: Arc<MemoryStore>, server: Arc<FakeServer>) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("static.key"), "42".repeat(32)).unwrap();
        Self::build_on(
            dir,
            "sealing_key_file = \"static.key\"\n",
            "",
            statics,
            store,
            server,
            None,
            Clock::System,
        )
    }

    fn build(dir: tempfile::TempDir, top: &str, extra: &str, roles: &str) -> Kit {
        Self::build_on(
            dir,
            top,
            extra,
            roles,
            Arc::new(MemoryStore::new()),
            FakeServer::new(),
            None,
            Clock::System,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build_on(
        dir: tempfile::TempDir,
        top: &str,
        extra: &str,
        roles: &str,
        store: Arc<MemoryStore>,
        server: Arc<FakeServer>,
        audit: Option<&std::path::Path>,
        clock: Clock,
    ) -> Kit {
        let text = format!(
            "{top}admins = [\"spiffe://credbroker.dev/dba/*\"]\n\n\
             [server]\nlisten = \"127.0.0.1:0\"\nname_prefix = \"k_\"\n\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n\n\
             {extra}\n\
             [databases.main]\nkind = \"postgres\"\nadmin_url = \"postgres://a@127.0.0.1:1/main\"\n\n\
             [databases.second]\nkind = \"postgres\"\nadmin_url = \"postgres://a@127.0.0.1:1/second\"\n\n\
             {roles}"
        );
        let config = Config::parse(&text, dir.path()).unwrap();
        let mut backends = Backends::new();
        for db in ["main", "second"] {
            let b: Arc<dyn Backend> = Arc::new(FakeBackend::new(db, server.clone()));
            backends.insert(db.to_string(), b);
        }
        let audit_path = audit
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| dir.path().join("audit.log"));
        let audit = Arc::new(AuditLog::open(&audit_path, false).unwrap());
        let broker = Arc::new(Broker::with_clock(
            Arc::new(config),
            store.clone(),
            backends,
            audit,
            Arc::new(Metrics::new()),
            clock,
        ));
        Kit {
            broker,
            store,
            server,
            dir,
        }
    }

    pub fn audit_path(&self) -> std::path::PathBuf {
        self.dir.path().join("audit.log")
    }

    pub fn audit(&self) -> Vec<Record> {
        crate::audit::read_records(&self.dir.path().join("audit.log")).unwrap_or_default()
    }
}

pub fn role(name: &str, db: &str) -> String {
    format!(
        "[roles.{name}]\ndatabase = \"{db}\"\ndefault_ttl = \"1m\"\nmax_ttl = \"10m\"\n\
         allowed = [\"{APP}\"]\n\n"
    )
}

pub fn app() -> Identity {
    Identity::from_trusted(APP)
}

pub fn admin() -> Identity {
    Identity::from_trusted(ADMIN)
}

/// A pending lease on role `a`, database `second`, expiring in a minute:
/// what a store or sweep test writes and looks for by `username`.
pub fn pending_lease(username: &str) -> crate::lease::Lease {
    let now = chrono::Utc::now();
    let soon = now + chrono::Duration::minutes(1);
    crate::lease::Lease {
        id: crate::lease::LeaseId::generate(),
        role: "a".into(),
        database: "second".into(),
        kind: crate::lease::BackendKind::Postgres,
        username: crate::lease::Username::from_store(username.into()),
        user_host: String::new(),
        identity: "x".into(),
        state: crate::lease::LeaseState::Pending,
        issued_at: now,
        expires_at: soon,
        max_expires_at: soon,
        due_at: soon,
        revoked_at: None,
        revoke_attempts: 0,
        last_error: None,
        grant_id: None,
    }
}

/// Token `n` of `identity` (hash and accessor from `n`), issued now and
/// valid for an hour.
pub fn vault_token(n: u32, identity: &str) -> crate::store::VaultToken {
    let now = crate::lease::truncate_ms(chrono::Utc::now());
    crate::store::VaultToken {
        hash: format!("{n:064x}"),
        accessor: format!("acc{n}"),
        identity: identity.to_string(),
        cert_sha256: "ab".repeat(32),
        issued_at: now,
        expires_at: now + chrono::Duration::hours(1),
    }
}

/// The lock the event tests send around: on `spiffe://td/ns/shop/*`,
/// placed now by `spiffe://td/dba/oncall` for INC-9, without an end.
pub fn shop_lock() -> crate::lock::Lock {
    crate::lock::Lock {
        id: crate::lock::LockId::generate(),
        target: crate::lock::LockTarget::Identity(
            crate::policy::IdentityPattern::new("spiffe://td/ns/shop/*").unwrap(),
        ),
        reason: "INC-9".into(),
        created_by: "spiffe://td/dba/oncall".into(),
        created_at: chrono::Utc::now(),
        expires_at: None,
    }
}

/// A `[databases.orders]` section of `kind` at `admin_url`, no password,
/// one connection and two-second timeouts: what a backend's unit tests
/// build one from, with nothing listening or a server that refuses.
pub fn database_config(kind: crate::lease::BackendKind, admin_url: String) -> DatabaseConfig {
    DatabaseConfig {
        name: "orders".into(),
        kind,
        admin_url,
        admin_password: SecretSource::None,
        client_host: None,
        client_port: None,
        client_sslmode: None,
        client_sslrootcert: None,
        max_connections: 1,
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(2),
        scram_iterations: 1,
    }
}
