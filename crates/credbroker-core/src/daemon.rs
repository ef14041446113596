//! Assembles a running broker from a config: audit log, lease store,
//! backends, reaper, gRPC and metrics listeners — and takes it down again.
//! `credbroker serve`, `credbroker demo` and the tests all start it here,
//! with listeners and a shutdown signal of their choosing.

use std::future::Future;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditLog, Event, Outcome};
use crate::broker::Broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::{backend, pruner, reaper, server, store};

/// Everything `run` needs besides the config.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    /// The Vault-compatible API (`[vault_api]`); None: not served.
    pub vault_api: Option<TcpListener>,
    /// The web console (`[console] listen`), when configured.
    pub console: Option<TcpListener>,
}

impl Listeners {
    /// gRPC alone (the demo, the bench): no metrics, Vault API or console.
    pub fn grpc_only(grpc: TcpListener) -> Self {
        Listeners {
            grpc,
            metrics: None,
            vault_api: None,
            console: None,
        }
    }

    /// Binds the addresses named in the config.
    pub async fn bind(config: &Config) -> Result<Self> {
        let grpc = listen("server.listen", config.server.listen).await?;
        let metrics = match config.server.metrics_listen {
            Some(addr) => Some(listen("server.metrics_listen", addr).await?),
            None => None,
        };
        let vault_api = match &config.vault_api {
            Some(v) => Some(listen("vault_api.listen", v.listen).await?),
            None => None,
        };
        let console = match &config.console {
            Some(c) => Some(listen("console.listen", c.listen).await?),
            None => None,
        };
        Ok(Listeners {
            grpc,
            metrics,
            vault_api,
            console,
        })
    }
}

/// A broker that is ready to serve, before its listeners are running.
pub struct Daemon {
    pub broker: Arc<Broker>,
    /// Just-in-time access for people (`access`): the `Access` gRPC
    /// service and the loop that expires requests and ends grants.
    pub access: Arc<crate::access::Access>,
    /// The access policies' webhooks (`notify`), flushed at shutdown.
    pub webhooks: Arc<crate::notify::Webhooks>,
    pub tls: server::SharedTls,
    pub warnings: Vec<String>,
}

