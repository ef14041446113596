//! `credbroker bench-client` (hidden): the load of `bench outside`, in a
//! process of its own, as users meet the broker — over the network, with
//! their own CPU to spend. The parent talks to it over stdin/stdout, one
//! line each way at a time:
//!
//! 1. parent → a [`Job`] as JSON (on stdin, not argv: it carries the
//!    throwaway database's password or OpenBao's token);
//! 2. client → `ready` once every caller's connection is open and has done
//!    one untimed cycle (TLS handshakes, logins, pools warm);
//! 3. parent → `go` (it has read the CPU counters);
//! 4. client → an [`Outcome`] as JSON when the run is over;
//! 5. the client holds its connections until stdin closes, so the
//!    database's server processes are still there to be counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;

use crate::bench::setup::{self, Grant};
use crate::bench::{io_err, lease, pg_err, vault_http, Latency};
use credbroker::backend::Backend;
use credbroker::config::RoleConfig;
use credbroker::error::{Error, Result};
use credbroker::pb;

/// What the client process sends, and how long.
#[derive(Serialize, Deserialize)]
pub struct Job {
    pub work: Work,
    pub callers: usize,
    pub duration_ms: u64,
    /// A fixed number of cycles in all instead of a duration.
    pub leases: Option<u64>,
}

/// One column's cycle. No `Debug`: a job carries secrets.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Work {
    /// (a): `CREATE ROLE … PASSWORD 'plaintext'` and the grant, then the
    /// drop, as the superuser of the throwaway server on 127.0.0.1.
    Plaintext {
        port: u16,
        user: String,
        password: String,
        dbname: String,
    },
    /// (a) on MariaDB (`bench outside --mysql`): `CREATE USER …
    /// IDENTIFIED BY 'plaintext'` and the grant, then `DROP USER`, as root
    /// over TCP on 127.0.0.1 (`bench::mysql::direct_cycle`).
    MysqlPlaintext {
        port: u16,
        user: String,
        password: String,
    },
    /// (b′): credbroker's own backend, called straight with the bench
    /// config's database and role.
    Sql { config: PathBuf },
    /// (c): `IssueLease` + `RevokeLease` over mTLS gRPC as the dev `app`.
    Grpc { port: u16, pki: PathBuf },
    /// (c-v): cert login once per caller, then `<mount>/creds/<role>` +
    /// `sys/leases/revoke` over the Vault API.
    Vault {
        port: u16,
        pki: PathBuf,
        mount: String,
        role: String,
    },
    /// OpenBao: the same two calls with a token, over TLS.
    OpenBao {
        port: u16,
        ca: PathBuf,
        token: String,
        mount: String,
        role: String,
    },
}

/// What the client measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub leases: u64,
    pub errors: u64,
    pub seconds: f64,
    pub cycle: Latency,
    pub first_error: Option<String>,
}

/// One caller's open connection.
enum Caller {
    Pg(tokio_postgres::Client),
    My(mysql_async::Conn),
    Sql(Arc<dyn Backend>, Arc<RoleConfig>),
    Grpc(pb::broker_client::BrokerClient<Channel>),
    Http(vault_http::Conn, Arc<(String, String)>),
}

impl Caller {
    async fn cycle(&mut self) -> Result<()> {
        match self {
            Caller::Pg(c) => lease::direct_cycle(c, false, Grant::Member, None)
                .await
                .map(drop),
            Caller::My(c) => crate::bench::mysql::direct_cycle(c, false).await.map(drop),
            Caller::Sql(backend, role) => lease::backend_cycle(backend.as_ref(), role, None)
                .await
                .map(drop),
            Caller::Grpc(c) => {
                let (id, _) = setup::issue(c, 600).await?;
                setup::revoke(c, id).await
            }
            Caller::Http(conn, target) => conn.creds_and_revoke(&target.0, &target.1).await,
        }
    }
}

