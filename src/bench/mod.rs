//! `credbroker bench`: where credbroker stands between what PostgreSQL can
//! do with a plaintext password and what it can do with a ready verifier,
//! measured in one run on one throwaway server, so the ratios hold however
//! busy the machine is.
//!
//! - [`lease`]: (a) plaintext baseline, (b) 1-round verifier, (c) credbroker
//!   end to end over gRPC + mTLS, at several caller counts.
//! - [`outside`]: the same work as users meet it — load from a separate
//!   client process ([`client`], `credbroker bench-client`) over mTLS gRPC
//!   and the Vault API, against a `credbroker serve` process, beside the
//!   same SQL sent straight and OpenBao ([`openbao`]) when `bao` is on
//!   the PATH; CPU per lease of every process.
//! - [`reaper`]: many leases due at once; time until every role is gone.
//! - [`console`]: the web console's pages over 100,000 live leases.
//! - [`steps`]: the layer that sums the lease path's step spans for
//!   [`lease`]'s table of where a lease's time goes.
//! - [`scale`]: many live leases with real roles (issue rate and memory as
//!   they grow, restart, orphan sweep, `admin leases` with filters, reaper
//!   order over a staggered slice, teardown) and a million store rows
//!   (restart to ready, memory, reaper wake-up cost).
//!
//! Figures are printed and written as Markdown and JSON. Nothing here is
//! used by the broker itself.

pub mod client;
pub mod console;
pub mod cpu;
pub mod lease;
pub mod mysql;
pub mod openbao;
pub mod outside;
pub mod outside_mysql;
pub mod reaper;
pub mod scale;
pub mod scaleout;
pub mod setup;
pub mod steps;
pub mod vault_http;

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use credbroker::error::{Error, Result};

/// Latency figures of one run, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles; sorts `samples`.
    pub fn of(samples: &mut [Duration]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            ms(samples[i])
        };
        Latency {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the machine was doing while we measured: other work on a shared
/// host moves absolute figures, not same-run ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_mb: u64,
    /// `/proc/loadavg` at the start and end of the run.
    pub load_start: String,
    pub load_end: String,
    pub postgres: String,
    pub build: &'static str,
}

impl Machine {
    pub fn sample(postgres: String) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let memory_mb = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            memory_mb,
            load_start: loadavg(),
            load_end: String::new(),
            postgres,
            build: if cfg!(debug_assertions) {
                "debug (figures are not representative: use --release)"
            } else {
                "release"
            },
        }
    }

    pub fn finish(&mut self) {
        self.load_end = loadavg();
    }

    pub fn markdown(&self) -> String {
        format!(
            "- machine: {} × {}, {} MB RAM, Linux {}\n- {}\n- build: {}\n- load average (1/5/15 min) at start: {}, at end: {}\n",
            self.cpus,
            self.cpu_model,
            self.memory_mb,
            self.kernel,
            self.postgres,
            self.build,
            self.load_start,
            self.load_end
        )
    }
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long each run lasted, for a report's first lines.
pub(crate) fn run_length(fixed_leases: Option<u64>, duration_s: f64) -> String {
    match fixed_leases {
        Some(n) => format!("{n} leases per run"),
        None => format!("{duration_s:.0} s per run"),
    }
}

/// The report's closing lines: each run's first error, by its column.
pub(crate) fn first_errors<'a>(
    runs: impl Iterator<Item = (&'a str, usize, Option<&'a str>)>,
) -> String {
    let mut out = String::new();
    for (column, callers, error) in runs {
        if let Some(e) = error {
            out.push_str(&format!(
                "\nfirst error in {column} at {callers} callers: {e}\n"
            ));
        }
    }
    out
}

/// Resident memory of a process, in MB (`VmRSS`).
pub fn rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmRSS:")
}

/// Peak resident memory of a process, in MB (`VmHWM`).
pub fn hwm_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// A `/proc/PID/status` figure given in kB (`field` with its colon), in MB.
fn status_mb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Writes `name.md` and `name.json` into `dir`.
pub fn write_report<T: Serialize>(dir: &Path, name: &str, markdown: &str, json: &T) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown)
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", md.display())))?;
    let js = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(json).map_err(Error::internal)?;
    std::fs::write(&js, text + "\n")
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", js.display())))?;
    Ok(())
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

fn pg_err(what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |e| match e.as_db_error() {
        Some(db) => Error::internal(format!("{what}: {} ({})", db.message(), db.code().code())),
        None => Error::internal(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&mut s);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
        let mut one = vec![Duration::from_millis(7)];
        assert_eq!(Latency::of(&mut one).p99_ms, 7.0);
        assert_eq!(Latency::of(&mut []).max_ms, 0.0);
    }
}
