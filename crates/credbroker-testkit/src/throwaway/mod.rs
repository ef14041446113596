//! Throwaway PostgreSQL and MariaDB servers for tests and `credbroker demo`.
//!
//! Each server lives in its own temporary directory, listens on 127.0.0.1 on a
//! free port and is gone when its handle is dropped. Two things make this
//! harder than spawning a child process:
//!
//! * Tests run as root, and `initdb`/`postgres` refuse to run as root, so the
//!   servers run as an unprivileged OS user (`postgres`/`mysql`, else `nobody`).
//! * A server must not outlive the process that started it, even when that
//!   process panics, aborts or is killed with SIGKILL (static handles are never
//!   dropped). Every server therefore runs under a small `sh` supervisor whose
//!   stdin is a pipe from us: when our process dies the kernel closes the pipe,
//!   the supervisor's `read` returns and it kills the server and removes the
//!   temporary directory. No `unsafe`, no `prctl`.

mod mariadb;
mod postgres;
mod standby;

pub use mariadb::{mariadb_binaries_present, MariadbOptions, ThrowawayMariadb};
pub use postgres::{postgres_binaries_present, PostgresOptions, ThrowawayPostgres};

/// TLS for a throwaway server: its certificate and key (PEM), and the CA
/// it trusts for client certificates, if it should ask for them.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("key_pem", &"<redacted>")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

/// What every throwaway server is, whatever its engine: a supervised
/// process in a private directory, with its log, its port and its
/// superuser's password. [`ThrowawayPostgres`] and [`ThrowawayMariadb`]
/// deref to it, so stopping, reading the log and the like are written once
/// here; each engine adds how it is set up, started and connected to.
pub struct ServerProcess {
    // Declared before `dir`: the server must be gone before its directory is.
    pub(crate) server: Option<Supervised>,
    pub(crate) dir: TempDir,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_path: PathBuf,
    pub(crate) run_as: Option<RunAs>,
    pub(crate) port: u16,
    pub(crate) password: String,
}

/// Longest wait for a server's clean (or fast) shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(90);

impl ServerProcess {
    /// A private directory for a server run as `run_as`: `data/` (for the
    /// engine's setup to fill) and the log file `log_name`, created and
    /// owned by `run_as`; a fresh superuser password. The port is the
    /// engine's to pick once its setup is done (a free port stays free
    /// only until someone binds it).
    pub(crate) fn prepare(
        prefix: &str,
        log_name: &str,
        run_as: Option<RunAs>,
    ) -> io::Result<ServerProcess> {
        let dir = TempDir::new(prefix, run_as.as_ref())?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join(log_name);
        create_log(&log_path, run_as.as_ref())?;
        Ok(ServerProcess {
            server: None,
            dir,
            data_dir,
            log_path,
            run_as,
            port: 0,
            password: random_password(),
        })
    }

    /// `Debug` for an engine's handle, `name`: no password, whether it runs.
    pub(crate) fn debug(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("running", &self.server.is_some())
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    pub fn read_log(&self) -> io::Result<String> {
        let bytes = std::fs::read(&self.log_path).map_err(|e| {
            io::Error::other(format!("cannot read {}: {e}", self.log_path.display()))
        })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server process, while it runs (for measuring its CPU).
    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.server_pid)
    }

    /// Whether the server runs (it does unless [`stop`](Self::stop)ped).
    pub fn is_running(&self) -> bool {
        self.server.as_ref().is_some_and(Supervised::server_alive)
    }

    /// The engine's clean shutdown (PostgreSQL's fast one: sessions are
    /// ended), data kept. Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> io::Result<()> {
        match self.server.take() {
            Some(server) => server.stop(STOP_TIMEOUT).await,
            None => Ok(()),
        }
    }

    /// Keeps a server that answered its readiness check: on failure
    /// `server` is dropped here, which kills it.
    pub(crate) fn started(&mut self, server: Supervised, ready: io::Result<()>) -> io::Result<()> {
        ready?;
        self.server = Some(server);
        Ok(())
    }
}

/// `Deref` to [`ServerProcess`] for an engine's handle that keeps it in
/// `process`.
macro_rules! deref_to_process {
    ($ty:ty) => {
        impl std::ops::Deref for $ty {
            type Target = super::ServerProcess;

            fn deref(&self) -> &super::ServerProcess {
                &self.process
            }
        }

        impl std::ops::DerefMut for $ty {
            fn deref_mut(&mut self) -> &mut super::ServerProcess {
                &mut self.process
            }
        }

        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.process.debug(stringify!($ty), f)
            }
        }
    };
}
use deref_to_process;

