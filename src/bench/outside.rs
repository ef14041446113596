//! `credbroker bench outside`: the lease path as users meet it. The
//! broker runs as `credbroker serve` (its own process, durable defaults:
//! the SQLite store on disk) and the load comes from another process
//! (`credbroker bench-client`, see [`crate::bench::client`]) over the
//! network, on one throwaway PostgreSQL with SCRAM and fsync on. Every
//! column does the same work — a login role with a group grant, then its
//! removal:
//!
//! - (a) plaintext `CREATE ROLE … PASSWORD` + grant, then the drop;
//! - (b′) credbroker's own statements, sent straight by its backend code;
//! - (c) credbroker over mTLS gRPC; (c-v) over its Vault API;
//! - OpenBao's database secrets engine, when `bao` is on the PATH.
//!
//! CPU per lease of each process (server, database, client) from
//! `/proc/<pid>/stat`, and the load average when each run started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::bench::client::{Job, Outcome, Work};
use crate::bench::cpu::{ApartPerLease, Meter};
use crate::bench::openbao::{self, OpenBao};
use crate::bench::setup::{self, BenchPostgres, BrokerSettings};
use crate::bench::{io_err, loadavg, Latency, Machine};
use credbroker::error::{Error, Result};
use credbroker_testkit::devenv::DevEnv;

#[derive(Debug, Clone)]
pub struct Options {
    pub callers: Vec<usize>,
    pub duration: Duration,
    /// A fixed number of leases per run instead of a duration.
    pub leases: Option<u64>,
    pub columns: Vec<Column>,
    /// Runs of each (column, callers); the report keeps the fastest.
    pub rounds: usize,
    pub out_dir: PathBuf,
    /// `[vault_api] token_cache` of the broker under test (off: every
    /// request reads its token from the store, the cache's "before").
    pub vault_token_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Column {
    #[serde(rename = "a_plaintext")]
    Plaintext,
    #[serde(rename = "b2_same_sql")]
    SameSql,
    #[serde(rename = "c_grpc")]
    Grpc,
    #[serde(rename = "cv_vault_api")]
    VaultApi,
    #[serde(rename = "openbao")]
    OpenBao,
}

impl Column {
    pub const ALL: [Column; 5] = [
        Column::Plaintext,
        Column::SameSql,
        Column::Grpc,
        Column::VaultApi,
        Column::OpenBao,
    ];

    pub fn parse(s: &str) -> Option<Column> {
        match s {
            "a" | "plaintext" => Some(Column::Plaintext),
            "p" | "b2" | "sql" => Some(Column::SameSql),
            "c" | "grpc" => Some(Column::Grpc),
            "v" | "cv" | "vault" => Some(Column::VaultApi),
            "o" | "openbao" => Some(Column::OpenBao),
            _ => None,
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Column::Plaintext => "(a) plaintext",
            Column::SameSql => "(b′) same SQL",
            Column::Grpc => "(c) gRPC",
            Column::VaultApi => "(c-v) Vault API",
            Column::OpenBao => "OpenBao",
        }
    }
}

/// One (column, callers) run, as the client process saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub column: Column,
    pub callers: usize,
    pub leases: u64,
    pub errors: u64,
    pub seconds: f64,
    pub leases_per_s: f64,
    pub cycle: Latency,
    pub cost: ApartPerLease,
    /// `/proc/loadavg` (1/5/15 min) when the run started.
    pub load: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub duration_s: f64,
    pub fixed_leases: Option<u64>,
    pub rounds: usize,
    /// `OpenBao vX` when it ran; otherwise why not.
    pub openbao: String,
    pub runs: Vec<Run>,
}

/// The ports and files every column's job points at.
struct Targets<'a> {
    pg: &'a BenchPostgres,
    env: &'a DevEnv,
    grpc_port: u16,
    vault_port: u16,
    bao: Option<&'a OpenBao>,
}

impl Targets<'_> {
    fn work(&self, c: Column) -> Option<Work> {
        let pki = self.env.pki.clone();
        let (mount, role) = (openbao::MOUNT.to_string(), setup::ROLE.to_string());
        Some(match c {
            Column::Plaintext => Work::Plaintext {
                port: self.pg.pg.port(),
                user: self.pg.pg.superuser().into(),
                password: self.pg.pg.superuser_password().into(),
                dbname: setup::DB.into(),
            },
            Column::SameSql => Work::Sql {
                config: self.env.config_path.clone(),
            },
            Column::Grpc => Work::Grpc {
                port: self.grpc_port,
                pki,
            },
            Column::VaultApi => Work::Vault {
                port: self.vault_port,
                pki,
                mount,
                role,
            },
            Column::OpenBao => {
                let bao = self.bao?;
                Work::OpenBao {
                    port: bao.port,
                    ca: bao.ca.clone(),
                    token: bao.token.clone(),
                    mount,
                    role,
                }
            }
        })
    }
}

