//! What the server is: MariaDB or MySQL, its version, the user name limit
//! and whether failsafe events can be made there — learnt once, on the
//! first connection that works, since statement forms and password
//! plugins differ. Preflight turns what is missing into start-up warnings
//! (never a refusal to start: invariant 4).

use mysql_async::prelude::Queryable;

use super::auth::{caching_sha2_hash, native_password_hash};
use super::quote::lit;
use super::MysqlBackend;
use crate::error::{Error, Result};
use crate::lease::Password;

/// Which server family we talk to; they differ in name limits, password
/// plugins and statement forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Mariadb,
    Mysql,
}

/// What we learnt about the server on the first connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub flavor: Flavor,
    pub version: (u32, u32, u32),
    /// Longest account user name the server accepts.
    pub max_user_len: usize,
    /// Whether failsafe events can be created here, or why not.
    pub failsafe: std::result::Result<(), String>,
}

impl ServerInfo {
    /// Reads `SELECT VERSION()`: `10.11.19-MariaDB-0+deb12u1`, `8.0.36`, …
    pub fn from_version(version: &str) -> Result<(Flavor, (u32, u32, u32))> {
        let flavor = if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::Mariadb
        } else {
            Flavor::Mysql
        };
        // Old MariaDB handshakes prefix a fake "5.5.5-".
        let v = version.strip_prefix("5.5.5-").unwrap_or(version);
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>().unwrap_or(0));
        let triple = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        if triple.0 == 0 {
            return Err(Error::internal(format!(
                "cannot read the server version {version:?}"
            )));
        }
        Ok((flavor, triple))
    }

    /// User name limits: MySQL 5.7.8+ 32 characters (16 before), MariaDB
    /// 10.0+ 80 (16 before).
    pub fn max_user_len(flavor: Flavor, v: (u32, u32, u32)) -> usize {
        match flavor {
            Flavor::Mariadb if v.0 >= 10 => 80,
            Flavor::Mysql if v >= (5, 7, 8) => 32,
            _ => 16,
        }
    }

    /// Whether `ALTER USER … ACCOUNT LOCK` exists: MySQL 5.7.6+ (the oldest
    /// we accept) and MariaDB 10.4+.
    pub fn can_lock(&self) -> bool {
        Self::lockable(self.flavor, self.version)
    }

    fn lockable(flavor: Flavor, version: (u32, u32, u32)) -> bool {
        match flavor {
            Flavor::Mysql => true,
            Flavor::Mariadb => version >= (10, 4, 0),
        }
    }

    /// The `IDENTIFIED …` clause carrying a hash, never the plaintext:
    /// MariaDB takes `BY PASSWORD '*…'` (mysql_native_password); MySQL 8
    /// gets its default plugin, caching_sha2_password, with a SHA-256 crypt
    /// hash we compute (`BY PASSWORD` is gone there, and
    /// mysql_native_password is off by default from 8.4 and removed in 9);
    /// MySQL 5.7 takes the native hash with `AS`.
    pub fn identified_clause(&self, password: &Password) -> String {
        Self::identified_with(self.flavor, self.version, &self.stored_hash(password))
    }

    /// The hash as the server will store it (`mysql.user.authentication_string`).
    pub fn stored_hash(&self, password: &Password) -> String {
        match self.flavor {
            Flavor::Mysql if self.version.0 >= 8 => caching_sha2_hash(password),
            _ => native_password_hash(password),
        }
    }

    pub(super) fn identified_with(flavor: Flavor, version: (u32, u32, u32), hash: &str) -> String {
        match flavor {
            Flavor::Mariadb => format!("IDENTIFIED BY PASSWORD {}", lit(hash)),
            Flavor::Mysql if version.0 >= 8 => {
                format!("IDENTIFIED WITH caching_sha2_password AS {}", lit(hash))
            }
            Flavor::Mysql => format!("IDENTIFIED WITH mysql_native_password AS {}", lit(hash)),
        }
    }
}

impl MysqlBackend {
    /// The server's flavour, limits and failsafe ability (cached).
    pub async fn server(&self) -> Result<&ServerInfo> {
        self.server.get_or_try_init(|| self.detect()).await
    }

    async fn detect(&self) -> Result<ServerInfo> {
        let mut conn = self.conn().await?;
        let version: Option<String> = self
            .timed("read version", conn.query_first("SELECT VERSION()"))
            .await?;
        let version = version.unwrap_or_default();
        let (flavor, v) = ServerInfo::from_version(&version)?;
        if flavor == Flavor::Mysql && v < (5, 7, 6) {
            return Err(Error::config(format!(
                "databases.{}: MySQL {version} is too old (needs 5.7.6 or later for CREATE USER … AS)",
                self.config.name
            )));
        }
        let failsafe = self
            .probe_failsafe(&mut conn, ServerInfo::lockable(flavor, v))
            .await?;
        if let Err(why) = &failsafe {
            // Preflight repeats this at start-up; a database first reached
            // later must not go unmentioned.
            tracing::warn!(database = %self.config.name, "NO DATABASE-SIDE EXPIRY: {why}");
        }
        Ok(ServerInfo {
            flavor,
            version: v,
            max_user_len: ServerInfo::max_user_len(flavor, v),
            failsafe,
        })
    }

