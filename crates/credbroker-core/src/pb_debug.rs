//! Hand-written `Debug` for the generated protobuf types that carry a
//! password: prost's derive would print it to any log or panic message
//! that formats a reply. build.rs turns the derive off for these.

use std::fmt;

use crate::pb;

fn redacted(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

impl fmt::Debug for pb::Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("lease_id", &self.lease_id)
            .field("role", &self.role)
            .field("database", &self.database)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            // The DSN holds the password too.
            .field("dsn", &redacted(&self.dsn))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database_name", &self.database_name)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("max_expires_at", &self.max_expires_at)
            .field("renewable", &self.renewable)
            .field("identity", &self.identity)
            .field("state", &self.state)
            .finish()
    }
}

impl fmt::Debug for pb::StaticCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredential")
            .field("static_role", &self.static_role)
            .field("database", &self.database)
            .field("kind", &self.kind)
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("dsn", &redacted(&self.dsn))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database_name", &self.database_name)
            .field("generation", &self.generation)
            .field("rotated_at", &self.rotated_at)
            .field("next_rotation_at", &self.next_rotation_at)
            .field("valid_until", &self.valid_until)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::pb;

    #[test]
    fn a_lease_and_every_reply_holding_one_print_no_password() {
        let lease = pb::Lease {
            lease_id: "l_abc".into(),
            username: "cb_app_x".into(),
            password: "hunter2hunter2".into(),
            dsn: "postgresql://cb_app_x:hunter2hunter2@h:5432/d".into(),
            ..Default::default()
        };
        let shown = format!("{lease:?} {lease:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("l_abc") && shown.contains("<redacted>"),
            "{shown}"
        );
        let reply = tonic::Response::new(lease);
        assert!(!format!("{reply:?}").contains("hunter2"));
    }

    #[test]
    fn a_static_credential_prints_no_password() {
        let c = pb::StaticCredential {
            static_role: "orders".into(),
            username: "app_a".into(),
            password: "hunter2hunter2".into(),
            dsn: "postgresql://app_a:hunter2hunter2@h:5432/d".into(),
            ..Default::default()
        };
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("app_a") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
