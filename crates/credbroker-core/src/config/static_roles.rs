//! `[static_roles.NAME]`: TOML → a validated [`StaticRoleConfig`]. Called
//! by `config.rs`, so a bad static role is a `Config` error (exit 64) like
//! every other typo. Part of `config` (the rotation in `crate::static_roles`
//! reads these types; `config` imports no module above it), re-exported as
//! `static_roles::config`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{
    allowed_patterns, duration_or, is_host_pattern, is_role_name, parse_duration, valid_key,
    DatabaseConfig, ABSOLUTE_MAX_TTL,
};
use crate::error::{Error, Result};
use crate::lease::{BackendKind, MAX_USERNAME_LEN};
use crate::policy::IdentityPattern;

/// One static role, validated.
#[derive(Debug, Clone)]
pub struct StaticRoleConfig {
    pub name: String,
    pub database: String,
    /// Who may read the credential: the same patterns as `[roles.X] allowed`.
    pub allowed: Vec<IdentityPattern>,
    /// How often the password changes.
    pub rotation_period: Duration,
    /// How long the previous user keeps working after a rotation; at most
    /// one period (it is the next rotation's target after that).
    pub overlap: Duration,
    /// After the overlap, end the previous user's sessions too (not only
    /// refuse its logins).
    pub end_sessions: bool,
    /// Two users: alternating (each rotation changes the one not in use).
    /// One user: Vault's mode, which breaks pools holding the old password
    /// at every rotation.
    pub users: Vec<String>,
    /// Whether the broker creates the users (members of `owner`, with
    /// `grants`); otherwise a DBA made them.
    pub create: bool,
    pub grants: Vec<String>,
    pub owner: Option<String>,
    /// MySQL account host part (`%` unless set).
    pub host: String,
}

impl StaticRoleConfig {
    pub fn alternating(&self) -> bool {
        self.users.len() == 2
    }

    /// `rotation_period` as a chrono duration.
    pub fn period(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.rotation_period).unwrap_or(chrono::Duration::MAX)
    }

    pub fn overlap_delta(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.overlap).unwrap_or(chrono::Duration::MAX)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStaticRole {
    database: String,
    #[serde(default)]
    allowed: Vec<String>,
    rotation_period: String,
    overlap: Option<String>,
    end_sessions: Option<bool>,
    users: Vec<String>,
    #[serde(default)]
    create: bool,
    #[serde(default)]
    grants: Vec<String>,
    owner: Option<String>,
    host: Option<String>,
}

/// Validates every `[static_roles.*]` against the databases; `prefix` is
/// the broker's `name_prefix`, which no static user may start with (the
/// orphan sweep drops unknown users with that prefix).
pub(crate) fn validate(
    raw: BTreeMap<String, RawStaticRole>,
    databases: &BTreeMap<String, DatabaseConfig>,
    prefix: &str,
) -> Result<BTreeMap<String, StaticRoleConfig>> {
    let mut out = BTreeMap::new();
    // Users are per server (a PostgreSQL cluster, a MySQL server), not per
    // `[databases]` entry: two entries on one server name the same users.
    let mut taken: BTreeMap<(Server, String, String), String> = BTreeMap::new();
    for (name, r) in raw {
        let role = validate_one(&name, r, databases, prefix)?;
        let db = &databases[&role.database];
        let server = server_of(db);
        for u in &role.users {
            // The broker's own admin user of that server (any entry's).
            if let Some((other_db, _)) = databases
                .iter()
                .find(|(_, d)| server_of(d) == server && admin_user_of(d).as_deref() == Some(u))
            {
                return Err(Error::config(format!(
                    "static_roles.{name}.users: {u:?} is the broker's own admin user on {} (databases.{other_db}.admin_url); rotating it would lock the broker out — name another user",
                    server.show()
                )));
            }
            let key = (server.clone(), u.clone(), role.host.clone());
            if let Some(other) = taken.insert(key, name.clone()) {
                let other_db = &out
                    .get(&other)
                    .map(|o: &StaticRoleConfig| o.database.clone())
                    .unwrap_or_default();
                let place = if *other_db == role.database {
                    format!("database {other_db:?}")
                } else {
                    format!(
                        "databases {other_db:?} and {:?}, both on {}",
                        role.database,
                        server.show()
                    )
                };
                return Err(Error::config(format!(
                    "static_roles.{name}.users: {u:?} is already a user of static_roles.{other} ({place}, where users are shared); two static roles would rotate one user and retire each other's current password — give each static role users of its own"
                )));
            }
        }
        out.insert(name, role);
    }
    Ok(out)
}

