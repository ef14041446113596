//! The lease path, side by side on one PostgreSQL:
//!
//! - (a) what most brokers send: `CREATE ROLE … PASSWORD 'plaintext' VALID
//!   UNTIL …` and a grant, then the drop, straight over tokio-postgres;
//! - (b) the same with a 1-round SCRAM verifier: the database's own limit;
//! - (b′) exactly the statements credbroker sends, in its order and
//!   transactions, with no broker: its own `PostgresBackend` (create with
//!   verifier and grants; NOLOGIN, end sessions, reassign and drop owned,
//!   drop role) called straight. The floor for credbroker's semantics:
//!   c/b′ is the broker's own efficiency, b′/b the price of safe revocation;
//! - (c) credbroker end to end: mTLS gRPC, policy, intent row, role,
//!   activation, audit record, reply; then revoke (claim, NOLOGIN, end
//!   sessions, drop, mark revoked, audit).
//!
//! One lease is one issue + revoke cycle in every scenario; each caller has
//! its own connection (a database session for (a)/(b), an mTLS channel for
//! (c)), opened before timing starts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use rand::Rng;
use serde::Serialize;

use crate::bench::cpu::{Meter, PerLease};
use crate::bench::setup::{self, BenchPostgres, BrokerSettings, Grant, InProcess};
use crate::bench::{pg_err, Latency, Machine};
use credbroker::backend::{Backend, NewUser, Revokee, UserRef};
use credbroker::error::{Error, Result};
use credbroker::lease::Password;
use credbroker_testkit::devenv::DevEnv;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub callers: Vec<usize>,
    /// How long each (scenario, callers) run lasts, unless `leases` is set.
    pub duration: Duration,
    /// A fixed number of leases per run instead of a duration.
    pub leases: Option<u64>,
    pub scenarios: Vec<Scenario>,
    /// The broker's backend pool size (None: the broker's default).
    pub pool: Option<usize>,
    pub grant: Grant,
    /// Time issuance alone; roles are dropped (leases revoked) after the
    /// clock stops.
    pub issue_only: bool,
    /// PostgreSQL with fsync and synchronous commit on.
    pub pg_durable: bool,
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scenario {
    #[serde(rename = "a_plaintext")]
    Plaintext,
    #[serde(rename = "b_verifier")]
    Verifier,
    #[serde(rename = "b2_backend_sql")]
    BackendSql,
    #[serde(rename = "c_credbroker")]
    Credbroker,
}

impl Scenario {
    pub fn parse(s: &str) -> Option<Scenario> {
        match s {
            "a" | "plaintext" => Some(Scenario::Plaintext),
            "b" | "verifier" => Some(Scenario::Verifier),
            "p" | "b2" | "backend" => Some(Scenario::BackendSql),
            "c" | "credbroker" => Some(Scenario::Credbroker),
            _ => None,
        }
    }

    fn header(self) -> &'static str {
        match self {
            Scenario::Plaintext => "(a) plaintext",
            Scenario::Verifier => "(b) verifier",
            Scenario::BackendSql => "(b′) its SQL",
            Scenario::Credbroker => "(c) credbroker",
        }
    }
}

/// One (scenario, callers) run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub scenario: Scenario,
    pub callers: usize,
    pub leases: u64,
    pub errors: u64,
    pub seconds: f64,
    pub leases_per_s: f64,
    /// Issue + revoke, as the caller saw it.
    pub cycle: Latency,
    /// Issue alone (create + grant for (a)/(b)).
    pub issue: Latency,
    /// CPU and WAL syncs per lease, from `/proc` and `pg_stat_wal`.
    pub cost: PerLease,
    /// Backend statements per lease, by kind: how many and their wall
    /// time (only backends that time their statements: MySQL).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepCost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// `lease` (PostgreSQL) or `mysql`: the report's file name.
    #[serde(skip)]
    pub file: &'static str,
    /// What (a) and (b) send, for the report's first lines.
    #[serde(skip)]
    pub baselines: &'static str,
    /// The grant every scenario makes, as SQL.
    #[serde(skip)]
    pub grant_sql: String,
    pub machine: Machine,
    pub duration_s: f64,
    pub fixed_leases: Option<u64>,
    pub broker_pool: Option<usize>,
    pub grant: Grant,
    pub issue_only: bool,
    pub runs: Vec<Run>,
}

