//! `[databases.NAME]` and `[roles.NAME]`: the target databases and the
//! roles leased on them, validated.

use super::*;

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub name: String,
    pub kind: BackendKind,
    /// Connection string for the broker's own admin account, without
    /// password: for PostgreSQL a URL with one host or several, or libpq
    /// key=value words (see `connstr`); for MySQL a single-host URL. TLS
    /// parameters may be in it (see `dbtls`), with relative paths already
    /// made absolute against the config file's directory.
    pub admin_url: String,
    pub admin_password: SecretSource,
    /// Host handed to clients in their DSN, when not the admin URL's host.
    pub client_host: Option<String>,
    pub client_port: Option<u16>,
    /// TLS that leased credentials tell clients to use (`sslmode` in the
    /// DSN, `PGSSLMODE`, JDBC `sslmode`, MySQL `ssl-mode`). `None` leaves
    /// it to the client's defaults.
    pub client_sslmode: Option<SslMode>,
    /// The CA file *on the client's machine* that goes with
    /// `client_sslmode` (`sslrootcert`, `PGSSLROOTCERT`, MySQL `ssl-ca`);
    /// not read by the broker.
    pub client_sslrootcert: Option<String>,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    /// PBKDF2 rounds of the SCRAM verifier the broker computes (PostgreSQL).
    /// Key stretching protects guessable passwords; ours are 238 random
    /// bits, so one round loses nothing and keeps issuance fast for the
    /// server (which re-runs PBKDF2 at this count) and every client login.
    pub scram_iterations: u32,
}

/// `host = "caller"` on a MySQL role: the account is `'user'@'<caller's
/// address>'`, so the credential logs in only from the machine that
/// leased it (as the database sees it: through NAT or a proxy, that is
/// the last hop's address). A static role's host may not be it. Here, not
/// in `broker` (which re-exports it), so that `config` imports nothing
/// above it.
pub const CALLER_HOST: &str = "caller";

#[derive(Debug, Clone)]
pub struct RoleConfig {
    pub name: String,
    pub database: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub allowed: Vec<IdentityPattern>,
    /// Caller networks (the TCP peer address) that may issue and renew;
    /// empty: any address.
    pub allowed_networks: Vec<crate::policy::Network>,
    /// SQL run after the user is created; `{{name}}` becomes the quoted user.
    pub grants: Vec<String>,
    /// MySQL account host (`%` by default, e.g. `10.0.0.%` to pin a network;
    /// `caller`: the leasing caller's own address, see [`CALLER_HOST`]).
    pub host: String,
    /// Most live leases one identity may hold on this role.
    pub max_leases_per_identity: Option<u32>,
    /// Issues per second one identity may make on this role (token bucket).
    pub issue_rate: Option<f64>,
    pub issue_burst: Option<u32>,
    /// Who inherits what a leased user creates (invariant 7). PostgreSQL: a
    /// role the leased user becomes a member of (so `SET ROLE owner`
    /// works); MySQL: the account (`name` or `name@host`) that becomes
    /// the DEFINER of its views and routines. `None`: the broker's admin.
    pub owner: Option<String>,
    /// This role's own `drain_deadline`, when set; see
    /// [`Config::drain_deadline`] for the one a handover uses.
    pub drain_deadline: Option<Duration>,
}

/// Upper bound for any TTL: a "short-lived" credential living longer than
/// this is a configuration mistake.
pub const ABSOLUTE_MAX_TTL: Duration = Duration::from_secs(31 * 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) kind: String,
    pub(super) admin_url: String,
    pub(super) admin_password_file: Option<PathBuf>,
    pub(super) admin_password_env: Option<String>,
    pub(super) client_host: Option<String>,
    pub(super) client_port: Option<u16>,
    pub(super) client_sslmode: Option<String>,
    pub(super) client_sslrootcert: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) connect_timeout: Option<String>,
    pub(super) statement_timeout: Option<String>,
    pub(super) scram_iterations: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRole {
    pub(super) database: String,
    pub(super) default_ttl: String,
    pub(super) max_ttl: String,
    #[serde(default)]
    pub(super) allowed: Vec<String>,
    pub(super) allowed_networks: Option<Vec<String>>,
    #[serde(default)]
    pub(super) grants: Vec<String>,
    pub(super) host: Option<String>,
    pub(super) max_leases_per_identity: Option<u32>,
    pub(super) issue_rate: Option<f64>,
    pub(super) issue_burst: Option<u32>,
    pub(super) owner: Option<String>,
    pub(super) drain_deadline: Option<String>,
}