/// The OS user a server runs as when we are root.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl RunAs {
    /// `None` means "run as ourselves": only root has to (and can) switch user.
    pub(crate) fn choose(preferred: &str) -> io::Result<Option<RunAs>> {
        if effective_uid()? != 0 {
            return Ok(None);
        }
        let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| {
            io::Error::other(format!(
                "cannot read /etc/passwd to find an unprivileged user for the throwaway \
                 database server: {e}"
            ))
        })?;
        for name in [preferred, "nobody"] {
            if let Some(user) = lookup_user(&passwd, name) {
                return Ok(Some(user));
            }
        }
        Err(io::Error::other(format!(
            "running as root, but neither the `{preferred}` nor the `nobody` user exists in \
             /etc/passwd; database servers refuse to run as root: create one with \
             `useradd --system {preferred}`"
        )))
    }

    pub(crate) fn apply(&self, cmd: &mut Command) {
        // std also drops supplementary groups (setgroups(0)) when root sets a uid.
        cmd.uid(self.uid).gid(self.gid);
    }
}

fn lookup_user(passwd: &str, name: &str) -> Option<RunAs> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let user = fields.next()?;
        if user != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some(RunAs {
            name: user.to_owned(),
            uid,
            gid,
        })
    })
}

/// Reads the effective uid from /proc, which needs neither libc nor `unsafe`.
fn effective_uid() -> io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| io::Error::other(format!("cannot read /proc/self/status: {e}")))?;
    status
        .lines()
        .find_map(|line| {
            // "Uid:\treal\teffective\tsaved\tfs"
            line.strip_prefix("Uid:")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .ok_or_else(|| io::Error::other("no Uid line in /proc/self/status"))
}

/// Asks the kernel for a free port. Someone else may grab it between our
/// `drop` and the server's `bind`; on a test machine that is rare enough.
pub(crate) fn free_port() -> io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| {
        io::Error::other(format!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
    })?;
    Ok(listener.local_addr()?.port())
}

/// Alphanumeric, so it can be pasted into SQL literals, URLs and config files
/// without escaping surprises.
pub(crate) fn random_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// A private temporary directory, owned by the server's user, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(prefix: &str, owner: Option<&RunAs>) -> io::Result<TempDir> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let suffix: String = rand::rng()
                .sample_iter(rand::distr::Alphanumeric)
                .take(10)
                .map(char::from)
                .collect();
            let path = base.join(format!("credbroker-{prefix}-{suffix}"));
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "cannot create a temporary directory in {}: {e}",
                        base.display()
                    )))
                }
            }
            let dir = TempDir { path };
            std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))?;
            if let Some(user) = owner {
                chown(&dir.path, user)?;
            }
            return Ok(dir);
        }
        Err(io::Error::other(format!(
            "cannot create a unique temporary directory in {}",
            base.display()
        )))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // The supervisor usually removed it already.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn chown(path: &Path, user: &RunAs) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
        io::Error::other(format!(
            "cannot give {} to user `{}`: {e}",
            path.display(),
            user.name
        ))
    })
}

/// Writes a file only the server's user can read (password files).
pub(crate) fn write_private_file(
    path: &Path,
    contents: &str,
    owner: Option<&RunAs>,
) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    if let Some(user) = owner {
        chown(path, user)?;
    }
    Ok(())
}

/// Creates the server log up front so that both we and the server's user can
/// append to it.
pub(crate) fn create_log(path: &Path, owner: Option<&RunAs>) -> io::Result<()> {
    std::fs::File::create(path)?;
    if let Some(user) = owner {
        chown(path, user)?;
    }
    Ok(())
}

/// Runs a short-lived setup program (initdb, mariadb-install-db) to completion,
/// appending its output to the server log.
pub(crate) async fn run_setup(mut cmd: Command, what: &str, log_path: &Path) -> io::Result<()> {
    let log = std::fs::OpenOptions::new().append(true).open(log_path)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = tokio::task::spawn_blocking(move || cmd.status())
        .await
        .map_err(io::Error::other)?
        .map_err(|e| io::Error::other(format!("cannot run {program}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what} failed ({status}); end of its output:\n{}",
            // Setup tools print long boilerplate after the actual error.
            log_tail(log_path, 60)
        )))
    }
}