impl Daemon {
    /// Opens audit, store and backends, and checks the databases.
    /// Unreachable databases are warnings, not errors: leases on other
    /// databases keep working, and the reaper retries.
    pub async fn open(config: Config) -> Result<Self> {
        let tls = server::tls::server_config(&config.tls)?;
        let audit = Arc::new(
            AuditLog::open(&config.audit.path, config.audit.fsync)?
                .with_rotation(config.audit.rotate_size),
        );
        let sealer = if config.static_roles.is_empty() {
            None
        } else {
            // A missing or malformed key is the operator's to fix: exit 64.
            Some(crate::static_roles::Sealer::load(&config.sealing_key)?)
        };
        let store = store::open_config(&config.store).await?;
        let backends = backend::connect_all(&config).await?;
        let mut warnings = server::tls::crl_warnings(&config.tls, chrono::Utc::now());
        warnings.extend(config.drain_clamps());
        for d in config.databases.values() {
            let what = format!("database {:?}", d.name);
            // Every host of a PostgreSQL admin_url; MySQL's has one.
            warnings.extend(match d.kind {
                crate::lease::BackendKind::Postgres => {
                    crate::connstr::tls_warning(&what, &d.admin_url)
                }
                crate::lease::BackendKind::Mysql => {
                    crate::dbtls::url_warning(&what, &d.admin_url, crate::dbtls::Dialect::Mysql)
                }
            });
        }
        if let crate::config::StoreUrl::Postgres(url) = &config.store.url {
            warnings.extend(crate::connstr::tls_warning("the lease store", url));
        }
        for (name, b) in &backends {
            // A refused TLS certificate (wrong CA, wrong host name) is the
            // operator's to fix: a start-up error, unlike a database that
            // is merely down.
            b.check_tls().await?;
            match b.preflight().await {
                Ok(w) => warnings.extend(w),
                Err(e) => {
                    warnings.push(format!("database {name:?} not reachable at start-up: {e}"))
                }
            }
        }
        if config.store.url.is_shared() {
            // A claim that runs out while its holder is still revoking hands
            // the lease to another replica mid-drop; keep a wide margin.
            for d in config.databases.values() {
                let longest = 3 * (d.connect_timeout + d.statement_timeout);
                if config.store.claim_timeout < longest {
                    warnings.push(format!(
                        "store.claim_timeout ({:?}) is short for database {:?}: a revocation there may \
                         take up to {longest:?}; another replica could take it over mid-drop",
                        config.store.claim_timeout, d.name
                    ));
                }
            }
        }
        if config.store.url.is_shared() {
            // A replica killed mid-rotation holds the role's claim until it
            // runs out; the current password must outlive that wait.
            for r in config.static_roles.values() {
                if r.overlap < config.store.claim_timeout {
                    warnings.push(format!(
                        "static_roles.{}: overlap ({:?}) is shorter than store.claim_timeout ({:?}): if a \
                         replica dies mid-rotation, the current password may expire before another \
                         replica can take the rotation over",
                        r.name, r.overlap, config.store.claim_timeout
                    ));
                }
            }
        }
        if let Some(sealer) = &sealer {
            // Values sealed under another key (the key file replaced, or
            // replicas with different keys): a warning, not a refusal to
            // start. Leases do not need the key, and the recovery
            // (`admin rotate --static-role NAME --abandon-pending`) goes
            // through a running broker; meanwhile that role's reads fail
            // with a FailedPrecondition that says the same.
            match store.static_list().await {
                Ok(states) => {
                    for st in states
                        .iter()
                        .filter(|s| config.static_roles.contains_key(&s.role))
                    {
                        for (which, e) in crate::static_roles::unopenable(sealer, st) {
                            warnings.push(format!(
                                "static_roles.{}: the {which} password does not open with the sealing key (key id {}): {e}",
                                st.role,
                                sealer.key_id()
                            ));
                        }
                    }
                }
                Err(e) => warnings.push(format!("cannot read the static roles' state: {e}")),
            }
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let metrics = Arc::new(Metrics::new());
        for name in config.databases.keys() {
            metrics.watch_database(name);
        }
        let webhook_options = crate::notify::WebhookOptions {
            ca_file: config.server.webhook_ca_file.clone(),
            ..Default::default()
        };
        crate::notify::check_options(&webhook_options)?;
        let webhooks = Arc::new(crate::notify::Webhooks::new(
            webhook_options,
            metrics.clone(),
        ));
        let broker = Arc::new(Broker::new(
            Arc::new(config),
            store,
            backends,
            audit,
            metrics,
        ));
        let access = Arc::new(crate::access::Access::new(
            broker.clone(),
            Arc::new(crate::access::WebhookNotifier::new(webhooks.clone())),
        ));
        Ok(Daemon {
            broker,
            access,
            webhooks,
            tls: Arc::new(RwLock::new(tls)),
            warnings,
        })
    }

    /// Access events go to `notifier` instead of the log (the webhook).
    pub fn with_access_notifier(
        mut self,
        notifier: Arc<dyn crate::access::AccessNotifier>,
    ) -> Self {
        self.access = Arc::new(crate::access::Access::new(self.broker.clone(), notifier));
        self
    }

    /// A handle that applies a changed config file to the running broker.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            broker: self.broker.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Runs the reaper, the pruner and both listeners until `shutdown`; then stops
    /// accepting, gives in-flight requests `shutdown_grace` to finish, and
    /// returns.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let broker = self.broker;
        let stop = CancellationToken::new();
        let mut start = Event::new("credbroker:system", "start");
        start.outcome = Some(Outcome::Ok);
        broker.audit().append(start)?;

        // Lease events to and from the other replicas of a shared store.
        let relay = match &broker.config().store.url {
            crate::config::StoreUrl::Postgres(url) => Some(
                crate::relay::start(
                    url,
                    &broker.config().store.password,
                    broker.watch().clone(),
                    broker.token_cache().clone(),
                    stop.clone(),
                )
                .await?,
            ),
            crate::config::StoreUrl::Sqlite(_) => None,
        };
        let reaper = tokio::spawn(reaper::run(broker.clone(), stop.clone().cancelled_owned()));
        let pruner = tokio::spawn(pruner::run(broker.clone(), stop.clone().cancelled_owned()));
        let access_loop = tokio::spawn(crate::access::expiry::run(
            self.access.clone(),
            stop.clone().cancelled_owned(),
        ));
        let statics = tokio::spawn(
            broker
                .static_rotator()
                .clone()
                .run(stop.clone().cancelled_owned()),
        );
        let http = listeners.metrics.map(|l| {
            tokio::spawn(server::http::serve(
                broker.clone(),
                l,
                stop.clone().cancelled_owned(),
            ))
        });
        let tls_files = {
            let b = broker.clone();
            tokio::spawn(server::tls::watch_files(
                move || b.config().tls.clone(),
                self.tls.clone(),
                stop.clone().cancelled_owned(),
            ))
        };
        let console = listeners.console.map(|l| {
            tokio::spawn(crate::console::serve(
                self.access.clone(),
                l,
                self.tls.clone(),
                stop.clone().cancelled_owned(),
            ))
        });
        let grace = broker.config().server.shutdown_grace;
        let grpc_stop = CancellationToken::new();
        // Stops accepting together with gRPC: one shutdown for both APIs.
        let vault_api = match (listeners.vault_api, broker.config().vault_api.clone()) {
            (Some(l), Some(cfg)) => Some(tokio::spawn(crate::vault_api::serve(
                broker.clone(),
                cfg,
                l,
                self.tls.clone(),
                grpc_stop.clone().cancelled_owned(),
            ))),
            (Some(_), None) => {
                return Err(Error::Config(
                    "a vault_api listener was given but the config has no [vault_api]".into(),
                ))
            }
            (None, _) => None,
        };
        let grpc = tokio::spawn(server::serve_grpc(
            broker.clone(),
            self.access.clone(),
            listeners.grpc,
            self.tls,
            grpc_stop.clone().cancelled_owned(),
        ));
        tokio::pin!(shutdown);
        let mut grpc = grpc;
        let served = tokio::select! {
            _ = &mut shutdown => None,
            r = &mut grpc => Some(r),
        };
        tracing::info!("shutting down");
        grpc_stop.cancel();
        // Lease watches never finish on their own: end them, or graceful
        // shutdown would wait the whole grace period for them.
        broker.watch().close();
        let result = match served {
            Some(r) => r.map_err(Error::internal).and_then(|r| r),
            None => match tokio::time::timeout(grace, &mut grpc).await {
                Ok(r) => r.map_err(Error::internal).and_then(|r| r),
                Err(_) => {
                    tracing::warn!(?grace, "in-flight requests did not finish in time");
                    grpc.abort();
                    Ok(())
                }
            },
        };
        if let Some(h) = vault_api {
            let _ = h.await;
        }
        stop.cancel();
        let _ = reaper.await;
        let _ = pruner.await;
        let _ = access_loop.await;
        // Access events still queued for a policy's webhook: a short,
        // bounded flush (what is left is counted as dropped).
        self.webhooks.shutdown(crate::notify::SHUTDOWN_FLUSH).await;
        if let Some(h) = relay {
            let _ = h.await;
        }
        let _ = tls_files.await;
        let _ = statics.await;
        if let Some(h) = http {
            let _ = h.await;
        }
        if let Some(h) = console {
            let _ = h.await;
        }
        let mut end = Event::new("credbroker:system", "stop");
        end.outcome = Some(Outcome::Ok);
        let _ = broker.audit().append(end);
        result
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Keys read once, when the listeners, the store and the audit log open:
/// a changed one is said at SIGHUP, never silently ignored. Compared by
/// their `Debug` text, which holds every field; it is never printed (a
/// store URL names its user and host). `server.name_prefix` is read live
/// elsewhere, so [`Reloader::reload`] keeps the old one until a restart:
/// the orphan sweep must not stop seeing the users issued under it.
/// `store.claim_timeout`, `retention` and `prune_interval` are read live
/// and so are not here.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    use std::fmt::Debug;
    let (o, n) = (&old.server, &new.server);
    let keys: [(&str, &dyn Debug, &dyn Debug); 14] = [
        ("server.listen", &o.listen, &n.listen),
        (
            "server.webhook_ca_file",
            &o.webhook_ca_file,
            &n.webhook_ca_file,
        ),
        (
            "server.metrics_listen",
            &o.metrics_listen,
            &n.metrics_listen,
        ),
        (
            "server.request_timeout",
            &o.request_timeout,
            &n.request_timeout,
        ),
        (
            "server.max_connections",
            &o.max_connections,
            &n.max_connections,
        ),
        (
            "server.max_connections_per_identity",
            &o.max_connections_per_identity,
            &n.max_connections_per_identity,
        ),
        (
            "server.max_connections_per_source",
            &o.max_connections_per_source,
            &n.max_connections_per_source,
        ),
        (
            "server.ipv6_source_prefix",
            &o.ipv6_source_prefix,
            &n.ipv6_source_prefix,
        ),
        ("[vault_api]", &old.vault_api, &new.vault_api),
        ("[console]", &old.console, &new.console),
        ("server.name_prefix", &o.name_prefix, &n.name_prefix),
        ("store.url", &old.store.url, &new.store.url),
        ("store.password", &old.store.password, &new.store.password),
        ("[audit]", &old.audit, &new.audit),
    ];
    keys.into_iter()
        .filter(|(_, a, b)| format!("{a:?}") != format!("{b:?}"))
        .map(|(k, _, _)| format!("{k} changed: restart the broker to apply"))
        .collect()
}

/// Binds one configured address. A port in use is the machine's state at
/// this moment (another broker, a leftover process), not a mistake in the
/// file: `unavailable`, exit 1, where other bind errors stay `config` (64).
async fn listen(key: &str, addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            Error::unavailable(format!(
                "{key} {addr}: {e}; is another broker (or another program) listening there? \
                 (`ss -ltnp 'sport = :{}'` shows which)",
                addr.port()
            ))
        } else {
            Error::config(format!("{key} {addr}: {e}"))
        }
    })
}