impl RawDatabase {
    pub(super) fn validate(self, name: String, base: &Path) -> Result<DatabaseConfig> {
        if !valid_key(&name) {
            return Err(cfg_err(format!(
                "databases.{name}: names use a-z, 0-9, '-', '_', '.'"
            )));
        }
        let what = |k: &str| format!("databases.{name}.{k}");
        // The parse error's own text, not its Display: that would say
        // "config: " a second time inside this one.
        let kind = BackendKind::parse(&self.kind).map_err(|e| {
            let text = match &e {
                Error::Config(d) => d.message().to_string(),
                other => other.to_string(),
            };
            cfg_err(format!("{}: {text}", what("kind")))
        })?;
        let no_password = || {
            cfg_err(format!(
                "{}: must not contain a password; use admin_password_file or admin_password_env",
                what("admin_url")
            ))
        };
        let scheme = self.admin_url.split_once("://").map(|(s, _)| s);
        let admin_url = match kind {
            // libpq's forms: a URL with one host or several, or key=value.
            BackendKind::Postgres => {
                if scheme.is_some_and(|s| !matches!(s, "postgres" | "postgresql")) {
                    return Err(cfg_err(format!(
                        "{}: scheme {:?} does not match kind \"postgres\"",
                        what("admin_url"),
                        scheme.unwrap_or_default()
                    )));
                }
                connstr::normalize(&self.admin_url, base).map_err(|e| match e {
                    ConnStrError::Password => no_password(),
                    e => cfg_err(format!("{}: {e}", what("admin_url"))),
                })?
            }
            BackendKind::Mysql => {
                if let Some(why) = connstr::mysql_host_count_error(&self.admin_url) {
                    return Err(cfg_err(format!("{}: {why}", what("admin_url"))));
                }
                let url = url::Url::parse(&self.admin_url)
                    .map_err(|e| cfg_err(format!("{}: {e}", what("admin_url"))))?;
                if !matches!(url.scheme(), "mysql" | "mariadb") {
                    return Err(cfg_err(format!(
                        "{}: scheme {:?} does not match kind \"mysql\"",
                        what("admin_url"),
                        url.scheme()
                    )));
                }
                if url.password().is_some() {
                    return Err(no_password());
                }
                dbtls::normalize_url(&self.admin_url, Dialect::Mysql, base)
                    .map_err(|e| cfg_err(format!("{}: {e}", what("admin_url"))))?
            }
        };
        let client_sslmode = self
            .client_sslmode
            .as_deref()
            .map(|m| {
                SslMode::parse(m).ok_or_else(|| {
                    cfg_err(format!(
                        "{}: {m:?}: expected disable, prefer, require, verify-ca or verify-full",
                        what("client_sslmode")
                    ))
                })
            })
            .transpose()?;
        if self.client_sslrootcert.is_some() && client_sslmode.is_none() {
            return Err(cfg_err(format!(
                "{}: set client_sslmode too (e.g. \"verify-full\")",
                what("client_sslrootcert")
            )));
        }
        if let Some(root) = &self.client_sslrootcert {
            if root.is_empty() || root.chars().any(char::is_control) {
                return Err(cfg_err(format!(
                    "{}: not a path",
                    what("client_sslrootcert")
                )));
            }
        }
        let admin_password = secret_source(
            &format!("databases.{name}"),
            "admin_password",
            self.admin_password_file,
            self.admin_password_env,
            base,
        )?;
        let scram_iterations = self.scram_iterations.unwrap_or(1);
        if scram_iterations == 0 || scram_iterations > 1_000_000 {
            return Err(cfg_err(format!(
                "{}: must be 1..=1000000",
                what("scram_iterations")
            )));
        }
        Ok(DatabaseConfig {
            kind,
            admin_url,
            admin_password,
            client_host: self.client_host,
            client_port: self.client_port,
            client_sslmode,
            client_sslrootcert: self.client_sslrootcert,
            max_connections: self.max_connections.unwrap_or(16).clamp(1, 512),
            connect_timeout: opt_duration(
                &what("connect_timeout"),
                self.connect_timeout.as_ref(),
                Duration::from_secs(3),
            )?,
            statement_timeout: opt_duration(
                &what("statement_timeout"),
                self.statement_timeout.as_ref(),
                Duration::from_secs(5),
            )?,
            scram_iterations,
            name,
        })
    }
}