/// The last lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    // Only the end matters, and the log of a long test can be large.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The supervisor. `$1` log file, `$2` signal for an immediate stop, `$3`
/// signal for a fast stop, `$4` directory to remove after an immediate stop,
/// then the server command. A line `fast` on stdin asks for a fast stop and
/// keeps the directory; anything else, including EOF when our process is gone,
/// stops the server with the immediate signal and removes the directory. The
/// server's state is polled in /proc because `wait` alone cannot time out and
/// a backgrounded helper timer would outlive us. Note that `sh` starts
/// background commands with SIGINT and SIGQUIT ignored; PostgreSQL installs
/// its own handlers, MariaDB is stopped with SIGTERM/SIGKILL.
const SUPERVISOR: &str = r#"
log=$1 immediate=$2 fast=$3 dir=$4
shift 4
exec 2>>"$log"
"$@" </dev/null >>"$log" 2>&1 &
pid=$!
echo "$pid"
exec >/dev/null
read -r how || how=
if [ "$how" = fast ]; then sig=$fast; grace=600; else sig=$immediate; grace=100; fi
alive() {
  st=$(cut -d ' ' -f 3 "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
kill -s "$sig" "$pid" 2>/dev/null
i=0
while alive; do
  i=$((i + 1))
  if [ "$i" -ge "$grace" ]; then kill -s KILL "$pid" 2>/dev/null; fi
  sleep 0.1
done
wait "$pid"
if [ "$how" != fast ]; then rm -rf "$dir"; fi
"#;

/// A running server under its supervisor.
#[derive(Debug)]
pub(crate) struct Supervised {
    child: Child,
    /// Closing this pipe (by drop, or by the kernel when we die) kills the server.
    stdin: Option<ChildStdin>,
    server_pid: u32,
}

pub(crate) struct ServerCommand<'a> {
    pub(crate) program: &'a Path,
    pub(crate) args: Vec<String>,
    pub(crate) log: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) run_as: Option<&'a RunAs>,
    pub(crate) immediate_signal: &'a str,
    pub(crate) fast_signal: &'a str,
}

impl Supervised {
    pub(crate) fn spawn(spec: &ServerCommand<'_>) -> io::Result<Supervised> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(SUPERVISOR)
            .arg("credbroker-throwaway-supervisor")
            .arg(spec.log)
            .arg(spec.immediate_signal)
            .arg(spec.fast_signal)
            .arg(spec.dir)
            .arg(spec.program)
            .args(&spec.args)
            .current_dir(spec.dir)
            .env("LC_ALL", "C")
            .env("HOME", spec.dir)
            // Ctrl-C in a terminal goes to the whole foreground process group;
            // the supervisor must outlive the test to clean up after it.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(user) = spec.run_as {
            user.apply(&mut cmd);
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::other(format!(
                "cannot start {} under /bin/sh: {e}",
                spec.program.display()
            ))
        })?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout).read_line(&mut line)?;
        }
        let Ok(server_pid) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "the supervisor of {} did not report a pid; log:\n{}",
                spec.program.display(),
                log_tail(spec.log, 30)
            )));
        };
        Ok(Supervised {
            child,
            stdin,
            server_pid,
        })
    }

    /// Whether the server process still runs (a zombie does not count).
    pub(crate) fn server_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.server_pid)) else {
            return false;
        };
        // The state follows the parenthesised command name, which may hold spaces.
        match stat.rsplit_once(')') {
            Some((_, rest)) => !matches!(rest.split_whitespace().next(), Some("Z" | "X") | None),
            None => false,
        }
    }

    /// Asks for a clean shutdown that keeps the data directory, and waits
    /// until the server and its supervisor are gone. (Dropping kills instead.)
    pub(crate) async fn stop(mut self, timeout: Duration) -> io::Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            // A failed write means the supervisor is gone already.
            let _ = stdin.write_all(b"fast\n");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "the database server (pid {}) did not stop within {timeout:?}",
                    self.server_pid
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // EOF on the pipe: the supervisor kills the server and cleans up. We wait
        // for it so the port is free and the directory gone when drop returns;
        // the supervisor escalates to SIGKILL itself, so this cannot hang long.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Polls `attempt` until it succeeds, the server dies, or `timeout` passes.
pub(crate) async fn wait_until_ready<T, F, Fut>(
    what: &str,
    server: &Supervised,
    log: &Path,
    timeout: Duration,
    mut attempt: F,
) -> io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if !server.server_alive() {
            return Err(io::Error::other(format!(
                "{what} exited during startup; end of its log ({}):\n{}",
                log.display(),
                log_tail(log, 30)
            )));
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "{what} did not accept connections within {timeout:?} (last error: {last_error}); \
                 end of its log ({}):\n{}",
                log.display(),
                log_tail(log, 30)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        let user = lookup_user(passwd, "postgres").unwrap();
        assert_eq!((user.uid, user.gid), (101, 104));
        assert!(lookup_user(passwd, "post").is_none());
    }
}
