//! `credbroker bench scaleout`: issue + revoke per second with 1, 2, 3…
//! `credbroker serve` replicas on one PostgreSQL lease store, at several
//! caller counts, and where the CPU went. The load comes from
//! `credbroker bench-client` processes (one per replica: callers are dealt
//! round-robin over the replicas, as a TCP load balancer would), over mTLS
//! gRPC, with durable defaults everywhere: the store and the target
//! database are two throwaway PostgreSQL servers with fsync and
//! synchronous commit on.
//!
//! What limits it is read off CPU per process, as cores busy over the
//! run: the brokers, the store's PostgreSQL, the target's PostgreSQL, the
//! clients — against the machine's cores, all of which every process
//! here shares (on a small machine the replicas compete with their own
//! databases; the table says so rather than hide it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::client::{Job, Work};
use crate::bench::cpu::{pid_ticks, postgres_ticks, ticks_per_second};
use crate::bench::outside::ClientProcess;
use crate::bench::setup::{self, BenchPostgres, BrokerSettings, Spawned};
use crate::bench::{io_err, loadavg, Machine};
use credbroker::error::{Error, Result};
use credbroker_testkit::devenv::DevEnv;

/// `credbroker bench scaleout`'s flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Replica counts, comma-separated (each on the same store)
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2, 3])]
    pub replicas: Vec<usize>,
    /// Concurrent callers in all, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = vec![16usize, 64])]
    pub callers: Vec<usize>,
    /// How long each run lasts
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Where the Markdown and JSON reports go
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
}

/// One (replicas, callers) run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub replicas: usize,
    pub callers: usize,
    pub leases: u64,
    pub errors: u64,
    pub seconds: f64,
    pub leases_per_s: f64,
    /// Lease-weighted mean of the clients' medians.
    pub p50_ms: f64,
    /// The worst client's 99th percentile.
    pub p99_ms: f64,
    /// Cores busy over the run, per process kind.
    pub brokers_cores: f64,
    pub store_pg_cores: f64,
    pub target_pg_cores: f64,
    pub clients_cores: f64,
    /// `/proc/loadavg` when the run started.
    pub load: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub duration_s: f64,
    pub runs: Vec<Run>,
}

/// CPU ticks of every process kind at one instant.
struct Ticks {
    brokers: u64,
    store: u64,
    target: u64,
    clients: u64,
    at: Instant,
}

impl Ticks {
    fn now(brokers: &[u32], clients: &[u32], store: &Path, target: &Path) -> Ticks {
        Ticks {
            brokers: brokers.iter().map(|&p| pid_ticks(p)).sum(),
            store: postgres_ticks(store),
            target: postgres_ticks(target),
            clients: clients.iter().map(|&p| pid_ticks(p)).sum(),
            at: Instant::now(),
        }
    }
}

pub async fn run(args: &Args) -> Result<Report> {
    if args.replicas.is_empty() || args.replicas.contains(&0) {
        return Err(Error::config("--replicas: give counts of at least 1"));
    }
    if args.callers.is_empty() || args.callers.contains(&0) {
        return Err(Error::config("--callers: give counts of at least 1"));
    }
    let target = BenchPostgres::start(true).await?;
    let store = BenchPostgres::start(true).await?;
    let mut machine = Machine::sample(format!(
        "target: {}; store: a second server alike",
        target.version
    ));
    let dir = setup::bench_dir("scaleout")?;
    let base = setup::write_env(
        dir.path(),
        &target,
        "127.0.0.1:0",
        &BrokerSettings::default(),
    )?;
    let store_db = "credbroker_store";
    store
        .pg
        .create_database(store_db)
        .await
        .map_err(io_err("create store database"))?;
    let secret = dir.path().join("store-password");
    credbroker::fsutil::write_secret_file(&secret, store.pg.superuser_password().as_bytes())
        .map_err(io_err("store password file"))?;
    let template = std::fs::read_to_string(&base.config_path)
        .map_err(io_err("read config"))?
        .replace(
            &format!(
                "[store]\nurl = \"sqlite://{}\"\n",
                base.store_path.display()
            ),
            &format!(
                "[store]\nurl = \"{}\"\npassword_file = \"{}\"\n",
                store.pg.url(store_db),
                secret.display()
            ),
        );
    if !template.contains(store_db) {
        return Err(Error::internal(
            "bench config: no [store] section to replace",
        ));
    }

    let mut counts = args.replicas.clone();
    counts.sort_unstable();
    counts.dedup();
    let mut replicas: Vec<(Spawned, u16)> = Vec::new();
    let mut runs = Vec::new();
    for &n in &counts {
        while replicas.len() < n {
            replicas.push(start_replica(&base, &template, replicas.len()).await?);
        }
        for &callers in &args.callers {
            let r = measure(
                &replicas[..n],
                callers,
                args.duration,
                &base,
                &store,
                &target,
                dir.path(),
            )
            .await?;
            eprintln!(
                "  {} replica(s) {:>3} callers: {:>7.1} leases/s  p50 {:>6.1} ms  p99 {:>6.1} ms  \
                 cores: brokers {:.2} store {:.2} target {:.2} clients {:.2}  ({} errors, load {})",
                r.replicas,
                r.callers,
                r.leases_per_s,
                r.p50_ms,
                r.p99_ms,
                r.brokers_cores,
                r.store_pg_cores,
                r.target_pg_cores,
                r.clients_cores,
                r.errors,
                r.load
            );
            runs.push(r);
        }
    }
    for (mut r, _) in replicas {
        r.stop().await?;
    }
    machine.finish();
    Ok(Report {
        machine,
        duration_s: args.duration.as_secs_f64(),
        runs,
    })
}