pub async fn run(opts: &Options) -> Result<Report> {
    let pg = BenchPostgres::start(true).await?;
    let machine = Machine::sample(pg.version.clone());
    let dir = setup::bench_dir("outside")?;
    let (grpc_port, vault_port) = (setup::free_port()?, setup::free_port()?);
    let env = setup::write_env(
        dir.path(),
        &pg,
        &format!("127.0.0.1:{grpc_port}"),
        &BrokerSettings::default(),
    )?;
    let broker = serve(opts, &env, grpc_port, vault_port).await?;
    let (bao, openbao_note) = match (opts.columns.contains(&Column::OpenBao), openbao::find()) {
        (false, _) => (None, "not asked for".to_string()),
        (true, None) => {
            eprintln!("  OpenBao: {}", openbao::HOW_TO_GET);
            (None, openbao::HOW_TO_GET.to_string())
        }
        (true, Some(bin)) => {
            let bao_dir = dir.path().join("openbao");
            let bao = OpenBao::start(&bin, &bao_dir, &env.pki, &pg).await?;
            let note = format!(
                "{} ({}; raft storage, TLS, scram-sha-256)",
                bao.version,
                bin.display()
            );
            (Some(bao), note)
        }
    };
    let targets = Targets {
        pg: &pg,
        env: &env,
        grpc_port,
        vault_port,
        bao: bao.as_ref(),
    };
    let runs = runs(
        opts,
        &opts.columns,
        |c| targets.work(c),
        |c| match c {
            Column::Grpc | Column::VaultApi => broker.as_ref().map(|b| b.pid()),
            Column::OpenBao => bao.as_ref().map(|b| b.pid()),
            Column::Plaintext | Column::SameSql => None,
        },
        &pg.meter().await?,
        dir.path(),
    )
    .await?;
    if let Some(mut b) = broker {
        b.stop().await?;
    }
    if let Some(b) = bao {
        b.stop().await?;
    }
    Ok(Report::new(opts, machine, openbao_note, runs))
}

/// Adds the bench broker's `[vault_api]` on `vault_port` to `env`'s config
/// (each caller logs in once; the default cap of 32 tokens per identity
/// would evict the first callers' tokens at 64 callers) and starts it as
/// `credbroker serve` on `grpc_port` when a column asks for it (gRPC, the
/// Vault API).
pub(super) async fn serve(
    opts: &Options,
    env: &DevEnv,
    grpc_port: u16,
    vault_port: u16,
) -> Result<Option<setup::Spawned>> {
    let mut config = std::fs::read_to_string(&env.config_path).map_err(io_err("read config"))?;
    config.push_str(&format!(
        "\n[vault_api]\nlisten = \"127.0.0.1:{vault_port}\"\nmax_tokens_per_identity = 1000\n\
         token_cache = {}\n",
        opts.vault_token_cache
    ));
    std::fs::write(&env.config_path, config).map_err(io_err("write config"))?;
    if !opts.columns.contains(&Column::Grpc) && !opts.columns.contains(&Column::VaultApi) {
        return Ok(None);
    }
    let addr = format!("https://127.0.0.1:{grpc_port}");
    Ok(Some(setup::Spawned::start(env, &addr).await?))
}

/// Every (callers, column) run of `columns`, each the fastest of
/// `opts.rounds`, printed as it ends. `work`: what the client process does
/// for a column (`None`: the column cannot run here, e.g. OpenBao without
/// `bao`); `server`: the pid of the process serving it, if any.
pub(super) async fn runs(
    opts: &Options,
    columns: &[Column],
    work: impl Fn(Column) -> Option<Work>,
    server: impl Fn(Column) -> Option<u32>,
    meter: &Meter,
    dir: &Path,
) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for &callers in &opts.callers {
        for &column in columns {
            let mut best: Option<Run> = None;
            for _ in 0..opts.rounds.max(1) {
                let Some(work) = work(column) else {
                    continue;
                };
                let job = Job {
                    work,
                    callers,
                    duration_ms: opts.duration.as_millis() as u64,
                    leases: opts.leases,
                };
                let r = measure(column, job, server(column), meter, dir).await?;
                if best
                    .as_ref()
                    .is_none_or(|b| r.leases_per_s > b.leases_per_s)
                {
                    best = Some(r);
                }
            }
            let Some(r) = best else { continue };
            print_run(&r);
            runs.push(r);
        }
    }
    Ok(runs)
}