pub async fn run(opts: &Options) -> Result<Report> {
    let pg = BenchPostgres::start(opts.pg_durable).await?;
    let machine = Machine::sample(pg.version.clone());
    let dir = setup::bench_dir("lease")?;
    let settings = BrokerSettings {
        max_connections: opts.pool,
        grant: opts.grant,
        ..Default::default()
    };
    let env = setup::write_env(dir.path(), &pg, "127.0.0.1:0", &settings)?;
    let meter = pg.meter().await?;
    let runs = runs(opts, &env, &meter, |scenario, callers| {
        measure_direct(&pg, &meter, scenario, callers, opts)
    })
    .await?;
    Ok(Report::new(opts, machine, runs))
}

/// Every (callers, scenario) run of `opts`, printed as it ends: (a) and
/// (b) by `direct`, (b′) by credbroker's backend and (c) by a broker in
/// this process, both on `env`'s database.
pub(crate) async fn runs<F, Fut>(
    opts: &Options,
    env: &DevEnv,
    meter: &Meter,
    direct: F,
) -> Result<Vec<Run>>
where
    F: Fn(Scenario, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Run>>,
{
    let broker = if opts.scenarios.contains(&Scenario::Credbroker) {
        Some(InProcess::start(env).await?)
    } else {
        None
    };
    let mut runs = Vec::new();
    for &callers in &opts.callers {
        for &scenario in &opts.scenarios {
            let r = match scenario {
                Scenario::Plaintext | Scenario::Verifier => direct(scenario, callers).await?,
                Scenario::BackendSql => measure_backend(env, meter, callers, opts).await?,
                Scenario::Credbroker => {
                    let b = broker.as_ref().expect("started above");
                    measure_broker(env, meter, &b.addr, callers, opts).await?
                }
            };
            print_run(&r);
            runs.push(r);
        }
    }
    if let Some(b) = broker {
        b.stop().await?;
    }
    Ok(runs)
}

impl Report {
    /// The report of `runs`, for PostgreSQL (`bench mysql` names its own
    /// file, baselines and grant).
    pub(crate) fn new(opts: &Options, mut machine: Machine, runs: Vec<Run>) -> Report {
        machine.finish();
        Report {
            file: "lease",
            baselines:
                "(a) CREATE ROLE … PASSWORD 'plaintext'; (b) the same with a 1-round SCRAM verifier",
            grant_sql: Grant::statement(opts.grant, "<role>"),
            machine,
            duration_s: opts.duration.as_secs_f64(),
            fixed_leases: opts.leases,
            broker_pool: opts.pool,
            grant: opts.grant,
            issue_only: opts.issue_only,
            runs,
        }
    }
}

/// One kind of backend statement, per lease of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepCost {
    pub step: String,
    pub per_lease: f64,
    pub ms_per_lease: f64,
}

/// One progress line per run, on stderr.
pub(crate) fn print_run(r: &Run) {
    eprintln!(
        "  {:<15} {:>3} callers: {:>8.1} leases/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} leases, {} errors)",
        r.scenario.header(),
        r.callers,
        r.leases_per_s,
        r.cycle.p50_ms,
        r.cycle.p99_ms,
        r.leases,
        r.errors
    );
}

/// What `--issue-only` leaves for after the run (roles, users, lease ids),
/// each cycle pushing its own; `None` without it.
pub(crate) type Kept<T> = Option<Arc<std::sync::Mutex<Vec<T>>>>;

