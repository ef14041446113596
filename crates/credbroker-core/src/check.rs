//! `credbroker check`: everything a broker needs from its surroundings,
//! verified before it serves — like `nginx -t` or `vault operator
//! diagnose`. Certificates (expiry, chain, CRL freshness), the lease store,
//! every database (connection, the admin's privileges, a rolled-back dry
//! run of each role's grants) and the name prefix (no users with it that
//! the store does not know). Each finding is ok, a warning or an error,
//! with the fix; the SQL lives in the backends (`postgres::check`,
//! `mysql::check`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use crate::backend::finding::{Finding, Level};
use crate::config::{Config, RoleConfig};
use crate::lease::BackendKind;

/// A certificate that expires within this is a warning: renewal is due.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.count(Level::Error)
    }
    pub fn warnings(&self) -> usize {
        self.count(Level::Warning)
    }
    fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// The table `credbroker check` prints; `color` adds ANSI colours to
    /// the status column (only for a terminal).
    pub fn table(&self, color: bool) -> String {
        let width = self
            .findings
            .iter()
            .map(|f| f.scope.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!("{:<7}  {:<width$}  DETAIL\n", "STATUS", "CHECK");
        for f in &self.findings {
            let status = format!("{:<7}", f.level.as_str());
            let status = match (color, f.level) {
                (false, _) => status,
                (true, Level::Ok) => format!("\x1b[32m{status}\x1b[0m"),
                (true, Level::Warning) => format!("\x1b[33m{status}\x1b[0m"),
                (true, Level::Error) => format!("\x1b[31m{status}\x1b[0m"),
            };
            out.push_str(&format!("{status}  {:<width$}  {}\n", f.scope, f.message));
            if let Some(fix) = &f.fix {
                out.push_str(&format!("{:<7}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        out.push_str(&format!(
            "\n{} error(s), {} warning(s)\n",
            self.errors(),
            self.warnings()
        ));
        out
    }
}

/// Runs every check on a parsed config.
pub async fn run(config: &Config, config_path: &Path) -> Report {
    let mut report = Report::default();
    let f = &mut report.findings;
    f.push(Finding::ok(
        "config",
        format!(
            "{}: {} database(s), {} role(s), listen {}, name_prefix {:?}",
            config_path.display(),
            config.databases.len(),
            config.roles.len(),
            config.server.listen,
            config.server.name_prefix
        ),
    ));
    check_tls(config, f);

    // Read-only and without creating anything, so that the verdict is the
    // same with the broker serving the store or stopped.
    let label = store_label(&config.store.url.to_string());
    let store: StoreView = match tokio::time::timeout(
        Duration::from_secs(15),
        crate::store::open_to_inspect(&config.store),
    )
    .await
    {
        Ok(Ok(Some(s))) => {
            f.push(Finding::ok("store", format!("opened {label} (read-only)")));
            StoreView::Open(s)
        }
        Ok(Ok(None)) => {
            f.push(Finding::ok(
                "store",
                format!("{label} does not exist yet: `serve` creates it (no leases yet)"),
            ));
            StoreView::NotCreatedYet
        }
        Ok(Err(e)) => {
            f.push(Finding::error(
                "store",
                format!("cannot open {label}: {e}"),
                "check store.url (and store.password_file for PostgreSQL) and the file's permissions",
            ));
            StoreView::Unreadable
        }
        Err(_) => {
            f.push(Finding::error(
                "store",
                format!("no answer from {label} within 15 s"),
                "check store.url",
            ));
            StoreView::Unreadable
        }
    };

    let mut roles_of: BTreeMap<&str, Vec<&RoleConfig>> = BTreeMap::new();
    for r in config.roles.values() {
        roles_of.entry(r.database.as_str()).or_default().push(r);
    }
    for (name, db) in &config.databases {
        let roles = roles_of.remove(name.as_str()).unwrap_or_default();
        let prefix = &config.server.name_prefix;
        let (findings, prefixed) = match db.kind {
            BackendKind::Postgres => crate::backend::postgres::check(db, &roles, prefix).await,
            BackendKind::Mysql => crate::backend::mysql::check::check(db, &roles, prefix).await,
        };
        f.extend(findings);
        check_prefix(name, prefix, prefixed, &store, f).await;
    }
    check_static_roles(config, &store, f).await;
    report
}

/// What the checks read the store through.
enum StoreView {
    /// Opened read-only.
    Open(std::sync::Arc<dyn crate::store::Store>),
    /// Not there yet (`serve` creates it): no lease and no rotation is
    /// recorded, which is what the checks read then — nothing is opened
    /// or created to say so.
    NotCreatedYet,
    /// Could not be opened (an error finding says why): what needs it is
    /// not checked.
    Unreadable,
}

/// Static roles: the sealing key opens, and each role's last rotation in
/// the store is recent and did not fail.
async fn check_static_roles(config: &Config, store: &StoreView, f: &mut Vec<Finding>) {
    if config.static_roles.is_empty() {
        return;
    }
    let sealer = match crate::static_roles::Sealer::load(&config.sealing_key) {
        Ok(s) => Some(s),
        Err(e) => {
            f.push(Finding::error(
                "sealing_key",
                e.to_string(),
                "write 32 random bytes as hex (openssl rand -hex 32) where sealing_key_file points; \
                 every replica needs the same key",
            ));
            None
        }
    };
    let states = match store {
        StoreView::Open(s) => s.static_list().await.unwrap_or_default(),
        StoreView::NotCreatedYet => Vec::new(),
        StoreView::Unreadable => return,
    };
    let now = Utc::now();
    for r in config.static_roles.values() {
        let scope = format!("static_roles.{}", r.name);
        // The stored values open with this key: a replaced key (or
        // replicas with different ones) is found here, not by a reader.
        let st = states.iter().find(|s| s.role == r.name);
        let bad = match (&sealer, st) {
            (Some(k), Some(s)) => crate::static_roles::unopenable(k, s),
            _ => Vec::new(),
        };
        if !bad.is_empty() {
            for (which, e) in bad {
                let fix = match &e {
                    crate::Error::FailedPrecondition(_) => format!(
                        "put the key the values were sealed with back on every replica (sealing_key_file), \
                         or, if it was replaced on purpose, run `credbroker admin rotate --static-role {} --abandon-pending`: \
                         it abandons what cannot be opened and rotates afresh under the current key",
                        r.name
                    ),
                    _ => format!(
                        "the stored value is damaged: run `credbroker admin rotate --static-role {} --abandon-pending`",
                        r.name
                    ),
                };
                f.push(Finding::error(
                    &scope,
                    format!("the {which} password does not open with the sealing key: {e}"),
                    fix,
                ));
            }
            continue;
        }
        match st {
            None => f.push(Finding::ok(
                &scope,
                "not rotated yet: the broker rotates it at start",
            )),
            Some(s) if s.last_error.is_some() => f.push(Finding::warning(
                &scope,
                format!(
                    "the last rotation failed: {}",
                    s.last_error.as_deref().unwrap_or_default()
                ),
                "see the broker's log and the database's; the broker retries on its own",
            )),
            Some(s) if s.next_rotation_at.is_some_and(|t| t < now) => f.push(Finding::warning(
                &scope,
                format!(
                    "rotation overdue since {}",
                    s.next_rotation_at.unwrap_or(now).to_rfc3339()
                ),
                "is a broker running? it rotates at start",
            )),
            Some(s) => f.push(Finding::ok(
                &scope,
                format!(
                    "current user {} (generation {}), next rotation {}",
                    s.current.as_ref().map(|c| c.user.as_str()).unwrap_or("-"),
                    s.generation,
                    s.next_rotation_at
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default()
                ),
            )),
        }
    }
}

/// Users with our prefix that the store has no live lease for: another
/// deployment with the same prefix (whose users our orphan sweep would
/// drop), or leftovers. `prefixed` is `None` when the database could not
/// be asked: nothing is said then (the database's own error stands), never
/// an `ok` for what was not checked.
async fn check_prefix(
    db: &str,
    prefix: &str,
    prefixed: Option<Vec<String>>,
    store: &StoreView,
    f: &mut Vec<Finding>,
) {
    let scope = format!("database {db}");
    let Some(prefixed) = prefixed else { return };
    let known = match store {
        StoreView::Open(store) => store.live_among(&prefixed).await,
        // No store yet, so no lease: every prefixed user is a stranger.
        StoreView::NotCreatedYet => Ok(Default::default()),
        StoreView::Unreadable => {
            if !prefixed.is_empty() {
                f.push(Finding::warning(
                    &scope,
                    format!(
                        "{} user(s) with prefix {prefix:?} exist; without the store, cannot tell whose",
                        prefixed.len()
                    ),
                    "fix the store, then run check again",
                ));
            }
            return;
        }
    };
    let known = match known {
        Ok(k) => k,
        Err(e) => {
            f.push(Finding::error(
                "store",
                format!("cannot ask the store about users: {e}"),
                "check the store",
            ));
            return;
        }
    };
    let mut strangers: Vec<&String> = prefixed.iter().filter(|u| !known.contains(*u)).collect();
    strangers.sort();
    if strangers.is_empty() {
        let msg = match prefixed.len() {
            0 => format!("name prefix {prefix:?}: no users with it yet"),
            n => format!("name prefix {prefix:?}: {n} user(s) with it, all leased by this broker"),
        };
        f.push(Finding::ok(&scope, msg));
        return;
    }
    let shown: Vec<&str> = strangers.iter().take(5).map(|s| s.as_str()).collect();
    f.push(Finding::error(
        &scope,
        format!(
            "name prefix {prefix:?} collides: {} user(s) with it that this broker's store does not know: {}{}",
            strangers.len(),
            shown.join(", "),
            if strangers.len() > shown.len() { ", …" } else { "" }
        ),
        "give this deployment its own server.name_prefix (the orphan sweep drops prefixed users \
         it does not know), or drop these users if they are left from an old deployment",
    ));
}

fn store_label(url: &str) -> String {
    // A PostgreSQL store string never carries a password (config refuses
    // it), but keep only its hosts and database anyway.
    match crate::connstr::parse(url) {
        Ok(c) => format!(
            "postgres://{}/{}",
            c.hosts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            c.dbname.as_deref().unwrap_or("")
        ),
        Err(_) => url.to_string(),
    }
}

fn check_tls(config: &Config, f: &mut Vec<Finding>) {
    let tls = &config.tls;
    let now = Utc::now();
    let cas = match read_certs(&tls.client_ca) {
        Ok(c) if !c.is_empty() => c,
        unusable => {
            let (what, fix) = match unusable {
                Err(e) => (e.to_string(), "point tls.client_ca at a readable PEM file"),
                Ok(_) => (
                    "no certificate in it".to_string(),
                    "point tls.client_ca at the PEM file of the CA that signs client certificates",
                ),
            };
            f.push(Finding::error(
                "tls.client_ca",
                format!("{}: {what}", tls.client_ca.display()),
                fix,
            ));
            Vec::new()
        }
    };
    for ca in &cas {
        validity("tls.client_ca", &tls.client_ca, ca, now, f);
    }
    match read_certs(&tls.cert) {
        Ok(certs) if !certs.is_empty() => {
            validity("tls.cert", &tls.cert, &certs[0], now, f);
            if !cas.is_empty() {
                chain(&certs, &cas, f);
            }
        }
        Ok(_) => f.push(Finding::error(
            "tls.cert",
            format!("{}: no certificate in it", tls.cert.display()),
            "point tls.cert at the server certificate (PEM)",
        )),
        Err(e) => f.push(Finding::error(
            "tls.cert",
            format!("{}: {e}", tls.cert.display()),
            "point tls.cert at a readable PEM file",
        )),
    }
    // What `serve` does with the files: key matches, verifier builds.
    if let Err(e) = crate::server::tls::server_config(tls) {
        f.push(Finding::error(
            "tls",
            e.to_string(),
            "fix the files named; the key must belong to tls.cert",
        ));
    }
    match &tls.crl {
        Some(crl) => check_crl(crl, now, f),
        // The warning `serve` logs at every start, counted here too.
        None => f.push(Finding::warning(
            "tls.crl",
            "not set: a leaked client certificate is accepted until it expires",
            "set tls.crl to the CA's CRL (PEM); the broker reloads it when it changes",
        )),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn validity(
    scope: &str,
    path: &Path,
    der: &CertificateDer<'_>,
    now: DateTime<Utc>,
    f: &mut Vec<Finding>,
) {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => c,
        Err(e) => {
            f.push(Finding::error(
                scope,
                format!("{}: not a certificate: {e}", path.display()),
                "use a PEM certificate",
            ));
            return;
        }
    };
    let subject = cert.subject().to_string();
    let not_after = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0);
    let not_before = DateTime::from_timestamp(cert.validity().not_before.timestamp(), 0);
    let (Some(not_after), Some(not_before)) = (not_after, not_before) else {
        return;
    };
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    if not_after < now {
        f.push(Finding::error(
            scope,
            format!(
                "{} ({subject}) expired at {}",
                path.display(),
                at(not_after)
            ),
            "issue a new certificate (dev: credbroker pki dev --out DIR)",
        ));
    } else if not_before > now {
        f.push(Finding::error(
            scope,
            format!(
                "{} ({subject}) is not valid before {}",
                path.display(),
                at(not_before)
            ),
            "check this machine's clock, or wait",
        ));
    } else if (not_after - now).to_std().unwrap_or_default() < EXPIRY_WARNING {
        f.push(Finding::warning(
            scope,
            format!(
                "{} ({subject}) expires soon, at {}",
                path.display(),
                at(not_after)
            ),
            "renew it; SIGHUP makes the broker load the new one",
        ));
    } else {
        f.push(Finding::ok(
            scope,
            format!(
                "{} ({subject}) valid until {}",
                path.display(),
                at(not_after)
            ),
        ));
    }
}

/// Whether the server certificate chains to `client_ca`. Not required
/// (clients may trust another CA for the server), so only a warning.
fn chain(certs: &[CertificateDer<'static>], cas: &[CertificateDer<'static>], f: &mut Vec<Finding>) {
    crate::server::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let _ = roots.add(ca.clone());
    }
    let verifier =
        match rustls::client::WebPkiServerVerifier::builder(std::sync::Arc::new(roots)).build() {
            Ok(v) => v,
            Err(_) => return,
        };
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("static name");
    let result = rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &certs[0],
        &certs[1..],
        &name,
        &[],
        rustls_pki_types::UnixTime::now(),
    );
    match result {
        // Any other name error is about the name we made up, not the chain.
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        | Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext { .. },
        )) => f.push(Finding::ok("tls.cert", "chains to tls.client_ca")),
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
        | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            ..
        })) => {} // reported by `validity`
        Err(e) => f.push(Finding::warning(
            "tls.cert",
            format!("does not chain to tls.client_ca: {e}"),
            "fine if clients trust another CA for the server (their --ca); otherwise issue \
             tls.cert from the same CA",
        )),
    }
}

