//! `[server]`, `[tls]`, `[console]` and `[vault_api]`: the listeners and
//! what each door accepts, validated.

use super::*;

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
    /// [`crate::store::TokenStore::insert_vault_token`]).
    pub max_tokens_per_identity: u32,
    /// Verified tokens are kept in memory (`token_cache.rs`) so a request
    /// skips the store read of its token; `false` reads every token from
    /// the store (the bench's "before", or a deployment that wants no
    /// window at all between a revoke on one replica and the others).
    pub token_cache: bool,
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
    /// The CA that verifies access policies' `notify` webhooks instead of
    /// the public roots (a chat server on an internal CA); relative to the
    /// config file. Read at start.
    pub webhook_ca_file: Option<PathBuf>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    pub(super) listen: String,
}

impl RawConsole {
    pub(super) fn validate(self, server: &ServerConfig) -> Result<ConsoleConfig> {
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
pub(super) const MAX_TOKENS_PER_IDENTITY_LIMIT: u32 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVaultApi {
    pub(super) listen: String,
    pub(super) mount: Option<String>,
    pub(super) token_ttl: Option<String>,
    pub(super) token_max_ttl: Option<String>,
    pub(super) max_tokens_per_identity: Option<i64>,
    pub(super) token_cache: Option<bool>,
}

impl RawVaultApi {
    pub(super) fn validate(self, grpc: SocketAddr) -> Result<VaultApiConfig> {
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
            token_cache: self.token_cache.unwrap_or(true),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) metrics_listen: Option<String>,
    pub(super) name_prefix: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) max_connection_age: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_identity: Option<usize>,
    pub(super) max_connections_per_source: Option<usize>,
    ipv6_source_prefix: Option<u8>,
    pub(super) drain_deadline: Option<String>,
    pub(super) webhook_ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: PathBuf,
    pub(super) crl: Option<PathBuf>,
    /// "refuse" (default) or "warn".
    pub(super) crl_expired: Option<String>,
}

impl RawServer {
    pub(super) fn validate(self) -> Result<ServerConfig> {
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
            webhook_ca_file: self.webhook_ca_file,
        })
    }
}

impl RawTls {
    pub(super) fn validate(self, base: &Path) -> Result<TlsConfig> {
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

/// "64MiB", "1GB", "4096": binary (KiB, MiB, GiB) and decimal (KB, MB,
/// GB) units, or plain bytes.
pub(super) fn parse_size(v: &str) -> Option<u64> {
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
