//! TOML → a validated [`Config`]. Everything a typo can break is checked
//! here, once, so the rest of the broker works with types, not strings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::dbtls::{self, Dialect, SslMode};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, MAX_USERNAME_LEN};
use crate::policy::{IdentityPattern, Network};

pub mod static_roles;
pub use static_roles::StaticRoleConfig;

/// The whole broker configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub store: StoreConfig,
    pub audit: AuditConfig,
    pub reaper: ReaperConfig,
    /// Identities allowed to call the Admin service.
    pub admins: Vec<IdentityPattern>,
    /// Networks admin calls must come from (the TCP peer); empty: any.
    pub admin_networks: Vec<crate::policy::Network>,
    pub databases: BTreeMap<String, DatabaseConfig>,
    pub roles: BTreeMap<String, RoleConfig>,
    /// `[static_roles.NAME]`: existing users whose passwords the broker
    /// rotates (see `static_roles`).
    pub static_roles: BTreeMap<String, StaticRoleConfig>,
    /// The key that seals static-role passwords in the store
    /// (`sealing_key_file` / `sealing_key_env`); never in the store itself.
    pub sealing_key: SecretSource,
    /// The Vault-compatible HTTPS API (`[vault_api]`), when configured.
    pub vault_api: Option<VaultApiConfig>,
    /// The web console (`[console]`); off unless configured.
    pub console: Option<ConsoleConfig>,
}

/// `[console]`: the admins' web console on its own mTLS listener.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
}

/// `[vault_api]`: HashiCorp Vault's database-credentials API on a listener
/// of its own, so Vault clients switch by changing their address.
#[derive(Debug, Clone)]
pub struct VaultApiConfig {
    pub listen: SocketAddr,
    /// The path clients read credentials under (`<mount>/creds/<role>`);
    /// Vault's default for the database engine is `database`.
    pub mount: String,
    /// A token's life from login, and what each renew-self grants.
    pub token_ttl: Duration,
    /// No renewal moves a token's expiry past login + this.
    pub token_max_ttl: Duration,
    /// Most tokens one identity holds at once; a login beyond it evicts
    /// the identity's token nearest its expiry (see
    /// [`crate::store::LeaseStore::insert_vault_token`]).
    pub max_tokens_per_identity: u32,
}

/// `server.max_connections` unless set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// One identity's (and one source's) share is the listener's cap divided by
/// this unless set: eight callers at their share fill a listener, one
/// cannot.
pub const DEFAULT_SHARE_DIVISOR: usize = 8;
/// `server.ipv6_source_prefix` unless set: what one host or site is
/// usually given.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Every user the broker makes starts with this; the orphan sweep only
    /// ever touches names with it.
    pub name_prefix: String,
    /// How long a SIGTERM waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Connections are closed after this long so a client whose certificate
    /// was revoked must handshake again.
    pub max_connection_age: Duration,
    /// An HTTP request's head must arrive within this, and its body within
    /// this again; a request still arriving then ends its connection (408).
    pub request_timeout: Duration,
    /// Most open connections per listener (gRPC, Vault API, console).
    pub max_connections: usize,
    /// Most of a listener's connections one identity holds; past it that
    /// identity's new connections are closed, nobody else's.
    pub max_connections_per_identity: usize,
    /// Most of a listener's connections one source holds (an IPv4 address,
    /// an IPv6 network of `ipv6_source_prefix` bits).
    pub max_connections_per_source: usize,
    /// IPv6 sources are counted per network of this many bits (64: one
    /// host's usual allotment), for the connection shares and the
    /// per-source handshake cap.
    pub ipv6_source_prefix: u8,
    /// How long a routine handover's replaced credential may drain
    /// (`revocation::drain`) before what is left of its sessions is ended
    /// and it is dropped; a role may set its own (`[roles.X]
    /// drain_deadline`). "0s": no draining, handovers revoke at once.
    pub drain_deadline: Duration,
}

/// `server.drain_deadline` unless set: long enough for a query or a
/// transaction a pool has in flight to finish, short enough that a pool
/// which never lets go is not kept waiting for.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
    /// A CRL past its nextUpdate refuses every client (true, the default)
    /// or is used anyway with a loud warning at every load (`crl_expired =
    /// "warn"`), for CAs that publish late.
    pub refuse_expired_crl: bool,
}

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

/// Where a database's admin password comes from. The value itself is read
/// by the backend when it connects and never stored in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    None,
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Reads the secret into a zeroizing [`crate::lease::Password`]. `key`
    /// names the config key it came from (`store.password`,
    /// `databases.orders.admin_password`) for the error message.
    pub fn read(&self, key: &str) -> Result<Option<crate::lease::Password>> {
        use crate::lease::Password;
        match self {
            SecretSource::None => Ok(None),
            SecretSource::File(path) => read_secret_file(path)
                .map(|t| Some(Password::from_secret(t)))
                .map_err(|e| Error::config(format!("{key}_file {}: {e}", path.display()))),
            SecretSource::Env(var) => std::env::var(var)
                .map(|v| Some(Password::from_secret(v)))
                .map_err(|_| Error::config(format!("{key}_env: ${var} is not set"))),
        }
    }
}