    pub(super) async fn preflight_warnings(&self) -> Result<Vec<String>> {
        let server = self.server().await?.clone();
        let db = &self.config.name;
        let mut warnings = Vec::new();
        let mut conn = self.conn().await?;
        match &server.failsafe {
            Err(why) => warnings.push(format!(
                "database {db:?}: NO DATABASE-SIDE EXPIRY: {why}; leased users outlive a dead broker until it returns"
            )),
            Ok(()) => {
                let state: Option<String> = self
                    .timed(
                        "read event_scheduler",
                        conn.query_first("SELECT @@global.event_scheduler"),
                    )
                    .await?;
                let state = state.unwrap_or_default();
                if !state.eq_ignore_ascii_case("ON") {
                    warnings.push(format!(
                        "database {db:?}: NO DATABASE-SIDE EXPIRY: event_scheduler is {state}, so the failsafe \
                         events that drop leased users at their expiry will not run and users outlive a dead \
                         broker; run SET GLOBAL event_scheduler = ON and set event_scheduler = ON in the server's \
                         configuration (events never run on replicas either)"
                    ));
                }
            }
        }
        let privileges: Vec<String> = self
            .timed(
                "check privileges",
                conn.query(
                    "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = \
                     CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
                     SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
                ),
            )
            .await?;
        let has = |p: &str| privileges.iter().any(|x| x.eq_ignore_ascii_case(p));
        if !has("CREATE USER") {
            warnings.push(format!(
                "database {db:?}: the admin account may lack the global CREATE USER privilege: issuing will fail"
            ));
        }
        if !has("PROCESS") {
            warnings.push(format!(
                "database {db:?}: the admin account may lack PROCESS: revocation cannot see, so cannot end, leased users' live sessions"
            ));
        }
        if !(has("SUPER") || has("CONNECTION ADMIN") || has("CONNECTION_ADMIN")) {
            warnings.push(format!(
                "database {db:?}: the admin account may lack CONNECTION_ADMIN (or SUPER): revocation cannot end leased users' live sessions"
            ));
        }
        if !(has("SUPER") || has("SET USER") || has("SET_USER_ID") || has("SET_ANY_DEFINER")) {
            warnings.push(format!(
                "database {db:?}: the admin account may lack SET USER (MariaDB 10.5.2+) / SET_USER_ID \
                 (MySQL 8.0; SET_ANY_DEFINER from 8.2) or SUPER: views, routines, triggers and events a leased \
                 user defines cannot be handed to the role's owner, so their revocation fails (the user stays locked)"
            ));
        }
        if server.flavor == Flavor::Mariadb {
            // With a password validation plugin active, this setting makes
            // MariaDB refuse every `IDENTIFIED BY PASSWORD '<hash>'`.
            let strict: Option<(u64, u64)> = self
                .timed(
                    "check password validation",
                    conn.query_first(
                        "SELECT @@global.strict_password_validation, (SELECT COUNT(*) FROM \
                         information_schema.PLUGINS WHERE PLUGIN_TYPE = 'PASSWORD VALIDATION' \
                         AND PLUGIN_STATUS = 'ACTIVE')",
                    ),
                )
                .await?;
            if let Some((1, plugins)) = strict {
                if plugins > 0 {
                    warnings.push(format!(
                        "database {db:?}: strict_password_validation is ON with a password validation plugin: \
                         MariaDB refuses password hashes, so issuing will fail; set strict_password_validation = OFF \
                         (the broker's passwords are 40 random characters)"
                    ));
                }
            }
        }
        if server.max_user_len < crate::lease::MAX_USERNAME_LEN {
            warnings.push(format!(
                "database {db:?}: the server allows user names of {} characters only: issuing will fail",
                server.max_user_len
            ));
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Username;

    #[test]
    fn flavours_and_limits_come_from_the_version_string() {
        let (f, v) = ServerInfo::from_version("10.11.19-MariaDB-0+deb12u1").unwrap();
        assert_eq!((f, v), (Flavor::Mariadb, (10, 11, 19)));
        assert_eq!(ServerInfo::max_user_len(f, v), 80);
        let (f, v) = ServerInfo::from_version("5.5.5-10.6.12-MariaDB").unwrap();
        assert_eq!((f, v), (Flavor::Mariadb, (10, 6, 12)));
        let (f, v) = ServerInfo::from_version("8.0.36").unwrap();
        assert_eq!((f, v), (Flavor::Mysql, (8, 0, 36)));
        assert_eq!(ServerInfo::max_user_len(f, v), 32);
        let (f, v) = ServerInfo::from_version("8.4.3-commercial").unwrap();
        assert_eq!((f, v), (Flavor::Mysql, (8, 4, 3)));
        assert_eq!(ServerInfo::max_user_len(Flavor::Mysql, (5, 6, 40)), 16);
        assert!(ServerInfo::from_version("garbage").is_err());
    }

    #[test]
    fn password_clauses_carry_hashes_only() {
        let p = Password::generate();
        for (flavor, version, want) in [
            (Flavor::Mariadb, (10, 11, 0), "IDENTIFIED BY PASSWORD '*"),
            (
                Flavor::Mysql,
                (8, 0, 36),
                "IDENTIFIED WITH caching_sha2_password AS '$A$005$",
            ),
            (
                Flavor::Mysql,
                (5, 7, 44),
                "IDENTIFIED WITH mysql_native_password AS '*",
            ),
        ] {
            let s = ServerInfo {
                flavor,
                version,
                max_user_len: 32,
                failsafe: Ok(()),
            };
            let clause = s.identified_clause(&p);
            assert!(clause.starts_with(want), "{clause}");
            assert!(!clause.contains(p.expose()));
        }
    }

    #[test]
    fn names_fit_mysql_and_two_thousand_issues_never_repeat_one() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..20_000 {
            let role = ["orders-readonly", "x", "a_very_long_role_name_indeed"][i % 3];
            let u = Username::generate("cb_", role);
            assert!(u.as_str().len() <= ServerInfo::max_user_len(Flavor::Mysql, (8, 0, 0)));
            assert!(
                u.as_str().len() <= 64,
                "event names are at most 64 characters"
            );
            assert!(seen.insert(u.as_str().to_string()), "duplicate {u}");
        }
    }
}
