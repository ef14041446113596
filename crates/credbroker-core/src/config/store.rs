//! `[store]`, `[audit]` and `[reaper]`: where leases are kept, where the
//! audit log goes, and how expiry is worked off, validated.

use super::*;

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `sqlite://path` or `postgres://…` (never with a password in it).
    /// libpq's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`,
    /// `sslkey`) may be in it; relative paths there are made absolute
    /// against the config file's directory.
    pub url: StoreUrl,
    /// The PostgreSQL store's password, read when the store connects.
    pub password: SecretSource,
    /// How long a replica's claim on a lease's revocation lasts before
    /// another replica may take it over (its holder may have died).
    pub claim_timeout: Duration,
    /// How long revoked rows stay in the store (for `admin leases` and
    /// look-ups of past leases) before the pruner deletes them; the audit
    /// log is the lasting record. Bounds the store's size.
    pub retention: Duration,
    /// How often the pruner looks for revoked rows past `retention`.
    pub prune_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// fsync after each record an answer waits for, so a power loss cannot
    /// take a record whose request was answered. Off by default: every
    /// record is already one `write` to an `O_APPEND` file before the
    /// reply, which survives a crash of the broker (not of the machine).
    pub fsync: bool,
    /// Rotate the log to `<path>.<last seq>` at this size; the hash chain
    /// continues into the new file. None: one file (reopened on SIGHUP for
    /// logrotate).
    pub rotate_size: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// Most leases revoked in one database transaction.
    pub batch_size: usize,
    /// How long a pending intent may stay unresolved before the reaper
    /// treats its issuer as dead and drops whatever it made.
    pub intent_grace: Duration,
    /// How often to look for broker-named users without a live lease.
    pub orphan_sweep_interval: Duration,
    /// Failed revocations after which a lease shows as `failing`.
    pub failing_after_attempts: u32,
    /// Longest pause between two revocation attempts.
    pub max_backoff: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) url: String,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_env: Option<String>,
    pub(super) claim_timeout: Option<String>,
    pub(super) retention: Option<String>,
    pub(super) prune_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) path: PathBuf,
    #[serde(default)]
    pub(super) fsync: bool,
    /// "64MiB", "1GB", or bytes.
    pub(super) rotate_size: Option<String>,
    /// A TOML key written after `[audit]` lands in this table; DESIGN.md's
    /// sample does exactly that with `admins`, so accept it here too.
    #[serde(default)]
    pub(super) admins: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReaper {
    pub(super) batch_size: Option<usize>,
    pub(super) intent_grace: Option<String>,
    pub(super) orphan_sweep_interval: Option<String>,
    pub(super) failing_after_attempts: Option<u32>,
    pub(super) max_backoff: Option<String>,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            url: "sqlite://credbroker.db".to_string(),
            password_file: None,
            password_env: None,
            claim_timeout: None,
            retention: None,
            prune_interval: None,
        }
    }
}

impl RawStore {
    pub(super) fn validate(self, base: &Path) -> Result<StoreConfig> {
        let password = secret_source(
            "store",
            "password",
            self.password_file,
            self.password_env,
            base,
        )?;
        let url = StoreUrl::parse(&self.url, base)?;
        if matches!(url, StoreUrl::Sqlite(_)) && password != SecretSource::None {
            return Err(cfg_err(
                "store.password_file/password_env only apply to a postgres:// store".to_string(),
            ));
        }
        let claim_timeout = opt_duration(
            "store.claim_timeout",
            self.claim_timeout.as_ref(),
            Duration::from_secs(60),
        )?;
        if claim_timeout < Duration::from_secs(1) {
            return Err(cfg_err("store.claim_timeout: at least 1s".to_string()));
        }
        let retention = opt_duration(
            "store.retention",
            self.retention.as_ref(),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        let prune_interval = opt_duration(
            "store.prune_interval",
            self.prune_interval.as_ref(),
            Duration::from_secs(600),
        )?;
        if retention < Duration::from_secs(1) || prune_interval < Duration::from_secs(1) {
            return Err(cfg_err(
                "store.retention and store.prune_interval: at least 1s".to_string(),
            ));
        }
        Ok(StoreConfig {
            url,
            password,
            claim_timeout,
            retention,
            prune_interval,
        })
    }
}

impl RawAudit {
    pub(super) fn validate(self, base: &Path) -> Result<AuditConfig> {
        let rotate_size = self
            .rotate_size
            .as_deref()
            .map(|v| {
                parse_size(v).filter(|n| *n >= 4096).ok_or_else(|| {
                    cfg_err(format!(
                        "audit.rotate_size {v:?}: a size of at least 4KiB, like \"64MiB\" or \"1GB\""
                    ))
                })
            })
            .transpose()?;
        Ok(AuditConfig {
            path: resolve(base, &self.path),
            fsync: self.fsync,
            rotate_size,
        })
    }
}

impl RawReaper {
    pub(super) fn validate(self) -> Result<ReaperConfig> {
        Ok(ReaperConfig {
            batch_size: self.batch_size.unwrap_or(500).clamp(1, 10_000),
            intent_grace: opt_duration(
                "reaper.intent_grace",
                self.intent_grace.as_ref(),
                Duration::from_secs(60),
            )?,
            orphan_sweep_interval: opt_duration(
                "reaper.orphan_sweep_interval",
                self.orphan_sweep_interval.as_ref(),
                Duration::from_secs(300),
            )?,
            failing_after_attempts: self.failing_after_attempts.unwrap_or(8).max(1),
            max_backoff: opt_duration(
                "reaper.max_backoff",
                self.max_backoff.as_ref(),
                Duration::from_secs(300),
            )?,
        })
    }
}

/// Where the lease store lives. `sqlite://PATH` (one broker) or a
/// PostgreSQL connection string as libpq takes it (replicas share it; one
/// host or several, URL or key=value; TLS parameters normalised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl StoreUrl {
    /// Parses `store.url`; relative paths (the SQLite file, TLS files) are
    /// made absolute against `base`.
    pub fn parse(url: &str, base: &Path) -> Result<Self> {
        if let Some(p) = url.strip_prefix("sqlite://") {
            return Ok(StoreUrl::Sqlite(resolve(base, Path::new(p))));
        }
        if connstr::looks_like_postgres(url) {
            let normalized = connstr::normalize(url, base).map_err(|e| match e {
                ConnStrError::Password => cfg_err(
                    "store.url: must not contain a password; use store.password_file or store.password_env"
                        .to_string(),
                ),
                e => cfg_err(format!("store.url: {e}")),
            })?;
            return Ok(StoreUrl::Postgres(normalized));
        }
        Err(cfg_err(format!(
            "store.url {url:?}: expected sqlite://PATH, postgres://… (one host or several) or \
             libpq key=value words (host=… dbname=…)"
        )))
    }

    /// A store that several replicas can share.
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreUrl::Postgres(_))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            StoreUrl::Postgres(u) => f.write_str(u),
        }
    }
}