/// One run: a client process opens its connections and warms up; the
/// counters are read; it runs; they are read again before it lets go of
/// its connections.
async fn measure(
    column: Column,
    job: Job,
    server: Option<u32>,
    meter: &Meter,
    dir: &Path,
) -> Result<Run> {
    let callers = job.callers;
    let mut client = ClientProcess::start(&job, dir).await?;
    let load = loadavg();
    let before = meter.apart(server, client.pid).await;
    let outcome = client.run().await?;
    let after = meter.apart(server, client.pid).await;
    client.finish().await?;
    Ok(Run {
        column,
        callers,
        leases: outcome.leases,
        errors: outcome.errors,
        seconds: outcome.seconds,
        leases_per_s: outcome.leases as f64 / outcome.seconds.max(1e-9),
        cycle: outcome.cycle,
        cost: ApartPerLease::between(&before, &after, outcome.leases),
        load,
        first_error: outcome.first_error,
    })
}

/// `credbroker bench-client` as a child, spoken to over its stdin/stdout
/// (also `bench scaleout`'s, one per replica).
pub(crate) struct ClientProcess {
    child: Child,
    pub(crate) pid: u32,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl ClientProcess {
    /// Spawns it, hands it the job and waits for its `ready`.
    pub(crate) async fn start(job: &Job, dir: &Path) -> Result<ClientProcess> {
        let exe = std::env::current_exe().map_err(io_err("own executable"))?;
        let log = dir.join("bench-client.log");
        let err = std::fs::File::create(&log).map_err(io_err("client log"))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("bench-client")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err("spawn credbroker bench-client"))?;
        let pid = child
            .id()
            .ok_or_else(|| Error::internal("bench-client exited at once"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .map(|o| BufReader::new(o).lines())
            .ok_or_else(|| Error::internal("bench-client has no stdout"))?;
        let mut me = ClientProcess {
            child,
            pid,
            stdin,
            stdout,
            log,
        };
        let line = serde_json::to_string(job).map_err(Error::internal)?;
        me.say(&line).await?;
        me.expect("ready").await?;
        Ok(me)
    }

    async fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::internal("bench-client stdin closed"))?;
        let sent = async {
            stdin.write_all(format!("{line}\n").as_bytes()).await?;
            stdin.flush().await
        };
        match sent.await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(&format!("cannot write to it: {e}"))),
        }
    }

    async fn line(&mut self) -> Result<String> {
        match self.stdout.next_line().await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(self.failed("it ended")),
            Err(e) => Err(self.failed(&format!("cannot read it: {e}"))),
        }
    }

    async fn expect(&mut self, word: &str) -> Result<()> {
        let l = self.line().await?;
        if l == word {
            Ok(())
        } else {
            Err(self.failed(&format!("it said {l:?}, not {word:?}")))
        }
    }

    /// `go`, then the outcome.
    pub(crate) async fn run(&mut self) -> Result<Outcome> {
        self.say("go").await?;
        let l = self.line().await?;
        serde_json::from_str(&l).map_err(|e| self.failed(&format!("not an outcome ({e}): {l}")))
    }

    /// Closes its stdin (it lets go of its connections and exits).
    pub(crate) async fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .map_err(|_| Error::internal("bench-client did not exit within 60 s"))?
            .map_err(io_err("wait for bench-client"))?;
        if !status.success() {
            return Err(self.failed(&format!("it exited with {status}")));
        }
        Ok(())
    }

    /// An error naming what went wrong and the end of the client's log.
    fn failed(&self, what: &str) -> Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Error::internal(format!(
            "bench-client: {what}; its log:\n{}",
            tail.join("\n")
        ))
    }
}

/// One progress line per run, on stderr.
pub(super) fn print_run(r: &Run) {
    eprintln!(
        "  {:<16} {:>3} callers: {:>8.1} leases/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} leases, {} errors, load {})",
        r.column.header(),
        r.callers,
        r.leases_per_s,
        r.cycle.p50_ms,
        r.cycle.p99_ms,
        r.leases,
        r.errors,
        r.load
    );
}

/// Reads one figure off a run; `None` where the run has none.
type Figure = fn(&Run) -> Option<f64>;

/// The ratios the issue asks for: numerator, denominator, header.
const RATIOS: [(Column, Column, &str); 4] = [
    (Column::Grpc, Column::Plaintext, "c/a"),
    (Column::Grpc, Column::SameSql, "c/b′"),
    (Column::VaultApi, Column::Grpc, "c-v/c"),
    (Column::Grpc, Column::OpenBao, "c/OpenBao"),
];