/// A secret file's text without its trailing line end, read so that no
/// copy of it is left behind un-wiped: one buffer of the file's size
/// (`fs::read` reserves exactly that, so it never grows and leaves an old
/// block behind), wiped on every error path, cut in place and moved — not
/// copied — into the caller's zeroizing wrapper.
fn read_secret_file(path: &Path) -> std::io::Result<String> {
    let mut bytes = zeroize::Zeroizing::new(std::fs::read(path)?);
    let keep = bytes
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\r'))
        .map_or(0, |i| i + 1);
    bytes.truncate(keep);
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(text),
        Err(e) => {
            drop(zeroize::Zeroizing::new(e.into_bytes()));
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub name: String,
    pub kind: BackendKind,
    /// Connection URL for the broker's own admin account, without password.
    /// TLS parameters may be in its query (see `dbtls`), with relative
    /// paths already made absolute against the config file's directory.
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

impl Config {
    /// How long a handover of a `role` lease drains: the role's own
    /// `drain_deadline`, else `server.drain_deadline`, never longer than
    /// the role's `max_ttl` — a lease's whole life (see
    /// [`Config::drain_clamps`]). A removed role drains by the server's.
    pub fn drain_deadline(&self, role: &str) -> Duration {
        match self.roles.get(role) {
            Some(r) => r
                .drain_deadline
                .unwrap_or(self.server.drain_deadline)
                .min(r.max_ttl),
            None => self.server.drain_deadline,
        }
    }

    /// How long a static role's previous user drains once its overlap is
    /// over (`static_roles`): `server.drain_deadline`, but never into the
    /// next rotation, which targets that user again (alternating users) —
    /// so at most `rotation_period - overlap`. Zero (retired at once, as
    /// before) without `end_sessions` or with a single user.
    pub fn static_drain_deadline(&self, r: &StaticRoleConfig) -> Duration {
        if !r.end_sessions || !r.alternating() {
            return Duration::ZERO;
        }
        self.server
            .drain_deadline
            .min(r.rotation_period.saturating_sub(r.overlap))
    }

    /// One start-up warning per role whose drain deadline (its own or the
    /// server's) is longer than its `max_ttl` and so is clamped to it, and
    /// per static role whose overlap leaves less room to drain than
    /// `server.drain_deadline`.
    pub fn drain_clamps(&self) -> Vec<String> {
        let statics = self.static_roles.values().filter_map(|r| {
            let room = self.static_drain_deadline(r);
            (r.end_sessions && r.alternating() && room < self.server.drain_deadline).then(|| {
                format!(
                    "static_roles.{}: the previous user is the next rotation's target \
                     rotation_period - overlap ({}) after its overlap ends, so its sessions drain \
                     for at most that, not server.drain_deadline ({}){}",
                    r.name,
                    humantime::format_duration(room),
                    humantime::format_duration(self.server.drain_deadline),
                    if room.is_zero() {
                        "; they are ended at once: shorten overlap to let them drain"
                    } else {
                        ""
                    }
                )
            })
        });
        let leases = self.roles.values().filter_map(|r| {
            let (d, key) = match r.drain_deadline {
                Some(d) => (d, format!("roles.{}.drain_deadline", r.name)),
                None => (self.server.drain_deadline, "server.drain_deadline".into()),
            };
            (d > r.max_ttl).then(|| {
                format!(
                    "{key} ({}) is longer than role {:?}'s max_ttl ({}); its handovers drain \
                         for at most {} (a drain never outlives the lease's hard limit)",
                    humantime::format_duration(d),
                    r.name,
                    humantime::format_duration(r.max_ttl),
                    humantime::format_duration(r.max_ttl)
                )
            })
        });
        leases.chain(statics).collect()
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base)
    }

    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).map_err(Error::config)?;
        raw.validate(base)
    }

    pub fn role(&self, name: &str) -> Option<&RoleConfig> {
        self.roles.get(name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    admins: Vec<String>,
    admin_networks: Option<Vec<String>>,
    server: RawServer,
    tls: RawTls,
    #[serde(default)]
    store: Option<RawStore>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default)]
    reaper: Option<RawReaper>,
    #[serde(default)]
    databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    static_roles: BTreeMap<String, static_roles::RawStaticRole>,
    sealing_key_file: Option<PathBuf>,
    sealing_key_env: Option<String>,
    vault_api: Option<RawVaultApi>,
    #[serde(default)]
    console: Option<RawConsole>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    listen: String,
}

impl RawConsole {
    fn validate(self, server: &ServerConfig) -> Result<ConsoleConfig> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| cfg_err(format!("console.listen {:?}: {e}", self.listen)))?;
        if listen == server.listen || Some(listen) == server.metrics_listen {
            return Err(cfg_err(format!(
                "console.listen {listen}: already used by [server]; give the console a port of its own"
            )));
        }
        Ok(ConsoleConfig { listen })
    }
}

/// `[vault_api] max_tokens_per_identity` unless set: room for a few
/// dozen clients (or restarts within `token_ttl`) of one identity, while
/// a login flood leaves at most this many rows per identity in the store.
pub const DEFAULT_MAX_TOKENS_PER_IDENTITY: u32 = 32;
/// The largest `max_tokens_per_identity` taken: beyond it the cap bounds
/// nothing a store would notice.
const MAX_TOKENS_PER_IDENTITY_LIMIT: u32 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVaultApi {
    listen: String,
    mount: Option<String>,
    token_ttl: Option<String>,
    token_max_ttl: Option<String>,
    max_tokens_per_identity: Option<i64>,
}