impl RawRole {
    pub(super) fn validate(
        self,
        name: String,
        databases: &BTreeMap<String, DatabaseConfig>,
    ) -> Result<RoleConfig> {
        if !valid_key(&name) {
            return Err(cfg_err(format!(
                "roles.{name}: names use a-z, 0-9, '-', '_', '.'"
            )));
        }
        let what = |k: &str| format!("roles.{name}.{k}");
        let Some(db) = databases.get(&self.database) else {
            return Err(cfg_err(format!(
                "{}: no [databases.{}] is configured",
                what("database"),
                self.database
            )));
        };
        let default_ttl = parse_duration(&what("default_ttl"), &self.default_ttl)?;
        let max_ttl = parse_duration(&what("max_ttl"), &self.max_ttl)?;
        if default_ttl.is_zero() || max_ttl.is_zero() {
            return Err(cfg_err(format!("roles.{name}: TTLs must be positive")));
        }
        if default_ttl > max_ttl {
            return Err(cfg_err(format!(
                "roles.{name}: default_ttl exceeds max_ttl"
            )));
        }
        if max_ttl > ABSOLUTE_MAX_TTL {
            return Err(cfg_err(format!("{}: at most 31 days", what("max_ttl"))));
        }
        let allowed = allowed_patterns(&what("allowed"), &self.allowed, "lease this role")?;
        let allowed_networks = networks(
            &what("allowed_networks"),
            &self.allowed_networks,
            "nobody could lease this role",
        )?;
        for g in &self.grants {
            if !g.contains("{{name}}") {
                return Err(cfg_err(format!(
                    "{}: {g:?} does not mention {{{{name}}}}, so it would not apply to the leased user",
                    what("grants")
                )));
            }
        }
        let host = self.host.unwrap_or_else(|| "%".to_string());
        if !is_host_pattern(&host) {
            return Err(cfg_err(format!(
                "{}: {host:?} is not a MySQL host pattern",
                what("host")
            )));
        }
        if db.kind == BackendKind::Postgres && host != "%" {
            return Err(cfg_err(format!(
                "{}: only MySQL accounts have a host part; for PostgreSQL use pg_hba.conf",
                what("host")
            )));
        }
        if let Some(owner) = &self.owner {
            if !is_role_name(owner) {
                return Err(cfg_err(format!(
                    "{}: {owner:?} is not a role or account name",
                    what("owner")
                )));
            }
        }
        if let Some(rate) = self.issue_rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(cfg_err(format!(
                    "{}: must be a positive number",
                    what("issue_rate")
                )));
            }
        }
        Ok(RoleConfig {
            database: self.database,
            default_ttl,
            max_ttl,
            allowed,
            allowed_networks,
            grants: self.grants,
            host,
            max_leases_per_identity: self.max_leases_per_identity,
            issue_rate: self.issue_rate,
            issue_burst: self.issue_burst,
            owner: self.owner,
            drain_deadline: self
                .drain_deadline
                .map(|d| parse_duration(&what("drain_deadline"), &d))
                .transpose()?,
            name,
        })
    }
}

/// Whether `host` can be a MySQL account's host part (`%`, a name, an
/// address, a netmask; quoted wherever it reaches SQL).
pub(super) fn is_host_pattern(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-%_:/".contains(&b))
}

/// Whether `name` can be a role or account name. Quoted wherever it
/// reaches SQL; this only keeps out what no real role or account name
/// holds.
pub(super) fn is_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name
            .chars()
            .any(|c| c.is_control() || c == '\'' || c == '`' || c == '"')
}

pub(super) fn server_prefix_fits(prefix: &str) -> bool {
    prefix.len() + 1 + 16 < MAX_USERNAME_LEN
}
