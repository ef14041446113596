//! `credbroker sidecar --static-role NAME`: keeps a static role's
//! credential in the file. Read → write (0600, atomically) → notify the
//! application (`--exec` / `--signal`) → sleep until the broker's
//! `next_rotation_at` → read again; a read that still shows the old
//! generation (the broker has not rotated yet) is retried shortly after.
//! The previous credential stays valid for the static role's overlap, so
//! an application that reconnects when notified never sees a refused
//! login. Nothing is revoked on exit: the users are shared.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::lease::Password;
use crate::pb;

use super::connect::Connector;
use super::credential::{rfc3339, time};
use super::{remove_file, Credential, Options, CALL_TIMEOUT};

/// How long after `next_rotation_at` to read: the rotation itself takes
/// a round trip to the database.
const AFTER_ROTATION: Duration = Duration::from_millis(250);
/// Retry pause while the broker has not rotated yet, or is away.
const RETRY: Duration = Duration::from_millis(500);

/// Runs until `shutdown` (then removes the file unless `--keep`), or until
/// no valid credential could be held for `give_up_after` (`Err`).
pub async fn run(
    opts: Options,
    mut client: Connector,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut generation: Option<u64> = None;
    let mut valid_until: Option<DateTime<Utc>> = None;
    let started = Utc::now();
    let mut last_error = String::new();
    // Reads in a row that found the rotation overdue: backed off, so a
    // broker that cannot rotate (database away) is not asked twice a second.
    let mut overdue = 0u32;
    loop {
        client.refresh();
        let req = pb::GetStaticCredentialRequest {
            static_role: opts.role.clone(),
        };
        let mut broker = client.client();
        let wait = match tokio::time::timeout(CALL_TIMEOUT, broker.get_static_credential(req)).await
        {
            Ok(Ok(reply)) => {
                let c = credential(reply.into_inner())?;
                let next = c.next_rotation_at;
                if generation != Some(c.generation) {
                    let text = opts.format.render(&c.credential);
                    crate::fsutil::write_secret_file(&opts.out, text.as_bytes()).map_err(|e| {
                        Error::unavailable(format!("cannot write {}: {e}", opts.out.display()))
                    })?;
                    tracing::info!(
                        path = %opts.out.display(),
                        static_role = %opts.role,
                        username = %c.credential.username,
                        generation = c.generation,
                        next_rotation_at = %rfc3339(next),
                        "static credential written"
                    );
                    let hook = opts.notify.fire(&c.credential, &opts.out);
                    if opts.once {
                        if let Some(h) = hook {
                            let _ = h.await;
                        }
                        return Ok(());
                    }
                    generation = Some(c.generation);
                    valid_until = Some(c.credential.expires_at);
                }
                let until_next = (next - Utc::now()).to_std().unwrap_or_default();
                if until_next.is_zero() {
                    overdue += 1;
                    (RETRY * (1 << (overdue.min(5) - 1))).min(Duration::from_secs(5))
                } else {
                    overdue = 0;
                    until_next + AFTER_ROTATION
                }
            }
            Ok(Err(status)) => {
                last_error = crate::client::describe(&status);
                tracing::warn!(static_role = %opts.role, error = %last_error, "cannot read the static credential; retrying");
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) && generation.is_none()
                {
                    return Err(Error::FailedPrecondition(last_error));
                }
                RETRY
            }
            Err(_) => {
                last_error = format!("no answer within {CALL_TIMEOUT:?}");
                RETRY
            }
        };
        let now = Utc::now();
        let since = valid_until.unwrap_or(started);
        if now >= since + TimeDelta::from_std(opts.give_up_after).unwrap_or_default() {
            remove_file(&opts.out);
            return Err(Error::unavailable(format!(
                "no valid credential for static role {:?} since {} (last error: {last_error})",
                opts.role,
                rfc3339(since)
            )));
        }
        tokio::select! {
            _ = &mut shutdown => {
                if !opts.keep {
                    remove_file(&opts.out);
                }
                return Ok(());
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

struct StaticReply {
    credential: Credential,
    generation: u64,
    next_rotation_at: DateTime<Utc>,
}

/// Takes the secrets out of the reply (its copies are wiped) into the
/// same [`Credential`] the file formats render; the file's `expires_at`
/// is when the database stops accepting the password.
fn credential(mut r: pb::StaticCredential) -> Result<StaticReply> {
    let (Some(rotated_at), Some(next), Some(valid_until)) = (
        time(&r.rotated_at),
        time(&r.next_rotation_at),
        time(&r.valid_until),
    ) else {
        r.password.zeroize();
        r.dsn.zeroize();
        return Err(Error::internal("broker reply without static-role times"));
    };
    Ok(StaticReply {
        generation: r.generation,
        next_rotation_at: next,
        credential: Credential {
            password: Password::from_secret(std::mem::take(&mut r.password)),
            dsn: Zeroizing::new(std::mem::take(&mut r.dsn)),
            lease_id: String::new(),
            kind: r.kind,
            username: r.username,
            host: r.host,
            port: r.port,
            database: r.database_name,
            issued_at: rotated_at,
            expires_at: valid_until,
            max_expires_at: valid_until,
            renewable: false,
            clock_offset: TimeDelta::zero(),
        },
    })
}
