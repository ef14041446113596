//! A primary/standby pair out of a throwaway PostgreSQL: a streaming
//! standby made by `pg_basebackup -R`, made synchronous on the primary,
//! then the two halves of a failover — the primary stopped the way a crash
//! stops it, the standby promoted. For the tests that fail a store or a
//! target database over (`tests/it/failover.rs`).

use std::io;
use std::process::Command;
use std::time::{Duration, Instant};

use super::postgres::{conf_line, HOST, SUPERUSER};
use super::{free_port, run_setup, ServerProcess, ThrowawayPostgres};

/// Longest wait for the standby to stream and count as synchronous.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

impl ThrowawayPostgres {
    /// Starts a streaming standby of this server (`pg_basebackup -R`, hot
    /// standby, on a port of its own) and makes it synchronous here
    /// (`synchronous_standby_names = '*'`, `synchronous_commit = on`):
    /// from then on a commit on this server returns only once the standby
    /// has it, so a failover to the standby loses nothing acknowledged.
    /// Returns once the standby streams as `sync`.
    pub async fn start_sync_standby(&self) -> io::Result<ThrowawayPostgres> {
        let mut process =
            ServerProcess::prepare("pg-standby", "postgres.log", self.run_as.clone())?;
        // The standby's superuser is the primary's, copied with its data.
        process.password = self.password.clone();
        // Owned copies: `process.port` is set below, after the copy.
        let dir = process.dir.path().to_path_buf();
        let data_dir = process.data_dir.clone();
        let run_as = process.run_as.clone();
        let program = self.bin_dir.join("pg_basebackup");
        if !program.is_file() {
            return Err(io::Error::other(format!(
                "{} is missing: install PostgreSQL's client tools beside the server \
                 (`apt-get install postgresql-client`, the same version as initdb)",
                program.display()
            )));
        }
        let mut basebackup = Command::new(program);
        basebackup
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--host", HOST, "--port", &self.port.to_string()])
            .args(["--username", SUPERUSER])
            .args([
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ])
            .env("PGPASSWORD", &self.password)
            .current_dir(dir.as_path())
            .env("LC_ALL", "C");
        if let Some(user) = &run_as {
            user.apply(&mut basebackup);
        }
        run_setup(basebackup, "pg_basebackup", &process.log_path).await?;

        // The copy carries the primary's port and socket directory: later
        // lines win. `primary_conninfo` again, with the password and a name
        // `pg_stat_replication` shows.
        let port = free_port()?;
        process.port = port;
        let mut conf = String::from("\n# credbroker throwaway standby\n");
        for (key, value) in [
            ("port", port.to_string()),
            (
                "unix_socket_directories",
                dir.as_path().to_string_lossy().into_owned(),
            ),
            (
                "primary_conninfo",
                format!(
                    "host={HOST} port={} user={SUPERUSER} password={} application_name=standby",
                    self.port, self.password
                ),
            ),
        ] {
            conf.push_str(&conf_line(key, &value)?);
        }
        let auto_conf = data_dir.join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&auto_conf).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&auto_conf, existing)?;

        let mut standby = ThrowawayPostgres {
            process,
            bin_dir: self.bin_dir.clone(),
            via_socket: self.via_socket,
        };
        standby.start_server().await?;

        let primary = self.connect("postgres").await?;
        // One statement each: ALTER SYSTEM refuses to run in a transaction
        // block, which a multi-statement query is.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "ALTER SYSTEM SET synchronous_commit = 'on'",
            "SELECT pg_reload_conf()",
        ] {
            primary.batch_execute(sql).await.map_err(|e| {
                io::Error::other(format!(
                    "cannot make the standby synchronous ({sql}): {}",
                    e.as_db_error()
                        .map_or(e.to_string(), |d| d.message().to_string())
                ))
            })?;
        }
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            let sync = primary
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication \
                     WHERE application_name = 'standby' AND state = 'streaming' \
                       AND sync_state = 'sync'",
                    &[],
                )
                .await
                .map_err(|e| io::Error::other(format!("cannot read pg_stat_replication: {e}")))?;
            if sync.is_some() {
                return Ok(standby);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "the standby did not stream as synchronous within {SYNC_TIMEOUT:?}; its log:\n{}",
                    standby.read_log().unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Promotes a standby to primary (`pg_promote`, waiting until done).
    /// A promoted standby has no standby of its own and waits for none.
    pub async fn promote(&self) -> io::Result<()> {
        let client = self.connect("postgres").await?;
        let done: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(|e| io::Error::other(format!("pg_promote failed: {e}")))?
            .get(0);
        if done {
            Ok(())
        } else {
            Err(io::Error::other("pg_promote did not finish within 60 s"))
        }
    }

    /// Stops the server the way a crash does: PostgreSQL's immediate stop
    /// (SIGQUIT: every session cut, no checkpoint), its directory removed.
    /// What it acknowledged survives only where it was replicated to.
    pub fn stop_immediately(&mut self) {
        drop(self.server.take());
    }
}