/// Replica `i`: the shared config with its own port and audit log, in a
/// directory of its own (its `broker.log` there).
async fn start_replica(base: &DevEnv, template: &str, i: usize) -> Result<(Spawned, u16)> {
    let dir = base.dir.join(format!("replica-{i}"));
    std::fs::create_dir_all(&dir).map_err(io_err("replica directory"))?;
    let port = setup::free_port()?;
    let env = DevEnv {
        dir: dir.clone(),
        pki: base.pki.clone(),
        config_path: dir.join("broker.toml"),
        audit_path: dir.join("audit.log"),
        store_path: base.store_path.clone(),
    };
    let text = template
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            &format!("path = \"{}\"", base.audit_path.display()),
            &format!("path = \"{}\"", env.audit_path.display()),
        );
    std::fs::write(&env.config_path, text).map_err(io_err("write replica config"))?;
    let spawned = Spawned::start(&env, &format!("https://127.0.0.1:{port}")).await?;
    Ok((spawned, port))
}

/// One run: a client process per replica with its share of the callers
/// (caller k goes to replica k mod n), all started and warmed up, the
/// CPU counters read, all let go at once, the counters read again.
async fn measure(
    replicas: &[(Spawned, u16)],
    callers: usize,
    duration: Duration,
    base: &DevEnv,
    store: &BenchPostgres,
    target: &BenchPostgres,
    dir: &Path,
) -> Result<Run> {
    let n = replicas.len();
    let mut clients = Vec::new();
    for (i, (_, port)) in replicas.iter().enumerate() {
        let share = callers / n + usize::from(i < callers % n);
        if share == 0 {
            continue;
        }
        let job = Job {
            work: Work::Grpc {
                port: *port,
                pki: base.pki.clone(),
            },
            callers: share,
            duration_ms: duration.as_millis() as u64,
            leases: None,
        };
        let client_dir = dir.join(format!("client-{n}-{callers}-{i}"));
        std::fs::create_dir_all(&client_dir).map_err(io_err("client directory"))?;
        clients.push(ClientProcess::start(&job, &client_dir).await?);
    }
    let broker_pids: Vec<u32> = replicas.iter().map(|(s, _)| s.pid()).collect();
    let client_pids: Vec<u32> = clients.iter().map(|c| c.pid).collect();
    let (store_dir, target_dir) = (store.pg.data_dir(), target.pg.data_dir());
    let load = loadavg();
    let before = Ticks::now(&broker_pids, &client_pids, store_dir, target_dir);
    let outcomes = futures::future::join_all(clients.iter_mut().map(|c| c.run())).await;
    let after = Ticks::now(&broker_pids, &client_pids, store_dir, target_dir);
    for c in clients {
        c.finish().await?;
    }
    let outcomes = outcomes.into_iter().collect::<Result<Vec<_>>>()?;
    let leases: u64 = outcomes.iter().map(|o| o.leases).sum();
    let seconds = outcomes.iter().map(|o| o.seconds).fold(0.0, f64::max);
    let wall = (after.at - before.at).as_secs_f64().max(1e-9);
    let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / ticks_per_second() / wall;
    Ok(Run {
        replicas: n,
        callers,
        leases,
        errors: outcomes.iter().map(|o| o.errors).sum(),
        seconds,
        leases_per_s: leases as f64 / seconds.max(1e-9),
        p50_ms: outcomes
            .iter()
            .map(|o| o.cycle.p50_ms * o.leases as f64)
            .sum::<f64>()
            / (leases.max(1) as f64),
        p99_ms: outcomes.iter().map(|o| o.cycle.p99_ms).fold(0.0, f64::max),
        brokers_cores: cores(before.brokers, after.brokers),
        store_pg_cores: cores(before.store, after.store),
        target_pg_cores: cores(before.target, after.target),
        clients_cores: cores(before.clients, after.clients),
        load,
        first_error: outcomes.into_iter().find_map(|o| o.first_error),
    })
}

impl Report {
    pub fn markdown(&self) -> String {
        let errors: u64 = self.runs.iter().map(|r| r.errors).sum();
        let mut out = format!(
            "# credbroker bench scaleout: issue + revoke, N replicas on one PostgreSQL store\n\n{}\
             - replicas: `credbroker serve` processes, one shared PostgreSQL store (fsync and \
             synchronous commit on) on a server of its own; target: another throwaway \
             PostgreSQL; clients: one `credbroker bench-client` per replica, callers dealt \
             round-robin, mTLS gRPC\n- {:.0} s per run; errors: {errors}\n- cores busy = CPU \
             time of the process kind over the run's wall time (of {} cores in all)\n\n\
             | replicas | callers | leases/s | p50 ms | p99 ms | brokers | store PG | target PG | clients | load (1 min) |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.machine.markdown(),
            self.duration_s,
            self.machine.cpus,
        );
        for r in &self.runs {
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                r.replicas,
                r.callers,
                r.leases_per_s,
                r.p50_ms,
                r.p99_ms,
                r.brokers_cores,
                r.store_pg_cores,
                r.target_pg_cores,
                r.clients_cores,
                r.load.split_whitespace().next().unwrap_or("")
            ));
        }
        out.push_str(&crate::bench::first_errors(
            self.runs
                .iter()
                .map(|r| ("scaleout", r.callers, r.first_error.as_deref())),
        ));
        out
    }
}