/// Runs `callers` workers until the deadline (or the lease count) and
/// gathers their samples. Each worker gets its state from `open` before
/// the clock starts, and does one untimed cycle to warm up. Each cycle is
/// given the [`Kept`] list; what was left on it comes back with the run,
/// for the caller to clean up.
pub(crate) async fn drive<T, S, O, OF, C, CF>(
    scenario: Scenario,
    meter: &Meter,
    callers: usize,
    opts: &Options,
    open: O,
    cycle: C,
) -> Result<(Run, Vec<T>)>
where
    T: Send + 'static,
    S: Send + 'static,
    O: Fn() -> OF,
    OF: std::future::Future<Output = Result<S>>,
    C: Fn(S, Kept<T>) -> CF + Send + Sync + Clone + 'static,
    CF: std::future::Future<Output = (S, Result<Duration>)> + Send,
{
    let kept: Kept<T> = opts.issue_only.then(Default::default);
    let list = kept.clone();
    let cycle = move |s| cycle(s, list.clone());
    let mut states = Vec::with_capacity(callers);
    for _ in 0..callers {
        let s = open().await?;
        let (s, warm) = cycle.clone()(s).await;
        warm.map_err(|e| Error::internal(format!("{}: warm-up: {e}", scenario.header())))?;
        states.push(s);
    }
    let remaining = Arc::new(AtomicU64::new(opts.leases.unwrap_or(u64::MAX)));
    let before = meter.in_process().await;
    crate::bench::steps::take();
    let started = Instant::now();
    let deadline = started + opts.duration;
    let fixed = opts.leases.is_some();
    let mut tasks = Vec::with_capacity(callers);
    for mut state in states {
        let cycle = cycle.clone();
        let remaining = remaining.clone();
        tasks.push(tokio::spawn(async move {
            let mut cycles = Vec::new();
            let mut issues = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                if fixed {
                    if remaining
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_err()
                    {
                        break;
                    }
                } else if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let (s, r) = cycle(state).await;
                state = s;
                match r {
                    Ok(issue) => {
                        cycles.push(t.elapsed());
                        issues.push(issue);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                        // A broken connection must not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (state, cycles, issues, errors, first_error)
        }));
    }
    let mut cycles = Vec::new();
    let mut issues = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    // Held until the costs are read: a connection closed before then takes
    // its server process's CPU time with it until the postmaster reaps it.
    let mut states = Vec::with_capacity(callers);
    for t in tasks {
        let (state, c, i, e, f) = t.await.map_err(Error::internal)?;
        states.push(state);
        cycles.extend(c);
        issues.extend(i);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = meter.in_process().await;
    drop(states);
    let leases = cycles.len() as u64;
    let n = leases.max(1) as f64;
    let recorded = crate::bench::steps::take();
    let mut steps: Vec<StepCost> = recorded
        .into_iter()
        .map(|(step, (count, took))| StepCost {
            step,
            per_lease: count as f64 / n,
            ms_per_lease: took.as_secs_f64() * 1000.0 / n,
        })
        .collect();
    // What no step accounts for: gRPC, TLS, the handler, waiting for a
    // core. Only the broker's own steps are summed: a backend statement is
    // inside the broker step that sent it.
    if scenario == Scenario::Credbroker && !steps.is_empty() {
        let cycle_ms = cycles.iter().map(|d| d.as_secs_f64()).sum::<f64>() * 1000.0 / n;
        let in_steps: f64 = steps
            .iter()
            .filter(|s| credbroker::steps::is_broker_step(&s.step))
            .map(|s| s.ms_per_lease)
            .sum();
        steps.push(StepCost {
            step: "rest of the cycle (gRPC, TLS, handler, queueing)".into(),
            per_lease: 1.0,
            ms_per_lease: (cycle_ms - in_steps).max(0.0),
        });
    }
    let left = kept
        .map(|k| std::mem::take(&mut *k.lock().unwrap_or_else(|p| p.into_inner())))
        .unwrap_or_default();
    let run = Run {
        scenario,
        callers,
        cost: PerLease::between(&before, &after, leases, scenario == Scenario::Credbroker),
        steps,
        leases,
        errors,
        seconds,
        leases_per_s: cycles.len() as f64 / seconds,
        cycle: Latency::of(&mut cycles),
        issue: Latency::of(&mut issues),
        first_error,
    };
    Ok((run, left))
}

async fn measure_direct(
    pg: &BenchPostgres,
    meter: &Meter,
    scenario: Scenario,
    callers: usize,
    opts: &Options,
) -> Result<Run> {
    let verifier = scenario == Scenario::Verifier;
    let grant = opts.grant;
    let (run, names) = drive(
        scenario,
        meter,
        callers,
        opts,
        || async { pg.connect().await.map(Arc::new) },
        move |client: Arc<tokio_postgres::Client>, kept: Kept<String>| async move {
            let r = direct_cycle(&client, verifier, grant, kept.as_deref()).await;
            (client, r)
        },
    )
    .await?;
    if !names.is_empty() {
        let client = pg.connect().await?;
        for chunk in names.chunks(500) {
            let list = chunk.join(", ");
            retrying(&client, &format!("DROP OWNED BY {list}; DROP ROLE {list};"))
                .await
                .map_err(pg_err("drop roles after the run"))?;
        }
    }
    Ok(run)
}

/// (b′): credbroker's backend, called straight, one pool shared by the
/// callers (as the broker shares its pool).
async fn measure_backend(
    env: &DevEnv,
    meter: &Meter,
    callers: usize,
    opts: &Options,
) -> Result<Run> {
    let (backend, role) = backend_of(&env.config_path)?;
    let (run, users) = drive(
        Scenario::BackendSql,
        meter,
        callers,
        opts,
        || {
            let backend = backend.clone();
            async move { Ok(backend) }
        },
        move |backend: Arc<dyn Backend>, kept: Kept<UserRef>| {
            let role = role.clone();
            async move {
                let r = backend_cycle(backend.as_ref(), &role, kept.as_deref()).await;
                (backend, r)
            }
        },
    )
    .await?;
    let revokees: Vec<Revokee> = users.into_iter().map(|u| Revokee::new(u, None)).collect();
    for chunk in revokees.chunks(500) {
        backend.revoke(chunk).await?;
    }
    Ok(run)
}

/// credbroker's own backend for the bench database of `config_path`, and
/// the bench role: what (b′) calls straight, in this process or in a
/// `bench-client`.
pub(crate) fn backend_of(
    config_path: &std::path::Path,
) -> Result<(Arc<dyn Backend>, Arc<credbroker::config::RoleConfig>)> {
    let config = credbroker::config::Config::load(config_path)?;
    let db = config
        .databases
        .get(setup::DB)
        .ok_or_else(|| Error::internal("bench config has no database"))?;
    let role = config
        .role(setup::ROLE)
        .ok_or_else(|| Error::internal("bench config has no role"))?
        .clone();
    // One lease's statements: no round shared with other callers.
    let backend: Arc<dyn Backend> = match db.kind {
        credbroker::lease::BackendKind::Postgres => Arc::new(
            credbroker::backend::postgres::PostgresBackend::new(db)?.without_shared_rounds(),
        ),
        credbroker::lease::BackendKind::Mysql => credbroker::backend::build(db)?,
    };
    Ok((backend, Arc::new(role)))
}

/// One (b′) lease: the user created as the broker creates it, then revoked
/// as the broker revokes it — or, with `keep`, left for after the run.
pub(crate) async fn backend_cycle(
    backend: &dyn Backend,
    role: &credbroker::config::RoleConfig,
    keep: Option<&std::sync::Mutex<Vec<UserRef>>>,
) -> Result<Duration> {
    let t = Instant::now();
    let username = credbroker::lease::Username::generate("bb_", &role.name);
    let password = Password::generate();
    let until = Utc::now() + chrono::Duration::minutes(10);
    let user = NewUser {
        username: &username,
        password: &password,
        valid_until: until,
        hard_limit: until,
        grants: &role.grants,
        host: "",
        owner: role.owner.as_deref(),
        role: &role.name,
    };
    backend.create_user(&user).await?;
    let issued = t.elapsed();
    let r = UserRef {
        username: username.clone(),
        host: String::new(),
    };
    match keep {
        Some(k) => k.lock().unwrap_or_else(|p| p.into_inner()).push(r),
        None => {
            backend.revoke(&[Revokee::new(r, None)]).await?;
        }
    }
    Ok(issued)
}

/// What a broker that talks to PostgreSQL directly does for one lease.
/// With `keep`, the role is left for the caller to drop after the run.
pub(crate) async fn direct_cycle(
    client: &tokio_postgres::Client,
    verifier: bool,
    grant: Grant,
    keep: Option<&std::sync::Mutex<Vec<String>>>,
) -> Result<Duration> {
    let t = Instant::now();
    let n: u64 = rand::rng().random();
    let name = escape_identifier(&format!("bd_{n:016x}"));
    let password = Password::generate();
    let secret = if verifier {
        credbroker::scram::verifier(&password, 1)
    } else {
        password.expose().to_string()
    };
    let until = (Utc::now() + chrono::Duration::minutes(10))
        .format("%Y-%m-%d %H:%M:%S%.3f+00")
        .to_string();
    let create = format!(
        "CREATE ROLE {name} LOGIN PASSWORD {} VALID UNTIL {}; {};",
        escape_literal(&secret),
        escape_literal(&until),
        grant.statement(&name)
    );
    retrying(client, &create)
        .await
        .map_err(pg_err("create role"))?;
    let issued = t.elapsed();
    if let Some(keep) = keep {
        keep.lock().unwrap_or_else(|p| p.into_inner()).push(name);
        return Ok(issued);
    }
    retrying(client, &format!("DROP OWNED BY {name}; DROP ROLE {name};"))
        .await
        .map_err(pg_err("drop role"))?;
    Ok(issued)
}

/// The same retry on a lost catalog race that the broker does, so table
/// grants under concurrency compare like with like.
async fn retrying(client: &tokio_postgres::Client, sql: &str) -> Result<(), tokio_postgres::Error> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match client.batch_execute(sql).await {
            Err(e) if attempt < 8 && credbroker::backend::postgres::lost_catalog_race(&e) => {
                let ms = rand::rng().random_range(1..=2u64 << attempt.min(5));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            other => return other,
        }
    }
}

async fn measure_broker(
    env: &DevEnv,
    meter: &Meter,
    addr: &str,
    callers: usize,
    opts: &Options,
) -> Result<Run> {
    let (run, ids) = drive(
        Scenario::Credbroker,
        meter,
        callers,
        opts,
        || setup::connected_client(env, addr),
        move |mut client, kept: Kept<String>| async move {
            let t = Instant::now();
            let r = async {
                let (id, _) = setup::issue(&mut client, 600).await?;
                let issued = t.elapsed();
                match kept {
                    Some(k) => k.lock().unwrap_or_else(|p| p.into_inner()).push(id),
                    None => setup::revoke(&mut client, id).await?,
                }
                Ok(issued)
            }
            .await;
            (client, r)
        },
    )
    .await?;
    let mut tasks = Vec::new();
    for part in ids.chunks(ids.len().div_ceil(16).max(1)) {
        let mut client = setup::connected_client(env, addr).await?;
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            for id in part {
                setup::revoke(&mut client, id).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(Error::internal)??;
    }
    Ok(run)
}

/// Reads one figure off a run.
type Figure = fn(&Run) -> f64;

impl Report {
    fn find(&self, s: Scenario, callers: usize) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.scenario == s && r.callers == callers)
    }

    /// The table: per caller count, leases/s and latency for (a), (b), (c),
    /// with (c)'s ratio to each baseline.
    pub fn markdown_table(&self) -> String {
        let mut out = String::from(
            "| callers | figure | (a) plaintext | (b) verifier | (b′) its SQL | (c) credbroker | c/a | c/b | c/b′ |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut callers: Vec<usize> = self.runs.iter().map(|r| r.callers).collect();
        callers.dedup();
        for n in callers {
            let rows: [(&str, Figure); 8] = [
                ("leases/s", |r| r.leases_per_s),
                ("p50 ms", |r| r.cycle.p50_ms),
                ("p99 ms", |r| r.cycle.p99_ms),
                ("max ms", |r| r.cycle.max_ms),
                ("CPU ms/lease, broker", |r| {
                    r.cost.broker_cpu_ms.unwrap_or(f64::NAN)
                }),
                ("CPU ms/lease, bench process", |r| r.cost.process_cpu_ms),
                ("CPU ms/lease, database", |r| r.cost.database_cpu_ms),
                ("WAL syncs/lease", |r| r.cost.wal_syncs.unwrap_or(f64::NAN)),
            ];
            for (label, get) in rows {
                let v = |s| self.find(s, n).map(get).filter(|x: &f64| !x.is_nan());
                let cell = |x: Option<f64>| match x {
                    Some(x) if x >= 100.0 => format!("{x:.0}"),
                    Some(x) => format!("{x:.2}"),
                    None => "–".into(),
                };
                let ratio = |c: Option<f64>, base: Option<f64>| match (c, base) {
                    (Some(c), Some(b)) if b > 0.0 => format!("{:.2}×", c / b),
                    _ => "–".into(),
                };
                let (a, b, b2, c) = (
                    v(Scenario::Plaintext),
                    v(Scenario::Verifier),
                    v(Scenario::BackendSql),
                    v(Scenario::Credbroker),
                );
                out.push_str(&format!(
                    "| {n} | {label} | {} | {} | {} | {} | {} | {} | {} |\n",
                    cell(a),
                    cell(b),
                    cell(b2),
                    cell(c),
                    ratio(c, a),
                    ratio(c, b),
                    ratio(c, b2)
                ));
            }
        }
        out
    }

    /// Where a lease's backend time goes, for runs that timed their
    /// statements: one row per statement kind.
    pub fn steps_table(&self) -> String {
        let timed: Vec<&Run> = self.runs.iter().filter(|r| !r.steps.is_empty()).collect();
        if timed.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "\n### Where a lease's time goes (wall time per step, summed over callers)\n\n\
             | callers | scenario | step | per lease | ms per lease |\n|---:|---|---|---:|---:|\n",
        );
        for r in timed {
            let mut steps = r.steps.clone();
            steps.sort_by(|a, b| b.ms_per_lease.total_cmp(&a.ms_per_lease));
            for s in steps {
                out.push_str(&format!(
                    "| {} | {} | {} | {:.2} | {:.2} |\n",
                    r.callers,
                    r.scenario.header(),
                    s.step,
                    s.per_lease,
                    s.ms_per_lease
                ));
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let how = crate::bench::run_length(self.fixed_leases, self.duration_s);
        let errors: u64 = self.runs.iter().map(|r| r.errors).sum();
        let what = if self.issue_only {
            "issue; one lease = issue alone (roles dropped, leases revoked after the clock stops)"
        } else {
            "issue + revoke; one lease = issue + revoke; latency is the whole cycle"
        };
        let mut out = format!(
            "# credbroker bench: {what}\n\n{}- baselines: {}\n- {how}\n- grant: {}\n- broker backend pool: {}\n- errors: {errors}\n\n",
            self.machine.markdown(),
            self.baselines,
            self.grant_sql,
            self.broker_pool
                .map(|n| n.to_string())
                .unwrap_or_else(|| "default".into()),
        );
        out.push_str(&self.markdown_table());
        out.push_str(&self.steps_table());
        out.push_str(&crate::bench::first_errors(
            self.runs
                .iter()
                .map(|r| (r.scenario.header(), r.callers, r.first_error.as_deref())),
        ));
        out
    }
}
