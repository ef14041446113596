//! Telling the application a new credential is in the file: run a command,
//! or signal a process (by pid or pidfile, read at signal time so a
//! restarted application is found).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, Signal};

use super::Credential;
use crate::error::{Error, Result};

/// How long an `--exec` command may run before it is killed: a hung hook
/// must not pile up one process per rotation.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub enum Notify {
    None,
    /// `sh -c CMD`, once per new credential.
    Exec(String),
    Signal {
        target: Target,
        signal: Signal,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pid(i32),
    PidFile(PathBuf),
}

const SIGNALS: &[(&str, Signal)] = &[
    ("HUP", Signal::HUP),
    ("INT", Signal::INT),
    ("QUIT", Signal::QUIT),
    ("USR1", Signal::USR1),
    ("USR2", Signal::USR2),
    ("TERM", Signal::TERM),
    ("ALRM", Signal::ALARM),
    ("WINCH", Signal::WINCH),
    ("CONT", Signal::CONT),
];

impl Notify {
    /// Parses `--signal PID_OR_PIDFILE:SIG`, e.g. `1234:HUP`,
    /// `/run/app.pid:SIGUSR1`, `1234:10`.
    pub fn parse_signal(s: &str) -> Result<Notify> {
        let bad = |why: &str| Error::config(format!("--signal {s:?}: {why}"));
        let (target, sig) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected PID_OR_PIDFILE:SIGNAL"))?;
        let name = sig.trim().to_ascii_uppercase();
        let name = name.strip_prefix("SIG").unwrap_or(&name);
        let signal = match name.parse::<i32>() {
            Ok(n) => Signal::from_named_raw(n),
            Err(_) => SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s),
        }
        .ok_or_else(|| {
            bad("unknown signal (use HUP, USR1, USR2, TERM, INT, QUIT, … or a number)")
        })?;
        let target = match target.parse::<i32>() {
            Ok(pid) if pid > 0 => Target::Pid(pid),
            Ok(_) => return Err(bad("the pid must be positive")),
            Err(_) if !target.is_empty() => Target::PidFile(PathBuf::from(target)),
            Err(_) => return Err(bad("no pid or pidfile")),
        };
        Ok(Notify::Signal { target, signal })
    }

    /// Fires the notification for `c`, just written to `out`. The returned
    /// task ends when the command has finished (or at once for signals).
    /// Failures are logged, never fatal: the file is already in place.
    pub fn fire(&self, c: &Credential, out: &Path) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            Notify::None => None,
            Notify::Exec(cmd) => Some(tokio::spawn(exec(
                cmd.clone(),
                vec![
                    ("CREDBROKER_LEASE_ID", c.lease_id.clone()),
                    ("CREDBROKER_USERNAME", c.username.clone()),
                    (
                        "CREDBROKER_EXPIRES_AT",
                        c.expires_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    ),
                    ("CREDBROKER_FILE", out.display().to_string()),
                ],
            ))),
            Notify::Signal { target, signal } => {
                match send(target, *signal) {
                    Ok(pid) => tracing::info!(pid, signal = ?signal, "application signalled"),
                    Err(e) => tracing::warn!(error = %e, "could not signal the application"),
                }
                None
            }
        }
    }
}

/// Runs the hook. It gets the lease id, user name, expiry and file path in
/// its environment, never the password: it reads the file like the app.
async fn exec(cmd: String, env: Vec<(&'static str, String)>) {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&cmd)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "--exec: cannot start sh");
            return;
        }
    };
    match tokio::time::timeout(EXEC_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::info!("--exec command finished"),
        Ok(Ok(status)) => tracing::warn!(%status, "--exec command failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "--exec command: wait failed"),
        Err(_) => {
            let _ = child.kill().await;
            tracing::warn!(timeout = ?EXEC_TIMEOUT, "--exec command timed out and was killed");
        }
    }
}

fn send(target: &Target, signal: Signal) -> std::result::Result<i32, String> {
    let pid = match target {
        Target::Pid(p) => *p,
        Target::PidFile(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("pidfile {}: {e}", path.display()))?;
            text.trim()
                .parse::<i32>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("pidfile {}: no pid in it", path.display()))?
        }
    };
    let p = Pid::from_raw(pid).ok_or_else(|| format!("bad pid {pid}"))?;
    rustix::process::kill_process(p, signal).map_err(|e| format!("pid {pid}: {e}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signal_targets() {
        match Notify::parse_signal("1234:HUP").unwrap() {
            Notify::Signal { target, signal } => {
                assert_eq!(target, Target::Pid(1234));
                assert_eq!(signal, Signal::HUP);
            }
            other => panic!("{other:?}"),
        }
        match Notify::parse_signal("/run/app:x.pid:sigusr1").unwrap() {
            Notify::Signal { target, signal } => {
                assert_eq!(target, Target::PidFile("/run/app:x.pid".into()));
                assert_eq!(signal, Signal::USR1);
            }
            other => panic!("{other:?}"),
        }
        assert!(Notify::parse_signal("1234:12").is_ok());
        for bad in ["1234", "0:HUP", "-1:HUP", ":HUP", "1234:NOPE", "1234:0"] {
            assert!(
                matches!(Notify::parse_signal(bad), Err(Error::Config(_))),
                "{bad}"
            );
        }
    }
}
