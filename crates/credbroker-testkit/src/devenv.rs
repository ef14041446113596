//! A complete, disposable broker set-up on this machine: dev certificates,
//! an admin password file and a config pointing at a throwaway database.
//! Used by `credbroker demo`, the integration tests and the benchmark, so
//! all three exercise the same files a user would write.

use std::path::{Path, PathBuf};

use crate::throwaway::ThrowawayPostgres;

/// Paths of one dev set-up, all inside `dir`.
#[derive(Clone)]
pub struct DevEnv {
    pub dir: PathBuf,
    pub pki: PathBuf,
    pub config_path: PathBuf,
    pub audit_path: PathBuf,
    pub store_path: PathBuf,
}

/// Identities of the dev client certificates written by `pki dev`.
pub const APP_IDENTITY: &str = "spiffe://credbroker.dev/ns/demo/app";
pub const OTHER_IDENTITY: &str = "spiffe://credbroker.dev/ns/demo/other";
pub const ADMIN_IDENTITY: &str = "spiffe://credbroker.dev/dba/oncall";

impl DevEnv {
    /// Writes certificates into `dir/pki` and an empty secrets folder.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("secrets"))?;
        let pki = dir.join("pki");
        crate::pki::write_dev_pki(&pki)?;
        Ok(DevEnv {
            dir: dir.to_path_buf(),
            pki,
            config_path: dir.join("broker.toml"),
            audit_path: dir.join("audit.log"),
            store_path: dir.join("leases.db"),
        })
    }

    /// Writes the superuser password of `pg` where a config can name it.
    pub fn write_pg_password(
        &self,
        name: &str,
        pg: &ThrowawayPostgres,
    ) -> std::io::Result<PathBuf> {
        let path = self.dir.join("secrets").join(format!("{name}-admin"));
        credbroker::fsutil::write_secret_file(&path, pg.superuser_password().as_bytes())?;
        Ok(path)
    }

    /// The `[server]`, `[tls]`, `[store]`, `[audit]` head of a config, with
    /// the dev admin identity; append `[databases.*]` and `[roles.*]`.
    pub fn config_head(&self, listen: &str, metrics_listen: Option<&str>) -> String {
        let metrics = metrics_listen
            .map(|m| format!("metrics_listen = \"{m}\"\n"))
            .unwrap_or_default();
        format!(
            "admins = [\"spiffe://credbroker.dev/dba/*\"]\n\n\
             [server]\nlisten = \"{listen}\"\n{metrics}\n\
             [tls]\ncert = \"{pki}/server.pem\"\nkey = \"{pki}/server-key.pem\"\nclient_ca = \"{pki}/ca.pem\"\n\n\
             [store]\nurl = \"sqlite://{store}\"\n\n\
             [audit]\npath = \"{audit}\"\n\n",
            pki = self.pki.display(),
            store = self.store_path.display(),
            audit = self.audit_path.display(),
        )
    }

    /// A `[databases.NAME]` section for a throwaway PostgreSQL.
    pub fn pg_database(
        &self,
        name: &str,
        pg: &ThrowawayPostgres,
        dbname: &str,
    ) -> std::io::Result<String> {
        let secret = self.write_pg_password(name, pg)?;
        Ok(format!(
            "[databases.{name}]\nkind = \"postgres\"\nadmin_url = \"{}\"\nadmin_password_file = \"{}\"\n\n",
            pg.url(dbname),
            secret.display()
        ))
    }

    /// A `[databases.NAME]` section (`kind = "mysql"`) for a MySQL or
    /// MariaDB server on 127.0.0.1:`port` with admin `root`; its password,
    /// when it has one, goes to a secrets file the config names.
    pub fn mysql_database(
        &self,
        name: &str,
        port: u16,
        dbname: &str,
        root_password: Option<&str>,
    ) -> std::io::Result<String> {
        let secret = match root_password {
            Some(p) => {
                let path = self.dir.join("secrets").join(format!("{name}-admin"));
                credbroker::fsutil::write_secret_file(&path, p.as_bytes())?;
                format!("admin_password_file = \"{}\"\n", path.display())
            }
            None => String::new(),
        };
        Ok(format!(
            "[databases.{name}]\nkind = \"mysql\"\nadmin_url = \"mysql://root@127.0.0.1:{port}/{dbname}\"\n{secret}\n"
        ))
    }

    pub fn client(&self, addr: &str, who: &str) -> credbroker::client::ClientOpts {
        credbroker::client::ClientOpts {
            addr: addr.to_string(),
            ca: self.pki.join("ca.pem"),
            cert: self.pki.join(format!("{who}.pem")),
            key: self.pki.join(format!("{who}-key.pem")),
        }
    }
}