/// A database server as users see it: users belong to it, not to one
/// `[databases]` entry. `localhost`, `127.0.0.1` and `::1` are one host;
/// other names are compared as written (the broker resolves nothing here).
/// A PostgreSQL `admin_url` naming several hosts (a primary and its
/// standbys) is one server: its hosts, sorted, whatever their order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Server {
    kind: &'static str,
    hosts: Vec<(String, u16)>,
}

impl Server {
    fn show(&self) -> String {
        self.hosts
            .iter()
            .map(|(host, port)| {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn same_host(host: &str) -> String {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    match host.as_str() {
        "localhost" | "127.0.0.1" | "::1" | "" => "localhost".to_string(),
        _ => host,
    }
}

fn server_of(db: &DatabaseConfig) -> Server {
    let mut hosts = match db.kind {
        BackendKind::Postgres => crate::connstr::parse(&db.admin_url)
            .map(|c| {
                c.hosts
                    .into_iter()
                    .map(|h| (same_host(&h.host), h.port))
                    .collect()
            })
            .unwrap_or_default(),
        BackendKind::Mysql => {
            let url = url::Url::parse(&db.admin_url).ok();
            let query = |k: &str| {
                url.as_ref().and_then(|u| {
                    u.query_pairs()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.into_owned())
                })
            };
            let host = url
                .as_ref()
                .and_then(|u| u.host_str().map(str::to_string))
                .filter(|h| !h.is_empty())
                .or_else(|| query("host"))
                .unwrap_or_default();
            let port = url
                .as_ref()
                .and_then(|u| u.port())
                .or_else(|| query("port").and_then(|p| p.parse().ok()))
                .unwrap_or(3306);
            vec![(same_host(&host), port)]
        }
    };
    hosts.sort();
    hosts.dedup();
    let kind = match db.kind {
        BackendKind::Postgres => "postgres",
        BackendKind::Mysql => "mysql",
    };
    Server { kind, hosts }
}

/// The user in a database's `admin_url` (the broker's own account there).
fn admin_user_of(db: &DatabaseConfig) -> Option<String> {
    if db.kind == BackendKind::Postgres {
        return crate::connstr::parse(&db.admin_url).ok()?.user;
    }
    let url = url::Url::parse(&db.admin_url).ok()?;
    let user = percent_encoding::percent_decode_str(url.username())
        .decode_utf8()
        .ok()?
        .into_owned();
    if user.is_empty() {
        url.query_pairs()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| v.into_owned())
    } else {
        Some(user)
    }
}

fn validate_one(
    name: &str,
    r: RawStaticRole,
    databases: &BTreeMap<String, DatabaseConfig>,
    prefix: &str,
) -> Result<StaticRoleConfig> {
    let err = |m: String| Error::config(m);
    let what = |k: &str| format!("static_roles.{name}.{k}");
    if !valid_key(name) {
        return Err(err(format!(
            "static_roles.{name}: names use a-z, 0-9, '-', '_', '.'"
        )));
    }
    let Some(db) = databases.get(&r.database) else {
        return Err(err(format!(
            "{}: no [databases.{}] is configured",
            what("database"),
            r.database
        )));
    };
    let allowed = allowed_patterns(&what("allowed"), &r.allowed, "read this static role")?;
    let rotation_period = parse_duration(&what("rotation_period"), &r.rotation_period)?;
    if rotation_period < Duration::from_secs(1) {
        return Err(err(format!("{}: at least 1s", what("rotation_period"))));
    }
    // A dead broker leaves a credential valid for up to two periods.
    if rotation_period > ABSOLUTE_MAX_TTL / 2 {
        return Err(err(format!(
            "{}: at most 15 days (a credential may live two periods)",
            what("rotation_period")
        )));
    }
    let overlap = duration_or(&what("overlap"), r.overlap.as_deref(), rotation_period)?;
    if overlap < Duration::from_secs(1) {
        return Err(err(format!("{}: at least 1s", what("overlap"))));
    }
    if overlap > rotation_period {
        return Err(err(format!(
            "{}: at most rotation_period; the previous user is the next rotation's target",
            what("overlap")
        )));
    }
    if r.users.is_empty() || r.users.len() > 2 {
        return Err(err(format!(
            "{}: list two users (alternating, recommended) or one (single-user mode)",
            what("users")
        )));
    }
    for u in &r.users {
        let ok = !u.is_empty()
            && u.len() <= MAX_USERNAME_LEN
            && !u.as_bytes()[0].is_ascii_digit()
            && u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(err(format!(
                "{}: {u:?} is not a user name (1-{MAX_USERNAME_LEN} of a-z, A-Z, 0-9, _, not starting with a digit)",
                what("users")
            )));
        }
        if u.starts_with(prefix) {
            return Err(err(format!(
                "{}: {u:?} starts with server.name_prefix {prefix:?}; the orphan sweep would drop it",
                what("users")
            )));
        }
    }
    if r.users.len() == 2 && r.users[0] == r.users[1] {
        return Err(err(format!("{}: the two users must differ", what("users"))));
    }
    if r.create {
        if r.owner.is_none() {
            return Err(err(format!(
                "{}: create = true needs an owner, the role both users are members of (objects belong to it)",
                what("owner")
            )));
        }
        for g in &r.grants {
            if !g.contains("{{name}}") {
                return Err(err(format!(
                    "{}: {g:?} does not mention {{{{name}}}}, so it would not apply to the users",
                    what("grants")
                )));
            }
        }
    } else if !r.grants.is_empty() || r.owner.is_some() {
        return Err(err(format!(
            "static_roles.{name}: grants and owner only apply with create = true (otherwise the users exist already)"
        )));
    }
    if let Some(owner) = &r.owner {
        if !is_role_name(owner) || r.users.iter().any(|u| u == owner) {
            return Err(err(format!(
                "{}: {owner:?} is not a role name other than the users",
                what("owner")
            )));
        }
    }
    let host = r.host.unwrap_or_else(|| "%".to_string());
    if !is_host_pattern(&host) || host == crate::config::CALLER_HOST {
        return Err(err(format!(
            "{}: {host:?} is not a MySQL host pattern",
            what("host")
        )));
    }
    if db.kind == BackendKind::Postgres && host != "%" {
        return Err(err(format!(
            "{}: only MySQL accounts have a host part",
            what("host")
        )));
    }
    Ok(StaticRoleConfig {
        name: name.to_string(),
        database: r.database,
        allowed,
        rotation_period,
        overlap,
        end_sessions: r.end_sessions.unwrap_or(true),
        users: r.users,
        create: r.create,
        grants: r.grants,
        owner: r.owner,
        host,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const BASE: &str = r#"
sealing_key_file = "secrets/static.key"
[server]
listen = "127.0.0.1:7443"
[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
[databases.orders]
kind = "postgres"
admin_url = "postgres://broker_admin@127.0.0.1:5432/orders"
[databases.shop]
kind = "mysql"
admin_url = "mysql://broker_admin@127.0.0.1:3306/shop"
[static_roles.orders-app]
database = "orders"
allowed = ["spiffe://example.org/ns/shop/*"]
rotation_period = "1h"
users = ["app_a", "app_b"]
"#;

    #[test]
    fn a_static_role_parses_with_its_defaults() {
        let c = Config::parse(BASE, Path::new("/etc/credbroker")).unwrap();
        let s = &c.static_roles["orders-app"];
        assert_eq!(s.rotation_period, std::time::Duration::from_secs(3600));
        assert_eq!(
            s.overlap, s.rotation_period,
            "overlap defaults to one period"
        );
        assert!(s.end_sessions && s.alternating() && !s.create);
        assert_eq!(s.host, "%");
        assert_eq!(
            c.sealing_key,
            crate::config::SecretSource::File("/etc/credbroker/secrets/static.key".into())
        );
        let single = BASE.replace("[\"app_a\", \"app_b\"]", "[\"app\"]");
        let c = Config::parse(&single, Path::new("/")).unwrap();
        assert!(!c.static_roles["orders-app"].alternating());
        let created = BASE.replace(
            "users = [",
            "create = true\nowner = \"app_owner\"\ngrants = [\"GRANT SELECT ON t TO {{name}}\"]\nusers = [",
        );
        assert!(
            Config::parse(&created, Path::new("/"))
                .unwrap()
                .static_roles["orders-app"]
                .create
        );
    }

    /// One case per bad input: each is a Config error (exit 64) naming the key.
    #[test]
    fn every_bad_static_role_input_is_a_config_error() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "database = \"orders\"",
                "database = \"nope\"",
                "static_roles.orders-app.database: no [databases.nope]",
            ),
            (
                "allowed = [\"spiffe://example.org/ns/shop/*\"]",
                "allowed = []",
                "allowed: empty",
            ),
            (
                "allowed = [\"spiffe://example.org/ns/shop/*\"]",
                "allowed = [\"shop\"]",
                "has no kind",
            ),
            (
                "rotation_period = \"1h\"",
                "rotation_period = \"often\"",
                "rotation_period: \"often\" is not a duration",
            ),
            (
                "rotation_period = \"1h\"",
                "rotation_period = \"0s\"",
                "rotation_period: at least 1s",
            ),
            (
                "rotation_period = \"1h\"",
                "rotation_period = \"30d\"",
                "at most 15 days",
            ),
            (
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\noverlap = \"2h\"",
                "overlap: at most rotation_period",
            ),
            (
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\noverlap = \"0s\"",
                "overlap: at least 1s",
            ),
            (
                "users = [\"app_a\", \"app_b\"]",
                "users = []",
                "list two users",
            ),
            (
                "users = [\"app_a\", \"app_b\"]",
                "users = [\"a\", \"b\", \"c\"]",
                "list two users",
            ),
            (
                "users = [\"app_a\", \"app_b\"]",
                "users = [\"app_a\", \"app_a\"]",
                "must differ",
            ),
            (
                "users = [\"app_a\", \"app_b\"]",
                "users = [\"app'; DROP\", \"b\"]",
                "is not a user name",
            ),
            (
                "users = [\"app_a\", \"app_b\"]",
                "users = [\"cb_app\", \"b\"]",
                "starts with server.name_prefix",
            ),
            (
                "users = [",
                "create = true\nusers = [",
                "create = true needs an owner",
            ),
            (
                "users = [",
                "create = true\nowner = \"o\"\ngrants = [\"GRANT SELECT ON t TO x\"]\nusers = [",
                "does not mention",
            ),
            (
                "users = [",
                "grants = [\"GRANT SELECT ON t TO {{name}}\"]\nusers = [",
                "only apply with create = true",
            ),
            (
                "users = [",
                "create = true\nowner = \"app_a\"\nusers = [",
                "not a role name other than the users",
            ),
            (
                "users = [",
                "host = \"10.0.0.%\"\nusers = [",
                "only MySQL accounts have a host part",
            ),
            (
                "users = [",
                "end_sessions = \"yes\"\nusers = [",
                "end_sessions",
            ),
            ("users = [", "colour = \"blue\"\nusers = [", "unknown field"),
            (
                "sealing_key_file = \"secrets/static.key\"\n",
                "",
                "sealing_key_file or sealing_key_env",
            ),
            (
                "sealing_key_file = \"secrets/static.key\"\n",
                "sealing_key_file = \"k\"\nsealing_key_env = \"K\"\n",
                "not both",
            ),
            (
                "[static_roles.orders-app]",
                "[static_roles.\"Orders App\"]",
                "names use",
            ),
        ];
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from}");
            let text = BASE.replacen(from, to, 1);
            let err = Config::parse(&text, Path::new("/")).unwrap_err();
            assert!(matches!(err, crate::Error::Config(_)), "{to}: {err}");
            assert!(err.to_string().contains(want), "{to}: {err}");
        }
        // Two static roles may not share a user on one database.
        let twice = format!(
            "{BASE}[static_roles.other]\ndatabase = \"orders\"\nallowed = [\"dns:x\"]\nrotation_period = \"1h\"\nusers = [\"app_b\", \"app_c\"]\n"
        );
        let err = Config::parse(&twice, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already a user of static_roles"), "{err}");
        // Nor on two `[databases]` entries of one server: users are the
        // server's (any database name, `localhost` or `127.0.0.1`).
        let same_cluster = format!(
            "{BASE}[databases.billing]\nkind = \"postgres\"\nadmin_url = \"postgres://broker_admin@localhost/billing\"\n\
             [static_roles.billing-app]\ndatabase = \"billing\"\nallowed = [\"dns:x\"]\nrotation_period = \"1h\"\nusers = [\"app_b\", \"app_c\"]\n"
        );
        let err = Config::parse(&same_cluster, Path::new("/"))
            .unwrap_err()
            .to_string();
        for want in [
            "static_roles.orders-app.users: \"app_b\" is already a user of static_roles.billing-app",
            "databases \"billing\" and \"orders\", both on localhost:5432",
        ] {
            assert!(err.contains(want), "{err}");
        }
        // Another server (port) keeps its own users.
        let elsewhere = same_cluster.replace("@localhost/billing", "@localhost:5433/billing");
        let c = Config::parse(&elsewhere, Path::new("/")).unwrap();
        assert_eq!(c.static_roles.len(), 2);
        // MySQL accounts are user@host: another host part is another account.
        let mysql_two = format!(
            "{BASE}[static_roles.shop-a]\ndatabase = \"shop\"\nallowed = [\"dns:x\"]\nrotation_period = \"1h\"\nusers = [\"app\"]\nhost = \"10.0.0.%\"\n\
             [static_roles.shop-b]\ndatabase = \"shop\"\nallowed = [\"dns:x\"]\nrotation_period = \"1h\"\nusers = [\"app\"]\n"
        );
        assert!(Config::parse(&mysql_two, Path::new("/")).is_ok());
        // The broker's own admin user, of this entry or another on the server.
        for (db, url) in [
            ("orders", "postgres://app_a@127.0.0.1:5432/orders"),
            ("billing", "postgres://app_a@127.0.0.1/billing"),
        ] {
            let text = if db == "orders" {
                BASE.replace("postgres://broker_admin@127.0.0.1:5432/orders", url)
            } else {
                format!("{BASE}[databases.billing]\nkind = \"postgres\"\nadmin_url = \"{url}\"\n")
            };
            let err = Config::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!(
                    "static_roles.orders-app.users: \"app_a\" is the broker's own admin user on localhost:5432 (databases.{db}.admin_url)"
                )),
                "{err}"
            );
        }
        // The host part is a MySQL thing; `caller` makes no sense for a shared user.
        let mysql = BASE.replace("database = \"orders\"", "database = \"shop\"");
        let c = Config::parse(
            &mysql.replace("users = [", "host = \"10.0.0.%\"\nusers = ["),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.static_roles["orders-app"].host, "10.0.0.%");
        let err = Config::parse(
            &mysql.replace("users = [", "host = \"caller\"\nusers = ["),
            Path::new("/"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a MySQL host pattern"), "{err}");
    }
}
