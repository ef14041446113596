//! One gate for every request (invariant 9): every control refuses on every
//! door, and each refusal is one audit record naming the door. The matrix
//! is generated from the library's own lists (`gate::Door::ALL`,
//! `gate::Control::ALL`); `attempt` matches every (control, door) pair with
//! no wildcard, so a door or a control added without its cell does not
//! compile. Each cell runs against a real broker (in-process, real mTLS on
//! every listener, a real PostgreSQL) and proves three things: the
//! request is refused with that door's code, exactly one new audit record
//! says so (`denied`, `via` = the door), and nothing was created in the
//! database.
//!
//! This file holds what the tests share: the doors of one broker (`Doors`,
//! each answering an `Answer`) and the access and lock calls. The tests
//! are one file per concern: `matrix.rs` (every control on every door, and
//! the holder door's `admin_networks`), `locks.rs` (locks on static roles,
//! issues racing `lock --revoke`, watch streams).

mod locks;
mod matrix;

pub(crate) use locks::{live_usernames, race_issues_against_lock_revoke};

use std::collections::BTreeSet;
use std::time::Duration;

use credbroker::audit::{Outcome, Record};
use credbroker::gate::{Control, Door};
use credbroker::pb;
use credbroker_testkit::pki::ClientSpec;

use crate::support::{
    admin_lock, admin_lock_with, demo_role, https, issue, role, static_read, tls_connect,
    write_client, write_two_id_client, TestBroker, APP,
};

const ADMIN2: &str = "spiffe://credbroker.dev/dba/second";

/// What a door answered: its own code (gRPC code name or HTTP status).
#[derive(Debug)]
struct Answer {
    code: String,
    text: String,
}

impl Answer {
    /// An HTTP door's answer (see `https`): its status, or "none".
    fn http((code, text): (u16, String)) -> Answer {
        Answer {
            code: match code {
                0 => "none".into(),
                c => c.to_string(),
            },
            text,
        }
    }

    fn grpc<T>(r: Result<T, tonic::Status>) -> Answer {
        match r {
            Ok(_) => Answer {
                code: "OK".into(),
                text: String::new(),
            },
            Err(s) => Answer {
                code: format!("{:?}", s.code()),
                text: s.message().to_string(),
            },
        }
    }
}

/// A broker with every door open: gRPC, the Vault API and the console.
struct Doors {
    b: TestBroker,
    console: u16,
}

impl Doors {
    async fn start(roles: &str, head: &str) -> Doors {
        Self::start_with(roles, head, "").await
    }

    /// `head`: top-level keys; `server`: keys of `[server]`.
    async fn start_with(roles: &str, head: &str, server: &str) -> Doors {
        let mut b = TestBroker::prepare(roles).await;
        b.enable_vault_api("").await;
        let console = b.enable_console().await;
        if !head.is_empty() {
            b.edit_config(|t| format!("{head}\n{t}"));
        }
        if !server.is_empty() {
            b.server_keys(server);
        }
        // More identities than the dev set: a second admin (to be locked
        // by the first) and a certificate that yields no identity.
        write_client(&b, "admin2", &ClientSpec::spiffe(ADMIN2));
        write_two_id_client(&b, "two");
        b.start_in_process().await;
        Doors { b, console }
    }

    fn vault(&self) -> u16 {
        self.b.vault_port.unwrap()
    }

    async fn vault_login(&self, who: &str) -> Result<String, Answer> {
        let a = Answer::http(
            https(
                &self.b,
                self.vault(),
                who,
                "PUT",
                "/v1/auth/cert/login",
                &[],
                "{}",
            )
            .await,
        );
        if a.code != "200" {
            return Err(a);
        }
        let body = a.text.split_once("\r\n\r\n").unwrap().1;
        // A chunked body: the JSON object is the line that starts with `{`.
        let json = body.lines().find(|l| l.starts_with('{')).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        Ok(v["auth"]["client_token"].as_str().unwrap().to_string())
    }

    async fn vault_call(
        &self,
        who: &str,
        token: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> Answer {
        Answer::http(
            https(
                &self.b,
                self.vault(),
                who,
                method,
                path,
                &[("X-Vault-Token", token)],
                body,
            )
            .await,
        )
    }

    async fn console_get(&self, who: &str) -> Answer {
        Answer::http(https(&self.b, self.console, who, "GET", "/", &[], "").await)
    }
}

/// The `Access` service as `who`.
fn access(b: &TestBroker, who: &str) -> pb::access_client::AccessClient<tonic::transport::Channel> {
    b.env.client(&b.addr, who).access().unwrap()
}

async fn access_request(
    b: &TestBroker,
    who: &str,
    role: &str,
) -> Result<tonic::Response<pb::AccessRequestInfo>, tonic::Status> {
    access(b, who)
        .request(pb::AccessRequestRequest {
            roles: vec![role.into()],
            reason: "INC-31 gate matrix".into(),
            ..Default::default()
        })
        .await
}

async fn lock_identity(b: &TestBroker, pattern: &str) {
    let locks = b
        .admin("admin")
        .await
        .list_locks(pb::ListLocksRequest {})
        .await
        .unwrap()
        .into_inner()
        .locks;
    if locks.iter().any(|l| l.value == pattern) {
        return;
    }
    admin_lock(
        b,
        pb::lock_request::Target::Identity(pattern.into()),
        "INC-25 gate matrix",
    )
    .await;
}