/// Applies a re-read config (SIGHUP): certificates, CRL, roles, policies,
/// admins and limits take effect for new requests and connections; open
/// connections continue. Databases are connected once at start, so their
/// changes need a restart (said loudly).
#[derive(Clone)]
pub struct Reloader {
    broker: Arc<Broker>,
    tls: server::SharedTls,
}

impl Reloader {
    pub fn reload(&self, path: &std::path::Path) -> Result<Vec<String>> {
        // logrotate moves the file and sends SIGHUP: reopen even when the
        // new config turns out to be broken.
        match self.broker.audit().reopen() {
            Ok(true) => tracing::info!("audit log reopened"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "audit log reopen failed; still writing the old file")
            }
        }
        let mut config = Config::load(path)?;
        let tls = server::tls::server_config(&config.tls)?;
        let mut warnings = server::tls::crl_warnings(&config.tls, chrono::Utc::now());
        let old = self.broker.config();
        for (name, db) in &config.databases {
            match old.databases.get(name) {
                None => warnings.push(format!(
                    "database {name:?} is new: restart the broker to connect it"
                )),
                Some(o) if o.admin_url != db.admin_url || o.kind != db.kind => warnings.push(
                    format!("database {name:?} changed: restart the broker to apply"),
                ),
                Some(_) => {}
            }
        }
        warnings.extend(restart_only_changes(&old, &config));
        // Restart-only like the rest, though read live (see above).
        config.server.name_prefix = old.server.name_prefix.clone();
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        self.broker.replace_config(Arc::new(config));
        let mut e = Event::new("credbroker:system", "reload");
        e.outcome = Some(Outcome::Ok);
        e.detail = (!warnings.is_empty()).then(|| warnings.join("; "));
        self.broker.audit().append(e)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(server: &str, tail: &str) -> Config {
        let text = format!(
            "admins = [\"spiffe://credbroker.dev/dba/*\"]\n\n\
             [server]\nlisten = \"127.0.0.1:7443\"\n{server}\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n\n\
             [databases.main]\nkind = \"postgres\"\nadmin_url = \"postgres://a@127.0.0.1:1/main\"\n\n\
             {tail}"
        );
        Config::parse(&text, std::path::Path::new("/tmp")).unwrap()
    }

