//! CPU time per lease, read from `/proc`: steadier on a shared machine than
//! rates, which move with every neighbour. Three accounts per run:
//!
//! - the broker: the threads of its own runtime (named [`BROKER_THREAD`])
//!   and the SQLite store's worker ([`STORE_THREAD`]), so the load
//!   generator in the same process is not counted as ours;
//! - the whole bench process (load generator, and for (b′) the backend
//!   code itself);
//! - the database server: PostgreSQL's postmaster and every child (live
//!   ones by their own counters, exited ones through the postmaster's
//!   `cutime`/`cstime`), or `mariadbd` (one process, every thread).
//!
//! Separate processes (`bench outside`: broker or OpenBao, client,
//! database) are read by pid. Either way a [`Meter`] reads the database.
//!
//! Plus WAL syncs (`pg_stat_wal.wal_sync`), PostgreSQL's fsyncs.

use std::path::{Path, PathBuf};

/// Thread name of the in-process broker's runtime.
pub const BROKER_THREAD: &str = "cb-broker";
/// The SQLite store's group-commit thread, which the broker owns.
pub const STORE_THREAD: &str = credbroker::store::group_commit::THREAD_NAME;

/// Where a run's costs are read: the database server's processes (and
/// PostgreSQL's `pg_stat_wal`).
pub(crate) enum Meter {
    Postgres {
        data_dir: PathBuf,
        client: tokio_postgres::Client,
    },
    /// A one-process database server (`mariadbd`); no WAL counter.
    Process(u32),
}

impl Meter {
    /// The counters of a run in this process: the broker's threads as the
    /// server, the whole bench process as the client.
    pub async fn in_process(&self) -> Counters {
        let broker = threads_named(BROKER_THREAD) + threads_named(STORE_THREAD);
        self.with_database(Some(broker), self_ticks()).await
    }

    /// The counters of a run of separate processes: the server (credbroker
    /// or OpenBao, if any) and the client, by pid.
    pub async fn apart(&self, server: Option<u32>, client: u32) -> Counters {
        self.with_database(server.map(pid_ticks), pid_ticks(client))
            .await
    }

    async fn with_database(&self, server: Option<u64>, client: u64) -> Counters {
        let (database, wal_syncs) = match self {
            Meter::Postgres {
                data_dir,
                client: pg,
            } => (postgres_ticks(data_dir), wal_syncs(pg).await),
            Meter::Process(pid) => (pid_ticks(*pid), None),
        };
        Counters {
            server,
            client,
            database,
            wal_syncs,
        }
    }
}

/// What a run cost, per lease.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PerLease {
    /// Broker threads; `None` where no broker ran (a, b, b′).
    pub broker_cpu_ms: Option<f64>,
    pub process_cpu_ms: f64,
    pub database_cpu_ms: f64,
    pub wal_syncs: Option<f64>,
}

impl PerLease {
    /// [`ApartPerLease`]'s figures under `bench lease`'s names: the broker's
    /// threads as the server, the bench process as the client.
    pub fn between(before: &Counters, after: &Counters, leases: u64, broker: bool) -> PerLease {
        let c = ApartPerLease::between(before, after, leases);
        PerLease {
            broker_cpu_ms: c.server_cpu_ms.filter(|_| broker),
            process_cpu_ms: c.client_cpu_ms,
            database_cpu_ms: c.database_cpu_ms,
            wal_syncs: c.wal_syncs,
        }
    }
}

/// Counters at one instant, in clock ticks: the server (credbroker or
/// OpenBao, if any), the client and the database server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub server: Option<u64>,
    pub client: u64,
    pub database: u64,
    pub wal_syncs: Option<i64>,
}

/// What a run of separate processes cost, per lease.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ApartPerLease {
    /// credbroker's or OpenBao's process; `None` where none ran (a, b′).
    pub server_cpu_ms: Option<f64>,
    pub client_cpu_ms: f64,
    pub database_cpu_ms: f64,
    pub wal_syncs: Option<f64>,
}

impl ApartPerLease {
    pub fn between(before: &Counters, after: &Counters, leases: u64) -> ApartPerLease {
        let n = leases.max(1) as f64;
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 * 1000.0 / ticks_per_second() / n;
        ApartPerLease {
            server_cpu_ms: before.server.zip(after.server).map(|(a, b)| ms(a, b)),
            client_cpu_ms: ms(before.client, after.client),
            database_cpu_ms: ms(before.database, after.database),
            wal_syncs: before
                .wal_syncs
                .zip(after.wal_syncs)
                .map(|(a, b)| (b - a).max(0) as f64 / n),
        }
    }
}

async fn wal_syncs(client: &tokio_postgres::Client) -> Option<i64> {
    client
        .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0))
}

pub(crate) fn ticks_per_second() -> f64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100.0,
        t => t as f64,
    }
}

/// utime, stime, cutime, cstime of a `/proc/.../stat` line. The command
/// name (field 2) may hold spaces and parentheses: parse after its last `)`.
fn stat_times(stat: &str) -> Option<[u64; 4]> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After the name: state is field 3, so utime (14) is index 11 here.
    let n = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| v.max(0) as u64)
    };
    Some([n(11)?, n(12)?, n(13)?, n(14)?])
}

fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

fn self_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_times(&s))
        .map(|t| t[0] + t[1])
        .unwrap_or(0)
}

pub(crate) fn pid_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_times(&s))
        .map(|t| t[0] + t[1])
        .unwrap_or(0)
}

fn threads_named(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| stat_times(&s))
        .map(|t| t[0] + t[1])
        .sum()
}

/// The postmaster's pid: the first line of `postmaster.pid`.
fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn postgres_ticks(data_dir: &Path) -> u64 {
    let Some(pm) = postmaster_pid(data_dir) else {
        return 0;
    };
    let Some(own) = std::fs::read_to_string(format!("/proc/{pm}/stat"))
        .ok()
        .and_then(|s| stat_times(&s))
    else {
        return 0;
    };
    let mut total = own.iter().sum::<u64>();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return total;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        if stat_ppid(&stat) == Some(pm) {
            if let Some(t) = stat_times(&stat) {
                total += t[0] + t[1];
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (postgres: bench (x) idle) S 4000 4242 4242 0 -1 4194560 1 0 0 0 \
                    17 5 3 2 20 0 1 0 100 0 0";
        assert_eq!(stat_times(line), Some([17, 5, 3, 2]));
        assert_eq!(stat_ppid(line), Some(4000));
    }

    #[test]
    fn this_process_uses_some_cpu() {
        // Spins until a tick is counted: on a loaded machine 60 ms of wall
        // time can hold less than one 10 ms tick of CPU. 10 s without one
        // means the count is broken.
        let before = self_ticks();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while self_ticks() <= before && t.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
            std::hint::black_box(x);
        }
        assert!(self_ticks() > before, "10 s of spinning counted no tick");
    }
}