/// Opens `n` callers for `work`.
async fn open(work: &Work, n: usize) -> Result<Vec<Caller>> {
    let mut callers = Vec::with_capacity(n);
    match work {
        Work::Plaintext {
            port,
            user,
            password,
            dbname,
        } => {
            for _ in 0..n {
                let (client, conn) = tokio_postgres::Config::new()
                    .host("127.0.0.1")
                    .port(*port)
                    .user(user)
                    .password(password)
                    .dbname(dbname)
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(pg_err("connect"))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                callers.push(Caller::Pg(client));
            }
        }
        Work::MysqlPlaintext {
            port,
            user,
            password,
        } => {
            for _ in 0..n {
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname("127.0.0.1")
                    .tcp_port(*port)
                    .prefer_socket(false)
                    .user(Some(user))
                    .pass(Some(password));
                let conn = mysql_async::Conn::new(opts)
                    .await
                    .map_err(crate::bench::mysql::my_err("connect"))?;
                callers.push(Caller::My(conn));
            }
        }
        Work::Sql { config } => {
            // One backend, its pool shared, as the broker shares its own.
            let (backend, role) = lease::backend_of(config)?;
            callers.extend((0..n).map(|_| Caller::Sql(backend.clone(), role.clone())));
        }
        Work::Grpc { port, pki } => {
            for _ in 0..n {
                let opts = credbroker::client::ClientOpts {
                    addr: format!("https://127.0.0.1:{port}"),
                    ca: pki.join("ca.pem"),
                    cert: pki.join("app.pem"),
                    key: pki.join("app-key.pem"),
                };
                callers.push(Caller::Grpc(opts.broker()?));
            }
        }
        Work::Vault {
            port,
            pki,
            mount,
            role,
        } => {
            let (cert, key) = (pki.join("app.pem"), pki.join("app-key.pem"));
            let tls = vault_http::tls(&pki.join("ca.pem"), Some((&cert, &key)))?;
            let target = Arc::new((mount.clone(), role.clone()));
            for _ in 0..n {
                let mut conn = vault_http::Conn::open(*port, tls.clone()).await?;
                let login = conn.ok(Method::POST, "/v1/auth/cert/login", None).await?;
                let token = login["auth"]["client_token"]
                    .as_str()
                    .ok_or_else(|| Error::internal("cert login answered no client_token"))?;
                conn.token = Some(token.to_string());
                callers.push(Caller::Http(conn, target.clone()));
            }
        }
        Work::OpenBao {
            port,
            ca,
            token,
            mount,
            role,
        } => {
            let tls = vault_http::tls(ca, None)?;
            let target = Arc::new((mount.clone(), role.clone()));
            for _ in 0..n {
                let mut conn = vault_http::Conn::open(*port, tls.clone()).await?;
                conn.token = Some(token.clone());
                callers.push(Caller::Http(conn, target.clone()));
            }
        }
    }
    Ok(callers)
}

/// Runs every caller until the deadline or the shared count runs out.
async fn drive(callers: Vec<Caller>, job: &Job) -> Result<(Vec<Caller>, Outcome)> {
    let remaining = Arc::new(AtomicU64::new(job.leases.unwrap_or(u64::MAX)));
    let fixed = job.leases.is_some();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(job.duration_ms);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut caller| {
            let remaining = remaining.clone();
            tokio::spawn(async move {
                let (mut took, mut errors, mut first) = (Vec::new(), 0u64, None);
                loop {
                    let more = if fixed {
                        remaining
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                    } else {
                        Instant::now() < deadline
                    };
                    if !more {
                        break;
                    }
                    let t = Instant::now();
                    match caller.cycle().await {
                        Ok(()) => took.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert_with(|| e.to_string());
                            // A broken connection must not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (caller, took, errors, first)
            })
        })
        .collect();
    let (mut kept, mut took, mut errors, mut first_error) = (Vec::new(), Vec::new(), 0, None);
    for t in tasks {
        let (caller, d, e, f) = t.await.map_err(Error::internal)?;
        kept.push(caller);
        took.extend(d);
        errors += e;
        first_error = first_error.or(f);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        kept,
        Outcome {
            leases: took.len() as u64,
            errors,
            seconds,
            cycle: Latency::of(&mut took),
            first_error,
        },
    ))
}

/// The hidden subcommand's body: the protocol in the module docs.
pub async fn run() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut next = async || lines.next_line().await.map_err(io_err("read stdin"));
    let job: Job = match next().await? {
        Some(l) => serde_json::from_str(&l)
            .map_err(|e| Error::config(format!("bench-client: not a job: {e}")))?,
        None => return Err(Error::config("bench-client: no job on stdin")),
    };
    let mut callers = open(&job.work, job.callers.max(1)).await?;
    for c in &mut callers {
        c.cycle()
            .await
            .map_err(|e| Error::internal(format!("warm-up: {e}")))?;
    }
    let mut out = tokio::io::stdout();
    let mut say = async |line: String| -> Result<()> {
        out.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(io_err("write stdout"))?;
        out.flush().await.map_err(io_err("write stdout"))
    };
    say("ready".into()).await?;
    if next().await?.as_deref() != Some("go") {
        return Err(Error::config("bench-client: expected `go`"));
    }
    let (callers, outcome) = drive(callers, &job).await?;
    say(serde_json::to_string(&outcome).map_err(Error::internal)?).await?;
    // Held until the parent has read the database's counters.
    while next().await?.is_some() {}
    drop(callers);
    Ok(())
}