    /// A SIGHUP that changes what the listeners read at start says so
    /// (it used to say "configuration reloaded" and keep the old values).
    #[test]
    fn restart_only_keys_changed_at_sighup_are_named() {
        let old = config("", "");
        assert!(restart_only_changes(&old, &config("", "")).is_empty());
        let new = config(
            "metrics_listen = \"127.0.0.1:9464\"\nmax_connections_per_identity = 5\n\
             name_prefix = \"other_\"\n",
            "[console]\nlisten = \"127.0.0.1:8443\"\n\n\
             [store]\nurl = \"sqlite:///var/lib/other/leases.db\"\n\n\
             [audit]\npath = \"/var/log/other/audit.log\"\n",
        );
        let said = restart_only_changes(&old, &new).join("; ");
        for key in [
            "server.metrics_listen",
            "server.max_connections_per_identity",
            "[console]",
            "server.name_prefix",
            "store.url",
            "[audit]",
        ] {
            assert!(said.contains(&format!("{key} changed: restart")), "{said}");
        }
        assert!(!said.contains("server.listen "), "{said}");
        assert!(!said.contains("store.password"), "{said}");
        // Keys read live are not restart-only.
        let live = config(
            "",
            "[store]\nurl = \"sqlite://credbroker.db\"\nretention = \"1h\"\n\
             prune_interval = \"5m\"\n",
        );
        assert!(restart_only_changes(&old, &live).is_empty());
    }
}
