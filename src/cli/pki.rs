//! `credbroker pki dev --out DIR`

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::CliResult;
use credbroker_testkit::pki::{DEV_ADMIN_ID, DEV_APP_ID, DEV_OTHER_ID, DEV_P12_PASSWORD};

#[derive(clap::Subcommand)]
pub enum Command {
    /// A development CA, a server certificate for localhost, and client
    /// certificates with SPIFFE IDs (app, other, and an admin)
    Dev {
        /// Directory to write the certificates and keys into (created if
        /// missing; files in it are overwritten)
        #[arg(long, default_value = "pki")]
        out: PathBuf,
    },
}

pub fn run(cmd: Command) -> CliResult {
    let Command::Dev { out } = cmd;
    credbroker_testkit::pki::write_dev_pki(&out)?;
    let p = |f: &str| out.join(f).display().to_string();
    // Each identity with what it is for, so a first config can name them
    // and the reader knows which one to expect a refusal for.
    println!(
        "development PKI in {} (not for production: the CA key is in it)",
        out.display()
    );
    let rows = [
        (p("ca.pem"), "CA: the broker's tls.client_ca, and every client's --ca".to_string()),
        (p("ca.crl"), "an empty CRL signed by the CA (tls.crl)".to_string()),
        (
            p("server.pem"),
            format!("server certificate for localhost, 127.0.0.1, ::1 (tls.cert, key {})", p("server-key.pem")),
        ),
        (
            p("app.pem"),
            format!("client {DEV_APP_ID}: a service; name it in a role's allowed"),
        ),
        (
            p("other.pem"),
            format!("client {DEV_OTHER_ID}: another service, to see a refusal"),
        ),
        (
            p("admin.pem"),
            format!("client {DEV_ADMIN_ID}: an admin, matched by admins = [\"spiffe://credbroker.dev/dba/*\"]"),
        ),
        (
            p("admin.p12"),
            format!("the admin's certificate and key for a browser (web console); import password {DEV_P12_PASSWORD:?}"),
        ),
    ];
    let width = rows.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
    for (file, what) in rows {
        println!("  {file:<width$}  {what}");
    }
    println!("  (each client NAME.pem has its key in NAME-key.pem, mode 0600)");
    Ok(ExitCode::SUCCESS)
}
