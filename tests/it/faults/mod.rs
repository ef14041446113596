//! Faults: crashes, outages, bad input, revoked certificates, abuse —
//! nothing lost, nothing left behind. Tests marked `#[ignore = "long"]` run
//! in their own step of scripts/test.sh (`cargo test -- --ignored`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use credbroker::pb;
use credbroker::pb::revoke_leases_request::Selector;
use credbroker::store::LeaseFilter;
use credbroker_testkit::pki::cert_serial;
use tonic::Code;

use crate::support::*;

mod abuse;
mod crashes;
mod crl;
mod reload;
mod synced;

fn roles() -> String {
    demo_role("ro", "1m", "10m") + &demo_role("short", "2s", "1m")
}

/// Writes a CRL revoking `who`'s dev certificate and returns its path.
fn revoke_cert(b: &TestBroker, who: &str) -> std::path::PathBuf {
    let pem = std::fs::read_to_string(b.env.pki.join(format!("{who}.pem"))).unwrap();
    let serial = cert_serial(&pem).expect("dev certificates have u64 serials");
    let crl = dev_ca(b).crl(&[serial]).unwrap();
    let path = b.env.pki.join("ca.crl");
    std::fs::write(&path, crl).unwrap();
    path
}

/// The user names of the live leases in `store` (every live state).
async fn store_usernames(store: &std::sync::Arc<dyn credbroker::store::Store>) -> BTreeSet<String> {
    store
        .list(&LeaseFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.username.to_string())
        .collect()
}

/// The store's row of lease `lease_id`, which the broker acknowledged:
/// it must be there.
async fn stored_lease(
    store: &std::sync::Arc<dyn credbroker::store::Store>,
    lease_id: &str,
) -> credbroker::lease::Lease {
    let id = credbroker::lease::LeaseId::parse(lease_id).unwrap();
    store
        .get(&id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("acknowledged lease {lease_id} missing from the store"))
}

fn with_crl(text: String, path: &std::path::Path) -> String {
    text.replace("[tls]\n", &format!("[tls]\ncrl = \"{}\"\n", path.display()))
}