impl RawVaultApi {
    fn validate(self, grpc: SocketAddr) -> Result<VaultApiConfig> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| Error::config(format!("vault_api.listen {:?}: {e}", self.listen)))?;
        if listen == grpc && listen.port() != 0 {
            return Err(Error::config(format!(
                "vault_api.listen {listen} is server.listen too; give it a port of its own"
            )));
        }
        let mount = self.mount.unwrap_or_else(|| "database".to_string());
        // One path segment: clients put it between `/v1/` and `/creds/`.
        if !valid_key(&mount) {
            return Err(Error::config(format!(
                "vault_api.mount {mount:?}: use 1-64 characters of a-z, A-Z, 0-9, '-', '_', '.' (e.g. \"database\")"
            )));
        }
        if mount == "sys" || mount == "auth" {
            return Err(Error::config(format!(
                "vault_api.mount {mount:?} is a path Vault reserves; choose another (e.g. \"database\")"
            )));
        }
        let token_ttl = opt_duration(
            "vault_api.token_ttl",
            self.token_ttl.as_ref(),
            Duration::from_secs(3600),
        )?;
        let token_max_ttl = opt_duration(
            "vault_api.token_max_ttl",
            self.token_max_ttl.as_ref(),
            Duration::from_secs(24 * 3600),
        )?;
        if token_ttl < Duration::from_secs(1) {
            return Err(Error::Config("vault_api.token_ttl: at least 1s".into()));
        }
        if token_max_ttl < token_ttl {
            return Err(Error::config(format!(
                "vault_api.token_max_ttl ({}) is shorter than vault_api.token_ttl ({})",
                humantime::format_duration(token_max_ttl),
                humantime::format_duration(token_ttl)
            )));
        }
        let max_tokens_per_identity = match self.max_tokens_per_identity {
            None => DEFAULT_MAX_TOKENS_PER_IDENTITY,
            Some(n) if (1..=i64::from(MAX_TOKENS_PER_IDENTITY_LIMIT)).contains(&n) => n as u32,
            Some(n) => {
                return Err(Error::config(format!(
                    "vault_api.max_tokens_per_identity = {n}: use 1 to {MAX_TOKENS_PER_IDENTITY_LIMIT} \
                     (default {DEFAULT_MAX_TOKENS_PER_IDENTITY}); at least the number of clients \
                     that share one identity"
                )))
            }
        };
        Ok(VaultApiConfig {
            listen,
            mount,
            token_ttl,
            token_max_ttl,
            max_tokens_per_identity,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    metrics_listen: Option<String>,
    name_prefix: Option<String>,
    shutdown_grace: Option<String>,
    max_connection_age: Option<String>,
    request_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_identity: Option<usize>,
    max_connections_per_source: Option<usize>,
    ipv6_source_prefix: Option<u8>,
    drain_deadline: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<PathBuf>,
    /// "refuse" (default) or "warn".
    crl_expired: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: String,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    claim_timeout: Option<String>,
    retention: Option<String>,
    prune_interval: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: PathBuf,
    #[serde(default)]
    fsync: bool,
    /// "64MiB", "1GB", or bytes.
    rotate_size: Option<String>,
    /// A TOML key written after `[audit]` lands in this table; DESIGN.md's
    /// sample does exactly that with `admins`, so accept it here too.
    #[serde(default)]
    admins: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReaper {
    batch_size: Option<usize>,
    intent_grace: Option<String>,
    orphan_sweep_interval: Option<String>,
    failing_after_attempts: Option<u32>,
    max_backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    kind: String,
    admin_url: String,
    admin_password_file: Option<PathBuf>,
    admin_password_env: Option<String>,
    client_host: Option<String>,
    client_port: Option<u16>,
    client_sslmode: Option<String>,
    client_sslrootcert: Option<String>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    statement_timeout: Option<String>,
    scram_iterations: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    database: String,
    default_ttl: String,
    max_ttl: String,
    #[serde(default)]
    allowed: Vec<String>,
    allowed_networks: Option<Vec<String>>,
    #[serde(default)]
    grants: Vec<String>,
    host: Option<String>,
    max_leases_per_identity: Option<u32>,
    issue_rate: Option<f64>,
    issue_burst: Option<u32>,
    owner: Option<String>,
    drain_deadline: Option<String>,
}

pub fn parse_duration(what: &str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        Error::config(format!(
            "{what}: {s:?} is not a duration ({e}); use e.g. \"15m\""
        ))
    })
}