fn check_crl(path: &Path, now: DateTime<Utc>, f: &mut Vec<Finding>) {
    use crate::server::tls::{read_crls, CrlItemError};
    let crls = match read_crls(path) {
        Ok(c) => c,
        Err(e) => {
            f.push(Finding::error(
                "tls.crl",
                format!("{}: {e}", path.display()),
                "point tls.crl at a readable PEM CRL",
            ));
            return;
        }
    };
    for crl in crls {
        let crl = match crl {
            Ok(c) => c,
            Err(e) => {
                let what = match e {
                    CrlItemError::NotPem => "not a PEM CRL",
                    CrlItemError::Unparsable => "cannot parse the CRL",
                };
                f.push(Finding::error(
                    "tls.crl",
                    format!("{}: {what}", path.display()),
                    "point tls.crl at a PEM CRL",
                ));
                return;
            }
        };
        match crl.next_update {
            Some(next) if next < now => f.push(Finding::warning(
                "tls.crl",
                format!(
                    "{} is stale: its next update was due at {}",
                    path.display(),
                    next.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                "fetch a fresh CRL from the CA; the broker reloads the file within 2 s",
            )),
            _ => f.push(Finding::ok(
                "tls.crl",
                format!("{}: {} revoked certificate(s)", path.display(), crl.revoked),
            )),
        }
    }
}

#[cfg(test)]
mod crl_tests {
    use super::*;

    #[test]
    fn a_crl_is_counted_fresh_or_stale_and_a_broken_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = credbroker_testkit::pki::DevCa::generate("test ca").unwrap();
        let now = Utc::now();
        let path = dir.path().join("ca.crl");
        let findings = |pem: &[u8]| {
            std::fs::write(&path, pem).unwrap();
            let mut f = Vec::new();
            check_crl(&path, now, &mut f);
            f
        };
        let fresh = findings(ca.crl(&[7, 9]).unwrap().as_bytes());
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].level, Level::Ok);
        assert!(
            fresh[0].message.contains("2 revoked"),
            "{}",
            fresh[0].message
        );
        let stale = ca
            .crl_between(
                &[],
                now - chrono::Duration::hours(2),
                now - chrono::Duration::hours(1),
            )
            .unwrap();
        let stale = findings(stale.as_bytes());
        assert_eq!(stale[0].level, Level::Warning);
        assert!(
            stale[0].message.contains("is stale"),
            "{}",
            stale[0].message
        );
        let broken = findings(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n");
        assert_eq!(broken[0].level, Level::Error);
        assert!(
            broken[0].message.contains("cannot parse"),
            "{}",
            broken[0].message
        );
    }
}
