//! TOML → a validated [`Config`]. Everything a typo can break is checked
//! here, once, so the rest of the broker works with types, not strings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::connstr::{self, ConnStrError};
use crate::dbtls::{self, Dialect, SslMode};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, MAX_USERNAME_LEN};
use crate::policy::{IdentityPattern, Network};

pub mod access;
mod databases;
mod server;
pub mod static_roles;
mod store;
#[cfg(test)]
mod tests;

pub use access::{AccessPolicy, ReasonRule};
pub use databases::*;
pub use server::*;
pub use static_roles::StaticRoleConfig;
pub use store::*;

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
    /// `[access.NAME]`: just-in-time access policies for people.
    pub access: BTreeMap<String, AccessPolicy>,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::config(placement_hint(e)))?;
        raw.validate(base)
    }

    pub fn role(&self, name: &str) -> Option<&RoleConfig> {
        self.roles.get(name)
    }
}

/// Keys of the file's top level. In TOML a key written below a `[table]`
/// belongs to that table, so one of these placed after the first table
/// reads as an unknown field of that table: the error says where it goes.
const TOP_LEVEL_KEYS: [&str; 4] = [
    "admins",
    "admin_networks",
    "sealing_key_file",
    "sealing_key_env",
];

fn placement_hint(e: toml::de::Error) -> String {
    let text = e.to_string();
    match TOP_LEVEL_KEYS
        .iter()
        .find(|k| text.contains(&format!("unknown field `{k}`")))
    {
        Some(k) => format!(
            "{}\nhint: `{k}` is a top-level key: move it above the first [table] (in TOML, a key \
             below a [table] belongs to that table)",
            text.trim_end()
        ),
        None => text,
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
    #[serde(default)]
    access: BTreeMap<String, access::RawAccess>,
}

/// An optional duration setting: parsed when set, else `default`.
pub fn duration_or(what: &str, s: Option<&str>, default: Duration) -> Result<Duration> {
    s.map_or(Ok(default), |s| parse_duration(what, s))
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
        let mut server = self.server.validate()?;
        server.webhook_ca_file = server.webhook_ca_file.map(|p| base.join(p));
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
        let access = self
            .access
            .into_iter()
            .map(|(name, a)| Ok((name.clone(), a.validate(name, &roles)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Config {
            access,
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

/// An identity pattern, its error prefixed with the key it came from.
pub(crate) fn identity_pattern(key: &str, pattern: &str) -> Result<IdentityPattern> {
    IdentityPattern::new(pattern).map_err(|e| e.config(key))
}

/// A role's or static role's `allowed` identity patterns, each parsed; an
/// empty list is refused (`nobody could` say what then).
pub(crate) fn allowed_patterns(
    key: &str,
    list: &[String],
    nobody_could: &str,
) -> Result<Vec<IdentityPattern>> {
    if list.is_empty() {
        return Err(cfg_err(format!(
            "{key}: empty, so nobody could {nobody_could}; list identity patterns"
        )));
    }
    list.iter().map(|p| identity_pattern(key, p)).collect()
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