fn opt_duration(what: &str, s: Option<&String>, default: Duration) -> Result<Duration> {
    s.map(|s| parse_duration(what, s))
        .transpose()
        .map(|d| d.unwrap_or(default))
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub(crate) fn valid_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn cfg_err(m: String) -> Error {
    Error::config(m)
}

/// The one reading of a `<key>_file` / `<key>_env` pair, for the
/// databases' admin passwords, the store's password and the sealing key.
/// `section` prefixes the message ("" for a top-level key).
fn secret_source(
    section: &str,
    key: &str,
    file: Option<PathBuf>,
    env: Option<String>,
    base: &Path,
) -> Result<SecretSource> {
    match (file, env) {
        (Some(_), Some(_)) => {
            let both = format!("set {key}_file or {key}_env, not both");
            Err(cfg_err(if section.is_empty() {
                both
            } else {
                format!("{section}: {both}")
            }))
        }
        (Some(f), None) => Ok(SecretSource::File(resolve(base, &f))),
        (None, Some(e)) => Ok(SecretSource::Env(e)),
        (None, None) => Ok(SecretSource::None),
    }
}

/// A list of CIDR networks under `key`: written but empty would refuse
/// everyone, which is surely a mistake.
fn networks(key: &str, list: &Option<Vec<String>>, empty_means: &str) -> Result<Vec<Network>> {
    match list {
        Some(n) if n.is_empty() => Err(cfg_err(format!(
            "{key}: empty, so {empty_means}; list networks or leave the key out"
        ))),
        Some(n) => n
            .iter()
            .map(|s| Network::parse(s).map_err(|e| e.config(key)))
            .collect(),
        None => Ok(Vec::new()),
    }
}

impl RawConfig {
    /// Each section validates itself; what crosses sections (a role's
    /// database, the admins listed under `[audit]`) is checked here.
    fn validate(self, base: &Path) -> Result<Config> {
        let server = self.server.validate()?;
        let tls = self.tls.validate(base)?;
        let store = self.store.unwrap_or_default().validate(base)?;
        let mut admin_patterns = self.admins;
        let audit = match self.audit {
            Some(a) => {
                admin_patterns.extend(a.admins.iter().cloned());
                a.validate(base)?
            }
            None => AuditConfig {
                path: resolve(base, Path::new("audit.log")),
                fsync: false,
                rotate_size: None,
            },
        };
        let admins = admin_patterns
            .iter()
            .map(|p| identity_pattern("admins", p))
            .collect::<Result<Vec<_>>>()?;
        let admin_networks = networks(
            "admin_networks",
            &self.admin_networks,
            "no admin could call",
        )?;
        let reaper = self.reaper.unwrap_or_default().validate()?;
        let databases = self
            .databases
            .into_iter()
            .map(|(name, d)| Ok((name.clone(), d.validate(name, base)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let roles = self
            .roles
            .into_iter()
            .map(|(name, r)| Ok((name.clone(), r.validate(name, &databases)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        debug_assert!(server_prefix_fits(&server.name_prefix));
        let static_roles =
            static_roles::validate(self.static_roles, &databases, &server.name_prefix)?;
        let sealing_key = secret_source(
            "",
            "sealing_key",
            self.sealing_key_file,
            self.sealing_key_env,
            base,
        )?;
        if !static_roles.is_empty() && sealing_key == SecretSource::None {
            return Err(cfg_err(
                "static_roles need a sealing key: set sealing_key_file or sealing_key_env (32 random bytes, hex or base64)"
                    .to_string(),
            ));
        }
        let vault_api = self
            .vault_api
            .map(|v| v.validate(server.listen))
            .transpose()?;
        if let (Some(v), Some(m)) = (&vault_api, server.metrics_listen) {
            if v.listen == m && m.port() != 0 {
                return Err(cfg_err(format!(
                    "vault_api.listen {m} is server.metrics_listen too; give it a port of its own"
                )));
            }
        }
        let console = self.console.map(|c| c.validate(&server)).transpose()?;
        if let (Some(c), Some(v)) = (&console, &vault_api) {
            if c.listen == v.listen && c.listen.port() != 0 {
                return Err(cfg_err(format!(
                    "console.listen {}: already used by [vault_api]; give the console a port of its own",
                    c.listen
                )));
            }
        }
        Ok(Config {
            server,
            tls,
            store,
            audit,
            reaper,
            admins,
            admin_networks,
            databases,
            roles,
            static_roles,
            sealing_key,
            vault_api,
            console,
        })
    }
}

impl RawServer {
    fn validate(self) -> Result<ServerConfig> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| cfg_err(format!("server.listen {:?}: {e}", self.listen)))?;
        let metrics_listen = self
            .metrics_listen
            .as_deref()
            .map(|s| {
                s.parse()
                    .map_err(|e| cfg_err(format!("server.metrics_listen {s:?}: {e}")))
            })
            .transpose()?;
        let name_prefix = self.name_prefix.unwrap_or_else(|| "cb_".to_string());
        // Ending in `_`, with no `_` in the role fragment that follows it,
        // makes the user names of two brokers with different prefixes
        // disjoint even when one prefix starts the other (`cb_` and
        // `cb_b_`): neither broker's sweep can take the other's users for
        // its own.
        let prefix_ok = name_prefix.len() >= 2
            && name_prefix.len() <= 6
            && name_prefix.ends_with('_')
            && name_prefix.as_bytes()[0].is_ascii_lowercase()
            && name_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !prefix_ok {
            return Err(cfg_err(format!(
                "server.name_prefix {name_prefix:?}: use 2-6 characters of a-z, 0-9 and _, starting with a letter and ending with _ (e.g. \"cb_\")"
            )));
        }
        let request_timeout = opt_duration(
            "server.request_timeout",
            self.request_timeout.as_ref(),
            Duration::from_secs(10),
        )?;
        if request_timeout < Duration::from_secs(1) || request_timeout > Duration::from_secs(600) {
            return Err(cfg_err(format!(
                "server.request_timeout {}: between 1s and 10m (e.g. \"10s\")",
                humantime::format_duration(request_timeout)
            )));
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(cfg_err(format!(
                "server.max_connections {max_connections}: between 1 and 1000000 (e.g. 1024)"
            )));
        }
        let share = |key: &str, given: Option<usize>| -> Result<usize> {
            let n = given.unwrap_or((max_connections / DEFAULT_SHARE_DIVISOR).max(1));
            if n == 0 || n > max_connections {
                return Err(cfg_err(format!(
                    "server.{key} {n}: between 1 and server.max_connections ({max_connections}); \
                     at most a fraction of it, or one caller can take the whole listener"
                )));
            }
            Ok(n)
        };
        let max_connections_per_identity = share(
            "max_connections_per_identity",
            self.max_connections_per_identity,
        )?;
        let max_connections_per_source = share(
            "max_connections_per_source",
            self.max_connections_per_source,
        )?;
        let ipv6_source_prefix = self.ipv6_source_prefix.unwrap_or(DEFAULT_IPV6_PREFIX);
        if !(16..=128).contains(&ipv6_source_prefix) {
            return Err(cfg_err(format!(
                "server.ipv6_source_prefix {ipv6_source_prefix}: between 16 and 128 bits (e.g. 64)"
            )));
        }
        Ok(ServerConfig {
            request_timeout,
            max_connections,
            max_connections_per_identity,
            max_connections_per_source,
            ipv6_source_prefix,
            listen,
            metrics_listen,
            name_prefix,
            shutdown_grace: opt_duration(
                "server.shutdown_grace",
                self.shutdown_grace.as_ref(),
                Duration::from_secs(10),
            )?,
            max_connection_age: opt_duration(
                "server.max_connection_age",
                self.max_connection_age.as_ref(),
                Duration::from_secs(300),
            )?,
            drain_deadline: opt_duration(
                "server.drain_deadline",
                self.drain_deadline.as_ref(),
                DEFAULT_DRAIN_DEADLINE,
            )?,
        })
    }
}

impl RawTls {
    fn validate(self, base: &Path) -> Result<TlsConfig> {
        let refuse_expired_crl = match self.crl_expired.as_deref() {
            None | Some("refuse") => true,
            Some("warn") => false,
            Some(other) => {
                return Err(cfg_err(format!(
                    "tls.crl_expired {other:?}: \"refuse\" (every client, until a fresh CRL is in place) or \"warn\""
                )))
            }
        };
        if self.crl_expired.is_some() && self.crl.is_none() {
            return Err(cfg_err(
                "tls.crl_expired: set tls.crl too; without a CRL nothing can expire".to_string(),
            ));
        }
        Ok(TlsConfig {
            cert: resolve(base, &self.cert),
            key: resolve(base, &self.key),
            client_ca: resolve(base, &self.client_ca),
            crl: self.crl.as_deref().map(|p| resolve(base, p)),
            refuse_expired_crl,
        })
    }
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
    fn validate(self, base: &Path) -> Result<StoreConfig> {
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
    fn validate(self, base: &Path) -> Result<AuditConfig> {
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
    fn validate(self) -> Result<ReaperConfig> {
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

impl RawDatabase {
    fn validate(self, name: String, base: &Path) -> Result<DatabaseConfig> {
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
        let url = url::Url::parse(&self.admin_url)
            .map_err(|e| cfg_err(format!("{}: {e}", what("admin_url"))))?;
        let scheme_ok = match kind {
            BackendKind::Postgres => matches!(url.scheme(), "postgres" | "postgresql"),
            BackendKind::Mysql => matches!(url.scheme(), "mysql" | "mariadb"),
        };
        if !scheme_ok {
            return Err(cfg_err(format!(
                "{}: scheme {:?} does not match kind {:?}",
                what("admin_url"),
                url.scheme(),
                kind.as_str()
            )));
        }
        if url.password().is_some() {
            return Err(cfg_err(format!(
                "{}: must not contain a password; use admin_password_file or admin_password_env",
                what("admin_url")
            )));
        }
        let dialect = match kind {
            BackendKind::Postgres => Dialect::Postgres,
            BackendKind::Mysql => Dialect::Mysql,
        };
        let admin_url = dbtls::normalize_url(&self.admin_url, dialect, base)
            .map_err(|e| cfg_err(format!("{}: {e}", what("admin_url"))))?;
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
    fn validate(
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
        if self.allowed.is_empty() {
            return Err(cfg_err(format!(
                "{}: empty, so nobody could lease this role; list identity patterns",
                what("allowed")
            )));
        }
        let allowed = self
            .allowed
            .iter()
            .map(|p| identity_pattern(&what("allowed"), p))
            .collect::<Result<Vec<_>>>()?;
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
        let host_ok = !host.is_empty()
            && host.len() <= 255
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-%_:/".contains(&b));
        if !host_ok {
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
            // Quoted wherever it reaches SQL; this only keeps out what no
            // real role or account name holds.
            let owner_ok = !owner.is_empty()
                && owner.len() <= 63
                && !owner
                    .chars()
                    .any(|c| c.is_control() || c == '\'' || c == '`' || c == '"');
            if !owner_ok {
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

/// Where the lease store lives. `sqlite://PATH` (one broker) or a
/// PostgreSQL URL (replicas share it; libpq TLS parameters normalised).
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
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let parsed = url::Url::parse(url)
                .map_err(|e| cfg_err(format!("store.url: not a valid URL: {e}")))?;
            if parsed.password().is_some() {
                return Err(cfg_err(
                    "store.url: must not contain a password; use store.password_file or store.password_env"
                        .to_string(),
                ));
            }
            let normalized = dbtls::normalize_url(url, Dialect::Postgres, base)
                .map_err(|e| cfg_err(format!("store.url: {e}")))?;
            return Ok(StoreUrl::Postgres(normalized));
        }
        Err(cfg_err(format!(
            "store.url {url:?}: expected sqlite://PATH or postgres://…"
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

/// An identity pattern, its error prefixed with the key it came from.
pub(crate) fn identity_pattern(key: &str, pattern: &str) -> Result<IdentityPattern> {
    IdentityPattern::new(pattern).map_err(|e| e.config(key))
}

fn server_prefix_fits(prefix: &str) -> bool {
    prefix.len() + 1 + 16 < MAX_USERNAME_LEN
}

/// "64MiB", "1GB", "4096": binary (KiB, MiB, GiB) and decimal (KB, MB,
/// GB) units, or plain bytes.
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    const SAMPLE: &str = r#"
admins = ["spiffe://example.org/dba/*"]
[server]
listen = "127.0.0.1:7443"
metrics_listen = "127.0.0.1:9464"
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
[store]
url = "sqlite://credbroker.db"
[audit]
path = "audit.log"
[databases.orders]
kind = "postgres"
admin_url = "postgres://broker_admin@127.0.0.1:5432/orders"
admin_password_file = "secrets/orders-admin"
[roles.orders-readonly]
database = "orders"
default_ttl = "15m"
max_ttl = "1h"
allowed = ["spiffe://example.org/ns/shop/*"]
grants = ["GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}"]
"#;

    #[test]
    fn store_urls_are_one_of_two_kinds() {
        let base = Path::new("/etc/credbroker");
        assert_eq!(
            StoreUrl::parse("sqlite://leases.db", base).unwrap(),
            StoreUrl::Sqlite(PathBuf::from("/etc/credbroker/leases.db"))
        );
        let pg = StoreUrl::parse("postgresql://cb@store/leases", base).unwrap();
        assert!(pg.is_shared());
        for (url, says) in [
            (
                "mysql://cb@store/leases",
                "expected sqlite://PATH or postgres://",
            ),
            (
                "postgres://cb:secret@store/leases",
                "must not contain a password",
            ),
            ("leases.db", "expected sqlite://PATH"),
        ] {
            let err = StoreUrl::parse(url, base).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn sample_parses_and_resolves_paths() {
        let c = Config::parse(SAMPLE, Path::new("/etc/credbroker")).unwrap();
        assert_eq!(c.tls.cert, Path::new("/etc/credbroker/pki/server.pem"));
        assert_eq!(
            c.store.url.to_string(),
            "sqlite:///etc/credbroker/credbroker.db"
        );
        let r = c.role("orders-readonly").unwrap();
        assert_eq!(r.max_ttl, Duration::from_secs(3600));
        assert_eq!(c.databases["orders"].scram_iterations, 1);
    }

    #[test]
    fn listener_share_keys_default_to_a_fraction_of_the_cap_and_refuse_mistakes() {
        let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
        assert_eq!(c.server.request_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_connections, 1024);
        assert_eq!(c.server.max_connections_per_identity, 128);
        assert_eq!(c.server.max_connections_per_source, 128);
        assert_eq!(c.server.ipv6_source_prefix, 64);
        let with = |keys: &str| {
            Config::parse(
                &SAMPLE.replacen("[server]\n", &format!("[server]\n{keys}\n"), 1),
                Path::new("/"),
            )
        };
        // The shares follow a changed cap unless set.
        let c = with("max_connections = 80").unwrap();
        assert_eq!(
            (
                c.server.max_connections_per_identity,
                c.server.max_connections_per_source
            ),
            (10, 10)
        );
        let c = with(
            "request_timeout = \"3s\"\nmax_connections_per_identity = 4\n\
             max_connections_per_source = 6\nipv6_source_prefix = 56",
        )
        .unwrap();
        assert_eq!(c.server.request_timeout, Duration::from_secs(3));
        assert_eq!(
            (
                c.server.max_connections_per_identity,
                c.server.max_connections_per_source,
                c.server.ipv6_source_prefix
            ),
            (4, 6, 56)
        );
        for (keys, says) in [
            ("request_timeout = \"0s\"", "server.request_timeout"),
            ("request_timeout = \"soon\"", "server.request_timeout"),
            ("max_connections = 0", "server.max_connections"),
            (
                "max_connections = 10\nmax_connections_per_identity = 11",
                "server.max_connections_per_identity",
            ),
            (
                "max_connections_per_source = 0",
                "server.max_connections_per_source",
            ),
            ("ipv6_source_prefix = 129", "server.ipv6_source_prefix"),
            ("ipv6_source_prefix = 8", "server.ipv6_source_prefix"),
        ] {
            let err = with(keys).unwrap_err().to_string();
            assert!(err.contains(says), "{keys}: {err}");
        }
    }

    #[test]
    fn vault_api_section_defaults_and_mistakes() {
        let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
        assert!(c.vault_api.is_none(), "off unless configured");
        let with = |section: &str| {
            Config::parse(&format!("{SAMPLE}[vault_api]\n{section}"), Path::new("/"))
        };
        let v = with("listen = \"127.0.0.1:8200\"\n")
            .unwrap()
            .vault_api
            .unwrap();
        assert_eq!(v.listen, "127.0.0.1:8200".parse().unwrap());
        assert_eq!(v.mount, "database");
        assert_eq!(v.token_ttl, Duration::from_secs(3600));
        assert_eq!(v.token_max_ttl, Duration::from_secs(86400));
        assert_eq!(v.max_tokens_per_identity, 32);
        let v = with("listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 1\n")
            .unwrap()
            .vault_api
            .unwrap();
        assert_eq!(v.max_tokens_per_identity, 1);
        let v = with("listen = \"127.0.0.1:8200\"\nmount = \"db-prod\"\ntoken_ttl = \"10m\"\n")
            .unwrap()
            .vault_api
            .unwrap();
        assert_eq!(
            (v.mount.as_str(), v.token_ttl),
            ("db-prod", Duration::from_secs(600))
        );
        for (section, want) in [
            ("listen = \"nowhere\"\n", "vault_api.listen"),
            ("listen = \"127.0.0.1:7443\"\n", "is server.listen too"),
            (
                "listen = \"127.0.0.1:9464\"\n",
                "is server.metrics_listen too",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmount = \"a/b\"\n",
                "vault_api.mount",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmount = \"sys\"\n",
                "Vault reserves",
            ),
            (
                "listen = \"127.0.0.1:8200\"\ntoken_ttl = \"soon\"\n",
                "not a duration",
            ),
            (
                "listen = \"127.0.0.1:8200\"\ntoken_ttl = \"2h\"\ntoken_max_ttl = \"1h\"\n",
                "shorter than",
            ),
            (
                "listen = \"127.0.0.1:8200\"\ntoken = \"x\"\n",
                "unknown field",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 0\n",
                "vault_api.max_tokens_per_identity = 0: use 1 to 10000",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = -3\n",
                "vault_api.max_tokens_per_identity = -3",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 10001\n",
                "use 1 to 10000",
            ),
            (
                "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = \"many\"\n",
                "max_tokens_per_identity",
            ),
        ] {
            let err = with(section).unwrap_err().to_string();
            assert!(err.contains(want), "{section:?}: {err}");
        }
    }

    #[test]
    fn design_sample_with_admins_after_audit_still_works() {
        let text = SAMPLE
            .replace("admins = [\"spiffe://example.org/dba/*\"]\n", "")
            .replace(
                "path = \"audit.log\"\n",
                "path = \"audit.log\"\nadmins = [\"spiffe://example.org/dba/*\"]\n",
            );
        let c = Config::parse(&text, Path::new("/")).unwrap();
        assert_eq!(c.admins.len(), 1);
    }

    #[test]
    fn mistakes_are_clear_errors() {
        let cases = [
            (
                "max_ttl = \"1h\"",
                "max_ttl = \"1 fortnight\"",
                "not a duration",
            ),
            (
                "database = \"orders\"",
                "database = \"nope\"",
                "no [databases.nope]",
            ),
            (
                "default_ttl = \"15m\"",
                "default_ttl = \"2h\"",
                "exceeds max_ttl",
            ),
            (
                "@127.0.0.1",
                ":hunter2@127.0.0.1",
                "must not contain a password",
            ),
            (
                "kind = \"postgres\"",
                "kind = \"oracle\"",
                "unknown database kind",
            ),
            ("TO {{name}}", "TO someone", "does not mention"),
            (
                "listen = \"127.0.0.1:7443\"",
                "listen = \"nowhere\"",
                "server.listen",
            ),
            ("[store]", "[stor]", "unknown field"),
        ];
        for (from, to, want) in cases {
            let text = SAMPLE.replace(from, to);
            let err = Config::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{to}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
            // The class is said once, at the start.
            assert_eq!(err.matches("config: ").count(), 1, "{err}");
        }
    }
    #[test]
    fn console_section_is_optional_checked_and_needs_a_port_of_its_own() {
        assert!(Config::parse(SAMPLE, Path::new("/"))
            .unwrap()
            .console
            .is_none());
        let with = |section: &str| Config::parse(&format!("{SAMPLE}\n{section}"), Path::new("/"));
        let c = with("[console]\nlisten = \"127.0.0.1:7444\"\n").unwrap();
        assert_eq!(c.console.unwrap().listen, "127.0.0.1:7444".parse().unwrap());
        for (section, want) in [
            (
                "[console]\nlisten = \"localhost\"\n",
                "console.listen \"localhost\"",
            ),
            (
                "[console]\nlisten = \"127.0.0.1:7443\"\n",
                "already used by [server]",
            ),
            (
                "[console]\nlisten = \"127.0.0.1:7444\"\nport = 1\n",
                "unknown field",
            ),
            ("[console]\n", "missing field `listen`"),
        ] {
            let err = with(section).unwrap_err().to_string();
            assert!(err.contains(want), "{section}: {err}");
        }
    }

    #[test]
    fn identity_patterns_without_a_kind_say_what_to_write() {
        let text = SAMPLE.replace(
            "allowed = [\"spiffe://example.org/ns/shop/*\"]",
            "allowed = [\"billing.internal\"]",
        );
        let err = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"config: roles.orders-readonly.allowed: identity pattern "billing.internal" has no kind; write "dns:billing.internal" (a DNS SAN) or "cn:billing.internal" (the subject CN)"#
        );
        let text = SAMPLE.replace("spiffe://example.org/dba/*", "ops-*");
        let err = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config: admins: identity pattern \"ops-*\" has no kind"),
            "{err}"
        );
        let text = SAMPLE.replace("spiffe://example.org/dba/*", "spiffe://Example.org/dba/*");
        let err = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("admins:") && err.contains("lowercase"),
            "{err}"
        );
        let text = SAMPLE.replace(
            "allowed = [\"spiffe://example.org/ns/shop/*\"]",
            "allowed = [\"dns:billing.internal\", \"cn:legacy-batch\"]",
        );
        let c = Config::parse(&text, Path::new("/")).unwrap();
        assert_eq!(c.role("orders-readonly").unwrap().allowed.len(), 2);
    }

    #[test]
    fn postgres_store_takes_its_password_from_a_file_and_a_claim_timeout() {
        let text = SAMPLE.replace(
            "url = \"sqlite://credbroker.db\"",
            "url = \"postgres://cb@store:5432/leases\"\npassword_file = \"secrets/store\"\nclaim_timeout = \"15s\"",
        );
        let c = Config::parse(&text, Path::new("/etc/credbroker")).unwrap();
        assert_eq!(c.store.url.to_string(), "postgres://cb@store:5432/leases");
        assert_eq!(
            c.store.password,
            SecretSource::File("/etc/credbroker/secrets/store".into())
        );
        assert_eq!(c.store.claim_timeout, Duration::from_secs(15));
        assert_eq!(
            Config::parse(SAMPLE, Path::new("/"))
                .unwrap()
                .store
                .claim_timeout,
            Duration::from_secs(60)
        );
        for (from, to, want) in [
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"postgres://cb:hunter2@store/leases\"",
                "must not contain a password",
            ),
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"sqlite://credbroker.db\"\npassword_env = \"X\"",
                "only apply to a postgres",
            ),
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"sqlite://credbroker.db\"\nclaim_timeout = \"10ms\"",
                "at least 1s",
            ),
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"sqlite://credbroker.db\"\nprune_interval = \"0s\"",
                "at least 1s",
            ),
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"sqlite://credbroker.db\"\nretention = \"a week\"",
                "store.retention",
            ),
        ] {
            let err = Config::parse(&SAMPLE.replace(from, to), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{to}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn tls_parameters_in_urls_are_checked_and_their_paths_resolved() {
        let text = SAMPLE
            .replace(
                "127.0.0.1:5432/orders\"",
                "db.internal:5432/orders?sslmode=verify-full&sslrootcert=pki/db-ca.pem\"\nclient_sslmode = \"verify-full\"\nclient_sslrootcert = \"/etc/ssl/db-ca.pem\"",
            )
            .replace(
                "url = \"sqlite://credbroker.db\"",
                "url = \"postgres://cb@store/leases?sslmode=require&sslrootcert=store-ca.pem\"",
            );
        let c = Config::parse(&text, Path::new("/etc/credbroker")).unwrap();
        let db = &c.databases["orders"];
        assert_eq!(
            db.admin_url,
            "postgres://broker_admin@db.internal:5432/orders?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/db-ca.pem"
        );
        assert_eq!(db.client_sslmode, Some(SslMode::VerifyFull));
        assert_eq!(db.client_sslrootcert.as_deref(), Some("/etc/ssl/db-ca.pem"));
        assert_eq!(
            c.store.url.to_string(),
            "postgres://cb@store/leases?sslmode=require&sslrootcert=/etc/credbroker/store-ca.pem"
        );
        for (from, to, want) in [
            (
                "/orders\"",
                "/orders?sslmode=verify\"",
                "databases.orders.admin_url: sslmode",
            ),
            (
                "/orders\"",
                "/orders?sslmode=verify-full\"",
                "needs sslrootcert",
            ),
            (
                "admin_password_file",
                "client_sslmode = \"sometimes\"\nadmin_password_file",
                "client_sslmode",
            ),
            (
                "admin_password_file",
                "client_sslrootcert = \"/ca.pem\"\nadmin_password_file",
                "set client_sslmode too",
            ),
            (
                "url = \"sqlite://credbroker.db\"",
                "url = \"postgres://cb@store/leases?sslmode=verify-ca\"",
                "store.url: sslmode=verify-ca needs sslrootcert",
            ),
        ] {
            let err = Config::parse(&SAMPLE.replace(from, to), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
    }

    #[test]
    fn store_retention_and_prune_interval_default_and_parse() {
        let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
        assert_eq!(c.store.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.store.prune_interval, Duration::from_secs(600));
        let text = SAMPLE.replace(
            "url = \"sqlite://credbroker.db\"",
            "url = \"sqlite://credbroker.db\"\nretention = \"36h\"\nprune_interval = \"1s\"",
        );
        let c = Config::parse(&text, Path::new("/")).unwrap();
        assert_eq!(c.store.retention, Duration::from_secs(36 * 3600));
        assert_eq!(c.store.prune_interval, Duration::from_secs(1));
    }

    proptest::proptest! {
        // The parser sees operator text and, on SIGHUP, a half-edited file:
        // whatever it gets, it answers Ok or a Config error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = Config::parse(&text, Path::new("/etc/credbroker"));
        }

        #[test]
        fn any_value_in_any_field_of_a_valid_file_never_panics(
            line in 0usize..24,
            value in proptest::prop_oneof![
                "\\PC{0,40}".prop_map(|v| format!("{v:?}")),
                proptest::num::i64::ANY.prop_map(|n| n.to_string()),
                "[\\PC{0,20}]",
                proptest::strategy::Just("\"\\u0000'; DROP ROLE x; --\"".to_string()),
                proptest::strategy::Just(format!("{:?}", "x".repeat(10_240))),
            ],
        ) {
            let text: String = SAMPLE
                .lines()
                .enumerate()
                .map(|(i, l)| match l.split_once(" = ") {
                    Some((k, _)) if i == line => format!("{k} = {value}\n"),
                    _ => format!("{l}\n"),
                })
                .collect();
            // A Config error (exit 64) that says more than its class: the
            // text after "config: " names what is wrong.
            if let Err(e) = Config::parse(&text, Path::new("/etc/credbroker")) {
                proptest::prop_assert!(
                    matches!(&e, Error::Config(d) if !d.message().trim().is_empty()),
                    "not a Config error with a message: {e:?}"
                );
            }
        }
    }
}

/// The running config, swapped whole on SIGHUP; every reader takes a
/// snapshot, so one request sees one config from start to end.
#[derive(Clone)]
pub struct ConfigHandle(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl ConfigHandle {
    pub fn new(config: std::sync::Arc<Config>) -> Self {
        ConfigHandle(std::sync::Arc::new(std::sync::RwLock::new(config)))
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, config: std::sync::Arc<Config>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}
