//! The Vault-compatible API driven by real, unmodified Vault clients:
//! hvac (HashiCorp's Python client, from a venv `scripts/test.sh` makes)
//! through `tests/vault/hvac_flow.py`, and vaultrs (Rust). Credentials are
//! proved by logging in as the issued user, and proved dead after.

use std::path::{Path, PathBuf};
use std::time::Duration;

use credbroker::audit::Outcome;
use credbroker_testkit::pki::{ClientSpec, DevCa};
use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::support::{
    demo_role, login, maria_opts, maria_root, one_value, role, unique, TestBroker, APP,
};

mod deployment;
mod hvac;
mod refusals;

const OTHER: &str = "spiffe://credbroker.dev/ns/demo/other";

/// The venv's python; missing, the test fails saying how to make it.
fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vault-venv/bin/python");
    assert!(
        p.exists(),
        "the hvac venv is missing ({}): run scripts/ensure-vault-venv.sh (scripts/test.sh runs it)",
        p.display()
    );
    p
}

/// A client certificate and key on disk, as a Vault client is given them.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
}

impl Cert {
    /// One of the dev PKI's client certificates (`app`, `other`, `admin`).
    fn dev(b: &TestBroker, who: &str) -> Cert {
        Cert {
            cert: b.env.pki.join(format!("{who}.pem")),
            key: b.env.pki.join(format!("{who}-key.pem")),
        }
    }

    /// A fresh certificate from the broker's CA for `identity`.
    fn fresh(b: &TestBroker, identity: &str) -> Cert {
        Self::from_spec(b, &ClientSpec::spiffe(identity))
    }

    /// A fresh certificate from the broker's CA as `spec` says.
    fn from_spec(b: &TestBroker, spec: &ClientSpec) -> Cert {
        let ca = DevCa::load(
            &std::fs::read_to_string(b.env.pki.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(b.env.pki.join("ca-key.pem")).unwrap(),
        )
        .unwrap();
        let pair = ca.client_cert(spec).unwrap();
        let name = unique("cert");
        let cert = b.env.dir.join(format!("{name}.pem"));
        let key = b.env.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert, pair.cert_pem).unwrap();
        std::fs::write(&key, pair.key_pem).unwrap();
        Cert { cert, key }
    }
}

/// Runs one hvac step (see hvac_flow.py) as `cert`; its JSON result.
async fn hvac(b: &TestBroker, cert: &Cert, step: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vault/hvac_flow.py");
    let out = tokio::process::Command::new(python())
        .arg(script)
        .arg(vault_url(b))
        .arg(&cert.cert)
        .arg(&cert.key)
        .arg(b.env.pki.join("ca.pem"))
        .arg(step)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hvac {step} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("hvac {step} printed no JSON ({e}): {stdout}"))
}

/// `ok` of a step that must succeed.
fn ok(v: Value) -> Value {
    match v.get("ok") {
        Some(o) => o.clone(),
        None => panic!("expected success, got {v}"),
    }
}

/// The hvac exception class of a step that must fail, and its errors.
fn err(v: &Value) -> (String, String) {
    let class = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"));
    (class.to_string(), v["errors"].to_string())
}

fn vault_url(b: &TestBroker) -> String {
    format!(
        "https://127.0.0.1:{}",
        b.vault_port.expect("vault api enabled")
    )
}

async fn vault_broker(roles: &str, extra: &str) -> TestBroker {
    let mut b = TestBroker::prepare(roles).await;
    b.enable_vault_api(extra).await;
    b.start_in_process().await;
    b
}

async fn login_token(b: &TestBroker, cert: &Cert) -> String {
    let r = ok(hvac(b, cert, "login", &[]).await);
    assert_eq!(r["is_authenticated"], true, "{r}");
    r["login"]["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn lease_of(v: &Value) -> (String, String, String) {
    (
        v["lease_id"].as_str().unwrap().to_string(),
        v["data"]["username"].as_str().unwrap().to_string(),
        v["data"]["password"].as_str().unwrap().to_string(),
    )
}