fn cell(x: Option<f64>) -> String {
    match x {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

impl Report {
    /// The report of `runs`; `openbao`: its version, or why it did not run.
    pub(super) fn new(
        opts: &Options,
        mut machine: Machine,
        openbao: String,
        runs: Vec<Run>,
    ) -> Report {
        machine.finish();
        Report {
            machine,
            duration_s: opts.duration.as_secs_f64(),
            fixed_leases: opts.leases,
            rounds: opts.rounds.max(1),
            openbao,
            runs,
        }
    }

    fn find(&self, c: Column, callers: usize) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.column == c && r.callers == callers)
    }

    fn callers(&self) -> Vec<usize> {
        let mut callers: Vec<usize> = self.runs.iter().map(|r| r.callers).collect();
        callers.dedup();
        callers
    }

    fn header(first: &str, second: Option<&str>) -> String {
        let mut cols = vec![first.to_string()];
        cols.extend(second.map(str::to_string));
        cols.extend(Column::ALL.iter().map(|c| c.header().to_string()));
        cols.extend(RATIOS.iter().map(|r| r.2.to_string()));
        let mut out = format!("| {} |\n|", cols.join(" | "));
        for (i, _) in cols.iter().enumerate() {
            out.push_str(if i < 1 + usize::from(second.is_some()) {
                "---|"
            } else {
                "---:|"
            });
        }
        out + "\n"
    }

    /// A row: the figure of every column, then the ratios (when `ratios`).
    fn row(&self, lead: &str, callers: usize, get: Figure, ratios: bool) -> String {
        let v = |c| self.find(c, callers).and_then(get);
        let mut cells: Vec<String> = Column::ALL.iter().map(|&c| cell(v(c))).collect();
        for (num, den, _) in RATIOS {
            cells.push(match (v(num), v(den)) {
                (Some(n), Some(d)) if ratios && d > 0.0 => format!("{:.2}×", n / d),
                _ => "–".into(),
            });
        }
        format!("| {lead} | {} |\n", cells.join(" | "))
    }

    /// The headline: leases/s per caller count, with the ratios.
    pub fn headline(&self) -> String {
        let mut out = Self::header("leases/s", None);
        for n in self.callers() {
            let lead = format!("{n} caller{}", if n == 1 { "" } else { "s" });
            out.push_str(&self.row(&lead, n, |r| Some(r.leases_per_s), true));
        }
        out
    }

    /// Every figure per caller count.
    pub fn figures(&self) -> String {
        let rows: [(&str, Figure, bool); 8] = [
            ("leases/s", |r| Some(r.leases_per_s), true),
            ("p50 ms", |r| Some(r.cycle.p50_ms), true),
            ("p99 ms", |r| Some(r.cycle.p99_ms), true),
            ("CPU ms/lease, server", |r| r.cost.server_cpu_ms, true),
            (
                "CPU ms/lease, database",
                |r| Some(r.cost.database_cpu_ms),
                true,
            ),
            ("CPU ms/lease, client", |r| Some(r.cost.client_cpu_ms), true),
            ("WAL syncs/lease", |r| r.cost.wal_syncs, true),
            (
                "load (1 min) at start",
                |r| {
                    r.load
                        .split_whitespace()
                        .next()
                        .and_then(|l| l.parse().ok())
                },
                false,
            ),
        ];
        let mut out = Self::header("callers", Some("figure"));
        for n in self.callers() {
            for (label, get, ratios) in rows {
                out.push_str(&self.row(&format!("{n} | {label}"), n, get, ratios));
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let how = crate::bench::run_length(self.fixed_leases, self.duration_s);
        let errors: u64 = self.runs.iter().map(|r| r.errors).sum();
        let mut out = format!(
            "# credbroker bench outside: issue + revoke from a separate client process\n\n{}\
             - server: `credbroker serve` (SQLite store on disk, durable defaults); client: \
             `credbroker bench-client`, one connection per caller\n\
             - OpenBao: {}\n- {how}, best of {} round(s) by leases/s\n- errors: {errors}\n\n",
            self.machine.markdown(),
            self.openbao,
            self.rounds,
        );
        out.push_str(&self.headline());
        out.push('\n');
        out.push_str(&self.figures());
        out.push_str(&crate::bench::first_errors(
            self.runs
                .iter()
                .map(|r| (r.column.header(), r.callers, r.first_error.as_deref())),
        ));
        out
    }
}
